//! Tests of [`super`] (the model pipeline).

use super::*;
use crate::models::sdxl::UNetConfig;
use crate::pipeline::tiny::{write_random_checkpoint, TinyOptions};

fn tiny(v: bool) -> (tempfile::TempDir, SdxlModel) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    write_random_checkpoint(
        &p,
        TinyOptions {
            seed: 5,
            v_pred_ztsnr: v,
        },
    )
    .unwrap();
    let m = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
    (dir, m)
}

#[test]
fn tiny_text_configs_fit_the_tiny_unet() {
    let u = UNetConfig::tiny();
    assert_eq!(
        TextConfigs::tiny().unet_dims(),
        (u.context_dim, u.pooled_dim)
    );
    let s = UNetConfig::sdxl_base();
    assert_eq!(
        TextConfigs::sdxl().unet_dims(),
        (s.context_dim, s.pooled_dim)
    );
}

#[test]
fn tiny_checkpoint_is_detected_with_its_markers() {
    let (_d, m) = tiny(true);
    assert_eq!(m.info.unet_config, "tiny");
    assert_eq!(m.info.vae_config, "tiny");
    assert_eq!(m.info.text_config, "tiny");
    assert_eq!(m.info.native_size, (64, 64));
    assert_eq!(m.info.prediction, Prediction::V);
    assert!(m.info.ztsnr);
    assert!(m.schedule().is_ztsnr());
    assert!(
        m.info.prediction_source.contains("v_pred"),
        "{}",
        m.info.prediction_source
    );
    let (_d, m) = tiny(false);
    assert_eq!(m.info.prediction, Prediction::Eps);
    assert!(!m.info.ztsnr);
    assert!(!m.schedule().is_ztsnr());
    assert!(m.latent_shape(64, 96).is_ok());
    let e = m.latent_shape(64, 100).unwrap_err().to_string();
    assert!(
        e.contains("multiples of 32") && e.contains("nearest is 64x96"),
        "{e}"
    );
    // Past the largest side: an error, not an allocation that aborts.
    let e = m
        .latent_shape(64, 1_000_000 / 32 * 32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 16384"), "{e}");
    // The nearest named is one that fits.
    let e = m.latent_shape(64, 16_400).unwrap_err().to_string();
    assert!(e.contains("nearest is 64x16384"), "{e}");
    // Regression: a stray `ztsnr` marker on an eps file put eps
    // sampling on the ZTSNR schedule; as in ComfyUI it counts for v
    // only (and the file's warning says so). Asked for, it holds.
    let d = tempfile::tempdir().unwrap();
    let (plain, stray) = (
        d.path().join("e.safetensors"),
        d.path().join("z.safetensors"),
    );
    write_random_checkpoint(
        &plain,
        TinyOptions {
            seed: 5,
            v_pred_ztsnr: false,
        },
    )
    .unwrap();
    let opts = crate::models::sdxl::checkpoint::SaveOptions {
        ztsnr: true,
        ..Default::default()
    };
    Checkpoint::open(&plain)
        .unwrap()
        .save_with(&stray, &Default::default(), &opts)
        .unwrap();
    let m = SdxlModel::load(&stray, &LoadOptions::default()).unwrap();
    assert_eq!((m.info.prediction, m.info.ztsnr), (Prediction::Eps, false));
    assert!(m.info.warnings.iter().any(|w| w.contains("plain schedule")));
    let asked = LoadOptions {
        ztsnr: Some(true),
        ..Default::default()
    };
    assert!(SdxlModel::load(&stray, &asked).unwrap().info.ztsnr);
}

#[test]
fn zero_uncond_zeroes_text_but_keeps_size_embeddings() {
    let (_d, m) = tiny(false);
    let (c, u) = m.conditioning("a red circle", &UncondMode::Zero).unwrap();
    let b = Bound::new(&m.unet, &c, Some(&u), 64, 96).unwrap();
    assert_eq!(b.context.dims()[0], 2);
    let y = b.y.to_vec2::<f32>().unwrap(); // (2, 32 + 1536)
    let pooled = m.unet.config().pooled_dim;
    assert!(y[1][..pooled].iter().all(|&v| v == 0.0));
    assert!(y[0][..pooled].iter().any(|&v| v != 0.0));
    assert_eq!(y[0][pooled..], y[1][pooled..]);
    let ctx_u = b.context.narrow(0, 1, 1).unwrap();
    assert_eq!(
        ctx_u
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // `empty` encodes "": not zeros, same chunk count as the prompt.
    let (c2, e) = m.conditioning("a red circle", &UncondMode::Empty).unwrap();
    assert_eq!(e.context.dims(), c2.context.dims());
    assert!(
        e.pooled
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn pair_call_matches_separate_calls() {
    let (_d, m) = tiny(false);
    let (c, u) = m.conditioning("1shape", &UncondMode::Empty).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let pair = Bound::new(&m.unet, &c, Some(&u), 64, 64).unwrap();
    let (pc, pu) = pair.predict_pair(&x, 500.0).unwrap();
    let only_c = Bound::new(&m.unet, &c, None, 64, 64).unwrap();
    let only_u = Bound::new(&m.unet, &u, None, 64, 64).unwrap();
    let d = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(d(&pc, &only_c.predict(&x, 500.0).unwrap()) < 1e-4);
    assert!(d(&pu, &only_u.predict(&x, 500.0).unwrap()) < 1e-4);
    assert!(d(&pc, &pu) > 1e-4, "cond and uncond outputs should differ");
    // A negative longer than the prompt (2 chunks against 1): each branch
    // computes what it computes alone (A1111's default runs them apart),
    // and the prompt's own context is not padded.
    let long_neg = "lowres, bad anatomy, ".repeat(20);
    let (c, u) = m
        .conditioning("1shape", &UncondMode::Negative(long_neg))
        .unwrap();
    assert_eq!(
        (c.context.dim(1).unwrap(), u.context.dim(1).unwrap()),
        (77, 154)
    );
    let pair = Bound::new(&m.unet, &c, Some(&u), 64, 64).unwrap();
    let (pc, pu) = pair.predict_pair(&x, 500.0).unwrap();
    let only_c = Bound::new(&m.unet, &c, None, 64, 64).unwrap();
    let only_u = Bound::new(&m.unet, &u, None, 64, 64).unwrap();
    assert!(d(&pc, &only_c.predict(&x, 500.0).unwrap()) < 1e-4);
    assert!(d(&pu, &only_u.predict(&x, 500.0).unwrap()) < 1e-4);
}

#[test]
fn text_encoder_widths_must_fit_the_unet() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.safetensors");
    write_random_checkpoint(&src, TinyOptions::default()).unwrap();
    // Drop one bigG key: the text encoder check names it.
    let ck = Checkpoint::open(&src).unwrap();
    let dropped = format!("{BIGG_MODEL_PREFIX}.ln_final.weight");
    let tensors: Vec<(String, Tensor)> = ck
        .entries()
        .keys()
        .filter(|k| **k != dropped)
        .map(|k| (k.clone(), ck.tensor(k, DType::F32, &Device::Cpu).unwrap()))
        .collect();
    let bad = dir.path().join("b.safetensors");
    checkpoint::save_tensors(&bad, &tensors, &Default::default()).unwrap();
    let e = SdxlModel::load(&bad, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot infer the text encoder configs: bigG")
            && e.contains("missing conditioner.embedders.1.model.ln_final.weight"),
        "{e}"
    );
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
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

/// A checkpoint written by sgm `UNetModel` + HF `CLIPTextModel` +
/// open_clip `TextTransformer` + sgm VAE at a config of its own, with no
/// eps2v metadata (fixtures/scripts/gen_infer_golden.py), loads with no
/// config given: every config is inferred (GroupNorm 32 and 64-channel
/// heads from the sgm defaults), and every part matches its reference
/// within 1e-4.
#[test]
fn golden_checkpoint_loads_with_no_config() {
    use crate::models::sdxl::infer::HiddenSource;
    use crate::models::sdxl::{MiddleBlock, VaeConfig};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/golden/infer");
    let path = format!("{dir}/model.safetensors");
    let m = SdxlModel::load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(
        (
            m.info.unet_config.as_str(),
            m.info.vae_config.as_str(),
            m.info.text_config.as_str()
        ),
        ("custom", "custom", "custom")
    );
    let want = UNetConfig {
        in_channels: 4,
        out_channels: 4,
        model_channels: 32,
        channel_mult: vec![1, 2],
        num_res_blocks: vec![2, 1],
        transformer_depth: vec![0, 0, 1],
        transformer_depth_output: vec![1, 0, 0, 0, 0],
        middle: MiddleBlock::NoTransformer,
        num_head_channels: 64,
        context_dim: 128,
        pooled_dim: 32,
        num_groups: 32,
        use_linear_in_transformer: false,
    };
    assert_eq!(m.unet.config(), &want);
    assert_eq!(
        m.vae.config(),
        &VaeConfig {
            ch: 32,
            ch_mult: vec![1, 1, 1],
            num_res_blocks: 1,
            ..VaeConfig::sdxl()
        }
    );
    let (l, g) = (m.text.clip_l.config(), m.text.clip_g.config());
    assert_eq!(
        (l.width, l.layers, l.heads, l.intermediate),
        (64, 2, 1, 128)
    );
    assert_eq!(
        (g.width, g.layers, g.heads, g.intermediate),
        (64, 2, 1, 256)
    );
    assert_eq!(g.projection_dim, Some(32));
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(
        ckpt.infer_unet_config().unwrap().hidden,
        HiddenSource::Defaults
    );

    let io = candle_core::safetensors::load(format!("{dir}/io.safetensors"), &Device::Cpu).unwrap();
    let sizes: Vec<SizeCond> = io["unet.sizes"]
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| SizeCond {
            original: (r[0], r[1]),
            crop_top_left: (r[2], r[3]),
            target: (r[4], r[5]),
        })
        .collect();
    let y = build_y(&io["unet.pooled"], &sizes).unwrap();
    let out = m
        .unet
        .forward(
            &io["unet.x"],
            &io["unet.timesteps"],
            &io["unet.context"],
            &y,
        )
        .unwrap();
    let d = max_abs(&out, &io["unet.out"]);
    eprintln!("golden unet max abs err {d:e}");
    assert!(d <= 1e-4, "unet max abs err {d}");

    let ol = m.text.clip_l.forward(&io["text.ids_l"]).unwrap();
    let og = m.text.clip_g.forward(&io["text.ids_g"]).unwrap();
    let errs = [
        max_abs(&ol.penultimate, &io["text.penultimate_l"]),
        max_abs(&og.penultimate, &io["text.penultimate_g"]),
        max_abs(&og.pooled.unwrap(), &io["text.pooled"]),
    ];
    eprintln!("golden text max abs errs {errs:?}");
    assert!(errs.iter().all(|e| *e <= 1e-4), "{errs:?}");
    // The whole prompt path (our tokenizer, both encoders, concat).
    let prompts = ["a red circle on a blue background", "1shape, large, left"];
    for (i, p) in prompts.iter().enumerate() {
        let c = m.text.encode(&[p]).unwrap();
        let want = io["text.context"].narrow(0, i, 1).unwrap();
        let d = max_abs(&c.context, &want);
        assert!(d <= 1e-4, "{p}: context max abs err {d}");
        let d = max_abs(&c.pooled, &io["text.pooled"].narrow(0, i, 1).unwrap());
        assert!(d <= 1e-4, "{p}: pooled max abs err {d}");
    }

    let (mean, logvar) = m.vae.encode_moments(&io["vae.image"]).unwrap();
    let dec = m.vae.decode(&io["vae.z"]).unwrap();
    let errs = [
        max_abs(&mean, &io["vae.mean"]),
        max_abs(&logvar, &io["vae.logvar"]),
        max_abs(&dec, &io["vae.decoded"]),
    ];
    eprintln!("golden vae max abs errs {errs:?}");
    assert!(errs.iter().all(|e| *e <= 1e-4), "{errs:?}");
}

/// Our own saves of a spread of configs (tiny widths, non-32 groups,
/// per-block depths, middle variants, conv proj_in) load back with no
/// config given — the metadata carries groups and heads — and run.
#[test]
fn random_models_of_other_configs_load_and_run() {
    use crate::models::sdxl::{MiddleBlock, VaeConfig};
    use crate::pipeline::tiny::write_random_model;
    let dir = tempfile::tempdir().unwrap();
    let text = TextConfigs::tiny();
    let tiny = UNetConfig::tiny();
    let unets = [
        UNetConfig {
            num_res_blocks: vec![1, 2, 1],
            transformer_depth: vec![0, 2, 0, 1],
            transformer_depth_output: vec![1, 0, 0, 2, 1, 0, 0],
            middle: MiddleBlock::ResBlockOnly,
            ..tiny.clone()
        },
        UNetConfig {
            channel_mult: vec![1, 1],
            num_res_blocks: vec![1, 1],
            transformer_depth: vec![1, 1],
            transformer_depth_output: vec![1, 1, 0, 1],
            middle: MiddleBlock::Absent,
            use_linear_in_transformer: false,
            num_groups: 4,
            num_head_channels: 8,
            ..tiny.clone()
        },
    ];
    let vae = VaeConfig {
        ch: 8,
        ch_mult: vec![1, 2],
        num_groups: 4,
        num_res_blocks: 1,
        ..VaeConfig::tiny()
    };
    for (i, u) in unets.iter().enumerate() {
        let p = dir.path().join(format!("m{i}.safetensors"));
        write_random_model(&p, u, &vae, &text, TinyOptions::default()).unwrap();
        let m = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
        assert_eq!(m.unet.config(), u);
        assert_eq!(m.vae.config(), &vae);
        assert_eq!(m.info.text_config, "tiny");
        let (c, un) = m.conditioning("1shape", &UncondMode::Zero).unwrap();
        let b = Bound::new(&m.unet, &c, Some(&un), 32, 32).unwrap();
        let (h, w) = (32 / vae.downsample_factor(), 32 / vae.downsample_factor());
        let x = Tensor::randn(0f32, 1.0, (1, 4, h, w), &Device::Cpu).unwrap();
        let (pc, _) = b.predict_pair(&x, 500.0).unwrap();
        assert_eq!(pc.dims(), x.dims());
        let img = m.vae.decode_scaled(&x).unwrap();
        assert_eq!(img.dims(), &[1, 3, 32, 32]);
    }
}
