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

use crate::error::IoContext;
use crate::manifest::Manifest;
use crate::models::sdxl::checkpoint::Checkpoint;
use crate::pipeline::tiny::{write_random_checkpoint, TinyOptions};
use crate::pipeline::{LoadOptions, SdxlModel};
use crate::stages::bucket::{self, BucketConfig, BucketSet};
use crate::stages::import::{self, ImportConfig};
use crate::stages::Ctx;
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
/// captions) in `dir/ds`, and a seeded random tiny eps checkpoint with
/// unit-variance latents in `dir/base.safetensors`; returns both paths.
pub fn dataset(dir: &Path) -> Result<(PathBuf, PathBuf)> {
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
    let ctx = Ctx::quiet();
    let import = ImportConfig {
        from: src,
        limits: Default::default(),
        batch: 16,
    };
    import::run(&import, &mut m, &ctx)?;
    let buckets = BucketConfig {
        buckets: BucketSet::Kohya {
            resolution: 64,
            step: 64,
            min_side: 64,
            max_side: 64,
        },
        ..Default::default()
    };
    bucket::run(&buckets, &mut m, &ctx)?;
    let raw = dir.join("random.safetensors");
    let opts = TinyOptions {
        seed: 11,
        v_pred_ztsnr: false,
    };
    write_random_checkpoint(&raw, opts)?;
    let ck = dir.join("base.safetensors");
    unit_latents(&raw, &ck)?;
    Ok((ds, ck))
}

/// An RGB image as `(1, 3, h, w)` in [−1, 1] (what the VAE takes).
pub fn image_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let x: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(x, (1, h as usize, w as usize, 3), &Device::Cpu)?.permute((0, 3, 1, 2))?)
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
