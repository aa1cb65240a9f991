//! Model-level tests of the SDXL UNet and VAE: key/shape census against the
//! reference list, golden outputs of Stability's `sgm` (fixtures made by
//! `fixtures/scripts/gen_sdxl_goldens.py`), and gradient coverage.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::checkpoint::{unet_expected_keys, vae_expected_keys, Checkpoint};
use super::*;

fn fixture(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Rows of fixtures/sdxl_keys_shapes.tsv (enumerated from the sgm SDXL base
/// architecture by fixtures/scripts/gen_keys_shapes.py; the same keys and
/// shapes as shared/reference/sdxl_keys_shapes.tsv).
fn reference_shapes(prefix: &str) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(fixture("fixtures/sdxl_keys_shapes.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .map(|l| {
            let (key, shape) = l.split_once('\t').unwrap();
            let dims = shape
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<usize>().unwrap())
                .collect();
            (key.to_string(), dims)
        })
        .collect()
}

fn as_map(keys: Vec<(String, Vec<usize>)>) -> BTreeMap<String, Vec<usize>> {
    let n = keys.len();
    let map: BTreeMap<_, _> = keys.into_iter().collect();
    assert_eq!(map.len(), n, "a key was requested twice");
    map
}

#[test]
fn sdxl_base_unet_requests_exactly_the_reference_keys_and_shapes() {
    let got = as_map(unet_expected_keys(&UNetConfig::sdxl_base()).unwrap());
    let want = reference_shapes("model.diffusion_model.");
    assert_eq!(want.len(), 1680);
    for (k, s) in &want {
        assert_eq!(got.get(k), Some(s), "{k}");
    }
    assert_eq!(got, want);
    let params: usize = got.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 2_567_463_684);
}

#[test]
fn sdxl_vae_requests_exactly_the_reference_keys_and_shapes() {
    let got = as_map(vae_expected_keys(&VaeConfig::sdxl(), VAE_PREFIX).unwrap());
    let want = reference_shapes("first_stage_model.");
    assert_eq!(want.len(), 248);
    for (k, s) in &want {
        assert_eq!(got.get(k), Some(s), "{k}");
    }
    assert_eq!(got, want);
    let params: usize = got.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 83_653_863);
}

/// Must equal `UNET` in fixtures/scripts/gen_sdxl_goldens.py.
fn golden_unet_config() -> UNetConfig {
    UNetConfig {
        model_channels: 8,
        num_head_channels: 8,
        context_dim: 16,
        pooled_dim: 8,
        num_groups: 4,
        ..UNetConfig::tiny()
    }
}

/// Must equal `VAE` in fixtures/scripts/gen_sdxl_goldens.py.
fn golden_vae_config() -> VaeConfig {
    VaeConfig {
        ch: 8,
        num_groups: 4,
        ..VaeConfig::tiny()
    }
}

fn golden_io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture(&format!("fixtures/golden/sdxl/{name}")),
        &Device::Cpu,
    )
    .unwrap()
}

/// Equivalent reference: sgm `UNetModel(x, timesteps, context, y)` with y built
/// from `timestep_embedding` of the six size scalars (`ConcatTimestepEmbedderND`).
#[test]
fn unet_matches_sgm_golden() {
    let io = golden_io("unet_io.safetensors");
    let sizes: Vec<SizeCond> = io["sizes"]
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| SizeCond {
            original: (r[0], r[1]),
            crop_top_left: (r[2], r[3]),
            target: (r[4], r[5]),
        })
        .collect();
    let y = build_y(&io["pooled"], &sizes).unwrap();
    // f32 sinusoids of sizes ≈ 1000: one ulp of the argument is ~1e-4, and
    // torch's vectorised expf may round a frequency differently from libm.
    let dy = max_abs_diff(&y, &io["y"]);
    assert!(dy <= 1e-4, "y max abs err {dy}");

    let ckpt = Checkpoint::open(fixture("fixtures/golden/sdxl/unet_weights.safetensors")).unwrap();
    let unet = ckpt
        .load_unet(&golden_unet_config(), DType::F32, &Device::Cpu)
        .unwrap();
    let out = unet
        .forward(&io["x"], &io["timesteps"], &io["context"], &io["y"])
        .unwrap();
    let d = max_abs_diff(&out, &io["out"]);
    eprintln!("unet max abs err {d}, y max abs err {dy}");
    assert!(d <= 1e-4, "unet max abs err {d}");
}

/// Half-precision weights run on the CPU through the same code (kernels
/// compute in f32, everything else in the storage dtype): the golden UNet
/// in bf16 and f16 stays within the rounding of those formats (8 and 11
/// significant bits) of the f32 reference. The CUDA run of the same check
/// needs a GPU machine.
#[test]
fn unet_runs_in_half_precision_on_cpu() {
    let io = golden_io("unet_io.safetensors");
    let ckpt = Checkpoint::open(fixture("fixtures/golden/sdxl/unet_weights.safetensors")).unwrap();
    let scale = io["out"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    for (dtype, rel_tol) in [(DType::BF16, 0.03f32), (DType::F16, 0.005)] {
        let unet = ckpt
            .load_unet(&golden_unet_config(), dtype, &Device::Cpu)
            .unwrap();
        let cast = |k: &str| io[k].to_dtype(dtype).unwrap();
        let out = unet
            .forward(&cast("x"), &io["timesteps"], &cast("context"), &cast("y"))
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        let d = max_abs_diff(&out, &io["out"]);
        eprintln!("{dtype:?}: unet max abs err {d} (output max {scale})");
        assert!(
            d.is_finite() && d <= rel_tol * scale,
            "{dtype:?}: max abs err {d}"
        );
    }
}

/// Equivalent reference: sgm `Encoder` → `quant_conv` → DiagonalGaussian
/// (mean, clamped logvar) and `post_quant_conv` → `Decoder`.
#[test]
fn vae_matches_sgm_golden() {
    let io = golden_io("vae_io.safetensors");
    let ckpt = Checkpoint::open(fixture("fixtures/golden/sdxl/vae_weights.safetensors")).unwrap();
    let vae = ckpt
        .load_vae(&golden_vae_config(), DType::F32, &Device::Cpu)
        .unwrap();
    let (mean, logvar) = vae.encode_moments(&io["image"]).unwrap();
    let dm = max_abs_diff(&mean, &io["mean"]);
    let dl = max_abs_diff(&logvar, &io["logvar"]);
    assert!(
        dm <= 1e-4 && dl <= 1e-4,
        "encode max abs err mean {dm} logvar {dl}"
    );
    let dec = vae.decode(&io["z"]).unwrap();
    let dd = max_abs_diff(&dec, &io["decoded"]);
    assert!(dd <= 1e-4, "decode max abs err {dd}");
    // encode_sample with zero noise is the mean.
    let zero = mean.zeros_like().unwrap();
    assert_eq!(
        max_abs_diff(&vae.encode_sample(&io["image"], &zero).unwrap(), &mean),
        0.0
    );
}

/// Re-saved VAEs store mid-attention q/k/v/proj_out as `[c, c]` matrices.
#[test]
fn vae_accepts_matrix_attention_weights() {
    let io = golden_io("vae_io.safetensors");
    let mut weights = golden_io("vae_weights.safetensors");
    let mut n = 0;
    for (k, t) in weights.iter_mut() {
        if k.contains(".attn_1.") && k.ends_with("weight") && t.rank() == 4 {
            let (o, i, _, _) = t.dims4().unwrap();
            *t = t.reshape((o, i)).unwrap();
            n += 1;
        }
    }
    assert_eq!(n, 8);
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let vae = Vae::new(vb.pp(VAE_PREFIX), &golden_vae_config()).unwrap();
    let dd = max_abs_diff(&vae.decode(&io["z"]).unwrap(), &io["decoded"]);
    assert!(dd <= 1e-4, "decode max abs err {dd}");
}

/// Every UNet parameter must receive a non-zero gradient: catches candle
/// layers that silently detach (reference §8.3, checklist §9.7).
#[test]
fn every_tiny_unet_parameter_gets_a_gradient() {
    let cfg = UNetConfig::tiny();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let unet = UNet::new(vb.pp(UNET_PREFIX), &cfg).unwrap();
    init_params(&varmap, 7).unwrap();
    let expected = unet_expected_keys(&cfg).unwrap();
    let vars = varmap.data().lock().unwrap().clone();
    assert_eq!(vars.len(), expected.len());

    let b = 2;
    let x = Tensor::randn(0f32, 1.0, (b, 4, 16, 16), &dev).unwrap();
    let t = Tensor::new(&[999f32, 10.0], &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (b, 5, cfg.context_dim), &dev).unwrap();
    let pooled = Tensor::randn(0f32, 1.0, (b, cfg.pooled_dim), &dev).unwrap();
    let y = build_y(&pooled, &[SizeCond::inference(128.0, 128.0); 2]).unwrap();
    let out = unet.forward(&x, &t, &ctx, &y).unwrap();
    assert_eq!(out.dims(), x.dims());
    let loss = (out - &x).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut dead = Vec::new();
    for (name, var) in &vars {
        let ok = grads.get(var.as_tensor()).is_some_and(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
        if !ok {
            dead.push(name.clone());
        }
    }
    dead.sort();
    assert!(
        dead.is_empty(),
        "{} parameters without gradient: {:?}",
        dead.len(),
        dead
    );
}

#[test]
fn trainable_loader_returns_vars_for_every_unet_key() {
    let path = fixture("fixtures/golden/sdxl/unet_weights.safetensors");
    let ckpt = Checkpoint::open(&path).unwrap();
    let cfg = golden_unet_config();
    let (_, varmap) = ckpt
        .load_unet_trainable(&cfg, DType::F32, &Device::Cpu)
        .unwrap();
    let vars = varmap.data().lock().unwrap();
    assert_eq!(vars.len(), unet_expected_keys(&cfg).unwrap().len());
    let key = "model.diffusion_model.out.2.weight";
    let want = ckpt.tensor(key, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(vars[key].as_tensor(), &want), 0.0);
}

/// A tiny single-file checkpoint written by `save_tensors` loads back with
/// its named configs detected and the same outputs.
#[test]
fn tiny_checkpoint_round_trips_through_save_and_load() {
    let dev = Device::Cpu;
    let (ucfg, vcfg) = (UNetConfig::tiny(), VaeConfig::tiny());
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let unet = UNet::new(vb.pp(UNET_PREFIX), &ucfg).unwrap();
    let vae = Vae::new(vb.pp(VAE_PREFIX), &vcfg).unwrap();
    init_params(&varmap, 3).unwrap();
    let tensors: Vec<(String, Tensor)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    let opts = checkpoint::SaveOptions {
        v_pred: true,
        ..Default::default()
    };
    // What a killed save of the same file left goes (pids above Linux's
    // largest, 2^22, are never live); another file's stays, and so does a
    // save of this file by a process still running (pid 1).
    let killed = dir.path().join(".tiny.safetensors.tmp-4999999");
    let other = dir.path().join(".other.safetensors.tmp-4999999");
    let live = dir.path().join(".tiny.safetensors.tmp-1");
    for p in [&killed, &other, &live] {
        std::fs::write(p, b"half").unwrap();
    }
    checkpoint::save_tensors(&path, &tensors, &opts).unwrap();
    assert!(!killed.exists() && other.exists());
    assert_eq!(live.exists(), cfg!(target_os = "linux"));

    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.family(), checkpoint::Family::SdxlUnet);
    assert_eq!(ckpt.detect_unet_config().unwrap().0, "tiny");
    assert_eq!(ckpt.detect_vae_config().unwrap().0, "tiny");
    assert_eq!(ckpt.prediction().prediction, checkpoint::Prediction::V);
    ckpt.check_sdxl(&ucfg, Some(&vcfg)).unwrap();

    let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[250f32], &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 3, ucfg.context_dim), &dev).unwrap();
    let pooled = Tensor::randn(0f32, 1.0, (1, ucfg.pooled_dim), &dev).unwrap();
    let y = build_y(&pooled, &[SizeCond::inference(64.0, 64.0)]).unwrap();
    let loaded = ckpt.load_unet(&ucfg, DType::F32, &dev).unwrap();
    let a = unet.forward(&x, &t, &ctx, &y).unwrap();
    let b = loaded.forward(&x, &t, &ctx, &y).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let loaded_vae = ckpt.load_vae(&vcfg, DType::F32, &dev).unwrap();
    let z = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev).unwrap();
    let da = vae.decode(&z).unwrap();
    assert_eq!(da.dims(), &[1, 3, 16, 16]);
    assert_eq!(max_abs_diff(&da, &loaded_vae.decode(&z).unwrap()), 0.0);
}
