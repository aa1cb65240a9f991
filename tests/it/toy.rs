//! The toy world from the command line: `eps2v toy scenes` writes PNG +
//! `.txt` scenes that `eps2v import` takes with their tags as captions,
//! and `eps2v bucket` with the toy bucket list keeps every scene at its own
//! size (no crop).

use std::process::Command;

use eps2v::manifest::Manifest;
use eps2v::toy::Scene;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps2v")
}

fn run(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn toy_scenes_import_with_their_tags_and_bucket_at_their_own_size() {
    let work = tempfile::tempdir().unwrap();
    let scenes = work.path().join("scenes");
    let ds = work.path().join("ds");
    let (s, d) = (scenes.to_str().unwrap(), ds.to_str().unwrap());
    let out = run(&["--json", "toy", "scenes", s, "--count", "12", "--seed", "3"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["written"], 12);
    // A rerun finds everything there.
    let v: serde_json::Value = serde_json::from_str(&run(&[
        "--json", "toy", "scenes", s, "--count", "12", "--seed", "3",
    ]))
    .unwrap();
    assert_eq!(
        (v["written"].as_u64(), v["skipped"].as_u64()),
        (Some(0), Some(12))
    );
    run(&["init", d]);
    run(&["--json", "import", d, "--from", s]);
    run(&[
        "--json",
        "bucket",
        d,
        "--kohya-resolution",
        "80",
        "--step",
        "32",
        "--min-side",
        "64",
        "--max-side",
        "96",
    ]);
    let m = Manifest::open(&ds).unwrap();
    let mut q = m
        .conn()
        .prepare(
            "SELECT s.path, c.text, b.bucket_w, b.bucket_h, b.crop_left, b.crop_top
             FROM items i JOIN sources s ON s.item_id = i.id
             JOIN captions c ON c.item_id = i.id AND c.source = 'sidecar_txt'
             JOIN buckets b ON b.item_id = i.id",
        )
        .unwrap();
    let rows: Vec<(String, String, u32, u32, u32, u32)> = q
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 12);
    for (path, caption, bw, bh, cl, ct) in rows {
        let stem = std::path::Path::new(&path)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let index: u64 = stem.trim_start_matches("scene_").parse().unwrap();
        let scene = Scene::random(3, index);
        assert_eq!(caption.trim(), scene.caption());
        assert_eq!(
            (bw, bh, cl, ct),
            (scene.width, scene.height, 0, 0),
            "{stem}"
        );
    }
}

fn toy_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/toy")
}

fn committed_tagger() -> eps2v::models::tagger::Tagger {
    eps2v::models::tagger::Tagger::load(&toy_dir().join("tagger"), &candle_core::Device::Cpu)
        .unwrap()
}

/// Adherence of the committed base model on the first `prompts` prompts of
/// the fixed set (`steps` Euler steps, CFG 5), sampled as `prediction`
/// (+ ZTSNR).
fn committed_base_adherence(
    prediction: &str,
    ztsnr: bool,
    prompts: usize,
    steps: usize,
) -> eps2v::toy::eval::ToyEval {
    use eps2v::toy::eval::{evaluate, EvalOptions};
    let model = eps2v::pipeline::SdxlModel::load(
        toy_dir().join("model.safetensors"),
        &eps2v::pipeline::LoadOptions {
            device: Some(candle_core::Device::Cpu),
            prediction: Some(prediction.parse().unwrap()),
            ztsnr: Some(ztsnr),
            ..Default::default()
        },
    )
    .unwrap();
    evaluate(
        &model,
        &committed_tagger(),
        &EvalOptions {
            prompts,
            steps,
            ..Default::default()
        },
        &eps2v::stages::Ctx::quiet(),
    )
    .unwrap()
}

/// The committed toy tagger (`fixtures/toy/tagger`, written by `eps2v toy
/// build`) meets its gate: it reads the adherence attributes of fresh
/// scenes right ≥ 95 % of the time.
#[test]
fn the_committed_tagger_meets_its_gate() {
    use eps2v::toy::build::TAGGER_GATE;
    // Seed 7: scenes neither the tagger (seed 201) nor the UNet (seed 0) saw.
    let acc = eps2v::toy::eval::tagger_attribute_accuracy(&committed_tagger(), 7, 300).unwrap();
    assert!(acc.mean() >= TAGGER_GATE, "tagger attributes {acc:?}");
}

/// The adherence gate, as the README measures it (`toy eval
/// --prompts 256 --steps 20`): the base model sampled as eps follows its
/// prompts ≥ 80 % (measured 83.6 %).
#[test]
fn the_committed_base_model_meets_the_adherence_gate() {
    let e = committed_base_adherence("eps", false, 256, 20);
    assert!(
        e.overall >= eps2v::toy::build::ADHERENCE_GATE,
        "adherence {:?}, has shapes {}",
        e.adherence,
        e.has_shapes
    );
}

/// What the committed base model does today, as a floor a rebuild must not
/// fall under (measured 0.867 on these 32 prompts, 12 steps), and that the
/// same weights sampled as v + ZTSNR (an unconverted eps model read the
/// wrong way) follow their prompts clearly worse (measured 0.688; on 256
/// prompts, 20 steps, 83.6 % against 67.1 %): the damage the conversion
/// exists to repair.
#[test]
fn the_committed_base_model_follows_prompts_as_eps_not_as_v() {
    let eps = committed_base_adherence("eps", false, 32, 12);
    assert!(eps.overall >= BASE_FLOOR, "as eps: {:?}", eps.adherence);
    assert_eq!(eps.prediction, "eps");
    let v = committed_base_adherence("v", true, 32, 12);
    eprintln!("as eps {:.3}, as v + ZTSNR {:.3}", eps.overall, v.overall);
    assert!(
        eps.overall >= v.overall + 0.10,
        "as eps {:.3}, as v + ZTSNR {:.3}",
        eps.overall,
        v.overall
    );
}

/// `eps2v toy eval --denoise-from`: fresh scenes noised to the last step's
/// σ come back about as the VAE round trip reads them (measured 92.2 % on
/// these 32 scenes, 12 steps); from step 0 (txt2img with the scene under
/// σ_max's noise) the committed base reads about as from pure noise (79.7 %).
/// A step outside `--steps` is a config error naming the flag.
#[test]
fn denoising_fresh_scenes_from_low_noise_keeps_them() {
    let v: serde_json::Value = serde_json::from_str(&run(&[
        "--json",
        "toy",
        "eval",
        "--prompts",
        "32",
        "--steps",
        "12",
        "--denoise-from",
        "0,11",
    ]))
    .unwrap();
    let rows = v.as_array().unwrap();
    let overall = |i: usize| rows[i]["overall"].as_f64().unwrap();
    assert_eq!(rows[1]["step"], 11);
    assert!(overall(1) >= 0.85, "from the last step: {}", rows[1]);
    assert!(overall(1) >= overall(0) + 0.08, "{v}");
    assert!(rows[0]["sigma"].as_f64().unwrap() > 14.0, "{}", rows[0]);
    let out = Command::new(bin())
        .args(["toy", "eval", "--steps", "4", "--denoise-from", "4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--denoise-from 4"));
}

/// Floor of [`the_committed_base_model_follows_prompts_as_eps_not_as_v`].
const BASE_FLOOR: f64 = 0.82;

/// On a fresh clone `eps2v sample` needs neither `--model` nor `--size`: it
/// samples the committed toy model at its own 64×64; with the toy folder
/// missing it says so (exit 2).
#[test]
fn sample_defaults_to_the_committed_toy_model() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let v: serde_json::Value = serde_json::from_str(&run(&[
        "--json",
        "sample",
        "--prompt",
        "1shape, red circle",
        "--steps",
        "4",
        "--seed",
        "1",
        "--out",
        o,
    ]))
    .unwrap();
    assert_eq!(v["model"]["prediction"], "eps", "{v}");
    let pngs: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    assert_eq!(pngs.len(), 1);
    // Without --size: the toy model's own 64×64, not SDXL's 1024².
    assert_eq!(image::image_dimensions(&pngs[0]).unwrap(), (64, 64));
    let missing = Command::new(bin())
        .args(["sample", "--prompt", "1shape", "--out", o])
        .env("EPS2V_TOY_DIR", out.path().join("nowhere"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("nowhere") && err.contains("--model"), "{err}");
}

/// `eps2v toy eval` samples the committed model as eps by default and, with
/// `--prediction v --ztsnr`, the same weights as v + ZTSNR.
#[test]
fn toy_eval_honours_the_model_and_its_overrides() {
    // `toy eval` on 3 prompts at 3 steps, plus `extra` flags.
    let eval = |extra: &[&str]| -> serde_json::Value {
        let args = [
            &["--json", "toy", "eval", "--prompts", "3", "--steps", "3"],
            extra,
        ]
        .concat();
        serde_json::from_str(&run(&args)).unwrap()
    };
    let v = eval(&[]);
    assert_eq!(
        (v["prediction"].as_str(), v["ztsnr"].as_bool()),
        (Some("eps"), Some(false))
    );
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    let v = eval(&["--prediction", "v", "--ztsnr"]);
    assert_eq!(
        (v["prediction"].as_str(), v["ztsnr"].as_bool()),
        (Some("v"), Some(true))
    );
    let o = v["overall"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&o));
    // CFG rescale: given, it replaces the v default (0.7); out of range is
    // a config error naming the flag.
    let v = eval(&["--prediction", "v", "--ztsnr", "--rescale", "0"]);
    assert_eq!(v["options"]["rescale"].as_f64(), Some(0.0));
    let out = Command::new(bin())
        .args(["toy", "eval", "--prompts", "1", "--rescale", "1.5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rescale"));
}

/// `eps2v generate` with no `--model` renders the committed toy model with
/// the toy template at the toy sizes (not 1girl prompts at 1024²).
#[test]
fn generate_defaults_to_the_toy_model_template_and_sizes() {
    let work = tempfile::tempdir().unwrap();
    let ds = work.path().join("ds");
    let d = ds.to_str().unwrap();
    run(&["--json", "generate", d, "--count", "3", "--steps", "2"]);
    let m = Manifest::open(&ds).unwrap();
    let rows: Vec<(String, u32, u32)> = m
        .conn()
        .prepare("SELECT prompt, width, height FROM gen_items ORDER BY idx")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for (prompt, w, h) in rows {
        let spec = eps2v::toy::parse_tags(&prompt).unwrap();
        assert!(spec.count.is_some() && !spec.shapes.is_empty(), "{prompt}");
        assert!(eps2v::toy::scenes::TOY_BUCKETS.contains(&(w, h)), "{w}x{h}");
    }
}

/// A toy model under another name (what `train` and `merge` write) keeps
/// `generate`'s toy template and sizes; an SDXL-family file gets the 1girl
/// pack and the SDXL buckets. Decided from the file's UNet config.
#[test]
fn generate_picks_its_defaults_by_the_model_not_by_the_flag() {
    use clap::Parser;
    use eps2v::pipeline::tiny::{write_random_checkpoint, TinyOptions};
    use eps2v::prompts::TemplateSpec;
    use eps2v::stages::generate::plan::Sizes;
    let work = tempfile::tempdir().unwrap();
    let renamed = work.path().join("converted.safetensors");
    std::fs::copy(eps2v::toy::default_model_path().unwrap(), &renamed).unwrap();
    let sdxl = work.path().join("tiny_sdxl.safetensors");
    write_random_checkpoint(
        &sdxl,
        TinyOptions {
            seed: 3,
            v_pred_ztsnr: false,
        },
    )
    .unwrap();
    let config = |model: &std::path::Path| {
        let args = ["eps2v", "generate", "ds", "--count", "2", "--model"];
        let mut args: Vec<&str> = args.to_vec();
        args.push(model.to_str().unwrap());
        let cli = eps2v::cli::Cli::try_parse_from(&args).unwrap();
        let eps2v::cli::Command::Generate(g) = cli.command else {
            panic!("not generate")
        };
        g.to_config(&|_| None).unwrap()
    };
    let c = config(&renamed);
    assert_eq!(c.template, TemplateSpec::Builtin("toy".into()));
    let Sizes::Weighted(w) = &c.sizes else {
        panic!("{:?}", c.sizes)
    };
    let sizes: Vec<(u32, u32)> = w.iter().map(|s| (s.width, s.height)).collect();
    assert_eq!(sizes, eps2v::toy::scenes::TOY_BUCKETS.to_vec());
    let c = config(&sdxl);
    assert_eq!(c.template, TemplateSpec::Builtin("1girl".into()));
    assert_eq!(c.sizes, Sizes::sdxl());
}

/// The stages one by one on the toy world with no model, tagger or bucket
/// flag, as the brief promises every command defaults to it: generate →
/// caption (the toy tagger, since toy models made every image) → dedupe →
/// bucket (the toy buckets: the SDXL list would reject every image as too
/// small) → train → merge sweep (prompts from the toy pack) → sample.
#[test]
fn the_stages_one_by_one_on_the_toy_world_take_its_defaults() {
    let work = tempfile::tempdir().unwrap();
    let ds = work.path().join("ds");
    let d = ds.to_str().unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&run(&a)).unwrap()
    };
    let g = json(&["generate", d, "--count", "6", "--steps", "4"]);
    assert_eq!(g["rendered"], 6, "{g}");
    let c = json(&["caption", d]);
    assert_eq!(c["tagged"], 6, "{c}");
    json(&["dedupe", d]);
    let b = json(&["bucket", d]);
    assert_eq!(
        (
            b["bucketed"].as_u64(),
            b["rejected"].as_object().map(|r| r.len())
        ),
        (Some(6), Some(0)),
        "{b}"
    );
    assert_eq!(b["settings"]["buckets"]["resolution"], 80, "{b}");
    assert!(
        b["settings_from"]
            .as_str()
            .unwrap()
            .starts_with("the toy world's"),
        "{b}"
    );
    // A plain rerun keeps them (the set they were made with).
    let b = json(&["bucket", d]);
    assert_eq!(
        (b["bucketed"].as_u64(), b["already"].as_u64()),
        (Some(0), Some(6)),
        "{b}"
    );
    let out = work.path().join("converted.safetensors");
    let o = out.to_str().unwrap();
    let t = json(&["train", d, "--steps", "1", "--eval-every", "0", "--out", o]);
    assert!(out.is_file(), "{t}");
    let base = eps2v::toy::default_model_path().unwrap();
    let stem = work.path().join("sweep/m.safetensors");
    let text = run(&[
        "merge",
        o,
        base.to_str().unwrap(),
        "--sweep",
        "0.5",
        "--markers",
        "a",
        "--eval-seeds",
        "0",
        "--eval-steps",
        "2",
        "--out",
        stem.to_str().unwrap(),
    ]);
    assert!(
        text.contains("eval prompts: 8 drawn from the built-in toy pack"),
        "{text}"
    );
    let merged = work.path().join("sweep/m-a0.5.safetensors");
    assert!(merged.is_file(), "{text}");
    let s = json(&[
        "sample",
        "--model",
        merged.to_str().unwrap(),
        "--prompt",
        "red circle",
        "--steps",
        "4",
        "--out",
        work.path().join("samples").to_str().unwrap(),
    ]);
    assert_eq!(s["files"].as_array().map(|v| v.len()), Some(1), "{s}");
    assert_eq!(s["broken"].as_array().map(|v| v.len()), Some(0), "{s}");
}

/// `train` without `--model` converts the model that generated the
/// dataset (found where `generate` was given it, by its hash), not the toy
/// base; a model file gone since is an error saying so. A toy dataset with
/// imported images mixed in gets no toy-tagger default.
#[test]
fn train_defaults_to_the_generating_model_and_mixed_datasets_name_their_tagger() {
    let work = tempfile::tempdir().unwrap();
    let ds = work.path().join("ds");
    let d = ds.to_str().unwrap();
    let base = eps2v::toy::default_model_path().unwrap();
    // Another toy model: the base merged with itself (same weights, other
    // metadata, so another file hash).
    let other = work.path().join("other.safetensors");
    let o = other.to_str().unwrap();
    let b = base.to_str().unwrap();
    run(&["merge", b, b, "--alpha", "0", "--out", o]);
    assert_ne!(
        std::fs::read(&other).unwrap(),
        std::fs::read(&base).unwrap()
    );
    run(&["generate", d, "--model", o, "--count", "5", "--steps", "2"]);
    // A smaller plan leaves its last image behind as a replanned item: a
    // generated one, not an imported one.
    run(&[
        "generate", d, "--model", o, "--count", "4", "--steps", "2", "--replan",
    ]);
    // Still a toy dataset: the toy tagger and buckets by default.
    run(&["caption", d]);
    run(&["bucket", d]);
    let out = work.path().join("c.safetensors");
    let text = run(&[
        "train",
        d,
        "--steps",
        "1",
        "--eval-every",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        text.contains(&format!(
            "base model: {o} (no --model given: the model that generated the dataset)"
        )),
        "{text}"
    );
    // 4 items at --val-fraction 0.05 hold none out: said.
    assert!(
        text.contains("(no validation loss: --val-fraction 0.05 of 4 items holds none out)"),
        "{text}"
    );
    // Imported images mixed in: caption wants a tagger.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/images");
    Command::new(bin())
        .args(["import", d, "--from", fixtures.to_str().unwrap()])
        .output()
        .unwrap();
    let e = Command::new(bin()).args(["caption", d]).output().unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(2), "{err}");
    assert!(err.contains("some of its images were imported"), "{err}");
    // The model moved away: train and caption say where it was.
    std::fs::rename(&other, work.path().join("moved.safetensors")).unwrap();
    for args in [
        vec!["train", d, "--steps", "1", "--out", out.to_str().unwrap()],
        vec!["caption", d],
    ] {
        let e = Command::new(bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&e.stderr);
        assert_eq!(e.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("other, whose file is no longer at {o}")),
            "{err}"
        );
    }
}
