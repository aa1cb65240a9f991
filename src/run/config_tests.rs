use super::*;

#[test]
fn defaults_round_trip_and_list_every_stage() {
    let c = RunConfig::default();
    let text = toml::to_string(&c).unwrap();
    let back = RunConfig::from_toml(&text, "t.toml").unwrap();
    assert_eq!(back.stages, STAGES);
    assert_eq!(back.generate, c.generate);
    assert_eq!(back.train, c.train);
    assert_eq!(back.bucket, c.bucket);
    assert_eq!(
        RunConfig::from_toml("", "e.toml").unwrap().train,
        toy_train()
    );
}

#[test]
fn unknown_keys_name_the_table_and_suggest_the_nearest() {
    let e = RunConfig::from_toml("[train]\nobjectve = \"v\"\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.toml"), "{e}");
    assert!(e.contains("unknown key `train.objectve`"), "{e}");
    assert!(e.contains("did you mean `train.objective`"), "{e}");
    let e = RunConfig::from_toml("modle = \"x\"\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`modle`") && e.contains("did you mean `model`"),
        "{e}"
    );
    // Nested: arrays of tables, tables inside tables, tagged enums.
    let e = RunConfig::from_toml("[[train.stages]]\nblocks = [\"out\"]\nstep = 3\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.stages[0].step") && e.contains("`train.stages[0].steps`"),
        "{e}"
    );
    let e = RunConfig::from_toml("[caption.caption]\npolicyy = \"tags\"\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `caption.caption.policy`"), "{e}");
    let e = RunConfig::from_toml(
        "[bucket.buckets]\nkind = \"kohya\"\nresolution = 80\nstep = 32\nmin_side = 64\nmax_sid = 96\n",
        "c.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("did you mean `bucket.buckets.max_side`"), "{e}");
    // Regression: another kind's key was taken (and did nothing).
    let e = RunConfig::from_toml(
        "[bucket.buckets]\nkind = \"sdxl\"\nmax_side = 1536\n",
        "c.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("unknown key `bucket.buckets.max_side`") && e.contains("are: kind"),
        "{e}"
    );
    // Maps take any key.
    RunConfig::from_toml("[train.block_lr]\nOUT08 = 1e-4\n", "c.toml").unwrap();
    // Nothing near: the valid keys are listed.
    let e = RunConfig::from_toml("[merge]\nzzzzzzzz = 1\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(
        !e.contains("did you mean") && e.contains("alphas, blocks"),
        "{e}"
    );
}

#[test]
fn wrong_types_name_the_key() {
    let e = RunConfig::from_toml("[generate]\ncount = \"many\"\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.toml") && e.contains("count"), "{e}");
    assert!(e.contains("invalid type"), "{e}");
    let e = RunConfig::from_toml("[train]\nobjective = \"x\"\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("objective"), "{e}");
}

#[test]
fn impossible_stage_orders_are_errors() {
    let order = |s: &[&str]| check_stages(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
    order(&["generate", "caption", "bucket", "train"]).unwrap();
    order(&["train", "merge", "report"]).unwrap();
    let e = order(&["generate", "train", "bucket"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`train` comes before `bucket`"), "{e}");
    let e = order(&["merge", "train"]).unwrap_err().to_string();
    assert!(e.contains("`merge` comes before `train`"), "{e}");
    let e = order(&["generate", "captoin"]).unwrap_err().to_string();
    assert!(e.contains("did you mean `caption`"), "{e}");
    assert!(order(&["train", "train"])
        .unwrap_err()
        .to_string()
        .contains("twice"));
    assert!(order(&[]).is_err());
    let e = RunConfig::from_toml("stages = [\"train\", \"bucket\"]\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.toml: stages:"), "{e}");
}

/// Policy `prompt` needs no tagger to write captions, but `filter`
/// (alignment) and `evaluate` (adherence) do: the toy tagger stays the
/// default while either is listed.
#[test]
fn the_tagger_defaults_while_a_stage_needs_it() {
    let with = |stages: &[&str]| {
        let text = format!("stages = {stages:?}\n[caption.caption]\npolicy = \"prompt\"\n");
        let mut c = RunConfig::from_toml(&text, "p.toml").unwrap();
        c.resolve();
        c.caption.tagger
    };
    let toy = Some(super::super::defaults::default_tagger_dir());
    assert_eq!(with(&["generate", "caption", "filter"]), toy);
    assert_eq!(
        with(&["generate", "caption", "bucket", "train", "evaluate"]),
        toy
    );
    assert_eq!(with(&["generate", "caption", "bucket", "train"]), None);
    let mut c = RunConfig::default();
    c.resolve();
    assert_eq!(c.caption.tagger, toy, "merged always needs one");
}

#[test]
fn missing_files_name_the_key() {
    let mut c = RunConfig {
        model: Some("/nonexistent/base.safetensors".into()),
        ..Default::default()
    };
    c.resolve();
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.starts_with("model: /nonexistent/base.safetensors: no such file"),
        "{e}"
    );
}

/// The evaluation size is checked against the model's shapes before
/// any stage runs (it was first read by the merge sweep, after train).
#[test]
fn the_evaluation_size_is_checked_before_anything_runs() {
    let mut c = RunConfig::default();
    c.resolve();
    c.check_files().unwrap();
    c.evaluate.size = [100, 100];
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.starts_with("evaluate.size: size 100x100") && e.contains("multiples of 32"),
        "{e}"
    );
    c.stages = vec!["generate".into(), "caption".into()];
    c.check_files().unwrap();
    // A bad device fails before any stage that uses one; stages that
    // use none do not look at it.
    c.stages = vec!["train".into(), "merge".into()];
    c.evaluate.size = [64, 64];
    c.device.device = Some("gpu".into());
    let e = c.check_files().unwrap_err().to_string();
    assert!(e.starts_with("device.device"), "{e}");
    c.stages = vec!["bucket".into()];
    c.check_files().unwrap();
}

/// A block the UNet does not have is refused before any stage runs (it
/// was first found by train, after generation and curation).
#[test]
fn a_block_the_unet_lacks_is_refused_before_anything_runs() {
    let mut c = RunConfig::default();
    c.resolve();
    c.train.blocks = vec!["OUT99".into()];
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.starts_with("train.blocks: block OUT99 does not exist in this UNet"),
        "{e}"
    );
    c.stages = vec!["generate".into()];
    c.check_files().unwrap();
}

/// The toy tagger is no default for a model outside the toy world.
#[test]
fn a_real_model_needs_a_tagger_of_its_own() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("real.safetensors");
    std::fs::write(&model, b"not a toy checkpoint").unwrap();
    let mut c = RunConfig {
        model: Some(model),
        ..Default::default()
    };
    c.resolve();
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.starts_with("caption.tagger: not given") && e.contains("not a toy model"),
        "{e}"
    );
}

#[test]
fn sizes_parse_with_weights() {
    let s = parse_sizes(&["64x64".into(), "96x64=2".into()]).unwrap();
    assert_eq!(s.candidates(), vec![(64, 64), (96, 64)]);
    assert!(parse_sizes(&["64x".into()]).is_err());
    assert!(parse_sizes(&["64x64=-1".into()]).is_err());
    assert_eq!(parse_sizes(&[]).unwrap(), Sizes::sdxl());
}

/// `fixtures/configs/toy.toml` spells out the built-in default, and
/// `sdxl-1girl.toml` parses.
#[test]
fn committed_configs_parse_and_toy_is_the_default() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/configs");
    let toy = RunConfig::load(&dir.join("toy.toml")).unwrap();
    assert_eq!(
        serde_json::to_value(&toy).unwrap(),
        serde_json::to_value(RunConfig::default()).unwrap()
    );
    let real = RunConfig::load(&dir.join("sdxl-1girl.toml")).unwrap();
    assert_eq!(real.train.effective_stages().len(), 2);
    assert_eq!(real.generate.template, "1girl");
}

/// The committed schema is what the structs generate (regenerate with
/// `eps2v run --print-schema > schemas/config.schema.json`).
#[test]
fn committed_schema_matches_the_structs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/config.schema.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == schema_json(),
        "{} is stale: run `cargo run -- run --print-schema > schemas/config.schema.json`",
        path.display()
    );
}

/// The stages' checks name flags; in a config they name the keys.
#[test]
fn stage_errors_name_the_config_keys() {
    let check = |toml: &str| {
        let mut c = RunConfig::from_toml(toml, "c.toml").unwrap();
        c.resolve();
        c.check_files().unwrap_err().to_string()
    };
    assert_eq!(
        check("[generate]\ncount = 0\n"),
        "generate.count must be at least 1"
    );
    let e = check("[generate]\ncfg = -1.0\n");
    assert!(
        e.starts_with("generate.cfg must be a positive number"),
        "{e}"
    );
    let e = check("[generate]\nseed = 9223372036854775807\n");
    assert!(
        e.starts_with("generate.seed 9223372036854775807: the images take seeds"),
        "{e}"
    );
    let e = check("[caption.thresholds]\ngeneral = 1.5\ncharacter = 0.75\nmcut = false\n");
    assert!(
        e.starts_with("caption.thresholds.general 1.5: must be a probability"),
        "{e}"
    );
    let e = check("[generate]\nsampler = \"DPM++ 2M Karras\"\nschedule = \"normal\"\n");
    assert!(
        e.starts_with("generate.sampler: sampler \"DPM++ 2M Karras\" names the karras schedule"),
        "{e}"
    );
    let mut c =
        RunConfig::from_toml("[generate]\nsampler = \"DPM++ 2M Karras\"\n", "c.toml").unwrap();
    c.resolve();
    let g = c.generate_config().unwrap();
    assert_eq!(
        (g.sampler, g.schedule),
        (
            SamplerKind::DpmPp2m,
            Some(crate::diffusion::ScheduleKind::Karras)
        )
    );
    let e = check("[evaluate]\ncfg = 0.0\n");
    assert!(
        e.starts_with("evaluate.cfg must be a positive number"),
        "{e}"
    );
    // A message naming no flag keeps its section.
    assert_eq!(
        as_keys(
            Error::config("--counted x"),
            "generate",
            &[("--count", "generate.count")]
        )
        .to_string(),
        "generate: --counted x"
    );
}

/// α outside [0, 1] extrapolates past the converted or the base model (a
/// percentage given as 25 is the likely cause): refused before any stage.
#[test]
fn merge_alphas_outside_the_unit_interval_are_refused() {
    let mut c = RunConfig::default();
    c.resolve();
    c.merge.alphas = vec![0.25, 50.0];
    let e = c.check_files().unwrap_err().to_string();
    assert!(e.starts_with("merge.alphas: 50 is outside [0, 1]"), "{e}");
    c.merge.alphas = vec![0.0, 1.0];
    c.check_files().unwrap();
    c.merge.alphas = vec![-0.1];
    assert!(c.check_files().is_err());
    c.stages = vec!["generate".into()];
    c.check_files().unwrap();
}

/// eps with ZTSNR said in the config is refused before generation (it
/// used to warn and train).
#[test]
fn eps_with_ztsnr_is_refused_before_anything_runs() {
    let mut c =
        RunConfig::from_toml("[train]\nobjective = \"eps\"\nztsnr = true\n", "c.toml").unwrap();
    c.resolve();
    let e = c.check_files().unwrap_err().to_string();
    assert!(e.starts_with("train.ztsnr: true with objective eps"), "{e}");
    // eps alone turns ZTSNR off; on the toy (an eps model) the run would
    // then train eps on eps renders, which converts nothing.
    let mut c = RunConfig::from_toml("[train]\nobjective = \"eps\"\n", "c.toml").unwrap();
    c.resolve();
    assert!(!c.train.ztsnr);
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.starts_with("train.objective = \"eps\": model")
            && e.contains("already predicts epsilon")
            && e.contains("give the v model to convert"),
        "{e}"
    );
    assert_eq!(c.base_sampling(), (Prediction::Eps, false));
    // Without generate (training on a dataset made before) it is not judged.
    c.stages = vec!["train".into()];
    c.check_files().unwrap();
}

/// A v model given to `run` renders in v (its markers), not as eps, and
/// converting it to v again is refused before anything runs.
#[test]
fn a_v_model_renders_as_v_and_is_not_converted_to_v() {
    use crate::models::sdxl::checkpoint::{Checkpoint, SaveOptions};
    let d = tempfile::tempdir().unwrap();
    let v = d.path().join("v.safetensors");
    let toy = crate::run::defaults::default_model_path();
    Checkpoint::open(&toy)
        .unwrap()
        .save_with(
            &v,
            &Default::default(),
            &SaveOptions {
                v_pred: true,
                ztsnr: true,
                ..Default::default()
            },
        )
        .unwrap();
    let mut c = RunConfig {
        model: Some(v.clone()),
        ..RunConfig::default()
    };
    c.resolve();
    assert_eq!(c.base_sampling(), (Prediction::V, true));
    let g = c.generate_config().unwrap();
    assert_eq!(
        (g.prediction, g.ztsnr),
        (None, None),
        "the loader reads the markers"
    );
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.starts_with("train.objective = \"v\"")
            && e.contains("already predicts v (marker key v_pred)"),
        "{e}"
    );
    // The same file by another path is the same model.
    std::fs::create_dir(d.path().join("sub")).unwrap();
    c.train.model = d.path().join("sub").join("..").join("v.safetensors");
    assert_ne!(c.train.model, v);
    assert!(c.check_files().is_err());
    c.train.model = v.clone();
    c.train.objective = Prediction::Eps;
    c.train.ztsnr = false;
    c.check_files().unwrap();
    // The toy (eps) keeps rendering as eps, as the plans of earlier runs say.
    let mut c = RunConfig::default();
    c.resolve();
    let g = c.generate_config().unwrap();
    assert_eq!(
        (g.prediction, g.ztsnr),
        (Some(Prediction::Eps), Some(false))
    );
}

/// A model path that is there but no file (a broken link, a folder) is
/// named as such, not as "no such file".
#[cfg(unix)]
#[test]
fn a_model_that_is_no_file_is_named() {
    let d = tempfile::tempdir().unwrap();
    let link = d.path().join("m.safetensors");
    std::os::unix::fs::symlink(d.path().join("gone.safetensors"), &link).unwrap();
    let mut c = RunConfig {
        model: Some(link),
        ..RunConfig::default()
    };
    c.resolve();
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.starts_with("model: ") && e.contains("a broken link"),
        "{e}"
    );
    c.model = Some(d.path().to_path_buf());
    let e = c.check_files().unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
}
