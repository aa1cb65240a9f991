//! Run locks, and one writer per dataset.
//!
//! A process working on a run of a dataset (any stage's run from
//! [`Manifest::begin_run`] to [`Manifest::end_run`], a training run, a
//! `run` pipeline) holds an exclusive OS file lock (`flock(2)`; `libc`
//! rather than `File::try_lock`, which needs Rust 1.89 against the crate's
//! 1.85) on `<dataset>/.locks/run-<id>.lock`. The OS
//! drops it when the process ends, however it ends — `kill -9` included.
//! So a row still marked `running` whose lock is free was left by a
//! process that died, and one whose lock is held is live:
//! - a resume never takes over a run that another process is still
//!   writing (two `eps2v run` on one dataset, or `train --resume N` while
//!   run N trains), it says who holds it instead;
//! - the trainer can mark the training runs that dead processes left
//!   `running` as `failed` and remove the half-written checkpoints they
//!   left, which only a resume of that run removed before.
//!
//! Why not a pid in the manifest: a pid cannot tell a dead process from a
//! reused pid, nor a process on another machine sharing the folder; the
//! file lock is released by the kernel itself. Probing a lock takes it for
//! an instant, so a process that locks the same run at that very moment is
//! told it is busy (rerun); locks on network file systems are as good as
//! the file system's own (NFS v4 has them). A liveness probe
//! ([`Manifest::run_is_live`], [`Manifest::run_holder`]) creates and
//! writes nothing. The lock files stay (a few
//! bytes each): removing one could let two processes lock different files
//! under the same name.
//!
//! A run of a curation stage ([`WRITER_STAGES`]) also holds the dataset's
//! writer lock (`.locks/dataset-writer.lock`, the same kind of lock): those
//! stages change items and files and sweep temporary files they take for
//! their own leftovers, so a second one on the same folder (a `generate`
//! relaunched in another terminal) is refused, naming the first. `train`,
//! `run`'s own row, `inspect` and `sample` run alongside.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::Manifest;
use crate::error::{Error, IoContext, Result};

/// Folder of the lock files, in the dataset folder.
pub const LOCK_DIR: &str = ".locks";

/// An exclusive lock on one run, held until dropped (or the process ends),
/// with the dataset's writer lock for runs of [`WRITER_STAGES`].
#[derive(Debug)]
pub struct RunLock {
    _file: Locked,
    path: PathBuf,
    _writer: Option<Arc<Locked>>,
}

impl RunLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This run also holds the dataset's writer lock `writer` (released
    /// with the last run of the handle that holds it).
    pub(super) fn with_writer(mut self, writer: Option<Arc<Locked>>) -> Self {
        self._writer = writer;
        self
    }
}

#[cfg(not(unix))]
fn hostname() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "?".into())
}

#[cfg(unix)]
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Take a lock on `file` without waiting — exclusive to hold it, shared
/// to probe it (a shared lock needs no write access, which NFS's emulation
/// of `flock` asks of an exclusive one, and still conflicts with a
/// holder's exclusive lock): `Ok(false)` when another open file (another
/// process) holds a conflicting one.
#[cfg(unix)]
fn try_flock(file: &File, exclusive: bool) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    let mode = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: a valid open descriptor; flock has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Without `flock` every run looks free (no liveness).
#[cfg(not(unix))]
fn try_flock(_file: &File, _exclusive: bool) -> std::io::Result<bool> {
    Ok(true)
}

/// What the process holding `file`'s lock wrote in it ("pid … on …,
/// since …"), or "another process" before it has written.
fn holder(file: &mut File) -> String {
    let mut who = String::new();
    let _ = file.read_to_string(&mut who);
    match who.trim() {
        "" => "another process".into(),
        w => w.into(),
    }
}

impl Manifest {
    /// The lock file of run `id`.
    pub fn run_lock_path(&self, id: i64) -> PathBuf {
        self.root().join(LOCK_DIR).join(format!("run-{id}.lock"))
    }

    /// Lock run `id` for this process: `Ok(Err(holder))` when another
    /// process holds it (`holder`: its pid, host and start, as it wrote
    /// them).
    pub fn try_lock_run(&self, id: i64) -> Result<std::result::Result<RunLock, String>> {
        let path = self.run_lock_path(id);
        Ok(lock_file(&path)?.map(|file| RunLock {
            _file: file,
            path,
            _writer: None,
        }))
    }

    /// The dataset's writer lock for a run of `stage`, shared by every run
    /// of this handle that holds it: `None` for stages that may run
    /// alongside the curation stages ([`WRITER_STAGES`]), else the lock or
    /// an error naming the process that holds it.
    pub(super) fn writer_lock(&self, stage: &str) -> Result<Option<Arc<Locked>>> {
        if !WRITER_STAGES.contains(&stage) {
            return Ok(None);
        }
        if let Some(held) = self.writer.borrow().upgrade() {
            return Ok(Some(held));
        }
        let path = self.root().join(LOCK_DIR).join(WRITER_LOCK);
        match lock_file(&path)? {
            Ok(file) => {
                let file = Arc::new(file);
                *self.writer.borrow_mut() = Arc::downgrade(&file);
                Ok(Some(file))
            }
            Err(holder) => Err(Error::config(format!(
                "{}: another eps2v process is writing this dataset ({holder}); wait for it to finish or stop it (Ctrl-C), then rerun `{stage}`. Only one of import, generate, caption, dedupe, filter, bucket, export and merge writes a dataset at a time; inspect, sample and train can run alongside",
                self.root().display()
            ))),
        }
    }
}

/// The writer lock of a dataset read by another one's `manifest merge`.
#[derive(Debug)]
pub struct ShardLock {
    _held: Option<Arc<Locked>>,
}

impl Manifest {
    /// Hold this dataset's writer lock while `manifest merge` copies it
    /// into another (a `generate` requeued on it meanwhile is refused, and
    /// nothing changes between the file list and the rows), or an error
    /// naming the process that writes it. A folder where no lock file can
    /// be made (a read-only copy) has no writer: not held.
    pub fn lock_for_reading(&self) -> Result<ShardLock> {
        match self.writer_lock("merge") {
            Ok(held) => Ok(ShardLock { _held: held }),
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                Ok(ShardLock { _held: None })
            }
            Err(e) => Err(e),
        }
    }
}

/// Stages that change the dataset's items and files, or sweep temporary
/// files they assume are their own: one of them at a time per dataset
/// ([`LOCK_DIR`]/[`WRITER_LOCK`]). A second `generate` started on a folder
/// that one is filling would otherwise sweep the first one's half-written
/// images and render the same planned rows.
pub const WRITER_STAGES: &[&str] = &[
    "import", "generate", "caption", "dedupe", "filter", "bucket", "export", "merge",
];

/// The writer lock's file in [`LOCK_DIR`].
pub const WRITER_LOCK: &str = "dataset-writer.lock";

/// `eps2v run`'s lock file: one pipeline per dataset at a time.
pub const PIPELINE_LOCK: &str = "pipeline.lock";

/// The held pipeline lock ([`Manifest::pipeline_lock`]); dropping it
/// releases it.
pub struct PipelineLock {
    _held: Locked,
}

/// A lock file this process holds; the lock goes when it is dropped.
#[derive(Debug)]
pub(super) struct Locked {
    file: File,
    key: Option<FileKey>,
}

impl Drop for Locked {
    fn drop(&mut self) {
        // Forgotten before the descriptor closes (the field is dropped
        // after this): a thread that finds the lock still taken in between
        // waits for it (see `lock_file`).
        if let Some(key) = self.key {
            held_here().remove(&key);
        }
    }
}

/// A file's identity (device, inode): the same lock file however its
/// dataset's path is spelled.
type FileKey = (u64, u64);

#[cfg(unix)]
fn file_key(file: &File) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_key(_file: &File) -> Option<FileKey> {
    None
}

/// The lock files this process holds now.
fn held_here() -> std::sync::MutexGuard<'static, BTreeSet<FileKey>> {
    static HELD: Mutex<BTreeSet<FileKey>> = Mutex::new(BTreeSet::new());
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a lock released by this process may still look taken: a child
/// process this one is starting (`Command::spawn` in another thread)
/// holds a copy of every descriptor from its fork to its exec, and
/// `flock` locks belong to the open file, not to the descriptor.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a lock found taken, whose file says `who` holds it, was
/// released by this process: it names this process and no handle here
/// holds it, so only a child started by another thread (between its fork
/// and its exec) still has it, for an instant. A live handle of this
/// process counts as a holder, as another process would.
fn released_here(who: &str, key: Option<FileKey>) -> bool {
    who.starts_with(&format!("{},", this_process()))
        && key.is_some_and(|k| !held_here().contains(&k))
}

/// How a lock file names this process: "pid … on host".
fn this_process() -> String {
    format!("pid {} on {}", std::process::id(), hostname())
}

/// Take `file`'s lock (exclusive to hold it, shared to probe it):
/// `Ok(None)` when taken, `Ok(Some(holder))` when another process — or a
/// live handle of this one — holds it. A lock [`released_here`] is waited
/// for, up to [`RELEASE_WAIT`].
fn flock_or_holder(file: &mut File, path: &Path, exclusive: bool) -> Result<Option<String>> {
    let key = file_key(file);
    let started = std::time::Instant::now();
    loop {
        if try_flock(file, exclusive).at(path)? {
            return Ok(None);
        }
        let who = holder(file);
        if !released_here(&who, key) || started.elapsed() > RELEASE_WAIT {
            return Ok(Some(who));
        }
        file.seek(SeekFrom::Start(0)).at(path)?;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Create (if needed) and take `path`'s exclusive lock without waiting,
/// writing who holds it: `Ok(Err(holder))` when another process — or
/// another handle of this one — does.
fn lock_file(path: &Path) -> Result<std::result::Result<Locked, String>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .at(path)?;
    if let Some(who) = flock_or_holder(&mut file, path, true)? {
        return Ok(Err(who));
    }
    let key = file_key(&file);
    if let Some(key) = key {
        held_here().insert(key);
    }
    let locked = Locked { file, key };
    let mut file = &locked.file;
    file.set_len(0).at(path)?;
    file.seek(SeekFrom::Start(0)).at(path)?;
    file.write_all(format!("{}, since {}", this_process(), super::now()).as_bytes())
        .at(path)?;
    Ok(Ok(locked))
}

impl Manifest {
    /// Take the dataset's pipeline lock for this `eps2v run`, or an error
    /// naming the process that holds it. Taken before the pipeline row is
    /// chosen: two `run`s on one dataset (a scheduler's retry) would each
    /// pick a row, and the loser's empty row could later be reopened over
    /// the winner's progress.
    pub fn pipeline_lock(&self) -> Result<PipelineLock> {
        let path = self.root().join(LOCK_DIR).join(PIPELINE_LOCK);
        match lock_file(&path)? {
            Ok(held) => Ok(PipelineLock { _held: held }),
            Err(holder) => Err(Error::config(format!(
                "{}: another `eps2v run` is running on this dataset ({holder}); wait for it to finish or stop it (Ctrl-C), then rerun",
                self.root().display()
            ))),
        }
    }

    /// Lock run `id` for this process, or an error naming the process that
    /// holds it and what to do. The lock of a run this handle began
    /// ([`Manifest::begin_run`]) is handed over: the caller holds it from
    /// then on.
    pub fn lock_run(&self, id: i64) -> Result<RunLock> {
        if let Some(lock) = self.held.borrow_mut().remove(&id) {
            return Ok(lock);
        }
        self.try_lock_run(id)?.map_err(|holder| {
            Error::config(format!(
                "{}: run {id} is in use by another eps2v process ({holder}); wait for it to finish or stop it (Ctrl-C), then rerun",
                self.root().display()
            ))
        })
    }

    /// Whether another process holds run `id`'s lock now.
    pub fn run_is_live(&self, id: i64) -> Result<bool> {
        Ok(self.run_holder(id)?.is_some())
    }

    /// Who holds run `id`'s lock, without creating or writing anything
    /// (for read-only views such as `inspect`): `None` when no process
    /// does (or the run never had a lock file), else what the holder wrote.
    pub fn run_holder(&self, id: i64) -> Result<Option<String>> {
        let path = self.run_lock_path(id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        flock_or_holder(&mut file, &path, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_busy_until_dropped_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::init(dir.path()).unwrap();
        assert!(!m.run_is_live(7).unwrap());
        let lock = m.lock_run(7).unwrap();
        assert!(lock.path().ends_with(".locks/run-7.lock"));
        // Another open file description of the same file (as another
        // process would have) cannot take it.
        assert!(m.run_is_live(7).unwrap());
        assert!(!m.run_is_live(8).unwrap());
        let err = m.lock_run(7).unwrap_err().to_string();
        assert!(
            err.contains("run 7 is in use")
                && err.contains(&format!("pid {}", std::process::id()))
                && err.contains("rerun"),
            "{err}"
        );
        let ro = Manifest::open_read_only(dir.path()).unwrap();
        let holder = ro.run_holder(7).unwrap().unwrap();
        assert!(
            holder.starts_with(&format!("pid {} on ", std::process::id())),
            "{holder}"
        );
        assert_eq!(ro.run_holder(9).unwrap(), None, "no lock file");
        drop(lock);
        assert_eq!(ro.run_holder(7).unwrap(), None);
        assert!(!m.run_is_live(7).unwrap());
        let again = m.lock_run(7).unwrap();
        drop(again);
    }

    /// Every stage's run is locked from `begin_run` to `end_run`; a new run
    /// of a stage marks the rows of that stage that dead processes left
    /// `running` as failed, and leaves live ones alone. (Stages outside
    /// [`WRITER_STAGES`], so that two handles can run them at once.)
    #[test]
    fn stage_runs_are_locked_and_dead_ones_tidied_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::init(dir.path()).unwrap();
        let other = Manifest::open(dir.path()).unwrap();
        let none = serde_json::json!({});
        let status = |id: i64| -> String {
            m.conn()
                .query_row("SELECT status FROM runs WHERE id = ?1", [id], |r| r.get(0))
                .unwrap()
        };
        let dead = m.begin_run("probe", &none).unwrap();
        assert!(other.run_is_live(dead).unwrap(), "locked by begin_run");
        drop(m.lock_run(dead).unwrap()); // its process died
        assert!(!other.run_is_live(dead).unwrap());
        // Live in another handle (as another process would be).
        let live = other.begin_run("probe", &none).unwrap();
        let unrelated = {
            let id = m.begin_run("other", &none).unwrap();
            drop(m.lock_run(id).unwrap());
            id
        };
        let next = m.begin_run("probe", &none).unwrap();
        assert_eq!(status(dead), "failed");
        let note: String = m
            .conn()
            .query_row("SELECT counts_json FROM runs WHERE id = ?1", [dead], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&note).unwrap()["marked_failed_by"],
            live,
            "the first probe run after it found it dead"
        );
        assert_eq!(status(live), "running");
        assert_eq!(status(next), "running");
        assert_eq!(status(unrelated), "running", "another stage's row");
        m.end_run(next, true, &none).unwrap();
        assert!(!other.run_is_live(next).unwrap(), "released by end_run");
        assert!(m.run_is_live(live).unwrap());
    }

    /// A lock this process released is free to take again at once, and a
    /// probe finds it free, also while another thread starts child
    /// processes (each holds a copy of the lock's descriptor from its fork
    /// to its exec). Taking the writer lock between a test's stages, and
    /// probing a run that had just ended, failed now and then while
    /// parallel tests started processes.
    #[cfg(unix)]
    #[test]
    fn a_lock_released_while_children_start_is_free_again() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::init(dir.path()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let spawner = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut started = 0;
                while !stop.load(Ordering::Relaxed) {
                    std::process::Command::new("true").status().unwrap();
                    started += 1;
                }
                started
            }
        });
        let t = std::time::Instant::now();
        let mut taken = 0;
        let mut refused = Vec::new();
        while t.elapsed() < std::time::Duration::from_millis(500) {
            match m.writer_lock("import") {
                Ok(w) => {
                    assert!(w.is_some());
                    taken += 1;
                }
                Err(e) => refused.push(e.to_string()),
            }
            // A probe of a run this process ended says it is not live.
            drop(m.lock_run(7).unwrap());
            if m.run_is_live(7).unwrap() {
                refused.push("run 7 looked live after its lock was dropped".into());
            }
        }
        stop.store(true, Ordering::Relaxed);
        let started = spawner.join().unwrap();
        assert!(
            started > 0 && taken > 0,
            "{started} children, {taken} taken"
        );
        assert!(
            refused.is_empty(),
            "{} refused: {}",
            refused.len(),
            refused[0]
        );
        // Held by another handle of this process: refused at once.
        let held = m.writer_lock("import").unwrap();
        let other = Manifest::open(dir.path()).unwrap();
        let t = std::time::Instant::now();
        assert!(other.writer_lock("import").is_err());
        assert!(t.elapsed() < RELEASE_WAIT, "no wait for a live holder");
        drop(held);
        assert!(other.writer_lock("import").unwrap().is_some());
    }

    /// One curation writer per dataset: while a handle (a process) runs a
    /// writer stage, another handle's writer stage is refused, naming it,
    /// and leaves no row; stages outside the list run alongside; runs of
    /// one handle share the lock, which goes with the last of them.
    /// `manifest merge` holds a shard's writer lock while it copies it:
    /// refused while a curation stage writes it, a curation stage refused
    /// meanwhile; a shard whose folder takes no lock file is read as is.
    #[test]
    fn a_merged_shard_is_locked_against_writers() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::init(dir.path()).unwrap();
        let other = Manifest::open(dir.path()).unwrap();
        let held = m.lock_for_reading().unwrap();
        let e = other
            .begin_run("generate", &serde_json::json!({}))
            .unwrap_err();
        assert!(
            e.to_string().contains("another eps2v process is writing"),
            "{e}"
        );
        drop(held);
        let id = other.begin_run("generate", &serde_json::json!({})).unwrap();
        let e = m.lock_for_reading().unwrap_err().to_string();
        assert!(e.contains("another eps2v process is writing"), "{e}");
        other.end_run(id, true, &serde_json::json!({})).unwrap();
        drop(other);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let locks = dir.path().join(LOCK_DIR);
            std::fs::remove_file(locks.join(WRITER_LOCK)).unwrap();
            std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o555)).unwrap();
            // Root writes anywhere: then the lock is simply taken.
            let r = m.lock_for_reading();
            std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o755)).unwrap();
            r.unwrap();
        }
    }

    #[test]
    fn one_curation_stage_writes_a_dataset_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::init(dir.path()).unwrap();
        let other = Manifest::open(dir.path()).unwrap();
        let none = serde_json::json!({});
        let rows = || -> i64 {
            m.conn()
                .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
                .unwrap()
        };
        let a = m.begin_run("generate", &none).unwrap();
        let b = m.begin_run("caption", &none).unwrap();
        let before = rows();
        let e = other.begin_run("import", &none).unwrap_err().to_string();
        assert!(
            e.contains("another eps2v process is writing this dataset")
                && e.contains(&format!("pid {}", std::process::id()))
                && e.contains("rerun `import`"),
            "{e}"
        );
        assert_eq!(rows(), before, "a refused run leaves no row");
        let t = other.begin_run("train", &none).unwrap();
        m.end_run(a, true, &none).unwrap();
        assert!(
            other.begin_run("export", &none).is_err(),
            "b still holds it"
        );
        m.end_run(b, true, &none).unwrap();
        let c = other.begin_run("export", &none).unwrap();
        assert!(m.begin_run("bucket", &none).is_err());
        other.end_run(c, true, &none).unwrap();
        other.end_run(t, true, &none).unwrap();
        let d = m.begin_run("bucket", &none).unwrap();
        m.end_run(d, true, &none).unwrap();
    }
}
