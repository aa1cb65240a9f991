use super::*;
use clap::Parser;

use crate::cli::merge::{run_merge, MergeArgs};

#[derive(Parser)]
struct T {
    #[command(flatten)]
    a: TrainArgs,
}

/// A config of stages refuses the flags it would ignore (naming them),
/// and `--lr` only where some stage has no rate of its own; a run
/// config's `[train]` trains the run's `model`.
#[test]
fn stage_configs_refuse_flags_they_would_ignore_and_run_configs_keep_their_model() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("t.toml");
    let parse = |extra: &[&str]| {
        let mut args = vec!["x", "ds", "--config", f.to_str().unwrap()];
        args.extend_from_slice(extra);
        T::parse_from(args).a.to_config()
    };
    std::fs::write(
        &f,
        "model = \"run.safetensors\"\n[train]\n[[train.stages]]\nblocks = [\"all\"]\nsteps = 10\n",
    )
    .unwrap();
    let c = parse(&[]).unwrap();
    assert_eq!(c.model, std::path::PathBuf::from("run.safetensors"));
    assert_eq!(c.total_steps(), 10);
    for flag in [
        ["--steps", "5"],
        ["--blocks", "out"],
        ["--block-lr", "OUT08=1e-5"],
    ] {
        let e = parse(&flag).unwrap_err().to_string();
        assert!(e.contains(flag[0]) && e.contains("[[train.stages]]"), "{e}");
    }
    // The stage has no rate: --lr is its rate.
    assert_eq!(parse(&["--lr", "3e-6"]).unwrap().lr, 3e-6);
    std::fs::write(
            &f,
            "[train]\nmodel = \"own.safetensors\"\n[[train.stages]]\nblocks = [\"all\"]\nsteps = 10\nlr = 1e-6\n",
        )
        .unwrap();
    assert!(parse(&["--lr", "3e-6"])
        .unwrap_err()
        .to_string()
        .contains("--lr"));
    assert_eq!(
        parse(&[]).unwrap().model,
        std::path::PathBuf::from("own.safetensors")
    );
}

#[test]
fn flags_override_the_file_and_eps_defaults_to_no_ztsnr() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("t.toml");
    std::fs::write(
        &f,
        "[train]\nmodel = \"m.safetensors\"\nlr = 2e-6\nsteps = 9\n",
    )
    .unwrap();
    let t = T::parse_from([
        "x",
        "ds",
        "--config",
        f.to_str().unwrap(),
        "--steps",
        "5",
        "--objective",
        "eps",
    ]);
    let c = t.a.to_config().unwrap();
    assert_eq!((c.steps, c.lr, c.ztsnr), (5, 2e-6, false));
    let t = T::parse_from([
        "x",
        "ds",
        "--model",
        "m",
        "--blocks",
        "out,OUT08",
        "--uncond",
        "text:,",
        "--block-lr",
        "OUT08=2e-5",
    ]);
    let c = t.a.to_config().unwrap();
    assert_eq!(c.blocks, vec!["out", "OUT08"]);
    assert!(c.ztsnr);
    assert_eq!(c.uncond.to_string(), "text:,");
    assert_eq!(c.block_lr["OUT08"], 2e-5);
    c.validate().unwrap();
    // Every switch a config can turn on, the command line turns off
    // (and the last of a pair wins).
    std::fs::write(
            &f,
            "[train]\nmodel = \"m\"\ngradient_checkpointing = true\na1111_yaml = true\nmarkers = false\n",
        )
        .unwrap();
    let with = |flags: &[&str]| {
        let mut args = vec!["x", "ds", "--config", f.to_str().unwrap()];
        args.extend_from_slice(flags);
        let c = T::parse_from(args).a.to_config().unwrap();
        (c.gradient_checkpointing, c.a1111_yaml, c.markers)
    };
    assert_eq!(with(&[]), (true, true, false));
    let off = [
        "--no-gradient-checkpointing",
        "--no-a1111-yaml",
        "--markers",
    ];
    assert_eq!(with(&off), (false, false, true));
    let back = [
        "--no-gradient-checkpointing",
        "--gradient-checkpointing",
        "--markers",
        "--no-markers",
    ];
    assert_eq!(with(&back), (true, true, false));
    std::fs::write(&f, "[train]\nlearning_rate = 1\n").unwrap();
    let t = T::parse_from(["x", "ds", "--config", f.to_str().unwrap()]);
    let e = t.a.to_config().unwrap_err().to_string();
    assert!(e.contains("learning_rate"), "{e}");
    // --device / --precision: command line only, resolved before training.
    let t = T::parse_from(["x", "ds", "--model", "m", "--device", "cpu"]);
    let (d, p) = t.a.device.resolve().unwrap();
    assert!(d.is_cpu());
    assert_eq!(p, candle_core::DType::F32);
    assert!(t.a.to_config().is_ok());
    let t = T::parse_from(["x", "ds", "--device", "cpu", "--precision", "bf16"]);
    assert_eq!(t.a.device.resolve().unwrap_err().exit_code(), 2);
    let t = T::parse_from(["x", "ds", "--model", "m", "--weighting", "minsnr"]);
    assert!(t
        .a
        .to_config()
        .unwrap_err()
        .to_string()
        .contains("--weighting"));
}

/// Checkpoints are only written as `.safetensors`: UIs open other
/// extensions as pickles, and eps2v refuses to load them.
#[test]
fn train_and_merge_write_only_safetensors() {
    for out in ["m.ckpt", "m", "m.pt"] {
        let t = T::parse_from(["x", "ds", "--model", "b.safetensors", "--out", out]);
        let e = t.a.to_config().unwrap().validate().unwrap_err().to_string();
        assert!(
            e.contains("train.out (--out)") && e.contains("NAME.safetensors"),
            "{e}"
        );
    }
    let t = T::parse_from([
        "x",
        "ds",
        "--model",
        "b.safetensors",
        "--out",
        "m.SafeTensors",
    ]);
    assert!(t.a.to_config().unwrap().validate().is_ok());
    #[derive(Parser)]
    struct M {
        #[command(flatten)]
        a: MergeArgs,
    }
    // Refused before the inputs are read (they do not exist here).
    let m = M::parse_from(["x", "a.safetensors", "b.safetensors", "--out", "m.ckpt"]);
    let e = run_merge(m.a, true).unwrap_err().to_string();
    assert!(e.contains("merge --out m.ckpt"), "{e}");
}

/// `ztsnr` said in the config file holds against `--objective` (which
/// only moves the default): `ztsnr = false` with `--objective v` trained
/// v + ZTSNR.
#[test]
fn a_config_files_ztsnr_holds_against_the_objective_flag() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("t.toml");
    let parse = |toml: &str, extra: &[&str]| {
        std::fs::write(&f, toml).unwrap();
        let mut args = vec!["x", "ds", "--config", f.to_str().unwrap()];
        args.extend_from_slice(extra);
        let c = T::parse_from(args).a.to_config().unwrap();
        (c.objective.to_string(), c.ztsnr)
    };
    let noz = "[train]\nobjective = \"v\"\nztsnr = false\n";
    assert_eq!(parse(noz, &[]), ("v".into(), false));
    assert_eq!(parse(noz, &["--objective", "v"]), ("v".into(), false));
    assert_eq!(
        parse(noz, &["--objective", "v", "--ztsnr"]),
        ("v".into(), true)
    );
    // Said for another objective (the shipped configs' `ztsnr = true` is
    // v's): it follows the flag.
    let v_z = "[train]\nobjective = \"v\"\nztsnr = true\n";
    assert_eq!(parse(v_z, &["--objective", "eps"]), ("eps".into(), false));
    assert_eq!(parse(noz, &["--objective", "eps"]), ("eps".into(), false));
    assert_eq!(parse(v_z, &["--objective", "v"]), ("v".into(), true));
    // Not said in the file: it follows the flag.
    assert_eq!(
        parse("[train]\nobjective = \"eps\"\n", &["--objective", "v"]),
        ("v".into(), true)
    );
    assert_eq!(
        parse("[train]\n", &["--objective", "eps"]),
        ("eps".into(), false)
    );
}

#[test]
fn resume_commands_quote_for_the_shell() {
    assert_eq!(shell_quote("ds/a-1.toml"), "ds/a-1.toml");
    assert_eq!(shell_quote("my set"), "'my set'");
    assert_eq!(shell_quote("it's"), "'it'\\''s'");
    assert_eq!(shell_quote(""), "''");
}
