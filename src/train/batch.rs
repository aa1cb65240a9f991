//! One training micro-batch (what a step learns from) and the losses on it:
//! timesteps, noise (offset and multi-resolution), the noised latent and
//! the objective's target from the step's seeded stream; the per-sample
//! MSE; the deterministic validation loss.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rand::Rng;

use super::cache::Caches;
use super::config::{TrainConfig, Weighting};
use super::data::{rng_for, stream, TrainItem};
use crate::diffusion::noise::normals;
use crate::diffusion::training::{add_noise, target, LossWeighting};
use crate::diffusion::NoiseSchedule;
use crate::models::sdxl::build_y;
use crate::Result;

pub(super) fn loss_weighting(cfg: &TrainConfig) -> LossWeighting {
    match cfg.weighting {
        Weighting::None => LossWeighting::Uniform,
        Weighting::MinSnr => LossWeighting::MinSnr {
            gamma: cfg.min_snr_gamma,
        },
        Weighting::Debiased => LossWeighting::Debiased {
            snr_min: cfg.debiased_snr_min,
        },
    }
}

/// One micro-batch: inputs and targets ready for the UNet.
pub(super) struct Batch {
    pub(super) x_t: Tensor,
    pub(super) timesteps: Tensor,
    pub(super) context: Tensor,
    pub(super) y: Tensor,
    pub(super) target: Tensor,
    pub(super) weights: Tensor,
    pub(super) item_ids: Vec<i64>,
}

/// Assemble the micro-batch `idx` of training `step` (all randomness from
/// `(seed, step, micro)`; `at` is `(step, micro)`).
pub(super) fn make_batch(
    cfg: &TrainConfig,
    sched: &NoiseSchedule,
    caches: &Caches,
    items: &[TrainItem],
    idx: &[usize],
    (step, micro): (usize, usize),
    nan: bool,
) -> Result<Batch> {
    let b = idx.len();
    let mut rng = rng_for(cfg.seed, stream::STEP, step as u64, micro as u64);
    let timesteps: Vec<usize> = (0..b)
        .map(|_| rng.random_range(cfg.min_timestep..=cfg.max_timestep))
        .collect();
    let dropped: Vec<bool> = (0..b)
        .map(|_| rng.random::<f64>() < cfg.caption_dropout)
        .collect();
    let latents = idx
        .iter()
        .map(|&i| caches.latent(items[i].item_id))
        .collect::<Result<Vec<_>>>()?;
    let mut x0 = Tensor::cat(&latents, 0)?; // (b, 4, h, w)
    if nan {
        x0 = (x0 * f64::NAN)?;
    }
    let dims = x0.dims().to_vec();
    let (c, per) = (dims[1], dims[1..].iter().product::<usize>());
    let mut eps = Tensor::from_vec(normals(&mut rng, b * per), dims.clone(), x0.device())?;
    if cfg.noise_offset > 0.0 {
        let off = Tensor::from_vec(normals(&mut rng, b * c), (b, c, 1, 1), x0.device())?;
        eps = eps.broadcast_add(&(off * cfg.noise_offset)?)?;
    }
    if cfg.multires_noise_iterations > 0 {
        eps = multires_noise(
            &eps,
            &mut rng,
            cfg.multires_noise_iterations,
            cfg.multires_noise_discount,
        )?;
    }
    let x_t = add_noise(&x0, &eps, &timesteps, sched)?;
    let tgt = target(&x0, &eps, &timesteps, sched, cfg.objective)?;
    let w = loss_weighting(cfg).weights(sched, &timesteps, cfg.objective)?;
    let captions: Vec<&str> = idx.iter().map(|&i| items[i].caption.as_str()).collect();
    let (context, pooled) = caches.batch_cond(&captions, &dropped)?;
    let sizes: Vec<_> = idx.iter().map(|&i| items[i].size).collect();
    let y = build_y(&pooled, &sizes)?;
    let dev = x0.device().clone();
    Ok(Batch {
        x_t,
        timesteps: Tensor::from_vec(
            timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            b,
            &dev,
        )?,
        context,
        y,
        target: tgt,
        weights: Tensor::from_vec(w.iter().map(|&v| v as f32).collect::<Vec<_>>(), b, &dev)?,
        item_ids: idx.iter().map(|&i| items[i].item_id).collect(),
    })
}

/// Multi-resolution noise ([`TrainConfig::multires_noise_iterations`]):
/// `eps` plus `levels` more normal fields, as kohya's `pyramid_noise_like`:
/// level i is drawn at the latent size divided by rᶦ (r uniform in [2, 4)
/// per level; level 0 is a second full-size field), bilinearly upsampled
/// and weighted `discount^i`, stopping once a side reaches 1; then the sum
/// is rescaled to unit std per sample (kohya divides the whole batch by one
/// std; per sample keeps each item's noise level independent of its batch).
/// Coarse noise hides an image's low frequencies (layout, regional colour)
/// at high σ where plain per-cell noise averages out over a region. All
/// draws come from `rng` (the step's stream).
pub(super) fn multires_noise(
    eps: &Tensor,
    rng: &mut rand_chacha::ChaCha8Rng,
    levels: usize,
    discount: f64,
) -> Result<Tensor> {
    let (b, c, h, w) = eps.dims4()?;
    let mut noise = eps.clone();
    for i in 0..levels {
        let scale = (2.0 + 2.0 * rng.random::<f64>()).powi(i as i32);
        let (hi, wi) = (
            ((h as f64 / scale) as usize).max(1),
            ((w as f64 / scale) as usize).max(1),
        );
        let mut level =
            Tensor::from_vec(normals(rng, b * c * hi * wi), (b, c, hi, wi), eps.device())?;
        if (hi, wi) != (h, w) {
            level = level.upsample_bilinear2d(h, w, false)?;
        }
        noise = (noise + (level * discount.powi(i as i32))?)?;
        if hi == 1 || wi == 1 {
            break;
        }
    }
    let flat = noise.flatten_from(1)?;
    let centred = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
    let std = centred.sqr()?.mean_keepdim(1)?.sqrt()?;
    Ok(noise.broadcast_div(&std.reshape((b, 1, 1, 1))?)?)
}

/// Per-sample MSE `(b,)` of the UNet on a batch.
pub(super) fn per_sample_mse(unet: &crate::models::sdxl::UNet, b: &Batch) -> Result<Tensor> {
    let pred = unet.forward(&b.x_t, &b.timesteps, &b.context, &b.y)?; // (b, 4, h, w)
    per_sample_mse_of(&pred, b)
}

/// A micro-batch's loss (weighted per-sample MSE over `grad_accum`) and
/// the gradients of `vars`, through the whole graph or, with
/// `gradient_checkpointing`, block by block
/// ([`crate::models::sdxl::UNet::loss_and_grads_recomputed`]).
pub(super) fn loss_and_grads(
    unet: &crate::models::sdxl::UNet,
    b: &Batch,
    cfg: &TrainConfig,
    vars: &[Var],
) -> Result<(f64, GradStore)> {
    let loss_of = |pred: &Tensor| -> candle_core::Result<Tensor> {
        let mse = per_sample_mse_of(pred, b).map_err(candle_core::Error::wrap)?; // (b,)
        (mse * &b.weights)?.mean_all()? / cfg.grad_accum as f64
    };
    let (loss, g) = if cfg.gradient_checkpointing {
        unet.loss_and_grads_recomputed(&b.x_t, &b.timesteps, &b.context, &b.y, vars, &loss_of)?
    } else {
        let loss = loss_of(&unet.forward(&b.x_t, &b.timesteps, &b.context, &b.y)?)?;
        let g = loss.backward()?;
        (loss, g)
    };
    Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, g))
}

/// Per-sample MSE `(b,)` of a prediction `(b, 4, h, w)` against the batch's target.
fn per_sample_mse_of(pred: &Tensor, b: &Batch) -> Result<Tensor> {
    let n = b.x_t.dims()[0];
    Ok((pred.to_dtype(DType::F32)? - &b.target)?
        .sqr()?
        .reshape((n, ()))?
        .mean(1)?)
}

/// Deterministic validation loss: every item at every `val_timesteps`
/// entry, noise from `(seed, item, t)`, plain objective MSE.
pub(super) fn validation_loss(
    cfg: &TrainConfig,
    sched: &NoiseSchedule,
    caches: &Caches,
    unet: &crate::models::sdxl::UNet,
    items: &[TrainItem],
) -> Result<Option<f64>> {
    if items.is_empty() || cfg.val_timesteps.is_empty() {
        return Ok(None);
    }
    let mut total = 0.0;
    let mut n = 0usize;
    for (i, it) in items.iter().enumerate() {
        let x0 = &caches.latent(it.item_id)?;
        let (context, pooled) = caches.batch_cond(&[it.caption.as_str()], &[false])?;
        let y = build_y(&pooled, &[it.size])?;
        for &t in &cfg.val_timesteps {
            let mut rng = rng_for(cfg.seed, stream::VAL, i as u64, t as u64);
            let eps = Tensor::from_vec(normals(&mut rng, x0.elem_count()), x0.dims(), x0.device())?;
            let b = Batch {
                x_t: add_noise(x0, &eps, &[t], sched)?,
                timesteps: Tensor::from_vec(vec![t as f32], 1, x0.device())?,
                context: context.clone(),
                y: y.clone(),
                target: target(x0, &eps, &[t], sched, cfg.objective)?,
                weights: Tensor::ones(1, DType::F32, x0.device())?,
                item_ids: vec![it.item_id],
            };
            total += per_sample_mse(unet, &b)?
                .detach()
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            n += 1;
        }
    }
    Ok(Some(total / n as f64))
}

/// `acc + g` for every trainable variable that `g` has a gradient for,
/// detached: candle leaves a Var's gradient tracked when the op that made
/// it read tracked tensors (a convolution's kernel, a custom op's weight),
/// which would keep each micro-batch's forward graph alive until the step.
pub(super) fn add_grads(
    mut acc: GradStore,
    g: &GradStore,
    vars: &[(String, Var)],
) -> Result<GradStore> {
    for (_, v) in vars {
        if let Some(gv) = g.get(v.as_tensor()) {
            let gv = gv.detach();
            let sum = match acc.get(v.as_tensor()) {
                Some(a) => (a + gv)?,
                None => gv,
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

/// Global L2 norm of the gradients of `vars`.
pub(super) fn grad_norm(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    let mut sq = 0.0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}

/// Scale the gradients of `vars` (global norm `gnorm`) down to norm
/// `max` when above it (`max` ≤ 0: no clipping).
pub(super) fn clip_grads(
    grads: &mut GradStore,
    vars: &[(String, Var)],
    gnorm: f64,
    max: f64,
) -> Result<()> {
    if max > 0.0 && gnorm > max {
        let scale = max / (gnorm + 1e-6);
        for (_, v) in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::multires_noise;

    /// Accumulated gradients are detached: a tracked one (candle's conv
    /// kernel gradient reads the tracked activation) would keep each
    /// micro-batch's forward graph alive until the optimizer step.
    #[test]
    fn accumulated_gradients_hold_no_graph() {
        use candle_core::backprop::GradStore;
        let d = Device::Cpu;
        let w = candle_core::Var::new(&[1f32, 2.0], &d).unwrap();
        let x = candle_core::Var::new(&[3f32, 4.0], &d).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut g = GradStore::default();
        g.insert(w.as_tensor(), (x.as_tensor() * 2.0).unwrap());
        let once = super::add_grads(GradStore::default(), &g, &vars).unwrap();
        let twice = super::add_grads(once, &g, &vars).unwrap();
        let sum = twice.get(w.as_tensor()).unwrap();
        assert!(!sum.track_op());
        assert_eq!(sum.to_vec1::<f32>().unwrap(), [12.0, 16.0]);
    }

    /// Gradients over the limit are scaled to it, as one vector over all
    /// parameters; those under it, or with clipping off, stay.
    #[test]
    fn gradients_are_clipped_to_the_global_norm() {
        use super::{clip_grads, grad_norm};
        let d = Device::Cpu;
        let a = candle_core::Var::new(&[1f32, 1.0], &d).unwrap();
        let b = candle_core::Var::new(&[1f32], &d).unwrap();
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        // loss = 3·a0 + 0·a1 + 4·b0: gradients (3, 0) and (4), norm 5.
        let loss = ((a.as_tensor() * Tensor::new(&[3f32, 0.0], &d).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            + (b.as_tensor() * 4.0).unwrap().sum_all().unwrap())
        .unwrap();
        let got = |max: f64| {
            let mut g = loss.backward().unwrap();
            let n = grad_norm(&g, &vars).unwrap();
            assert!((n - 5.0).abs() < 1e-9);
            clip_grads(&mut g, &vars, n, max).unwrap();
            let ga: Vec<f32> = g.get(a.as_tensor()).unwrap().to_vec1().unwrap();
            let gb: Vec<f32> = g.get(b.as_tensor()).unwrap().to_vec1().unwrap();
            (ga, gb, grad_norm(&g, &vars).unwrap())
        };
        let (ga, gb, n) = got(1.0);
        assert!((ga[0] - 0.6).abs() < 1e-6 && ga[1] == 0.0 && (gb[0] - 0.8).abs() < 1e-6);
        assert!((n - 1.0).abs() < 1e-5, "{n}");
        assert_eq!(got(10.0).2, 5.0);
        assert_eq!(got(0.0).2, 5.0);
    }

    /// Multi-resolution noise: unit std per sample, deterministic from the
    /// stream, and far more power in each channel's spatial mean (the layout
    /// frequencies) than plain per-cell noise (variance 1/64 on 8×8).
    #[test]
    fn multires_noise_has_unit_std_and_coarse_power() {
        use rand::SeedableRng;
        let (b, c, h, w) = (64, 4, 8, 8);
        let draw = || {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let eps = Tensor::from_vec(
                crate::diffusion::noise::normals(&mut rng, b * c * h * w),
                (b, c, h, w),
                &Device::Cpu,
            )
            .unwrap();
            let m = multires_noise(&eps, &mut rng, 6, 0.8).unwrap();
            (eps, m)
        };
        let (eps, m) = draw();
        assert_eq!(m.dims(), &[b, c, h, w]);
        let v: Vec<Vec<f32>> = m.flatten_from(1).unwrap().to_vec2().unwrap();
        for s in &v {
            let mean = s.iter().sum::<f32>() / s.len() as f32;
            let var = s.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / s.len() as f32;
            assert!((var.sqrt() - 1.0).abs() < 1e-4, "std {}", var.sqrt());
        }
        let channel_mean_var = |t: &Tensor| {
            let means: Vec<f32> = t
                .mean((2, 3))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            means.iter().map(|x| x * x).sum::<f32>() / means.len() as f32
        };
        let (plain, multi) = (channel_mean_var(&eps), channel_mean_var(&m));
        assert!(plain < 0.03, "plain {plain}");
        assert!(multi > 4.0 * plain, "plain {plain}, multires {multi}");
        let (_, again) = draw();
        assert_eq!(
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    /// Level 0 is kohya's second full-size field with weight 1: with one level
    /// the result is (ε + ε′)/std, so its correlation with ε is 1/√2 (a first
    /// level that is already coarse, weighted 0.3, would leave it near 0.96).
    #[test]
    fn multires_noise_level_zero_is_a_full_size_field() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 16 * 4 * 32 * 32;
        let eps = Tensor::from_vec(
            crate::diffusion::noise::normals(&mut rng, n),
            (16, 4, 32, 32),
            &Device::Cpu,
        )
        .unwrap();
        let m = multires_noise(&eps, &mut rng, 1, 0.3).unwrap();
        let a: Vec<f32> = eps.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p * q) as f64).sum::<f64>();
        let corr = dot(&a, &b) / (dot(&a, &a) * dot(&b, &b)).sqrt();
        assert!((corr - 0.5f64.sqrt()).abs() < 0.02, "corr {corr}");
    }
}
