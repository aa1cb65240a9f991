//! `eps2v prompts`, `eps2v generate` and `eps2v manifest merge` through the
//! binary, on a seeded random tiny SDXL checkpoint (64×64, 2–3 steps):
//! `kill -9` or Ctrl-C mid-way then rerun gives exactly the uninterrupted
//! dataset (Ctrl-C: exit 130, the run ended, a second Ctrl-C quits at once);
//! the shipped Slurm script run as a 3-task array under a fake `SLURM_*`
//! environment, merged, equals a single run; the Kubernetes Job uses only
//! flags that exist; bad input exits 2 with nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use eps2v::manifest::Manifest;
use eps2v::pipeline::tiny::{write_random_checkpoint, TinyOptions};
use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps2v")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// (tempdir, tiny eps checkpoint), written once per test binary.
fn checkpoint() -> &'static (tempfile::TempDir, PathBuf) {
    static CK: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    CK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny_base.safetensors");
        write_random_checkpoint(
            &p,
            TinyOptions {
                seed: 11,
                v_pred_ztsnr: false,
            },
        )
        .unwrap();
        (dir, p)
    })
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .output()
        .unwrap()
}

fn generate_args<'a>(dir: &'a str, model: &'a str, count: &'a str) -> Vec<&'a str> {
    vec![
        "generate", dir, "--model", model, "--count", count, "--size", "64x64", "--steps", "2",
        "--seed", "5", "--batch", "2",
    ]
}

/// `(idx, seed, state, sha256)` of every plan row, and the bytes of each image.
fn dataset(dir: &Path) -> Vec<(i64, i64, String, String, Vec<u8>)> {
    let m = Manifest::open_read_only(dir).unwrap();
    let mut st = m
        .conn()
        .prepare(
            "SELECT g.idx, g.seed, g.state, i.sha256, i.path FROM gen_items g
             LEFT JOIN items i ON i.id = g.item_id ORDER BY g.idx",
        )
        .unwrap();
    let rows: Vec<(i64, i64, String, String, String)> = st
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows.into_iter()
        .map(|(i, s, st, sha, path)| (i, s, st, sha, std::fs::read(dir.join(path)).unwrap()))
        .collect()
}

fn count(dir: &Path, sql: &str) -> i64 {
    Manifest::open_read_only(dir)
        .unwrap()
        .conn()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[test]
fn prompts_prints_seeded_and_combinatorial_prompts() {
    let a = run(&["prompts", "1girl", "--count", "4", "--seed", "9"]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let text = String::from_utf8(a.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().all(|l| l.contains("1girl, solo, ")), "{text}");
    // The same seed gives the same prompts, from the file on disk too.
    let file = root().join("fixtures/prompts/1girl/template.txt");
    let b = run(&[
        "prompts",
        file.to_str().unwrap(),
        "--count",
        "4",
        "--seed",
        "9",
    ]);
    assert_eq!(String::from_utf8(b.stdout).unwrap(), text);
    let c = run(&[
        "--json",
        "prompts",
        "{red|blue} {circle|square}, {2$$ and $$a|b}",
        "--combinatorial",
        "--count",
        "100",
    ]);
    let v: Value = serde_json::from_slice(&c.stdout).unwrap();
    let got: Vec<&str> = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        [
            "red circle, a and b",
            "red circle, b and a",
            "red square, a and b",
            "red square, b and a",
            "blue circle, a and b",
            "blue circle, b and a",
            "blue square, a and b",
            "blue square, b and a"
        ]
    );
    // Fewer combinations than --count: said on stderr, not silently.
    let note = String::from_utf8_lossy(&c.stderr);
    assert!(
        note.contains("only 8 distinct combinations; printed 8 of the 100 asked for"),
        "{note}"
    );
    // --raw keeps the exact expansion; by default empty pieces are tidied away.
    let raw = run(&["prompts", "{|x},\n  b", "--combinatorial", "--raw"]);
    assert_eq!(String::from_utf8(raw.stdout).unwrap(), ",\n  b\nx,\n  b\n");
    let tidy = run(&["prompts", "{|x},\n  b", "--combinatorial"]);
    assert_eq!(String::from_utf8(tidy.stdout).unwrap(), "b\nx, b\n");
    // Tidied, the list is what generate plans: each prompt once (", a" and
    // "a, " are both "a").
    let distinct = run(&["prompts", "{|a}, {|a}", "--combinatorial"]);
    assert_eq!(String::from_utf8(distinct.stdout).unwrap(), "\na\na, a\n");
    // Errors name the place and exit 2.
    let e = run(&["prompts", "a, {b|c", "--count", "1"]);
    assert_eq!(e.status.code(), Some(2));
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        msg.contains("template (command line):1:4: unbalanced `{`"),
        "{msg}"
    );
    let e = run(&["prompts", "__nope__"]);
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("no wildcard folder was given"));
}

#[test]
fn kill9_then_rerun_gives_exactly_the_uninterrupted_dataset() {
    interrupt_then_rerun(false);
}

/// Ctrl-C (SIGINT): the batches in flight are kept, the run row ends
/// `failed` with `interrupted` and the rows left, the exit code is 130, and
/// a rerun renders exactly the rest.
#[test]
fn ctrl_c_keeps_the_rendered_batches_and_a_rerun_renders_the_rest() {
    interrupt_then_rerun(true);
}

/// Stop `generate` once two images are committed, with SIGKILL or (with
/// `ctrl_c`) SIGINT, rerun it, and compare with an uninterrupted run.
fn interrupt_then_rerun(ctrl_c: bool) {
    let (_d, model) = checkpoint();
    let model = model.to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let clean = work.path().join("clean");
    let n = "16";
    let o = run(&generate_args(clean.to_str().unwrap(), model, n));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = dataset(&clean);
    assert_eq!(reference.len(), 16);
    assert_eq!(count(&clean, "SELECT count(*) FROM items"), 16);

    let mut killed_midway = false;
    for attempt in 0..5 {
        let ds = work.path().join(format!("ds{attempt}"));
        let ds_s = ds.to_str().unwrap().to_string();
        let mut args = generate_args(&ds_s, model, n);
        args[9] = "3"; // more steps, so that there is time to kill it
        let mut child = Command::new(bin())
            .arg("--json")
            .args(&args)
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            let done = Manifest::open_read_only(&ds)
                .ok()
                .and_then(|m| {
                    m.conn()
                        .query_row(
                            "SELECT count(*) FROM gen_items WHERE state = 'rendered'",
                            [],
                            |r| r.get::<_, i64>(0),
                        )
                        .ok()
                })
                .unwrap_or(0);
            if done >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if ctrl_c {
            // SAFETY: a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        } else {
            child.kill().unwrap(); // SIGKILL
        }
        let o = child.wait_with_output().unwrap();
        let rendered = count(
            &ds,
            "SELECT count(*) FROM gen_items WHERE state = 'rendered'",
        );
        if rendered == 16 {
            continue; // finished before the kill; try again
        }
        killed_midway = true;
        let status = count(
            &ds,
            "SELECT count(*) FROM runs WHERE stage = 'generate' AND status = 'failed' AND ended_at IS NOT NULL",
        );
        if ctrl_c {
            assert_eq!(o.status.code(), Some(130), "exit code after Ctrl-C");
            let r: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(r["interrupted"], true, "{r}");
            assert_eq!(r["rendered"].as_i64().unwrap(), rendered, "{r}");
            assert_eq!(r["remaining"].as_i64().unwrap(), 16 - rendered, "{r}");
            assert_eq!(status, 1, "the interrupted run is ended as failed");
        } else {
            assert_eq!(status, 0, "a killed run stays `running`");
        }
        // The plan was complete before the first image: every row is there.
        assert_eq!(count(&ds, "SELECT count(*) FROM gen_items"), 16);
        // Rerun with the plan's own steps (3): exactly the missing rows.
        let o = run(&[&["--json"][..], &args].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["skipped"].as_i64().unwrap(), rendered, "{r}");
        assert_eq!(r["rendered"].as_i64().unwrap(), 16 - rendered, "{r}");
        // Uninterrupted run with the same flags.
        let clean3 = work.path().join(format!("clean{attempt}"));
        let mut cargs = args.clone();
        let c3 = clean3.to_str().unwrap().to_string();
        cargs[1] = &c3;
        assert!(run(&cargs).status.success());
        let (got, want) = (dataset(&ds), dataset(&clean3));
        assert_eq!(got.len(), 16);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.0, g.1, &g.2, &g.3), (w.0, w.1, &w.2, &w.3));
            assert_eq!(g.1, 5 + g.0, "planned seed");
            assert!(g.4 == w.4, "PNG bytes of index {}", g.0);
        }
        assert_eq!(count(&ds, "SELECT count(*) FROM items"), 16);
        assert_eq!(count(&ds, "SELECT count(*) FROM generation"), 16);
        let m = Manifest::open(&ds).unwrap();
        assert_eq!(m.integrity_check().unwrap(), "ok");
        // No temp files left behind.
        let mut stack = vec![ds.join("images")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    assert!(
                        !e.file_name().to_string_lossy().starts_with(".tmp"),
                        "{:?}",
                        e.path()
                    );
                }
            }
        }
        break;
    }
    assert!(
        killed_midway,
        "could not stop generate mid-way in 5 attempts"
    );
}

/// A second Ctrl-C while the first is honoured quits at once (killed by
/// SIGINT, not waiting for the batch), unless it comes within a second of
/// the first (the same request delivered twice); nothing half-written is
/// left and a rerun renders everything.
#[test]
fn a_second_ctrl_c_quits_at_once() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let (_d, model) = checkpoint();
    let model = model.to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ds = work.path().join("ds");
    let ds_s = ds.to_str().unwrap().to_string();
    let mut args = generate_args(&ds_s, model, "4");
    args[9] = "1000"; // one batch that takes seconds
    args[13] = "4";
    let mut child = Command::new(bin())
        .arg("--json")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            let _ = tx.send(line);
        }
    });
    // The plan is written (before the first batch starts).
    let t0 = Instant::now();
    while Manifest::open_read_only(&ds)
        .ok()
        .and_then(|m| {
            m.conn()
                .query_row("SELECT count(*) FROM gen_items", [], |r| r.get::<_, i64>(0))
                .ok()
        })
        .unwrap_or(0)
        < 4
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "no plan written");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id() as i32;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let noticed = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(30)).ok())
        .any(|l| l.contains("stopping at the next safe point"));
    assert!(noticed, "no notice after the first Ctrl-C");
    // The same request delivered twice (as `timeout` signals the process
    // and its group) is one request: it goes on to its safe point.
    unsafe { libc::kill(pid, libc::SIGINT) };
    std::thread::sleep(Duration::from_millis(1100));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a signal right after the first one ended it"
    );
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the second Ctrl-C did not stop it at once"
    );
    assert_eq!(
        count(
            &ds,
            "SELECT count(*) FROM gen_items WHERE state = 'rendered'"
        ),
        0
    );
    let o = run(&[&["--json"][..], &args[..]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["rendered"], 4, "{r}");
}

#[test]
fn slurm_array_shards_merged_equal_a_single_run() {
    let (_d, model) = checkpoint();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("data");
    let script = root().join("fixtures/configs/slurm-generate.sh");
    // The script as a Slurm array task, with the job's settings and `env`.
    let task_run = |env: &[(&str, String)]| {
        let mut c = Command::new("bash");
        c.arg(&script)
            .env("EPS2V", bin())
            .env("MODEL", model)
            .env("OUT", &out)
            .env("COUNT", "7")
            .env("SEED", "5")
            .env("STEPS", "2")
            .env("SIZE", "64x64")
            .env("BATCH", "2")
            .env("SAMPLER", "euler")
            .env_remove("JOB_COMPLETION_INDEX");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    for task in 4..7 {
        // `sbatch --array=4-6`: IDs 4..6, MIN 4, COUNT 3.
        let o = task_run(&[
            ("SLURM_ARRAY_TASK_ID", task.to_string()),
            ("SLURM_ARRAY_TASK_MIN", "4".into()),
            ("SLURM_ARRAY_TASK_COUNT", "3".into()),
            ("SLURM_ARRAY_TASK_STEP", "1".into()),
        ]);
        assert!(
            o.status.success(),
            "task {task}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let shard = PathBuf::from(format!("{}.shard-{task}", out.display()));
        let m = Manifest::open_read_only(&shard).unwrap();
        let s: String = m
            .conn()
            .query_row("SELECT shard FROM gen_plan", [], |r| r.get(0))
            .unwrap();
        assert_eq!(s, format!("{}/3", task - 3));
    }
    // Task 5 again, as a one-task array of its own (`SHARDS=3 ARRAY_BASE=4
    // sbatch --array=5`): still shard 2/3, into its folder, nothing left to
    // do. By position it would be shard 1/1.
    let o = task_run(&[
        ("SHARDS", "3".into()),
        ("ARRAY_BASE", "4".into()),
        ("SLURM_ARRAY_TASK_ID", "5".into()),
        ("SLURM_ARRAY_TASK_MIN", "5".into()),
        ("SLURM_ARRAY_TASK_COUNT", "1".into()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shards: Vec<String> = (4..7)
        .map(|t| format!("{}.shard-{t}", out.display()))
        .collect();
    let mut args = vec!["--json", "manifest", "merge", out.to_str().unwrap()];
    args.extend(shards.iter().map(String::as_str));
    // A shard that a process is still writing is refused, naming it; one
    // left `running` by a killed process is merged, its row as `failed`.
    let writer = Manifest::open(Path::new(&shards[1])).unwrap();
    let live = writer.begin_run("caption", &serde_json::json!({})).unwrap();
    let o = run(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "its caption run {live} is still in progress (pid "
        )),
        "{err}"
    );
    assert!(!out.exists());
    drop(writer); // killed: the row stays `running`, its lock is gone
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["rendered"].as_i64(), r["missing"].as_i64()),
        (Some(7), Some(0))
    );
    // The same plan in one process, with the script's flags.
    let single = work.path().join("single");
    let o = run(&[
        "generate",
        single.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--template",
        "1girl",
        "--count",
        "7",
        "--seed",
        "5",
        "--steps",
        "2",
        "--cfg",
        "5",
        "--sampler",
        "euler",
        "--batch",
        "3",
        "--size",
        "64x64",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dataset(&out), dataset(&single));
    assert_eq!(count(&out, "SELECT count(*) FROM items"), 7);
    assert_eq!(
        count(&out, "SELECT count(*) FROM runs WHERE stage = 'generate'"),
        4 // three tasks and task 5's rerun
    );
    let merge_id = r["run_id"].as_i64().unwrap();
    assert_eq!(
        count(
            &out,
            &format!(
                "SELECT count(*) FROM runs WHERE stage = 'caption' AND status = 'failed' \
                 AND json_extract(counts_json, '$.marked_failed_by') = {merge_id}"
            )
        ),
        1
    );
    assert_eq!(
        count(&out, "SELECT count(*) FROM runs WHERE status = 'running'"),
        0
    );
    // The shards extended to 9 images and merged again: OUT's plan grows
    // with them. Regression: it stayed at 7, and `generate OUT --count 7`
    // (the old flags) then replanned and set the two new images aside.
    for task in 4..7 {
        let o = task_run(&[
            ("COUNT", "9".into()),
            ("SLURM_ARRAY_TASK_ID", task.to_string()),
            ("SLURM_ARRAY_TASK_MIN", "4".into()),
            ("SLURM_ARRAY_TASK_COUNT", "3".into()),
            ("SLURM_ARRAY_TASK_STEP", "1".into()),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            r["count"].as_i64(),
            r["rendered"].as_i64(),
            r["missing"].as_i64()
        ),
        (Some(9), Some(9), Some(0)),
        "{r}"
    );
    assert_eq!(count(&out, "SELECT count FROM gen_plan"), 9);
    // Shards of another plan are refused with exit 2, OUT untouched.
    let other = work.path().join("other");
    assert!(run(&generate_args(
        other.to_str().unwrap(),
        model.to_str().unwrap(),
        "7"
    ))
    .status
    .success());
    let out2 = work.path().join("out2");
    let o = run(&[
        "manifest",
        "merge",
        out2.to_str().unwrap(),
        &shards[0],
        other.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("different generation plan"));
    assert!(!out2.exists());
}

/// The Kubernetes Job's command line parses as `eps2v generate` (every flag
/// exists) and, with `JOB_COMPLETION_INDEX`, picks its shard.
#[test]
fn k8s_job_uses_existing_flags() {
    let yaml = std::fs::read_to_string(root().join("fixtures/configs/k8s-generate.yaml")).unwrap();
    let start = yaml.find("exec eps2v generate").unwrap();
    let end = start + yaml[start..].find("\n          resources:").unwrap();
    let cmd: Vec<String> = yaml[start + 5..end]
        .split_whitespace()
        .map(|w| w.replace("$JOB_COMPLETION_INDEX", "2"))
        .collect();
    assert_eq!(cmd[0], "eps2v");
    let cli = eps2v::cli::Cli::try_parse_from(&cmd).unwrap_or_else(|e| panic!("{e}"));
    let eps2v::cli::Command::Generate(g) = cli.command else {
        panic!("not generate")
    };
    let env = |k: &str| (k == "JOB_COMPLETION_INDEX").then(|| "2".to_string());
    let c = g.to_config(&env).unwrap();
    assert_eq!(c.shard.to_string(), "3/8");
    assert!(yaml.contains("completions: 8") && yaml.contains("parallelism: 8"));
    assert_eq!(g.dir, PathBuf::from("/data/shards/2"));
}

#[test]
fn bad_inputs_exit_2_and_write_nothing() {
    let (_d, model) = checkpoint();
    let model = model.to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let broken_tpl = work.path().join("broken.txt");
    std::fs::write(&broken_tpl, "1girl,\n{red|blue hair").unwrap();
    let not_sdxl = work.path().join("lora.safetensors");
    {
        let t =
            candle_core::Tensor::zeros((4, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        eps2v::models::sdxl::checkpoint::save_tensors(
            &not_sdxl,
            &[("lora_unet_down_blocks_0.lora_up.weight".to_string(), t)],
            &Default::default(),
        )
        .unwrap();
    }
    let a_file = work.path().join("a_file");
    std::fs::write(&a_file, "x").unwrap();
    let ds = work.path().join("ds");
    let d = ds.to_str().unwrap();
    let unwritable = a_file.join("ds");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--template".into(), broken_tpl.to_str().unwrap().into()],
            "broken.txt:2:1: unbalanced `{`",
        ),
        (
            vec![
                "--wildcards".into(),
                work.path().join("no_such_dir").to_str().unwrap().into(),
            ],
            "wildcard folder not found",
        ),
        (
            vec!["--template".into(), "missing_template.txt".into()],
            "template file not found",
        ),
        (
            vec!["--template".into(), "1girl, __hair/nope__".into()],
            "wildcard __hair/nope__ not found",
        ),
        (vec!["--shard".into(), "4/3".into()], "--shard"),
        (
            vec![
                "--combinatorial".into(),
                "--template".into(),
                "{a|b}".into(),
            ],
            "only 2 distinct prompts but --count is 3",
        ),
    ];
    for (extra, want) in cases {
        let mut args: Vec<String> = generate_args(d, model, "3")
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra);
        let o = Command::new(bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!ds.exists(), "{args:?} created the dataset folder");
    }
    let mut bad_size = generate_args(d, model, "3");
    bad_size[7] = "64x100";
    let o = run(&bad_size);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiples of"));
    assert!(!ds.exists());
    let o = run(&generate_args(d, model, "0"));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--count must be at least 1"));
    assert!(!ds.exists());
    let o = run(&generate_args(d, not_sdxl.to_str().unwrap(), "3"));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a full SDXL checkpoint"));
    assert!(!ds.exists());
    let o = run(&generate_args(unwritable.to_str().unwrap(), model, "3"));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot write here"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A rerun that disagrees with the stored plan: exit 2, nothing changes.
    assert!(run(&generate_args(d, model, "3")).status.success());
    let before = dataset(&ds);
    let runs = count(&ds, "SELECT count(*) FROM runs");
    let mut args = generate_args(d, model, "3");
    args[11] = "6"; // --seed
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("seed was 5, this run asks for 6"));
    assert_eq!(dataset(&ds), before);
    assert_eq!(count(&ds, "SELECT count(*) FROM runs"), runs);
}
