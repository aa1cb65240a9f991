//! `eps2v sample` and `eps2v diagnose uncond` end to end on seeded random
//! tiny SDXL checkpoints (eps, and v + ZTSNR markers) written in the
//! single-file layout: PNGs decode, their A1111 `parameters` parse back (our
//! parser and A1111's regex) to the values asked for, a seed gives the same
//! bytes at any batch position, bad input exits 2. (`diagnose uncond`
//! verdicts on crafted models are in `cli.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use eps2v::imaging::infotext::{read_parameters, Infotext};
use eps2v::pipeline::tiny::{write_random_checkpoint, TinyOptions};
use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps2v")
}

/// (tempdir, eps checkpoint, v+ztsnr checkpoint), written once per test binary.
pub fn checkpoints() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static CK: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    CK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let eps = dir.path().join("tiny_eps.safetensors");
        let v = dir.path().join("tiny_vpred.safetensors");
        write_random_checkpoint(
            &eps,
            TinyOptions {
                seed: 1,
                v_pred_ztsnr: false,
            },
        )
        .unwrap();
        write_random_checkpoint(
            &v,
            TinyOptions {
                seed: 2,
                v_pred_ztsnr: true,
            },
        )
        .unwrap();
        (dir, eps, v)
    })
}

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn sample_json(model: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "--json",
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--size",
        "64x64",
        "--steps",
        "3",
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(
        o.status.success(),
        "sample failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A1111 `re_param_code` applied to the last line, values `json.loads`-ed
/// when quoted (modules/infotext_utils.py `parse_generation_parameters`).
fn a1111_params(text: &str) -> Vec<(String, String)> {
    let re = regex::Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).unwrap();
    let last = text.trim().lines().last().unwrap();
    re.captures_iter(last)
        .map(|c| {
            let v = c[2].to_string();
            let v = if v.starts_with('"') && v.ends_with('"') && v.len() >= 2 {
                serde_json::from_str::<String>(&v).unwrap_or(v)
            } else {
                v
            };
            (c[1].to_string(), v)
        })
        .collect()
}

fn files(report: &Value) -> Vec<PathBuf> {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| PathBuf::from(f.as_str().unwrap()))
        .collect()
}

#[test]
fn sample_writes_pngs_whose_parameters_parse_back() {
    let (_d, eps, _) = checkpoints();
    let out = tempfile::tempdir().unwrap();
    let prompt = "a red circle, (large:1.2), blue background";
    let report = sample_json(
        eps,
        out.path(),
        &[
            "--prompt",
            prompt,
            "--negative",
            "lowres, blurry",
            "--seed",
            "42",
            "--cfg",
            "5.5",
            "--sampler",
            "dpmpp_2m",
            "--schedule",
            "karras",
        ],
    );
    assert_eq!(report["seeds"], serde_json::json!([42]));
    let f = &files(&report)[0];
    assert_eq!(f.file_name().unwrap().to_str().unwrap(), "00000-42.png");
    let bytes = std::fs::read(f).unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    let text = read_parameters(&bytes).expect("parameters chunk");
    let it = Infotext::parse(&text);
    assert_eq!(it.prompt, prompt);
    assert_eq!(it.negative_prompt, "lowres, blurry");
    assert_eq!(it.steps(), Some(3));
    assert_eq!(it.sampler(), Some("DPM++ 2M"));
    assert_eq!(it.schedule_type(), Some("Karras"));
    assert_eq!(it.cfg_scale(), Some(5.5));
    assert_eq!(it.seed(), Some(42));
    assert_eq!(it.size(), Some((64, 64)));
    assert_eq!(it.model(), Some("tiny_eps"));
    let sha = eps2v::models::sdxl::checkpoint::sha256_file(eps).unwrap();
    assert_eq!(it.model_hash(), Some(&sha[..10]));
    assert_eq!(it.get("Prediction"), Some("eps"));
    assert_eq!(it.get("ZTSNR"), Some("False"));
    assert_eq!(it.get("Uncond"), Some("negative"));
    assert_eq!(it.get("CFG rescale"), Some("0"));
    let keys: Vec<&str> = it.params.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "Steps",
            "Sampler",
            "Schedule type",
            "CFG scale",
            "Seed",
            "Size",
            "Model hash",
            "Model",
            "Prediction",
            "ZTSNR",
            "Uncond",
            "CFG rescale",
            "Version"
        ]
    );
    // A1111's own regex reads the same pairs.
    assert_eq!(a1111_params(&text), it.params);
    // and formatting is stable: what we parse formats back to the same text.
    assert_eq!(it.format(), text);
    // A second run appends with the next index.
    let r2 = sample_json(
        eps,
        out.path(),
        &["--prompt", "x", "--seed", "7", "--cfg", "1"],
    );
    assert!(files(&r2)[0].ends_with("00001-7.png"));
}

#[test]
fn a_seed_gives_identical_bytes_at_any_batch_position() {
    let (_d, _, v) = checkpoints();
    let (o4, o1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let common = [
        "--prompt",
        "1shape, green square",
        "--sampler",
        "euler_a",
        "--uncond",
        "empty",
    ];
    let mut a = common.to_vec();
    a.extend(["--seed", "100", "--batch", "4"]);
    let r4 = sample_json(v, o4.path(), &a);
    assert_eq!(r4["seeds"], serde_json::json!([100, 101, 102, 103]));
    let mut b = common.to_vec();
    b.extend(["--seed", "102", "--batch", "1"]);
    let r1 = sample_json(v, o1.path(), &b);
    let batch = files(&r4);
    let single = std::fs::read(&files(&r1)[0]).unwrap();
    assert_eq!(
        std::fs::read(&batch[2]).unwrap(),
        single,
        "seed 102 at position 2 vs alone"
    );
    // Different seeds give different images.
    let p0 = image::open(&batch[0]).unwrap().to_rgb8();
    let p1 = image::open(&batch[1]).unwrap().to_rgb8();
    assert_ne!(p0.as_raw(), p1.as_raw());
}

#[test]
fn v_ztsnr_checkpoint_uses_its_markers_and_defaults() {
    let (_d, eps, v) = checkpoints();
    let out = tempfile::tempdir().unwrap();
    let r = sample_json(v, out.path(), &["--prompt", "a cat", "--seed", "3"]);
    assert_eq!(r["model"]["prediction"], "v");
    assert_eq!(r["model"]["ztsnr"], true);
    assert_eq!(r["resolved"]["schedule"], "Trailing");
    assert_eq!(r["resolved"]["rescale"], 0.7);
    let it = Infotext::parse(&read_parameters(&std::fs::read(&files(&r)[0]).unwrap()).unwrap());
    assert_eq!(it.get("Prediction"), Some("v"));
    assert_eq!(it.get("ZTSNR"), Some("True"));
    assert_eq!(it.get("Noise Schedule"), Some("Zero Terminal SNR"));
    assert_eq!(it.get("Uncond"), Some("zero"));
    assert_eq!(it.get("CFG rescale"), Some("0.7"));
    assert_eq!(it.schedule_type(), Some("Trailing"));
    // eps file: markers absent → eps, normal schedule; --prediction overrides.
    let r = sample_json(
        eps,
        out.path(),
        &["--prompt", "a cat", "--seed", "3", "--prediction", "v"],
    );
    assert_eq!(r["model"]["prediction"], "v");
    assert_eq!(r["model"]["prediction_source"], "--prediction");
    assert_eq!(r["model"]["ztsnr"], false);
    assert_eq!(r["resolved"]["schedule"], "Normal");
}

#[test]
fn bad_size_and_missing_model_exit_2() {
    let (_d, eps, _) = checkpoints();
    let out = tempfile::tempdir().unwrap();
    let o_dir = out.path().to_str().unwrap();
    let e = eps.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "sample", "--model", e, "--prompt", "x", "--size", "64by64", "--out", o_dir,
            ],
            "WIDTHxHEIGHT",
        ),
        (
            vec![
                "sample", "--model", e, "--prompt", "x", "--size", "72x64", "--out", o_dir,
            ],
            "multiples of",
        ),
        (
            vec![
                "sample",
                "--model",
                "/nonexistent/m.safetensors",
                "--prompt",
                "x",
                "--out",
                o_dir,
            ],
            "/nonexistent/m.safetensors",
        ),
        (
            vec![
                "sample",
                "--model",
                e,
                "--prompt",
                "x",
                "--sampler",
                "heun",
                "--out",
                o_dir,
            ],
            "unknown sampler",
        ),
        (
            vec![
                "diagnose",
                "uncond",
                "--model",
                "/nonexistent/m.safetensors",
            ],
            "/nonexistent/m.safetensors",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(out.path())
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}
