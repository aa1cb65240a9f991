//! Golden tests of the tagger against timm (fixtures/golden/tagger/, made by
//! fixtures/scripts/gen_tagger_goldens.py): model outputs, the reference
//! preprocessing bit for bit, and the whole image → probabilities path.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::*;
use crate::imaging::decode::{decode, DecodeLimits};

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/tagger")
}

fn image_path(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/images")
        .join(name);
    if p.exists() {
        p
    } else {
        golden().join(name)
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|v| v.abs() as f64).fold(1e-12, f64::max);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    diff / scale
}

/// Equivalent timm code: `model(x)` for the tiny random ViTs of the script
/// (v3 arguments; class token + fc_norm + erf GELU).
#[test]
fn tiny_vits_match_timm_logits() {
    for name in ["vit_v3_tiny", "vit_cls_fcnorm_tiny"] {
        let dir = golden().join(name);
        let t = Tagger::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(t.labels.len(), 24);
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
        let logits = t.model.forward(&io["x"]).unwrap();
        let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = io["logits"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let e = rel_err(&got, &want);
        assert!(e <= 1e-4, "{name}: relative error {e}");
    }
    // The two goldens really take the two branches.
    let a = TaggerConfig::from_file(&golden().join("vit_v3_tiny/config.json")).unwrap();
    let b = TaggerConfig::from_file(&golden().join("vit_cls_fcnorm_tiny/config.json")).unwrap();
    assert!(!a.class_token && !a.fc_norm && a.activation == TaggerActivation::GeluTanh);
    assert!(b.class_token && b.fc_norm && b.activation == TaggerActivation::GeluErf);
}

/// The reference preprocessing (wdv3-timm + timm eval transform) on odd
/// inputs, bit for bit, at the tiny size and at the real 448.
#[test]
fn preprocessing_matches_the_reference_bit_for_bit() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("preprocess.json")).unwrap())
            .unwrap();
    let cases = g.as_object().unwrap();
    assert!(cases.len() >= 12);
    for (name, entry) in cases {
        let bytes = std::fs::read(image_path(name)).unwrap();
        let d = decode(&bytes, &DecodeLimits::default()).unwrap();
        for size in [32usize, 448] {
            let want = &entry[size.to_string()];
            let p = Preprocess {
                size,
                ..Preprocess::new(&TaggerConfig::wd_vit_v3())
            };
            let resized = p.resize(&d.rgb);
            assert_eq!(
                hex::encode(Sha256::digest(&resized)),
                want["u8_sha256"].as_str().unwrap(),
                "{name} at {size}: resized pixels"
            );
            let x = p.normalize_bgr(&resized);
            let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(
                hex::encode(Sha256::digest(&raw)),
                want["f32_sha256"].as_str().unwrap(),
                "{name} at {size}: BGR tensor"
            );
        }
    }
    // The deviations from the script's own decode are the documented ones.
    let deviating: Vec<&str> = cases
        .iter()
        .filter(|(_, e)| !e["32"]["script_equal"].as_bool().unwrap())
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(deviating, ["grey16.png", "grey_alpha.png", "rgb16.png"]);
    assert!(
        cases["rgb16.png"]["32"]["script_max_level_diff"]
            .as_i64()
            .unwrap()
            <= 1
    );
}

/// Image file → decode → preprocess → tiny v3 tagger → sigmoid, against
/// the same path in Python.
#[test]
fn image_to_probabilities_matches_the_reference() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("e2e.json")).unwrap()).unwrap();
    let t = Tagger::load(&golden().join("vit_v3_tiny"), &Device::Cpu).unwrap();
    let probs = g["probabilities"].as_object().unwrap();
    assert!(probs.len() >= 4);
    let mut images = Vec::new();
    let mut want = Vec::new();
    for (name, p) in probs {
        let d = decode(
            &std::fs::read(image_path(name)).unwrap(),
            &DecodeLimits::default(),
        )
        .unwrap();
        images.push(t.preprocess.image(&d.rgb));
        want.push(
            p.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect::<Vec<f32>>(),
        );
    }
    // One batch: batching must not change any image's result.
    let got = t
        .probabilities(&t.preprocess.batch(&images, &Device::Cpu).unwrap())
        .unwrap();
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = rel_err(g, w);
        assert!(e <= 1e-4, "image {k}: relative error {e}");
    }
}

#[test]
fn config_is_inferred_from_shapes_without_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TaggerConfig {
        embed_dim: 128,
        num_heads: 2,
        mlp_hidden: 256,
        depth: 3,
        ..TaggerConfig::tiny(6)
    };
    let mut opts = tiny::TinyTaggerOptions::with_default_tags(1);
    opts.tags.truncate(6);
    opts.config = cfg.clone();
    tiny::write_random_tagger(dir.path(), &opts).unwrap();
    let with = Tagger::load(dir.path(), &Device::Cpu).unwrap();
    std::fs::remove_file(dir.path().join(CONFIG_FILE)).unwrap();
    let without = Tagger::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(without.config.embed_dim, 128);
    assert_eq!(without.config.num_heads, 2);
    assert_eq!(without.config.depth, 3);
    assert_eq!(without.config.img_size, 32);
    assert_eq!(
        TaggerConfig {
            architecture: cfg.architecture.clone(),
            ..without.config.clone()
        },
        with.config
    );
    let x = Tensor::randn(0f32, 1.0, (1, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(
        with.probabilities(&x).unwrap(),
        without.probabilities(&x).unwrap()
    );
}

/// Bad tagger folders: each a clear model/config error naming the file.
#[test]
fn bad_tagger_folders_are_clear_errors() {
    let src = golden().join("vit_v3_tiny");
    let copy = |dir: &std::path::Path| {
        for f in [MODEL_FILE, TAGS_FILE, CONFIG_FILE] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    };
    let csv = std::fs::read_to_string(src.join(TAGS_FILE)).unwrap();
    let fewer: String = csv.lines().take(20).map(|l| format!("{l}\n")).collect();
    type Breaker = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "19 tags, but the model has 24 outputs",
            Box::new(move |d| std::fs::write(d.join(TAGS_FILE), &fewer).unwrap()),
        ),
        (
            "columns `name` and `category` are required",
            Box::new(|d| std::fs::write(d.join(TAGS_FILE), "id,tag\n1,a\n").unwrap()),
        ),
        (
            "line 3: 3 fields",
            Box::new(|d| {
                std::fs::write(
                    d.join(TAGS_FILE),
                    "tag_id,name,category,count\n1,a,9,1\n2,b,0\n",
                )
                .unwrap()
            }),
        ),
        (
            "only model.onnx",
            Box::new(|d| {
                std::fs::remove_file(d.join(MODEL_FILE)).unwrap();
                std::fs::write(d.join("model.onnx"), b"onnx").unwrap();
            }),
        ),
        (
            "no selected_tags.csv",
            Box::new(|d| std::fs::remove_file(d.join(TAGS_FILE)).unwrap()),
        ),
        (
            "is not supported",
            Box::new(|d| {
                std::fs::write(
                    d.join(CONFIG_FILE),
                    r#"{"architecture": "swinv2_base_window8_256", "num_classes": 24}"#,
                )
                .unwrap()
            }),
        ),
        (
            "wrong shape",
            Box::new(|d| {
                let c = std::fs::read_to_string(d.join(CONFIG_FILE))
                    .unwrap()
                    .replace("\"mlp_ratio\": 2.0", "\"mlp_ratio\": 4.0");
                std::fs::write(d.join(CONFIG_FILE), c).unwrap()
            }),
        ),
    ];
    for (want, break_it) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy(dir.path());
        break_it(dir.path());
        let e = Tagger::load(dir.path(), &Device::Cpu).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(want), "{want}: {msg}");
        assert_eq!(e.exit_code(), 2);
    }
    let e = Tagger::load(std::path::Path::new("/no/such/tagger"), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("no such tagger folder"), "{e}");
}

#[test]
fn batch_rejects_wrong_sizes() {
    let p = Preprocess::new(&TaggerConfig::tiny(2));
    assert!(p.batch(&[vec![0.0; 5]], &Device::Cpu).is_err());
    let x = p
        .batch(&vec![vec![0.0; 3 * 32 * 32]; 2], &Device::Cpu)
        .unwrap();
    assert_eq!(x.dims(), &[2, 3, 32, 32]);
    assert_eq!(x.dtype(), DType::F32);
}

/// `caption --precision bf16` path: the weights in bf16 (on the CPU here,
/// the same dtype plumbing as on CUDA), an f32 batch cast on the way in,
/// f32 probabilities out, close to the f32 model's.
#[test]
fn bf16_weights_take_an_f32_batch_and_stay_close_to_f32() {
    let dir = golden().join("vit_v3_tiny");
    let f32m = Tagger::load(&dir, &Device::Cpu).unwrap();
    let bf16 = Tagger::load_with(&dir, &Device::Cpu, DType::BF16).unwrap();
    assert_eq!((f32m.dtype(), bf16.dtype()), (DType::F32, DType::BF16));
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let a = f32m.probabilities(&x).unwrap();
    let b = bf16.probabilities(&x).unwrap();
    assert_eq!(a.len(), 2);
    let max = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(max > 0.0 && max < 0.05, "max |Δp| {max}");
}

/// Regression: a non-finite output was read as "no tag seen" (and the
/// last rating as the best), so the filter rejected every image without
/// a reason; it is an error naming the tagger and what to do.
#[test]
fn a_non_finite_output_is_an_error() {
    let dir = golden().join("vit_v3_tiny");
    let t = Tagger::load(&dir, &Device::Cpu).unwrap();
    let x = Tensor::full(f32::NAN, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let e = t.probabilities(&x).unwrap_err().to_string();
    assert!(
        e.contains("tagger") && e.contains("NaN") && e.contains("--precision f32"),
        "{e}"
    );
}

/// An SDXL checkpoint (or a LoRA, a VAE) given as the tagger is named as
/// such, not as a folder missing its tag list.
#[test]
fn a_checkpoint_given_as_the_tagger_is_named() {
    let toy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/toy/model.safetensors");
    let e = TaggerFiles::locate(&toy).unwrap_err().to_string();
    assert!(
        e.contains("this is an SDXL checkpoint, not a WD tagger") && e.contains("--tagger takes"),
        "{e}"
    );
    // The toy tagger's own weights file is one.
    let tagger =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/toy/tagger/model.safetensors");
    let f = TaggerFiles::locate(&tagger).unwrap();
    assert_eq!(f.model, tagger);
    assert!(!Tagger::load(&tagger, &Device::Cpu).unwrap().inferred_config);
}

/// A tagger folder without config.json loads with the architecture
/// inferred from its shapes, and says so (`caption` warns).
#[test]
fn a_tagger_without_its_config_says_it_was_inferred() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/toy/tagger");
    let d = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "selected_tags.csv"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    assert!(
        Tagger::load(d.path(), &Device::Cpu)
            .unwrap()
            .inferred_config
    );
}
