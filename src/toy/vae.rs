//! Training the toy VAE ([`VaeConfig::toy`], the SDXL `AutoencoderKL`
//! class at toy widths) on toy scenes, and fitting its latent scale.
//!
//! Why: the toy base model (DESIGN.md §4) is trained in this VAE's latent
//! space, so the VAE must reconstruct scenes well (shapes, colours,
//! stripes) and give latents of a known scale.
//!
//! Training (sgm's `AutoencoderKL` objective without the GAN and the LPIPS
//! term, reference/sdxl.md §1.9): batch `b` of step `k` is scenes
//! `k·b .. (k+1)·b` of `data_seed`, each cropped to `crop`×`crop` at a
//! seeded position (the VAE is convolutional; 32×32 crops cost a quarter of
//! a 64×64 scene) and mapped to [−1, 1]; the latent is a sample `mean + exp(logvar/2)·ε` (ε from a
//! ChaCha8 stream of `seed` and the step); loss = mean |x̂ − x| (L1 on
//! pixels) + `kl_weight` · mean KL(N(mean, var) ‖ N(0, 1)) per latent
//! element; the project's fused AdamW with a linear warm-up (5 % of the
//! steps) then a cosine decay to 10 % of `lr`. Weights from
//! [`init_params`] with `seed`. Same seeds, same weights.
//!
//! Latent scale: LDM fixes `scale_factor = 1 / std(latents)` after
//! training (SDXL: 0.13025). Other tools hard-code SDXL's 0.13025 for any
//! file in the SDXL layout, so instead of storing another factor the
//! measured per-channel mean `m_c` and std `s_c` of the latent means on
//! fresh scenes are folded into the weights ([`normalize_latents`]):
//! `quant_conv` outputs `k_c·(mean − m_c)` (and `logvar + 2 ln k_c`) with
//! `k_c = 1 / (0.13025 · s_c)`, and `post_quant_conv` undoes it exactly
//! (`W/k_c`, bias `+ W·m`), so reconstructions are unchanged and the UNet's
//! latents (`encode · 0.13025`) have zero mean and std [`LATENT_STD`] per
//! channel.
//!
//! Why not unit std as in SDXL: a toy latent is 8×8 to 12×8, SDXL's at
//! 1024² is 128×128. An image's layout is its lowest frequencies, whose
//! signal-to-noise ratio grows with the number of latent cells averaged, so
//! at unit std a toy layout forms only at σ ≈ 1–3, where sampling an eps
//! model as v (the unconverted weights) merely shrinks the denoised estimate
//! and later steps repair it: the misread cost 4 points of adherence
//! against tens on real checkpoints, and the conversion had nothing to fix.
//! At std 2 the layout forms at higher σ and the terminal step still shows
//! the mean colour, as in SDXL: misread v 16–20 points under eps (the
//! committed build: 83.6 % against 67.1 %), and v + ZTSNR fixes
//! backgrounds (README, Toy world). Std 4 leaked so much colour that the
//! eps base fell to 33 %.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::resume::{named_vars, Checkpoints, TrainLoop};
use super::scenes::Scene;
use crate::diffusion::noise::normals;
use crate::models::sdxl::{init_params, Vae, VaeConfig};
use crate::nn::optim::AdamW;
use crate::stages::Ctx;
use crate::train::config::LrSchedule;
use crate::train::lr_factor;
use crate::{Error, Result};

/// Std of the toy latents as the UNet sees them (module docs; SDXL: 1).
pub const LATENT_STD: f64 = 2.0;

/// Side of the square crops the latent statistics and reconstruction
/// error are measured on.
pub const CROP: u32 = 64;

/// Settings of [`train_vae`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VaeTraining {
    /// Seed of the initial weights and of the latent-sampling noise.
    pub seed: u64,
    /// Seed of the training scenes.
    pub data_seed: u64,
    /// Optimizer steps.
    pub steps: usize,
    /// Scenes per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Weight of the KL term (per latent element, against L1 per pixel).
    pub kl_weight: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Side of the square training crops (a multiple of 8, ≤ 64): the VAE
    /// is convolutional, and 32×32 crops cost a quarter of full scenes.
    pub crop: u32,
}

impl Default for VaeTraining {
    fn default() -> Self {
        Self {
            seed: 0,
            data_seed: 11,
            steps: 2000,
            batch: 16,
            lr: 2e-3,
            kl_weight: 1e-4,
            weight_decay: 0.0,
            crop: 32,
        }
    }
}

/// What [`train_vae`] did.
#[derive(Debug, Clone, Serialize)]
pub struct VaeTrainReport {
    /// Total loss of every step.
    pub losses: Vec<f32>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Parameter count.
    pub params: usize,
    /// Per-channel mean of the latent means before normalising.
    pub latent_mean: Vec<f64>,
    /// Per-channel std of the latent means before normalising.
    pub latent_std: Vec<f64>,
    /// Mean absolute reconstruction error on fresh scenes, in [0, 255] units.
    pub recon_mae: f64,
}

/// A toy VAE being trained (weights in a `VarMap`, keys without the
/// `first_stage_model.` prefix).
pub struct ToyVae {
    varmap: VarMap,
    vae: Vae,
}

impl std::fmt::Debug for ToyVae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToyVae").finish()
    }
}

/// Scenes `start..start+n` of `seed`, centre-cropped to 64×64, as
/// `(n, 3, 64, 64)` in [−1, 1].
pub fn scene_crops(seed: u64, start: u64, n: usize) -> Result<Tensor> {
    scene_crops_at(seed, start, n, CROP, 0)
}

/// Scenes `start..start+n` of `seed`, each cropped to `side`×`side` at a
/// position drawn from `(salt, index)` (centred when `side` is 64), as
/// `(n, 3, side, side)` in [−1, 1].
pub fn scene_crops_at(seed: u64, start: u64, n: usize, side: u32, salt: u64) -> Result<Tensor> {
    use rand::Rng;
    use rayon::prelude::*;
    let c = side as usize;
    // Scenes are drawn on all cores (about 0.2 ms each, 4×4 supersampled: a
    // few ms of a ~60 ms training step). Each crop is a pure function of
    // its index, so the batch is the same as drawn one by one.
    let crops: Vec<Vec<f32>> = (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let img = Scene::random(seed, start + i).render();
            let (w, h) = img.dimensions();
            if side > w.min(h) || side == 0 || side % 8 != 0 {
                return Err(Error::config(format!(
                    "toy vae: crop {side} must be a multiple of 8 and at most {}",
                    w.min(h)
                )));
            }
            let (x0, y0) = if side == CROP {
                ((w - side) / 2, (h - side) / 2)
            } else {
                let mut rng = ChaCha8Rng::seed_from_u64(
                    salt ^ (start + i).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                (
                    rng.random_range(0..=w - side),
                    rng.random_range(0..=h - side),
                )
            };
            let crop = image::imageops::crop_imm(&img, x0, y0, side, side).to_image();
            let mut planes = vec![0f32; 3 * c * c];
            for (p, px) in crop.pixels().enumerate() {
                for ch in 0..3 {
                    planes[ch * c * c + p] = f32::from(px.0[ch]) / 127.5 - 1.0;
                }
            }
            Ok(planes)
        })
        .collect::<Result<_>>()?;
    let data = crops.concat();
    Ok(Tensor::from_vec(data, (n, 3, c, c), &Device::Cpu)?)
}

impl ToyVae {
    /// A freshly initialised toy VAE (weights from `seed`).
    pub fn new(seed: u64) -> Result<Self> {
        let varmap = VarMap::new();
        let vae = Vae::new(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            &VaeConfig::toy(),
        )?;
        init_params(&varmap, seed)?;
        Ok(Self { varmap, vae })
    }

    /// The VAE (sharing the trained weights).
    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// Training loss (L1 + `kl_weight`·KL) on images `x` with sampling noise `eps`.
    fn loss(&self, x: &Tensor, eps: &Tensor, kl_weight: f64) -> Result<(Tensor, Tensor)> {
        let (mean, logvar) = self.vae.encode_moments(x)?;
        let z = (&mean + (&logvar * 0.5)?.exp()?.mul(eps)?)?;
        let recon = self.vae.decode(&z)?;
        let l1 = (recon - x)?.abs()?.mean_all()?;
        // KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − ln σ²), mean per element.
        let kl = ((((mean.sqr()? + logvar.exp()?)? - 1.0)? - &logvar)? * 0.5)?.mean_all()?;
        let total = (&l1 + (kl * kl_weight)?)?;
        Ok((total, l1))
    }

    /// Mean L1 reconstruction error (latent means, no sampling) on scenes
    /// `start..start+n` of `seed`, in [0, 255] units.
    pub fn recon_mae(&self, seed: u64, start: u64, n: usize) -> Result<f64> {
        let mut sum = 0.0;
        let mut done = 0;
        while done < n {
            let k = 16.min(n - done);
            let x = scene_crops(seed, start + done as u64, k)?;
            let r = self.vae.decode(&self.vae.encode(&x)?)?.clamp(-1f32, 1f32)?;
            let e = (r - &x)?.abs()?.mean_all()?.to_scalar::<f32>()?;
            sum += f64::from(e) * k as f64;
            done += k;
        }
        Ok(sum / n.max(1) as f64 * 127.5)
    }

    /// Per-channel mean and std of the latent means over scenes
    /// `start..start+n` of `seed`.
    pub fn latent_stats(&self, seed: u64, start: u64, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let e = VaeConfig::toy().embed_dim;
        let (mut s1, mut s2, mut cnt) = (vec![0f64; e], vec![0f64; e], 0f64);
        let mut done = 0;
        while done < n {
            let k = 16.min(n - done);
            let z = self
                .vae
                .encode(&scene_crops(seed, start + done as u64, k)?)?;
            let z = z.transpose(0, 1)?.flatten_from(1)?.to_vec2::<f32>()?; // (e, k·h·w)
            for (c, row) in z.iter().enumerate() {
                for &v in row {
                    s1[c] += f64::from(v);
                    s2[c] += f64::from(v) * f64::from(v);
                }
            }
            cnt += z.first().map_or(0, Vec::len) as f64;
            done += k;
        }
        let mean: Vec<f64> = s1.iter().map(|s| s / cnt.max(1.0)).collect();
        let std = s2
            .iter()
            .zip(&mean)
            .map(|(s, m)| (s / cnt.max(1.0) - m * m).max(0.0).sqrt())
            .collect();
        Ok((mean, std))
    }

    /// Fold a per-channel shift `mean` and scale into `quant_conv` /
    /// `post_quant_conv` so the latent means have mean 0 and std
    /// `LATENT_STD / scale_factor` per channel (module docs).
    /// Reconstructions are unchanged (up to rounding).
    pub fn normalize_latents(&self, mean: &[f64], std: &[f64]) -> Result<()> {
        let cfg = VaeConfig::toy();
        let e = cfg.embed_dim;
        if mean.len() != e || std.len() != e || std.iter().any(|s| s.is_nan() || *s <= 1e-8) {
            return Err(Error::Other(format!(
                "toy vae: latent statistics {mean:?} / {std:?} cannot be normalised (a channel is constant); train longer"
            )));
        }
        let k: Vec<f64> = std
            .iter()
            .map(|s| LATENT_STD / (cfg.scale_factor * s))
            .collect();
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Other("varmap lock poisoned".into()))?;
        let get = |name: &str| {
            data.get(name)
                .ok_or_else(|| Error::Other(format!("toy vae: no parameter {name}")))
        };
        // quant_conv: rows 0..e are the mean, e..2e the log-variance.
        let qw = get("quant_conv.weight")?;
        let qb = get("quant_conv.bias")?;
        let mut w = qw.as_tensor().flatten_from(1)?.to_vec2::<f32>()?;
        let mut b = qb.as_tensor().to_vec1::<f32>()?;
        for c in 0..e {
            for v in &mut w[c] {
                *v = (f64::from(*v) * k[c]) as f32;
            }
            b[c] = ((f64::from(b[c]) - mean[c]) * k[c]) as f32;
            b[e + c] = (f64::from(b[e + c]) + 2.0 * k[c].ln()) as f32;
        }
        let wt = Tensor::new(w, &Device::Cpu)?.reshape(qw.dims())?;
        qw.set(&wt)?;
        qb.set(&Tensor::new(b, &Device::Cpu)?)?;
        // post_quant_conv: z = z'/k + m ⇒ W z + b = (W/k) z' + (b + W m).
        let pw = get("post_quant_conv.weight")?;
        let pb = get("post_quant_conv.bias")?;
        let mut w = pw.as_tensor().flatten_from(1)?.to_vec2::<f32>()?; // (z, e)
        let mut b = pb.as_tensor().to_vec1::<f32>()?;
        for (o, row) in w.iter_mut().enumerate() {
            let mut shift = 0.0;
            for c in 0..e {
                shift += f64::from(row[c]) * mean[c];
                row[c] = (f64::from(row[c]) / k[c]) as f32;
            }
            b[o] = (f64::from(b[o]) + shift) as f32;
        }
        let wt = Tensor::new(w, &Device::Cpu)?.reshape(pw.dims())?;
        pw.set(&wt)?;
        pb.set(&Tensor::new(b, &Device::Cpu)?)?;
        Ok(())
    }

    /// The weights, keys without the `first_stage_model.` prefix, sorted.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        crate::models::sdxl::varmap_tensors(&self.varmap)
    }
}

/// Train the toy VAE (module docs), then normalise its latents on 256
/// fresh scenes (seed `data_seed + 1`).
///
/// With `ck` the loop saves its state now and then and where it is stopped,
/// and goes on from a state saved under the same settings
/// ([`super::resume`]).
pub fn train_vae(
    opts: &VaeTraining,
    ck: Option<&Checkpoints>,
    ctx: &Ctx,
) -> Result<(ToyVae, VaeTrainReport)> {
    if opts.steps == 0 || opts.batch == 0 {
        return Err(Error::config(
            "toy vae training: steps and batch must be > 0",
        ));
    }
    let tv = ToyVae::new(opts.seed)?;
    let vars = tv.varmap.all_vars();
    let params = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    let warmup = (opts.steps / 20).max(1);
    let lat = (opts.crop / 8) as usize;
    let e = VaeConfig::toy().embed_dim;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x7661_655f_6e6f_6973); // "vae_nois"
    let mut lp = TrainLoop::start(
        "VAE",
        opts.steps,
        named_vars(&tv.varmap, ""),
        &mut opt,
        ck,
        ctx,
    )?;
    if lp.start > 0 {
        let pos = lp.rng_word_pos.ok_or_else(|| {
            Error::config(
                "toy VAE training: the saved state has no noise position; delete it to start over",
            )
        })?;
        rng.set_word_pos(pos);
    }
    let bar = ctx.bar(opts.steps as u64, "vae");
    bar.set_position(lp.start as u64);
    let mut warm = crate::nn::keep_warm();
    for step in lp.start..opts.steps {
        warm.refresh();
        let x = scene_crops_at(
            opts.data_seed,
            (step * opts.batch) as u64,
            opts.batch,
            opts.crop,
            opts.seed,
        )?;
        let eps = Tensor::from_vec(
            normals(&mut rng, opts.batch * e * lat * lat),
            (opts.batch, e, lat, lat),
            &Device::Cpu,
        )?;
        let (loss, l1) = tv.loss(&x, &eps, opts.kl_weight)?;
        let lr = opts.lr * lr_factor(step, opts.steps, warmup, LrSchedule::Cosine, 0.1);
        super::optimizer_step(&mut opt, &loss, lr, step, "toy vae", &mut lp.losses)?;
        bar.set_message(format!("l1 {:.4}", l1.to_scalar::<f32>()?));
        bar.inc(1);
        lp.after_step(step + 1, &opt, Some(rng.get_word_pos()))?;
    }
    bar.finish_and_clear();
    let eval_seed = opts.data_seed.wrapping_add(1);
    let (latent_mean, latent_std) = tv.latent_stats(eval_seed, 0, 256)?;
    tv.normalize_latents(&latent_mean, &latent_std)?;
    let recon_mae = tv.recon_mae(eval_seed, 0, 64)?;
    let seconds = lp.seconds();
    Ok((
        tv,
        VaeTrainReport {
            losses: lp.losses,
            seconds,
            params,
            latent_mean,
            latent_std,
            recon_mae,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_steps_lower_the_loss_and_normalising_keeps_reconstructions() {
        let opts = VaeTraining {
            steps: 16,
            batch: 4,
            lr: 3e-3,
            ..Default::default()
        };
        let before = ToyVae::new(opts.seed).unwrap().recon_mae(99, 0, 8).unwrap();
        let (tv, rep) = train_vae(&opts, None, &Ctx::quiet()).unwrap();
        assert_eq!(rep.losses.len(), 16);
        let after = tv.recon_mae(99, 0, 8).unwrap();
        assert!(after < before, "recon mae {before} → {after}");
        // After normalising, UNet-scale latents have mean ≈ 0 and std ≈
        // LATENT_STD per channel on the scenes the statistics came from.
        let (m, s) = tv.latent_stats(opts.data_seed + 1, 0, 256).unwrap();
        let f = VaeConfig::toy().scale_factor;
        for c in 0..m.len() {
            assert!((m[c] * f).abs() < 1e-3, "{m:?}");
            assert!((s[c] * f - LATENT_STD).abs() < 2e-3, "{s:?}");
        }
        // Folding the scale is exact up to rounding.
        let mae2 = {
            let t2 = train_vae(&opts, None, &Ctx::quiet()).unwrap().0;
            t2.recon_mae(99, 0, 8).unwrap()
        };
        assert_eq!(mae2, after, "same seeds, same weights");
    }

    #[test]
    fn normalising_changes_latents_not_reconstructions() {
        let tv = ToyVae::new(3).unwrap();
        let x = scene_crops(5, 0, 2).unwrap();
        let r0 = tv.vae().decode(&tv.vae().encode(&x).unwrap()).unwrap();
        let e = VaeConfig::toy().embed_dim;
        let mean: Vec<f64> = (0..e).map(|c| [0.5, -0.2, 0.1, 0.0][c % 4]).collect();
        let std: Vec<f64> = (0..e).map(|c| [2.0, 0.5, 1.0, 3.0][c % 4]).collect();
        tv.normalize_latents(&mean, &std).unwrap();
        let r1 = tv.vae().decode(&tv.vae().encode(&x).unwrap()).unwrap();
        let d = (r0 - r1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{d}");
    }
}
