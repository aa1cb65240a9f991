//! `eps2v train` and `eps2v merge` through the binary: SIGTERM mid-run
//! then `--resume` gives the same weights as an uninterrupted run; a full
//! disk while saving keeps the previous checkpoint; `ckpt info` reports what
//! was exported; merge and its sweep write what they say; bad input exits 2.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use eps2v::models::sdxl::checkpoint::Checkpoint;
use eps2v::train::testkit::dataset;
use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps2v")
}

fn train_args<'a>(ds: &'a str, ck: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "--json",
        "train",
        ds,
        "--model",
        ck,
        "--blocks",
        "out,OUT08",
        "--steps",
        steps,
        "--batch-size",
        "2",
        "--lr",
        "1e-4",
        "--val-fraction",
        "0",
        "--eval-every",
        "0",
        "--eval-seeds",
        "0",
        "--eval-steps",
        "2",
        "--eval-cfg",
        "1",
        "--save-dtype",
        "f32",
        "--out",
        out,
    ]
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn unet(p: &Path) -> Vec<Vec<f32>> {
    let ck = Checkpoint::open(p).unwrap();
    ck.entries()
        .keys()
        .filter(|k| k.starts_with("model.diffusion_model."))
        .map(|k| {
            ck.tensor(k, DType::F32, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// Run `eps2v` with `args` and stop it with SIGTERM once its new run (a
/// folder of `runs` not in `earlier`) has logged a few steps; its output,
/// after checking that it exited 130 (stopped).
fn stopped_after_a_few_steps(args: &[&str], runs: &Path, earlier: &[std::path::PathBuf]) -> Output {
    let child = Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        // Lines in the new run's log (header, the step-0 evaluation, steps).
        let logged = std::fs::read_dir(runs)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| !earlier.contains(&e.path()))
                    .filter_map(|e| std::fs::read_to_string(e.path().join("log.csv")).ok())
                    .map(|s| s.lines().count())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        if logged >= 6 || t0.elapsed() > Duration::from_secs(300) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn sigterm_then_resume_equals_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = dataset(d.path()).unwrap();
    let (ds, ck) = (ds.to_str().unwrap(), ck.to_str().unwrap());
    let straight = d.path().join("straight.safetensors");
    let o = Command::new(bin())
        .args(train_args(ds, ck, straight.to_str().unwrap(), "150"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Same run, stopped by SIGTERM once a few steps are logged.
    let resumed = d.path().join("resumed.safetensors");
    let runs = Path::new(ds).join("runs");
    let earlier: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let o = stopped_after_a_few_steps(
        &train_args(ds, ck, resumed.to_str().unwrap(), "150"),
        &runs,
        &earlier,
    );
    let r = json(&o);
    assert_eq!(r["interrupted"], true);
    let stopped_at = r["steps"].as_u64().unwrap();
    assert!(stopped_at < 150, "stopped at {stopped_at}");
    assert!(!resumed.exists());
    let id = r["run_id"].as_i64().unwrap().to_string();
    // `--resume` alone finds the stopped run of this config.
    let mut args = train_args(ds, ck, resumed.to_str().unwrap(), "150");
    args.push("--resume");
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["run_id"].as_i64().unwrap().to_string(), id);
    assert_eq!(json(&o)["steps"], 150);
    assert_eq!(json(&o)["resumed_at"], stopped_at);
    assert!(unet(&straight) == unet(&resumed), "resumed weights differ");
    // Nothing left to resume: `--resume` alone says so.
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no stopped training run with a checkpoint to resume"),
        "{err}"
    );
    // Resuming with another config names the field.
    let mut args = train_args(ds, ck, resumed.to_str().unwrap(), "151");
    args.extend(["--resume", &id]);
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("steps: 150 in the saved run, 151 now"),
        "{err}"
    );
    // ckpt info reports what was exported.
    let o = Command::new(bin())
        .args(["--json", "ckpt", "info", straight.to_str().unwrap()])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && info.contains("\"ztsnr\": true"),
        "{info}"
    );
}

/// A save that fails as on a full disk (`ulimit -f`) while a run goes on
/// from its checkpoint: the run stops with exit 2, its earlier checkpoints
/// are intact, no temp file is left, and it resumes from them.
#[test]
fn a_full_disk_while_saving_keeps_the_previous_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = dataset(d.path()).unwrap();
    let out = d.path().join("x.safetensors");
    let mut args = train_args(
        ds.to_str().unwrap(),
        ck.to_str().unwrap(),
        out.to_str().unwrap(),
        "150",
    );
    args.extend(["--save-every", "4"]);
    // Stopped part-way: its stop checkpoint is the one to keep.
    let runs = ds.join("runs");
    let o = stopped_after_a_few_steps(&args, &runs, &[]);
    let id = json(&o)["run_id"].as_i64().unwrap().to_string();
    let ckpts = runs.join(&id).join("checkpoints");
    let saved: Vec<_> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!saved.is_empty());
    // Resumed under a file-size limit (ulimit -f, 512-byte blocks) above
    // every other file of the dataset but below one checkpoint: its next
    // save fails as on a full disk.
    let mut biggest_other = 0u64;
    let mut ckpt_size = u64::MAX;
    for e in walk(&ds) {
        let len = std::fs::metadata(&e).unwrap().len();
        if e.to_string_lossy().contains("/checkpoints/") {
            ckpt_size = ckpt_size.min(len);
        } else {
            biggest_other = biggest_other.max(len);
        }
    }
    assert!(biggest_other < ckpt_size, "{biggest_other} vs {ckpt_size}");
    let blocks = (biggest_other + ckpt_size) / 2 / 512;
    args.extend(["--resume", &id]);
    let cmd = format!(
        "ulimit -f {blocks}; exec {} {}",
        bin(),
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let o = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("too large") || err.contains("File too large"),
        "{err}"
    );
    // The run's checkpoints are intact and loadable; no temp file is left.
    for e in std::fs::read_dir(&ckpts).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp"), "{name}");
        eps2v::train::state::load(&p, &Device::Cpu).unwrap();
    }
    for p in &saved {
        assert!(p.is_file(), "{} went", p.display());
    }
    assert!(!out.exists());
    // Room again: the run resumes from them and ends.
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["steps"], 150);
    assert!(!unet(&out).is_empty());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn merge_and_sweep_through_the_binary() {
    let d = tempfile::tempdir().unwrap();
    let (ds, ck) = dataset(d.path()).unwrap();
    let v = d.path().join("v.safetensors");
    let o = Command::new(bin())
        .args(train_args(
            ds.to_str().unwrap(),
            ck.to_str().unwrap(),
            v.to_str().unwrap(),
            "2",
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = d.path().join("m.safetensors");
    // A v + ZTSNR model and an eps one: which markers the merge carries
    // must be said.
    let o = Command::new(bin())
        .args(["merge", v.to_str().unwrap(), ck.to_str().unwrap(), "--out"])
        .arg(&m)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pass --markers a or --markers b"));
    assert!(!m.exists());
    let o = Command::new(bin())
        .args([
            "--json",
            "merge",
            v.to_str().unwrap(),
            ck.to_str().unwrap(),
            "--markers",
            "a",
            "--alpha",
            "0.5",
            "--blocks",
            "OUT08=0",
            "--out",
            m.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&o);
    assert_eq!(
        (r["v_pred"].as_bool(), r["ztsnr"].as_bool()),
        (Some(true), Some(true))
    );
    let sweep = d.path().join("sweep").join("s.safetensors");
    let run_sweep = || {
        let o = Command::new(bin())
            .args([
                "--json",
                "merge",
                v.to_str().unwrap(),
                ck.to_str().unwrap(),
                "--markers",
                "a",
                "--sweep",
                "0,0.5,1",
                "--eval-prompt",
                "red circle",
                "--eval-seeds",
                "0",
                "--eval-steps",
                "2",
                // No --eval-size: model A's own (the tiny config's 64×64).
                "--out",
                sweep.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o
    };
    let o = run_sweep();
    let r = json(&o);
    let points = r["points"].as_array().unwrap();
    assert_eq!(points.len(), 3);
    for p in points {
        assert!(Path::new(p["out"].as_str().unwrap()).is_file());
        assert!(Path::new(p["grid"].as_str().unwrap()).is_file());
        let s = p["retention"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&s), "{s}");
    }
    assert!(sweep.with_file_name("s-sweep.json").is_file());
    // Run again, it keeps what it scored while the files are the ones it
    // wrote: the same report, nothing rewritten; a merge changed since is
    // made and scored again.
    let mtime = |p: &str| std::fs::metadata(p).unwrap().modified().unwrap();
    let outs: Vec<String> = points
        .iter()
        .map(|p| p["out"].as_str().unwrap().to_string())
        .collect();
    let before: Vec<_> = outs.iter().map(|p| mtime(p)).collect();
    let again = json(&run_sweep());
    assert_eq!(again["points"], r["points"]);
    assert_eq!(outs.iter().map(|p| mtime(p)).collect::<Vec<_>>(), before);
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(&outs[1])
        .unwrap()
        .set_modified(old)
        .unwrap();
    let third = json(&run_sweep());
    assert_eq!(third["points"], r["points"]);
    assert_ne!(mtime(&outs[1]), old, "the changed merge was made again");
    assert_eq!(mtime(&outs[0]), before[0]);
    // Ctrl-C during a long sweep: it stops after the merge in hand, keeps
    // the merges written, writes no summary, and exits 130.
    let long = d.path().join("long").join("l.safetensors");
    let alphas: Vec<String> = (0..=40).map(|k| format!("{}", k as f64 / 20.0)).collect();
    let child = Command::new(bin())
        .args([
            "merge",
            v.to_str().unwrap(),
            ck.to_str().unwrap(),
            "--markers",
            "a",
            "--sweep",
            &alphas.join(","),
            "--eval-prompt",
            "red circle",
            "--eval-seeds",
            "0",
            "--eval-steps",
            "10",
            "--out",
            long.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = long.with_file_name("l-a0.safetensors");
    let t0 = Instant::now();
    while !first.is_file() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("merge sweep: stopped after") && err.contains("of 41 merges"),
        "{err}"
    );
    let written = std::fs::read_dir(long.parent().unwrap())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("safetensors".as_ref()))
        .count();
    assert!((1..41).contains(&written), "{written} merges written");
    assert!(!long.with_file_name("l-sweep.json").exists());
    // Bad input: blocks that are not UNet blocks, a missing model.
    let o = Command::new(bin())
        .args([
            "merge",
            v.to_str().unwrap(),
            ck.to_str().unwrap(),
            "--blocks",
            "VAE=1",
            "--out",
            m.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(bin())
        .args([
            "merge",
            "nope.safetensors",
            ck.to_str().unwrap(),
            "--out",
            m.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.safetensors"));
    // Each bad sweep setting and side is named by its flag, and found
    // before any image renders or merge is written.
    let bad = d.path().join("bad").join("b.safetensors");
    let own_output = bad.with_file_name("b-a1.safetensors");
    for (flags, says) in [
        (
            vec!["--reference", own_output.to_str().unwrap()],
            "--reference",
        ),
        (vec!["--eval-steps", "0"], "--eval-steps"),
        (vec!["--eval-size", "60x60"], "--eval-size"),
        (vec!["--eval-cfg", "0"], "--eval-cfg"),
        (vec!["--te", "c"], "--te \"c\": use a or b"),
    ] {
        let mut args = vec![
            "merge",
            v.to_str().unwrap(),
            ck.to_str().unwrap(),
            "--markers",
            "a",
            "--sweep",
            "0,1",
            "--eval-prompt",
            "red circle",
            "--out",
            bad.to_str().unwrap(),
        ];
        args.extend(flags);
        let o = Command::new(bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{says}: {err}");
        assert!(
            !bad.parent().unwrap().exists()
                || std::fs::read_dir(bad.parent().unwrap()).unwrap().count() == 0
        );
    }
    // A merge that cannot be made fails (the first merge is made before
    // the reference renders).
    let o = Command::new(bin())
        .args([
            "merge",
            v.to_str().unwrap(),
            ck.to_str().unwrap(),
            "--markers",
            "a",
            "--diff",
            "missing-c.safetensors",
            "--sweep",
            "0,1",
            "--eval-prompt",
            "red circle",
            "--out",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing-c.safetensors"));
    // Sweep settings without --sweep, and --alpha with it, are refused
    // (they were ignored without a word).
    for flags in [
        vec!["--eval-steps", "3"],
        vec!["--sweep", "0,1", "--alpha", "0.3"],
    ] {
        let mut args = vec!["merge", v.to_str().unwrap(), ck.to_str().unwrap()];
        args.extend(["--markers", "a", "--out", bad.to_str().unwrap()]);
        args.extend(flags);
        let o = Command::new(bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("--sweep"), "{err}");
    }
}

/// The base that generated the dataset, trained to the prediction it
/// already has (`--objective eps` on the eps toy), converts nothing: said
/// before anything else. The conversion itself is not warned about.
#[test]
fn training_the_generator_to_its_own_prediction_is_warned() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    let ds = ds.to_str().unwrap();
    let o = Command::new(bin())
        .args(["--json", "generate", ds, "--count", "4", "--steps", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let train = |objective: &str| {
        let out = d.path().join(format!("{objective}.safetensors"));
        Command::new(bin())
            .args([
                "train",
                ds,
                "--objective",
                objective,
                "--steps",
                "1",
                "--eval-every",
                "0",
                "--eval-steps",
                "1",
                "--val-fraction",
                "0",
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    // The warning comes before the data is looked at (unbucketed here:
    // the command then stops on that, exit 2).
    let o = train("eps");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rendered this dataset as eps (the generate plan's prediction)")
            && err.contains("converts nothing"),
        "{err}"
    );
    assert!(err.contains("nothing to train on"), "{err}");
    let o = train("v");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("converts nothing") && err.contains("nothing to train on"),
        "{err}"
    );
    // What the plan rendered decides, not the file's markers: the eps toy
    // rendered as v (`--prediction v`) warns for v and not for eps.
    std::fs::remove_dir_all(ds).unwrap();
    let o = Command::new(bin())
        .args(["--json", "generate", ds, "--count", "2", "--steps", "2"])
        .args(["--prediction", "v", "--ztsnr"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&train("v").stderr).into_owned();
    assert!(err.contains("rendered this dataset as v"), "{err}");
    let err = String::from_utf8_lossy(&train("eps").stderr).into_owned();
    assert!(!err.contains("converts nothing"), "{err}");
}
