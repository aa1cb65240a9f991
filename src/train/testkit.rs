//! Small fixtures for the trainer's tests and benchmarks: four coloured
//! shapes (64×64, one caption each) imported and bucketed into a dataset,
//! and a seeded random tiny SDXL checkpoint whose VAE gives unit-variance
//! latents for them (a random VAE's latents are ~1e-3, which would make
//! "the model reproduces its data" trivially true).
//!
//! Not a model stub: every file goes through the real import, bucket,
//! checkpoint and training code; only the data are synthetic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::diffusion::Prediction;
use crate::error::IoContext;
use crate::manifest::Manifest;
use crate::models::sdxl::checkpoint::Checkpoint;
use crate::models::sdxl::{UNetConfig, VaeConfig};
use crate::pipeline::tiny::{write_random_model, TinyOptions};
use crate::pipeline::TextConfigs;
use crate::pipeline::{LoadOptions, SdxlModel};
use crate::stages::bucket::{self, BucketConfig, BucketSet};
use crate::stages::import::{self, ImportConfig};
use crate::stages::Ctx;
use crate::train::config::{SaveDtype, TrainConfig, Weighting};
use crate::train::{eval, train, TrainOptions};
use crate::{Error, Result};

/// Captions of the four training images (one shape each on a light background).
pub const CAPTIONS: [&str; 4] = ["red circle", "blue square", "green triangle", "yellow ring"];

/// Shape `kind` (0..4, see [`CAPTIONS`]) on a `side × side` image.
pub fn shape_image(kind: usize, side: u32) -> RgbImage {
    let s = side as f64;
    RgbImage::from_fn(side, side, |x, y| {
        let (u, v) = ((x as f64 + 0.5) / s - 0.5, (y as f64 + 0.5) / s - 0.5);
        let r = (u * u + v * v).sqrt();
        let inside = match kind {
            0 => r < 0.3,
            1 => u.abs() < 0.25 && v.abs() < 0.25,
            2 => v > -0.3 && v < 0.3 && u.abs() < (v + 0.3) * 0.6,
            _ => r < 0.35 && r > 0.2,
        };
        let fg = [[220, 40, 40], [40, 60, 220], [40, 180, 60], [230, 210, 40]][kind % 4];
        image::Rgb(if inside { fg } else { [235, 235, 235] })
    })
}

/// A dataset of the four shapes (64×64, one 64×64 bucket, sidecar
/// captions) in `dir/ds`, and a seeded random tiny eps checkpoint
/// (`UNetConfig::tiny()`, the SDXL block layout) with unit-variance latents
/// in `dir/base.safetensors`; returns both paths.
pub fn dataset(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    dataset_with(dir, &UNetConfig::tiny())
}

/// Import the images (and sidecar captions) of `from` into `m`.
pub fn import_from(m: &mut Manifest, from: PathBuf) -> Result<()> {
    let import = ImportConfig {
        from,
        limits: Default::default(),
        batch: 16,
    };
    import::run(&import, m, &Ctx::quiet()).map(|_| ())
}

/// Bucket every item of `m` at [`dataset`]'s one bucket, 64×64.
pub fn bucket_all(m: &mut Manifest) -> Result<()> {
    let buckets = BucketConfig {
        buckets: BucketSet::Kohya {
            resolution: 64,
            step: 64,
            min_side: 64,
            max_side: 64,
        },
        ..Default::default()
    };
    bucket::run(&buckets, m, &Ctx::quiet()).map(|_| ())
}

/// A UNet small enough to train from scratch in seconds on a CPU: two
/// levels (16 and 32 channels), one ResBlock per level, one transformer
/// block at the second level and in the middle, the tiny text encoders'
/// context. Loads with no config given (shapes + eps2v metadata).
pub fn micro_unet() -> UNetConfig {
    UNetConfig::from_levels(16, vec![1, 2], 1, &[0, 1], 1, 8, 64, 32, 4)
}

/// [`dataset`] with a UNet of config `unet`.
pub fn dataset_with(dir: &Path, unet: &UNetConfig) -> Result<(PathBuf, PathBuf)> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).at(&src)?;
    for (i, c) in CAPTIONS.iter().enumerate() {
        let p = src.join(format!("{i}.png"));
        shape_image(i, 64).save(&p).map_err(|e| Error::Image {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        let t = src.join(format!("{i}.txt"));
        std::fs::write(&t, c).at(&t)?;
    }
    let ds = dir.join("ds");
    let mut m = Manifest::init(&ds)?;
    import_from(&mut m, src)?;
    bucket_all(&mut m)?;
    let raw = dir.join("random.safetensors");
    let opts = TinyOptions {
        seed: 11,
        v_pred_ztsnr: false,
    };
    write_random_model(&raw, unet, &VaeConfig::tiny(), &TextConfigs::tiny(), opts)?;
    let ck = dir.join("base.safetensors");
    unit_latents(&raw, &ck)?;
    Ok((ds, ck))
}

/// An RGB image as `(1, 3, h, w)` in [−1, 1] on the CPU (what the VAE takes).
pub fn image_tensor(img: &RgbImage) -> Result<Tensor> {
    crate::pipeline::latent::from_rgb8(img, &Device::Cpu)
}

/// The scaled training latents `(1, 4, 8, 8)` of the four shapes under `model`'s VAE.
pub fn shape_latents(model: &SdxlModel) -> Result<Vec<Tensor>> {
    (0..CAPTIONS.len())
        .map(|i| {
            Ok(model
                .vae
                .encode_scaled(&image_tensor(&shape_image(i, 64))?)?)
        })
        .collect()
}

/// Copy `src` to `dst` with the VAE's latent mean rescaled so the scaled
/// latents of the four shapes have unit std. The mean half of `quant_conv`
/// is multiplied by k and `post_quant_conv`'s input by 1/k, so
/// decode(encode(x)) is unchanged.
pub fn unit_latents(src: &Path, dst: &Path) -> Result<()> {
    let m = SdxlModel::load(src, &LoadOptions::default())?;
    let z = Tensor::cat(&shape_latents(&m)?, 0)?.flatten_all()?;
    let mean = z.mean_all()?.to_scalar::<f32>()?;
    let var = (z - mean as f64)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
    let k = 1.0 / (var as f64).sqrt();
    let ck = Checkpoint::open(src)?;
    let get = |key: &str| ck.tensor(key, DType::F32, &Device::Cpu);
    let qw = get("first_stage_model.quant_conv.weight")?; // (2e, 2z, 1, 1)
    let qb = get("first_stage_model.quant_conv.bias")?; // (2e,)
    let pw = get("first_stage_model.post_quant_conv.weight")?; // (z, e, 1, 1)
    let e = qb.dim(0)? / 2;
    let scale_rows = |t: &Tensor| -> Result<Tensor> {
        let top = (t.narrow(0, 0, e)? * k)?;
        let rest = t.narrow(0, e, t.dim(0)? - e)?;
        Ok(Tensor::cat(&[&top, &rest], 0)?)
    };
    let mut rep = HashMap::new();
    rep.insert(
        "first_stage_model.quant_conv.weight".to_string(),
        scale_rows(&qw)?,
    );
    rep.insert(
        "first_stage_model.quant_conv.bias".to_string(),
        scale_rows(&qb)?,
    );
    rep.insert(
        "first_stage_model.post_quant_conv.weight".to_string(),
        (pw / k)?,
    );
    ck.save_with(dst, &rep, &Default::default())
}

/// Settings of the conversion check (`the_conversion_works_as_a_number`
/// and `cargo bench --bench convert`): eps from scratch, then v + ZTSNR,
/// then back to eps, on the four shapes.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// Steps of eps training from the random initialisation.
    pub eps_steps: usize,
    /// Steps of `--objective v --ztsnr` from the eps model.
    pub v_steps: usize,
    /// Steps of `--objective eps` from the converted model.
    pub back_steps: usize,
    /// AdamW learning rate of every phase (batch 4, all blocks).
    pub lr: f64,
    /// Min-SNR-γ (γ = 5) weighting for the eps phases; the v phase always
    /// trains plain v-MSE, the default of the conversion.
    pub eps_min_snr: bool,
    /// Euler steps (trailing spacing under ZTSNR) when sampling for the
    /// distances.
    pub sample_steps: usize,
    /// Also convert the eps model with min-SNR-γ v weighting (which, under
    /// ZTSNR, weighs t = 999 by 0) to show what it costs.
    pub compare_v_min_snr: bool,
}

impl Default for Conversion {
    /// What the test runs (about 1.5 minutes on two cores with `micro_unet`).
    fn default() -> Self {
        Self {
            eps_steps: 2000,
            v_steps: 400,
            back_steps: 600,
            lr: 1e-3,
            eps_min_snr: true,
            sample_steps: 10,
            compare_v_min_snr: false,
        }
    }
}

/// Distances to the data (see [`distance_to_data`]) through the conversion.
#[derive(Debug, Clone, Copy)]
pub struct ConversionDistances {
    /// The eps model sampled as eps.
    pub eps: f64,
    /// The same weights sampled as v + ZTSNR, before any v training.
    pub unconverted: f64,
    /// After v + ZTSNR training, sampled as v + ZTSNR.
    pub converted: f64,
    /// After training back to eps, sampled as eps.
    pub back: f64,
    /// After v + ZTSNR training with min-SNR-γ weighting instead of plain
    /// v-MSE (when [`Conversion::compare_v_min_snr`]).
    pub converted_min_snr: Option<f64>,
}

/// Load `p`, overriding the prediction type / ZTSNR flag when given.
pub fn load_as(p: &Path, prediction: Option<Prediction>, ztsnr: Option<bool>) -> Result<SdxlModel> {
    SdxlModel::load(
        p,
        &LoadOptions {
            prediction,
            ztsnr,
            hash: false,
            ..Default::default()
        },
    )
}

/// Mean relative squared distance `|z − z_data|² / |z_data|²` between the
/// latent sampled for each caption (Euler, CFG 1, `steps` steps, seeds 0
/// and 1) and that caption's training latent.
pub fn distance_to_data(model: &SdxlModel, targets: &[Tensor], steps: usize) -> Result<f64> {
    let mut total = 0.0;
    for (i, c) in CAPTIONS.iter().enumerate() {
        for seed in [0, 1] {
            let z = eval::sample_latent(model, c, seed, steps, 1.0, 64, 64)?;
            let num = (z - &targets[i])?.sqr()?.sum_all()?.to_scalar::<f32>()?;
            let den = targets[i].sqr()?.sum_all()?.to_scalar::<f32>()?;
            total += (num / den) as f64;
        }
    }
    Ok(total / (2 * CAPTIONS.len()) as f64)
}

/// Run the conversion in `dir` on a fresh four-shapes dataset with a UNet
/// of config `unet`; `on_phase(name, steps, seconds, last_loss)` is called
/// after each training phase.
pub fn conversion(
    dir: &Path,
    unet: &UNetConfig,
    c: &Conversion,
    mut on_phase: impl FnMut(&str, usize, f64, Option<f64>),
) -> Result<ConversionDistances> {
    let (ds, ck) = dataset_with(dir, unet)?;
    let mut phase = |name: &str,
                     model: &Path,
                     out: &Path,
                     objective: Prediction,
                     steps: usize,
                     min_snr: bool| {
        let cfg = TrainConfig {
            model: model.to_path_buf(),
            objective,
            ztsnr: objective == Prediction::V,
            blocks: vec!["all".into()],
            steps,
            batch_size: 4,
            lr: c.lr,
            caption_dropout: 0.0,
            max_grad_norm: 1.0,
            weighting: if min_snr {
                Weighting::MinSnr
            } else {
                Weighting::None
            },
            val_fraction: 0.0,
            eval_every: 0,
            eval_prompt_count: 1,
            eval_seeds: vec![0],
            eval_steps: 2,
            eval_cfg: 1.0,
            save_every: 0,
            save_dtype: SaveDtype::F32,
            out: Some(out.to_path_buf()),
            ..Default::default()
        };
        let mut m = Manifest::open(&ds)?;
        let t0 = std::time::Instant::now();
        let r = train(&cfg, &mut m, &TrainOptions::default(), &Ctx::quiet())?;
        on_phase(name, steps, t0.elapsed().as_secs_f64(), r.last_loss);
        Ok::<_, Error>(())
    };
    let eps = dir.join("eps.safetensors");
    let v = dir.join("v.safetensors");
    let back = dir.join("back.safetensors");
    phase(
        "eps from scratch",
        &ck,
        &eps,
        Prediction::Eps,
        c.eps_steps,
        c.eps_min_snr,
    )?;
    let m = load_as(&eps, None, None)?;
    let targets = shape_latents(&m)?;
    let d_eps = distance_to_data(&m, &targets, c.sample_steps)?;
    let unconverted = load_as(&eps, Some(Prediction::V), Some(true))?;
    let d_unconverted = distance_to_data(&unconverted, &targets, c.sample_steps)?;
    phase(
        "convert (v + ZTSNR)",
        &eps,
        &v,
        Prediction::V,
        c.v_steps,
        false,
    )?;
    let mv = load_as(&v, None, None)?;
    if (mv.info.prediction, mv.info.ztsnr) != (Prediction::V, true) {
        return Err(Error::Model(format!(
            "{}: the converted checkpoint does not read back as v + ZTSNR",
            v.display()
        )));
    }
    let d_v = distance_to_data(&mv, &targets, c.sample_steps)?;
    let converted_min_snr = if c.compare_v_min_snr {
        let vm = dir.join("v-min-snr.safetensors");
        phase(
            "convert (v + ZTSNR, min-SNR-γ)",
            &eps,
            &vm,
            Prediction::V,
            c.v_steps,
            true,
        )?;
        Some(distance_to_data(
            &load_as(&vm, None, None)?,
            &targets,
            c.sample_steps,
        )?)
    } else {
        None
    };
    phase(
        "back to eps",
        &v,
        &back,
        Prediction::Eps,
        c.back_steps,
        c.eps_min_snr,
    )?;
    let mb = load_as(&back, None, None)?;
    if (mb.info.prediction, mb.info.ztsnr) != (Prediction::Eps, false) {
        return Err(Error::Model(format!(
            "{}: the checkpoint converted back does not read back as eps",
            back.display()
        )));
    }
    let d_back = distance_to_data(&mb, &targets, c.sample_steps)?;
    Ok(ConversionDistances {
        eps: d_eps,
        unconverted: d_unconverted,
        converted: d_v,
        back: d_back,
        converted_min_snr,
    })
}
