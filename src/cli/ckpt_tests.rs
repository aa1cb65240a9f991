use super::*;
use crate::models::sdxl::checkpoint::is_marker_key;
use crate::pipeline::tiny::{write_random_checkpoint, TinyOptions};
use candle_core::{DType, Device};

fn args(file: &std::path::Path, out: &std::path::Path, prediction: &str) -> MarkArgs {
    MarkArgs {
        file: file.to_path_buf(),
        prediction: prediction.into(),
        ztsnr: false,
        no_markers: false,
        a1111_yaml: false,
        out: out.to_path_buf(),
    }
}

/// A seeded tiny eps checkpoint stored in f16 (so that a mark that
/// changed dtypes would show), in `dir`.
fn tiny_f16(dir: &std::path::Path) -> std::path::PathBuf {
    let raw = dir.join("raw.safetensors");
    let opts = TinyOptions {
        seed: 5,
        v_pred_ztsnr: false,
    };
    write_random_checkpoint(&raw, opts).unwrap();
    let eps = dir.join("eps.safetensors");
    let save = crate::models::sdxl::checkpoint::SaveOptions {
        dtype: Some(DType::F16),
        v_pred: false,
        ztsnr: false,
        metadata: Default::default(),
    };
    Checkpoint::open(&raw)
        .unwrap()
        .save_with(&eps, &Default::default(), &save)
        .unwrap();
    eps
}

/// Every tensor but the markers, with its stored dtype and values.
fn weights(p: &std::path::Path) -> Vec<(String, String, Vec<f32>)> {
    let ck = Checkpoint::open(p).unwrap();
    ck.entries()
        .iter()
        .filter(|(k, _)| !is_marker_key(k))
        .map(|(k, e)| {
            let t = ck.tensor(k, DType::F32, &Device::Cpu).unwrap();
            (
                k.clone(),
                e.dtype.clone(),
                t.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

/// `ckpt mark` adds (or drops) the markers and the prediction metadata,
/// and changes nothing else: same tensors, same dtypes, the other
/// metadata kept.
#[test]
fn mark_sets_the_markers_and_copies_everything_else() {
    let d = tempfile::tempdir().unwrap();
    let eps = tiny_f16(d.path());
    let before = Checkpoint::open(&eps).unwrap().metadata().clone();
    assert!(!before.is_empty());

    let v = d.path().join("out/v.safetensors");
    // A1111's yaml describes the SDXL base UNet, not the tiny one: refused
    // before anything is written.
    let e = mark(&MarkArgs {
        ztsnr: true,
        a1111_yaml: true,
        ..args(&eps, &v, "v")
    })
    .unwrap_err();
    assert!(e.to_string().contains("A1111 configs describe"), "{e}");
    assert!(!v.exists());
    let r = mark(&MarkArgs {
        ztsnr: true,
        ..args(&eps, &v, "v")
    })
    .unwrap();
    assert_eq!((r.prediction.as_str(), r.ztsnr), ("v", true));
    assert_eq!(r.markers, ["v_pred", "ztsnr"]);
    assert_eq!(r.written, std::slice::from_ref(&v));
    let w = weights(&v);
    assert!(w.iter().any(|(_, dtype, _)| dtype == "F16"));
    assert_eq!(w, weights(&eps));
    let after = Checkpoint::open(&v).unwrap().metadata().clone();
    for (k, val) in &before {
        if k != "modelspec.prediction_type" && k != "eps2v.ztsnr" {
            assert_eq!(after.get(k), Some(val), "metadata {k}");
        }
    }
    assert_eq!(after["modelspec.prediction_type"], "v");

    // Back to eps: no markers, the metadata says epsilon.
    let back = d.path().join("back.safetensors");
    let r = mark(&args(&v, &back, "eps")).unwrap();
    assert_eq!((r.prediction.as_str(), r.ztsnr), ("epsilon", false));
    assert!(r.markers.is_empty());
    assert_eq!(weights(&back), weights(&eps));

    // Metadata only: read as v by eps2v (with its warning), no keys.
    let quiet = d.path().join("quiet.safetensors");
    let r = mark(&MarkArgs {
        no_markers: true,
        ..args(&eps, &quiet, "v")
    })
    .unwrap();
    assert_eq!(r.prediction, "v");
    assert!(r.markers.is_empty());
    let p = Checkpoint::open(&quiet).unwrap().prediction();
    assert!(p.warnings.iter().any(|w| w.contains("ckpt mark")), "{p:?}");
}

/// What cannot be marked is refused before anything is written.
#[test]
fn mark_refuses_eps_with_ztsnr_or_yaml_and_its_own_input() {
    let d = tempfile::tempdir().unwrap();
    let eps = d.path().join("eps.safetensors");
    let out = d.path().join("out.safetensors");
    let e = mark(&MarkArgs {
        ztsnr: true,
        ..args(&eps, &out, "eps")
    })
    .unwrap_err();
    assert!(e.to_string().contains("use --prediction v"), "{e}");
    let e = mark(&MarkArgs {
        a1111_yaml: true,
        ..args(&eps, &out, "eps")
    })
    .unwrap_err();
    assert!(e.to_string().contains("--a1111-yaml is for v"), "{e}");
    std::fs::write(&eps, b"not read").unwrap();
    let e = mark(&args(&eps, &eps, "v")).unwrap_err();
    assert!(e.to_string().contains("that is FILE itself"), "{e}");
    let e = mark(&args(&eps, &d.path().join("out.ckpt"), "v")).unwrap_err();
    assert!(e.to_string().contains("name it NAME.safetensors"), "{e}");
    // A yaml beside OUT wins over the keys in A1111: refused unless replaced.
    std::fs::write(out.with_extension("yaml"), b"model: {}").unwrap();
    let e = mark(&args(&eps, &out, "eps")).unwrap_err();
    assert!(e.to_string().contains("remove it"), "{e}");
    assert!(!out.exists());
    // An existing OUT (an earlier mark, another model) is not replaced.
    std::fs::remove_file(out.with_extension("yaml")).unwrap();
    std::fs::write(&out, b"an earlier file").unwrap();
    let e = mark(&args(&eps, &out, "v")).unwrap_err();
    assert!(
        e.to_string().contains("exists; give a new file name"),
        "{e}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"an earlier file");
    // `--prediction` takes the names `sample` takes.
    for (given, want) in [("epsilon", "eps"), ("v_prediction", "v"), ("V", "v")] {
        assert_eq!(parse_mark_prediction(given).as_deref(), Ok(want));
    }
    assert!(parse_mark_prediction("edm").is_err());
}

/// An EDM model (CosXL, Playground 2.5) is refused: its keys set its
/// sampling, and a discrete mark would drop them.
#[test]
fn mark_refuses_an_edm_model() {
    let d = tempfile::tempdir().unwrap();
    let eps = tiny_f16(d.path());
    let ck = Checkpoint::open(&eps).unwrap();
    let mut all: std::collections::HashMap<String, candle_core::Tensor> = ck
        .entries()
        .keys()
        .map(|k| (k.clone(), ck.tensor(k, DType::F32, &Device::Cpu).unwrap()))
        .collect();
    for k in ["edm_mean", "edm_std"] {
        all.insert(
            k.into(),
            candle_core::Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let edm = d.path().join("edm.safetensors");
    candle_core::safetensors::save(&all, &edm).unwrap();
    let out = d.path().join("out.safetensors");
    let e = mark(&args(&edm, &out, "v")).unwrap_err();
    assert!(e.to_string().contains("an EDM model"), "{e}");
    assert!(!out.exists());
}
