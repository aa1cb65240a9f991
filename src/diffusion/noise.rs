//! Seeded per-image Gaussian noise, generated on the CPU.
//!
//! A seed must give the same image on any device and in any batch position
//! (issue 4; DESIGN.md §5 "Determinism"). So noise is never drawn from a
//! device RNG or batch-wide: every image owns a ChaCha8 generator
//! (`rand_chacha`, seeded with `seed_from_u64`) and standard normals are drawn
//! with `rand_distr::StandardNormal` (ziggurat on f64, cast to f32), in
//! row-major (c, h, w) order. The finished tensor is then moved to the target
//! device.
//!
//! Conventions:
//! - image `i` of a batch started with seed `s` gets seed `s + i` (wrapping),
//!   as A1111 does ([`batch_seeds`]);
//! - each image has two independent ChaCha streams: stream
//!   [`INIT_STREAM`] gives the initial latent ([`noise_for_seed`]), stream
//!   [`SAMPLER_STREAM`] gives the per-step noise of ancestral samplers
//!   ([`SeededNoise`]); changing the sampler or step count therefore never
//!   changes the initial latent.
//!
//! (Our seeds do not reproduce A1111/ComfyUI images: those draw from torch's
//! Philox/MT generators. Only our own runs are reproducible bit for bit.)

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::{Error, Result};

/// ChaCha stream of the initial latent noise.
pub const INIT_STREAM: u64 = 0;
/// ChaCha stream of the per-step noise of ancestral samplers.
pub const SAMPLER_STREAM: u64 = 1;

/// Seeds of a batch: `seed + i` for i in 0..batch (wrapping at u64::MAX).
pub fn batch_seeds(seed: u64, batch: usize) -> Vec<u64> {
    (0..batch as u64).map(|i| seed.wrapping_add(i)).collect()
}

/// The generator of one image and stream.
pub fn image_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// `n` standard normals from `rng`, as f32.
pub fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// Initial latent noise N(0, 1) of one image, shape `(c, h, w)`, f32, on `device`.
pub fn noise_for_seed(seed: u64, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
    let (c, h, w) = shape;
    let mut rng = image_rng(seed, INIT_STREAM);
    Ok(Tensor::from_vec(normals(&mut rng, c * h * w), shape, &Device::Cpu)?.to_device(device)?)
}

/// Initial latent noise of a batch: the stack of [`noise_for_seed`] of each seed,
/// shape `(b, c, h, w)`.
pub fn batch_noise(seeds: &[u64], shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
    if seeds.is_empty() {
        return Err(Error::config("batch noise: no seeds given (batch size 0)"));
    }
    let per: Vec<Tensor> = seeds
        .iter()
        .map(|&s| noise_for_seed(s, shape, &Device::Cpu))
        .collect::<Result<_>>()?;
    Ok(Tensor::stack(&per, 0)?.to_device(device)?)
}

/// Source of the fresh N(0, 1) noise an ancestral sampler adds at each step.
pub trait NoiseSource {
    /// Noise shaped like `like` (`(b, c, h, w)`), same dtype and device.
    fn next_noise(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// Per-image seeded sampler noise: image `i` draws from stream
/// [`SAMPLER_STREAM`] of its own seed, so its noise does not depend on the
/// batch it is in.
#[derive(Clone, Debug)]
pub struct SeededNoise {
    rngs: Vec<ChaCha8Rng>,
}

impl SeededNoise {
    /// One generator per seed (one seed per image of the batch, in order).
    pub fn new(seeds: &[u64]) -> Self {
        Self {
            rngs: seeds
                .iter()
                .map(|&s| image_rng(s, SAMPLER_STREAM))
                .collect(),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn next_noise(&mut self, like: &Tensor) -> Result<Tensor> {
        let dims = like.dims();
        let b = dims.first().copied().unwrap_or(0);
        if b != self.rngs.len() {
            return Err(Error::config(format!(
                "sampler noise: batch of {b} images but {} seeds",
                self.rngs.len()
            )));
        }
        let per: usize = dims[1..].iter().product();
        let mut data = Vec::with_capacity(b * per);
        for rng in &mut self.rngs {
            data.extend(normals(rng, per));
        }
        Ok(Tensor::from_vec(data, dims, &Device::Cpu)?
            .to_dtype(like.dtype())?
            .to_device(like.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn same_seed_same_noise_in_any_batch_position() {
        let dev = Device::Cpu;
        let shape = (4, 8, 6);
        let b4 = batch_noise(&batch_seeds(41, 4), shape, &dev).unwrap();
        for i in 0..4 {
            let b1 = batch_noise(&[41 + i as u64], shape, &dev).unwrap();
            assert_eq!(
                bits(&b1.get(0).unwrap()),
                bits(&b4.get(i).unwrap()),
                "init noise pos {i}"
            );
        }
        // Sampler noise: several steps, image 2 of a batch of 4 == batch of 1 with seed 43.
        let like4 = b4.zeros_like().unwrap();
        let like1 = b4.narrow(0, 0, 1).unwrap().zeros_like().unwrap();
        let mut n4 = SeededNoise::new(&batch_seeds(41, 4));
        let mut n1 = SeededNoise::new(&[43]);
        for step in 0..3 {
            let a = n4.next_noise(&like4).unwrap();
            let b = n1.next_noise(&like1).unwrap();
            assert_eq!(
                bits(&a.get(2).unwrap()),
                bits(&b.get(0).unwrap()),
                "step {step}"
            );
        }
    }

    #[test]
    fn noise_is_standard_normal_and_seed_dependent() {
        let dev = Device::Cpu;
        let a = noise_for_seed(7, (4, 64, 64), &dev).unwrap();
        let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "mean {mean} var {var}"
        );
        let b = noise_for_seed(8, (4, 64, 64), &dev).unwrap();
        assert_ne!(bits(&a), bits(&b));
        // init and sampler streams differ
        let mut s = SeededNoise::new(&[7]);
        let first = s.next_noise(&a.unsqueeze(0).unwrap()).unwrap();
        assert_ne!(bits(&first), bits(&a));
        assert!(SeededNoise::new(&[1, 2]).next_noise(&first).is_err());
        assert!(batch_noise(&[], (1, 1, 1), &dev).is_err());
    }
}
