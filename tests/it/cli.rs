//! The model-side subcommands as a user runs them, every documented flag:
//! `ckpt info` (`--no-hash`, `--json`), `ckpt check` (a NaN is found and
//! named), `tokenize` (`--encoder l|g`, emphasis, `BREAK`), `sample
//! --ztsnr` overriding the file's markers, and `diagnose uncond` giving the
//! right verdict on two crafted models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use eps2v::models::sdxl::checkpoint::{self, Checkpoint, SaveOptions};
use serde_json::Value;

use crate::sample::checkpoints;

fn eps2v(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eps2v"))
        .args(args)
        .output()
        .unwrap()
}

fn json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Copy `src` to `dst`, passing every tensor through `edit(key, tensor)`.
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&str, Tensor) -> Tensor) -> PathBuf {
    let ck = Checkpoint::open(src).unwrap();
    let tensors: Vec<(String, Tensor)> = ck
        .entries()
        .keys()
        .map(|k| {
            let t = ck.tensor(k, DType::F32, &Device::Cpu).unwrap();
            (k.clone(), edit(k, t))
        })
        .collect();
    checkpoint::save_tensors(dst, &tensors, &SaveOptions::default()).unwrap();
    dst.to_path_buf()
}

#[test]
fn ckpt_info_and_check_report_the_file() {
    let (_d, eps, v) = checkpoints();
    // info --json: family, configs, prediction from the markers, hashes.
    let r = json(&eps2v(&["--json", "ckpt", "info", p(v)]));
    assert_eq!(r["family"], "sdxl");
    assert_eq!(
        (r["unet"]["name"].as_str(), r["vae"]["name"].as_str()),
        (Some("tiny"), Some("tiny")),
        "{r}"
    );
    assert_eq!(r["prediction"]["prediction"], "v");
    assert_eq!(r["prediction"]["ztsnr"], true);
    let sha = checkpoint::sha256_file(v).unwrap();
    assert_eq!(r["sha256"], sha.as_str());
    assert_eq!(r["autov2"], &sha[..10]);
    let comps: Vec<&str> = r["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for c in ["unet", "clip_l", "clip_g", "vae"] {
        assert!(comps.contains(&c), "{comps:?}");
    }
    let total: u64 = r["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["parameters"].as_u64().unwrap())
        .sum();
    assert_eq!(total, r["parameters"].as_u64().unwrap());
    // --no-hash skips the hashes; the eps file has no markers.
    let r = json(&eps2v(&["--json", "ckpt", "info", p(eps), "--no-hash"]));
    assert!(r["sha256"].is_null() && r["autov2"].is_null(), "{r}");
    assert_eq!(r["prediction"]["prediction"], "epsilon");
    assert_eq!(r["prediction"]["ztsnr"], false);
    // The size `sample` draws at by default: the UNet config's, unless
    // the file's modelspec.resolution says otherwise.
    assert_eq!(
        (&r["default_size"]["width"], &r["default_size"]["height"]),
        (&Value::from(64), &Value::from(64)),
        "{r}"
    );
    assert_eq!(r["default_size"]["source"], "the tiny UNet config");
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(eps).unwrap();
    let tensors: Vec<(String, Tensor)> = ck
        .entries()
        .keys()
        .map(|k| (k.clone(), ck.tensor(k, DType::F32, &Device::Cpu).unwrap()))
        .collect();
    let sized = dir.path().join("sized.safetensors");
    let opts = SaveOptions {
        metadata: [(checkpoint::META_RESOLUTION.to_string(), "96x64".into())].into(),
        ..Default::default()
    };
    checkpoint::save_tensors(&sized, &tensors, &opts).unwrap();
    let r = json(&eps2v(&["--json", "ckpt", "info", p(&sized), "--no-hash"]));
    assert_eq!(r["default_size"]["width"], 96, "{r}");
    assert_eq!(r["default_size"]["height"], 64, "{r}");
    assert_eq!(r["default_size"]["source"], "modelspec.resolution");
    // Text mode: the lines the README describes.
    let o = eps2v(&["ckpt", "info", p(v)]);
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "family      sdxl",
        "prediction  v",
        "ztsnr       yes",
        "size        64x64 (sample's default; from the tiny UNet config)",
        "autov2      ",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    // check: a clean file passes; a NaN is named, exit 2.
    let o = eps2v(&["ckpt", "check", p(eps)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("check       ok: SDXL layout"));
    let bad_key = "model.diffusion_model.out.2.bias";
    let bad = rewrite(eps, &dir.path().join("nan.safetensors"), |k, t| {
        if k == bad_key {
            let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v[1] = f32::NAN;
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
        } else {
            t
        }
    });
    // info does not scan the weights; check does.
    assert_eq!(
        eps2v(&["ckpt", "info", p(&bad), "--no-hash"]).status.code(),
        Some(0)
    );
    let o = eps2v(&["ckpt", "check", p(&bad)]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(bad_key) && err.contains("element 1"), "{err}");
    // Not a checkpoint: exit 2 with the file named.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let o = eps2v(&["ckpt", "info", p(&junk)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("junk.safetensors"));
}

#[test]
fn tokenize_prints_chunks_weights_and_padding_per_encoder() {
    let r = json(&eps2v(&["tokenize", "a cat"]));
    assert_eq!(r["encoder"], "l");
    assert_eq!(r["token_count"], 2);
    let ids: Vec<u64> = r["chunks"][0]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // open_clip: "a" = 320, "cat" = 2368; BOS, EOS, EOS padding for CLIP-L.
    assert_eq!(&ids[..4], &[49406, 320, 2368, 49407]);
    assert_eq!(ids.len(), 77);
    assert!(ids[4..].iter().all(|&i| i == 49407));
    // --encoder g pads with 0 after the first EOS.
    let g = json(&eps2v(&["tokenize", "a cat", "--encoder", "g"]));
    assert_eq!(g["encoder"], "g");
    let gids: Vec<u64> = g["chunks"][0]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(&gids[..4], &[49406, 320, 2368, 49407]);
    assert!(gids[4..].iter().all(|&i| i == 0));
    // Emphasis weights and BREAK chunks.
    let e = json(&eps2v(&["tokenize", "(cat:1.5) BREAK [dog]"]));
    let chunks = e["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 2);
    let w0: Vec<f64> = chunks[0]["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(&w0[..3], &[1.0, 1.5, 1.0]);
    let w1 = chunks[1]["weights"][1].as_f64().unwrap();
    assert!((w1 - 1.0 / 1.1).abs() < 1e-9, "{w1}");
    // A bad encoder is a usage error.
    assert_eq!(
        eps2v(&["tokenize", "x", "--encoder", "h"]).status.code(),
        Some(2)
    );
}

/// A render the model breaks is in `--json`'s report (`broken`, with its
/// seed), the error names it, and `sample` exits 1 (some items failed), not
/// 2 with no report.
#[test]
fn sample_reports_broken_renders_and_exits_1() {
    let (d, eps, _v) = checkpoints();
    // Finite weights (a NaN file is refused at load) whose products overflow.
    let broken = rewrite(eps, &d.path().join("overflow.safetensors"), |k, t| {
        if k == "first_stage_model.decoder.conv_out.weight" {
            (t.ones_like().unwrap() * 3e38).unwrap()
        } else {
            t
        }
    });
    let out = tempfile::tempdir().unwrap();
    let o = eps2v(&[
        "--json",
        "sample",
        "--model",
        p(&broken),
        "--prompt",
        "x",
        "--out",
        p(out.path()),
        "--size",
        "64x64",
        "--steps",
        "2",
        "--seed",
        "5",
        "--batch",
        "2",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("seed 5: nan_decode") && err.contains("seeds 6 too"),
        "{err}"
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["files"].as_array().unwrap().len(), 0);
    assert_eq!(r["broken"][1]["seed"], 6);
}

#[test]
fn sample_ztsnr_flag_overrides_the_file() {
    let (_d, eps, v) = checkpoints();
    let out = tempfile::tempdir().unwrap();
    let run = |model: &Path, extra: &[&str]| {
        let mut a = vec![
            "--json",
            "sample",
            "--model",
            p(model),
            "--prompt",
            "x",
            "--out",
            p(out.path()),
            "--size",
            "64x64",
            "--steps",
            "2",
            "--seed",
            "1",
        ];
        a.extend_from_slice(extra);
        json(&eps2v(&a))
    };
    // v file, --ztsnr false: v prediction kept, normal schedule, no ZTSNR.
    let r = run(v, &["--ztsnr", "false"]);
    assert_eq!(r["model"]["prediction"], "v");
    assert_eq!(r["model"]["ztsnr"], false);
    assert_eq!(r["resolved"]["schedule"], "Normal");
    // eps file, --prediction v --ztsnr true: both overridden, trailing.
    let r = run(eps, &["--prediction", "v", "--ztsnr", "true"]);
    assert_eq!(
        (
            r["model"]["prediction"].as_str(),
            r["model"]["ztsnr"].as_bool()
        ),
        (Some("v"), Some(true))
    );
    assert_eq!(r["resolved"]["schedule"], "Trailing");
    let text = eps2v::imaging::infotext::read_parameters(
        &std::fs::read(r["files"][0].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert!(
        text.contains("ZTSNR: True") && text.contains("Prediction: v"),
        "{text}"
    );
    // eps + ZTSNR is allowed but warned about.
    let r = run(eps, &["--ztsnr", "true"]);
    let warnings = r["model"]["warnings"].to_string();
    assert!(warnings.contains("ZTSNR with eps"), "{warnings}");
    assert_eq!(
        eps2v(&[
            "sample",
            "--model",
            p(eps),
            "--prompt",
            "x",
            "--ztsnr",
            "maybe"
        ])
        .status
        .code(),
        Some(2)
    );
}

/// Two crafted models: one whose UNet ignores the text conditioning (the
/// cross-attention values and the pooled columns of `label_emb` zeroed), so
/// `""` and zeros give the same output; one whose cross-attention values are
/// scaled up, so they differ strongly.
#[test]
fn diagnose_uncond_verdicts_on_crafted_models() {
    let (_d, eps, _) = checkpoints();
    let dir = tempfile::tempdir().unwrap();
    let pooled = 32; // UNetConfig::tiny().pooled_dim
    let deaf = rewrite(eps, &dir.path().join("deaf.safetensors"), |k, t| {
        if k.ends_with("attn2.to_v.weight") {
            t.zeros_like().unwrap()
        } else if k == "model.diffusion_model.label_emb.0.0.weight" {
            // (time_embed_dim, pooled + 1536): zero the pooled columns.
            let (rows, cols) = t.dims2().unwrap();
            let keep = t.narrow(1, pooled, cols - pooled).unwrap();
            let zeros = Tensor::zeros((rows, pooled), DType::F32, &Device::Cpu).unwrap();
            Tensor::cat(&[&zeros, &keep], 1).unwrap()
        } else {
            t
        }
    });
    let loud = rewrite(eps, &dir.path().join("loud.safetensors"), |k, t| {
        if k.ends_with("attn2.to_v.weight") {
            (t * 50.0).unwrap()
        } else {
            t
        }
    });
    let diagnose = |model: &Path| {
        json(&eps2v(&[
            "--json",
            "diagnose",
            "uncond",
            "--model",
            p(model),
            "--size",
            "64x64",
            "--timesteps",
            "999,500,50",
            "--seeds",
            "2",
        ]))
    };
    let r = diagnose(&deaf);
    assert_eq!(r["verdict"], "same", "{r}");
    assert_eq!(r["probes"].as_array().unwrap().len(), 6);
    assert!(r["max_rel_l2"].as_f64().unwrap() < 1e-6, "{r}");
    let r = diagnose(&loud);
    assert_eq!(r["verdict"], "different", "{r}");
    assert!(r["mean_rel_l2"].as_f64().unwrap() > 0.25 || r["mean_cosine"].as_f64().unwrap() < 0.9);
    assert!(r["message"].as_str().unwrap().contains("--uncond empty"));
    // Text mode prints the verdict line.
    let o = eps2v(&[
        "diagnose",
        "uncond",
        "--model",
        p(&deaf),
        "--size",
        "64x64",
        "--timesteps",
        "500",
        "--seeds",
        "1",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("verdict: same (this model treats ''"),
        "{text}"
    );
}

/// `--ztsnr` alone means true on every command that takes it, as the
/// README writes it (it needed a value on `sample` and `generate`).
#[test]
fn a_bare_ztsnr_flag_is_true() {
    use clap::Parser;
    use eps2v::cli::{Cli, Command as C};
    let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
    let C::Sample(s) = parse(&["eps2v", "sample", "--prompt", "x", "--ztsnr"]).command else {
        panic!("not sample")
    };
    assert_eq!(s.ztsnr, Some(true));
    let C::Sample(s) = parse(&["eps2v", "sample", "--ztsnr", "false", "--prompt", "x"]).command
    else {
        panic!("not sample")
    };
    assert_eq!(s.ztsnr, Some(false));
    let C::Generate(g) = parse(&["eps2v", "generate", "d", "--ztsnr", "--count", "1"]).command
    else {
        panic!("not generate")
    };
    assert_eq!(g.ztsnr, Some(true));
    // A seed the infotext could not give back is refused.
    assert!(Cli::try_parse_from([
        "eps2v",
        "sample",
        "--prompt",
        "x",
        "--seed",
        "9223372036854775808"
    ])
    .is_err());
    let C::Sample(s) = parse(&[
        "eps2v",
        "sample",
        "--prompt",
        "x",
        "--seed",
        "9223372036854775807",
    ])
    .command
    else {
        panic!("not sample")
    };
    assert_eq!(
        s.seed,
        Some(eps2v::cli::sample::Seed::Fixed(i64::MAX as u64))
    );
    // -1 is A1111's "random".
    let C::Sample(s) = parse(&["eps2v", "sample", "--prompt", "x", "--seed", "-1"]).command else {
        panic!("not sample")
    };
    assert_eq!(s.seed, Some(eps2v::cli::sample::Seed::Random));
    assert!(Cli::try_parse_from(["eps2v", "sample", "--prompt", "x", "--seed", "-2"]).is_err());
}

/// A mistyped `--from` is a usage error that leaves no new, empty dataset
/// behind; a dataset path that is a file says so (on stdout too, as JSON,
/// under `--json`).
#[test]
fn import_checks_its_source_before_creating_the_dataset() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("typo");
    let o = eps2v(&[
        "import",
        ds.to_str().unwrap(),
        "--from",
        d.path().join("missing").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such folder"));
    assert!(!ds.exists());
    let file = d.path().join("notes.txt");
    std::fs::write(&file, "x").unwrap();
    let o = eps2v(&["inspect", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists and is not a folder"));
    // --from a file: not a folder, said as such.
    let o = eps2v(&[
        "import",
        ds.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not a folder (import takes the folder"),
        "{err}"
    );
    assert!(!ds.exists());
    // The images' folder as the dataset: refused, nothing made there.
    let pics = d.path().join("pics");
    std::fs::create_dir(&pics).unwrap();
    let o = eps2v(&["import", p(&pics), "--from", p(&pics)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the images' folder is the dataset folder"),
        "{err}"
    );
    assert!(!pics.join("manifest.sqlite").exists());
    // Limits of 0 are usage errors, not a run that rejects everything.
    for flag in ["--max-side", "--max-pixels"] {
        let o = eps2v(&[
            "import",
            ds.to_str().unwrap(),
            "--from",
            d.path().to_str().unwrap(),
            flag,
            "0",
        ]);
        assert_eq!(o.status.code(), Some(2), "{flag}");
        assert!(!ds.exists());
    }
    // An I/O error is printed once, after its path (not again as its cause).
    let o = eps2v(&[
        "train",
        ds.to_str().unwrap(),
        "--config",
        d.path().join("no.toml").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // With --json, stdout still holds one JSON document: the error.
    let o = eps2v(&["--json", "inspect", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let said = v["error"].as_str().unwrap();
    assert!(said.contains("exists and is not a folder"), "{v}");
    assert_eq!(
        (v["exit_code"].as_i64(), v["interrupted"].as_bool()),
        (Some(2), Some(false))
    );
}

/// `train --help` shows the defaults its flags fall back to (taken from
/// the training config's own defaults).
#[test]
fn train_help_shows_the_defaults() {
    let o = eps2v(&["train", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "Optimizer steps [default: 1000]",
        "Learning rate [default: 1e-5]",
        "[default: constant]",
        "Caption-dropout probability [default: 0.1]",
        "Save a resumable checkpoint every N steps [default: 500]",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
}
