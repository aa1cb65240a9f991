//! Tests of [`super`]: seeded txt2img and img2img on tiny random
//! checkpoints, batch invariance, infotext.

use super::*;
use crate::pipeline::model::LoadOptions;
use crate::pipeline::tiny::{write_random_checkpoint, TinyOptions};

/// A random tiny checkpoint `NAME.safetensors` (the model name in the
/// infotext) in a fresh temporary folder, which lives as long as the guard.
fn tiny_checkpoint(name: &str, opts: TinyOptions) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{name}.safetensors"));
    write_random_checkpoint(&p, opts).unwrap();
    (dir, p)
}

/// [`tiny_checkpoint`] loaded with the default options.
fn tiny_model(name: &str, opts: TinyOptions) -> (tempfile::TempDir, SdxlModel) {
    let (dir, p) = tiny_checkpoint(name, opts);
    let m = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
    (dir, m)
}

/// Seed 3, v + ZTSNR (`true`) or eps.
fn seed3(v_pred_ztsnr: bool) -> TinyOptions {
    TinyOptions {
        seed: 3,
        v_pred_ztsnr,
    }
}

fn cfg() -> SampleConfig {
    SampleConfig {
        prompt: "red circle".into(),
        uncond: UncondMode::Zero,
        seed: 9,
        steps: 2,
        cfg: 4.0,
        rescale: None,
        sampler: SamplerKind::Euler,
        schedule: None,
        width: 64,
        height: 64,
        batch: 2,
    }
}

#[test]
fn generate_gives_seeded_distinct_images_and_infotext() {
    let (_dir, m) = tiny_model("toy-v", seed3(true));
    let mut calls = Vec::new();
    let g = generate(&m, &cfg(), &mut |d, t| calls.push((d, t))).unwrap();
    assert_eq!(
        calls,
        [(2, 4), (4, 4)],
        "both images advance in one UNet call per step"
    );
    assert_eq!(g.len(), 2);
    assert_eq!((g[0].seed, g[1].seed), (9, 10));
    assert_ne!(g[0].image.as_raw(), g[1].image.as_raw());
    let px = g[0].image.as_raw();
    assert!(px.iter().min() != px.iter().max(), "constant image");
    let text = g[1].infotext.format();
    assert_eq!(
        text,
        format!(
            "red circle\nSteps: 2, Sampler: Euler, Schedule type: Trailing, CFG scale: 4, Seed: 10, Size: 64x64, Model: toy-v, Prediction: v, ZTSNR: True, Uncond: zero, CFG rescale: 0.7, Noise Schedule: Zero Terminal SNR, Version: eps2v {}",
            env!("CARGO_PKG_VERSION")
        )
    );
    // CFG 1 skips the uncond branch but still samples.
    let one = SampleConfig {
        cfg: 1.0,
        batch: 1,
        ..cfg()
    };
    let g1 = generate(&m, &one, &mut |_, _| {}).unwrap();
    assert_ne!(g1[0].image.as_raw(), g[0].image.as_raw());
}

/// img2img ([`Start`]): only the steps from the start run, the
/// infotext records the denoising strength (before `Version`), the
/// result depends on the start latent, and a start outside the steps
/// or a latent of the wrong shape is a config error.
#[test]
fn sampling_from_a_noised_latent_runs_the_rest_of_the_path() {
    let (_dir, m) = tiny_model("toy-eps", seed3(false));
    let c = SampleConfig {
        steps: 4,
        batch: 1,
        ..cfg()
    };
    let item = [BatchItem {
        prompt: c.prompt.clone(),
        uncond: c.uncond.clone(),
        seed: 5,
    }];
    let (ch, h, w) = m.latent_shape(64, 64).unwrap();
    let render = |latent: &Tensor, step: usize| {
        let mut calls = Vec::new();
        let start = Start {
            latents: std::slice::from_ref(latent),
            step,
        };
        let r = sample_batch_from(&m, &c, &item, Some(&start), &mut |d, t| calls.push((d, t)));
        (r, calls)
    };
    let zeros = Tensor::zeros((1, ch, h, w), DType::F32, &m.device).unwrap();
    let ones = Tensor::ones((1, ch, h, w), DType::F32, &m.device).unwrap();
    let (r0, calls) = render(&zeros, 3);
    assert_eq!(calls, [(1, 1)], "one step left of four");
    let Rendered::Image(g0) = r0.unwrap().remove(0) else {
        panic!("broken render")
    };
    let text = g0.infotext.format();
    assert!(
        text.contains(&format!(
            "Denoising strength: 0.25, Version: eps2v {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    let Rendered::Image(g1) = render(&ones, 3).0.unwrap().remove(0) else {
        panic!("broken render")
    };
    assert_ne!(g0.image.as_raw(), g1.image.as_raw());
    let err = render(&zeros, 4).0.unwrap_err().to_string();
    assert!(err.contains("start step 4"), "{err}");
    let wrong = Tensor::zeros((1, ch, h + 1, w), DType::F32, &m.device).unwrap();
    let err = render(&wrong, 1).0.unwrap_err().to_string();
    assert!(err.contains("start latent of shape"), "{err}");
}

/// Regression (issue 13): a seed's pixels are the same whatever batch
/// it is rendered in, at any position, and next to prompts of another
/// chunk count (which go through their own UNet call).
#[test]
fn batch_is_a_speed_knob_only() {
    let (_dir, m) = tiny_model("toy", TinyOptions::default());
    let long = vec!["red circle"; 40].join(", "); // > 75 tokens: 2 chunks
    let items: Vec<BatchItem> = [
        ("red circle", UncondMode::Zero, 3),
        ("blue square, large", UncondMode::Empty, 4),
        (long.as_str(), UncondMode::Negative("blurry".into()), 5),
        ("1girl, solo", UncondMode::Negative("lowres".into()), 6),
        ("green", UncondMode::Zero, 7),
    ]
    .into_iter()
    .map(|(prompt, uncond, seed)| BatchItem {
        prompt: prompt.into(),
        uncond,
        seed,
    })
    .collect();
    let c = SampleConfig {
        sampler: SamplerKind::EulerAncestral,
        ..cfg()
    };
    let bytes = |r: &Rendered| match r {
        Rendered::Image(g) => (g.image.as_raw().clone(), g.infotext.format()),
        Rendered::Broken { reason, .. } => panic!("{reason}"),
    };
    let alone: Vec<_> = items
        .iter()
        .map(|it| {
            bytes(&sample_batch(&m, &c, std::slice::from_ref(it), &mut |_, _| {}).unwrap()[0])
        })
        .collect();
    let all = sample_batch(&m, &c, &items, &mut |_, _| {}).unwrap();
    let mut rev = items.clone();
    rev.reverse();
    let reversed = sample_batch(&m, &c, &rev, &mut |_, _| {}).unwrap();
    for i in 0..items.len() {
        assert_eq!(bytes(&all[i]), alone[i], "item {i} in a batch of 5");
        assert_eq!(
            bytes(&reversed[items.len() - 1 - i]),
            alone[i],
            "item {i} reversed"
        );
    }
    // On three single-thread lanes, two images per call, and one after the
    // other: the same bytes, in item order.
    for lanes in [3, 1] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(lanes)
            .build()
            .unwrap();
        let many = pool.install(|| {
            if std::env::var_os("EPS2V_LANES").is_none() {
                assert_eq!(crate::nn::lanes::lanes_for_latent(&m.device, 8, 8), lanes);
            }
            sample_many(&m, &c, &items, 2).unwrap()
        });
        assert_eq!(many.len(), items.len());
        for i in 0..items.len() {
            assert_eq!(
                bytes(&many[i]),
                alone[i],
                "item {i} of sample_many, {lanes} lanes"
            );
        }
    }
    assert!(alone[0]
        .1
        .starts_with("red circle\nSteps: 2, Sampler: Euler a"));
    assert!(
        alone[3].1.contains("\nNegative prompt: lowres\n"),
        "{}",
        alone[3].1
    );
    assert_ne!(alone[0].0, alone[1].0);
}

#[test]
fn nan_models_give_broken_renders_not_errors() {
    let (_dir, m) = tiny_model("toy", TinyOptions::default());
    let nan = Tensor::full(f32::NAN, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let r = decode_rgb8(&m, &nan).unwrap().unwrap_err();
    assert!(r.starts_with("nan_latent: 256 of 256"), "{r}");
}

/// Regression: one broken render made `sample` fail with no report, so
/// `--json` printed nothing about the images it had written. Now the report
/// lists the broken seeds beside the written files.
#[test]
fn broken_renders_are_in_the_report_not_an_error() {
    let (dir, p) = tiny_checkpoint("toy", TinyOptions::default());
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    // Finite weights (the loader refuses NaN ones) whose products overflow.
    let key = "first_stage_model.decoder.conv_out.weight";
    let b = t.get(key).unwrap();
    let huge = Tensor::full(3e38f32, b.shape(), &Device::Cpu).unwrap();
    t.insert(key.into(), huge.to_dtype(b.dtype()).unwrap());
    let broken = dir.path().join("broken.safetensors");
    candle_core::safetensors::save(&t, &broken).unwrap();
    let m = SdxlModel::load(&broken, &LoadOptions::default()).unwrap();
    let out = dir.path().join("out");
    let r = run(&m, &cfg(), &out, 0.0, &mut |_, _| {}).unwrap();
    assert!(r.files.is_empty());
    let seeds: Vec<u64> = r.broken.iter().map(|b| b.seed).collect();
    assert_eq!(seeds, [9, 10]);
    assert!(
        r.broken[0].reason.starts_with("nan_decode"),
        "{:?}",
        r.broken
    );
    let msg = r.broken_message().unwrap();
    assert!(
        msg.starts_with("seed 9: nan_decode") && msg.ends_with("; seeds 10 too"),
        "{msg}"
    );
    let fine = SdxlModel::load(&p, &LoadOptions::default()).unwrap();
    let r = run(&fine, &cfg(), &out, 0.0, &mut |_, _| {}).unwrap();
    assert_eq!((r.files.len(), r.broken_message()), (2, None));
}

/// The CUDA path's dtypes (UNet and text encoders in bf16 / f16, VAE in
/// `vae_dtype`) through the whole `sample` pipeline. `SdxlModel::load`
/// keeps the CPU in f32, so the half-precision parts are swapped in by
/// hand; the numerics are the CPU's, the dtype plumbing is the GPU's.
#[test]
fn generate_runs_with_half_precision_models_and_a_safe_vae() {
    use crate::models::sdxl::checkpoint::Checkpoint;
    use crate::models::sdxl::clip::SdxlTextEncoder;
    use crate::pipeline::model::TextConfigs;

    let (_dir, p) = tiny_checkpoint("toy-v", seed3(true));
    let opts = LoadOptions {
        device: Some(Device::Cpu),
        ..Default::default()
    };
    let one = SampleConfig { batch: 1, ..cfg() };
    let m32 = SdxlModel::load(&p, &opts).unwrap();
    let want = generate(&m32, &one, &mut |_, _| {}).unwrap();
    let want = want[0].image.as_raw();
    let ckpt = Checkpoint::open(&p).unwrap();
    let text = TextConfigs::tiny();
    for dtype in [DType::BF16, DType::F16] {
        let mut m = SdxlModel::load(&p, &opts).unwrap();
        m.unet = ckpt
            .load_unet(m32.unet.config(), dtype, &Device::Cpu)
            .unwrap();
        m.text = SdxlTextEncoder::new(
            ckpt.var_builder(dtype, &Device::Cpu),
            &text.clip_l,
            &text.clip_g,
        )
        .unwrap();
        let vae_dtype = crate::nn::vae_dtype(dtype);
        assert_ne!(vae_dtype, DType::F16);
        m.vae = ckpt
            .load_vae(m32.vae.config(), vae_dtype, &Device::Cpu)
            .unwrap();
        assert_eq!((m.unet.dtype(), m.vae.dtype()), (dtype, vae_dtype));
        let got = generate(&m, &one, &mut |_, _| {}).unwrap();
        let got = got[0].image.as_raw();
        assert_eq!(got.len(), want.len());
        let mean_abs = got
            .iter()
            .zip(want)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
            .sum::<f64>()
            / got.len() as f64;
        eprintln!("{dtype:?}: mean |Δpixel| vs f32 = {mean_abs:.2}");
        assert!(mean_abs < 4.0, "{dtype:?}: mean |Δpixel| {mean_abs}");
    }
}

#[test]
fn bad_numbers_are_config_errors() {
    for bad in [
        SampleConfig { batch: 0, ..cfg() },
        SampleConfig { steps: 0, ..cfg() },
        SampleConfig { cfg: -1.0, ..cfg() },
        SampleConfig {
            rescale: Some(1.5),
            ..cfg()
        },
        // The second image's seed would be 2^63, past what reads back.
        SampleConfig {
            seed: i64::MAX as u64,
            batch: 2,
            ..cfg()
        },
    ] {
        assert!(matches!(bad.validate(), Err(Error::Config(_))), "{bad:?}");
    }
    let last = SampleConfig {
        seed: i64::MAX as u64 - 1,
        batch: 2,
        ..cfg()
    };
    last.validate().unwrap();
}

#[test]
fn next_index_follows_existing_files() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(next_index(d.path()).unwrap(), 0);
    std::fs::write(d.path().join("00007-3.png"), b"x").unwrap();
    std::fs::write(d.path().join("notes-1.png"), b"x").unwrap();
    assert_eq!(next_index(d.path()).unwrap(), 8);
    write_atomic(&d.path().join("a.png"), b"abc").unwrap();
    assert_eq!(std::fs::read(d.path().join("a.png")).unwrap(), b"abc");
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 3);
}
