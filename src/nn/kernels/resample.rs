//! Nearest-neighbour ×2 upsampling of `(b, c, h, w)` (the SDXL UNet's and
//! VAE decoder's `Upsample`) as a candle custom op with backward.
//!
//! Why: as reshape + broadcast (the reference in
//! [`crate::nn::ops::reference::upsample_nearest2x`]) the forward goes
//! through candle's strided copy, and the backward is candle's generic
//! reduce over two non-contiguous inner dims: one divmod chain per element
//! on one thread, about 5 % of a toy VAE training step (perf, stop 26).
//! Here each is one pass, split over planes.
//!
//! The backward sums each 2×2 block of the gradient starting from zero in
//! row-major order, `((0 + g₀₀) + g₀₁) + g₁₀) + g₁₁`, which is the order
//! candle's reduce adds them in: results are bit-identical to the
//! reference (the tests check the bits), so models trained before this op
//! existed are reproduced exactly.

use super::{chunk_elems, slice_of, tensor_from, with_data, Real};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn geometry(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match dims {
        &[b, c, h, w] => Ok((b * c, h, w)),
        _ => bail!("upsample_nearest2x: expected (b, c, h, w), got {dims:?}"),
    }
}

/// `y (planes, 2h, 2w)` from `x (planes, h, w)`.
fn up_planes<T: Real>(y: &mut [T], x: &[T], h: usize, w: usize) {
    for (yp, xp) in y.chunks_exact_mut(4 * h * w).zip(x.chunks_exact(h * w)) {
        for (yr, xr) in yp.chunks_exact_mut(4 * w).zip(xp.chunks_exact(w)) {
            let (r0, r1) = yr.split_at_mut(2 * w);
            for (o, &v) in r0.chunks_exact_mut(2).zip(xr) {
                o[0] = v;
                o[1] = v;
            }
            r1.copy_from_slice(r0);
        }
    }
}

/// `dx (planes, h, w)` from `dy (planes, 2h, 2w)`: the sum of each 2×2 block,
/// in candle's reduce order (see the module docs).
fn down_planes<T: Real>(dx: &mut [T], dy: &[T], h: usize, w: usize) {
    for (dp, gp) in dx.chunks_exact_mut(h * w).zip(dy.chunks_exact(4 * h * w)) {
        for (dr, gr) in dp.chunks_exact_mut(w).zip(gp.chunks_exact(4 * w)) {
            let (g0, g1) = gr.split_at(2 * w);
            for ((o, a), b) in dr
                .iter_mut()
                .zip(g0.chunks_exact(2))
                .zip(g1.chunks_exact(2))
            {
                *o = T::ZERO + a[0] + a[1] + b[0] + b[1];
            }
        }
    }
}

/// Nearest-neighbour ×2 upsampling.
#[derive(Debug, Clone, Copy)]
pub struct Upsample2xOp;

impl CustomOp1 for Upsample2xOp {
    fn name(&self) -> &'static str {
        "eps2v-upsample-nearest2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h, w) = geometry(l.dims())?;
        fn run<T: Real>(s: &CpuStorage, l: &Layout, h: usize, w: usize) -> Result<CpuStorage> {
            let x = slice_of::<T>(s, l, "upsample_nearest2x x")?;
            let mut y = vec![T::ZERO; 4 * x.len()];
            if !x.is_empty() {
                let c = chunk_elems(x.len(), h * w);
                y.par_chunks_mut(4 * c)
                    .zip(x.par_chunks(c))
                    .for_each(|(yc, xc)| up_planes(yc, xc, h, w));
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = by_dtype!(s.dtype(), "upsample_nearest2x kernel", |T| run::<T>(
            s, l, h, w
        )?);
        let d = l.dims();
        Ok((out, Shape::from((d[0], d[1], 2 * d[2], 2 * d[3]))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (planes, h, w) = geometry(x.dims())?;
        let grad = grad.contiguous()?;
        fn run<T: Real>(
            x: &Tensor,
            grad: &Tensor,
            planes: usize,
            h: usize,
            w: usize,
        ) -> Result<Tensor> {
            let dx = with_data::<T, _>(grad, "upsample_nearest2x grad", |gs| {
                let mut dx = vec![T::ZERO; planes * h * w];
                if !dx.is_empty() {
                    let c = chunk_elems(dx.len(), h * w);
                    dx.par_chunks_mut(c)
                        .zip(gs.par_chunks(4 * c))
                        .for_each(|(o, gc)| down_planes(o, gc, h, w));
                }
                Ok(dx)
            })?;
            tensor_from(dx, x.dims())
        }
        by_dtype!(grad.dtype(), "upsample_nearest2x kernel backward", |T| Ok(
            Some(run::<T>(x, &grad, planes, h, w)?)
        ))
    }
}

/// Differentiable nearest-neighbour ×2 upsampling of a CPU f32/f64
/// `(b, c, h, w)` tensor.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Upsample2xOp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::test_util::{grads, rand};
    use crate::nn::ops::reference;
    use candle_core::{DType, Var};

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    }

    #[test]
    fn forward_and_backward_are_bit_identical_to_the_reference() -> Result<()> {
        // Small (one task) and large (split over threads) inputs, odd sizes;
        // the probe makes the incoming gradient a generic tensor.
        for dims in [[2usize, 3, 5, 7], [4, 16, 24, 20]] {
            let x = Var::from_tensor(&rand(&dims, 7, DType::F32)?)?;
            let probe = rand(&[dims[0], dims[1], 2 * dims[2], 2 * dims[3]], 8, DType::F32)?;
            let (a, ga) = grads(std::slice::from_ref(&x), &probe, &|t| {
                upsample_nearest2x(&t[0])
            })?;
            let (b, gb) = grads(std::slice::from_ref(&x), &probe, &|t| {
                reference::upsample_nearest2x(&t[0])
            })?;
            assert_eq!(bits(&a)?, bits(&b)?, "forward {dims:?}");
            assert_eq!(bits(&ga[0])?, bits(&gb[0])?, "backward {dims:?}");
        }
        Ok(())
    }

    #[test]
    fn f64_backward_sums_each_block() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Var::from_tensor(&Tensor::zeros((1, 1, 2, 2), DType::F64, &dev)?)?;
        let probe = Tensor::arange(0f64, 16.0, &dev)?.reshape((1, 1, 4, 4))?;
        let (_, g) = grads(&[x], &probe, &|t| upsample_nearest2x(&t[0]))?;
        // Blocks [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]].
        assert_eq!(
            g[0].flatten_all()?.to_vec1::<f64>()?,
            vec![10.0, 18.0, 42.0, 50.0]
        );
        Ok(())
    }

    #[test]
    fn rejects_a_non_4d_input() -> Result<()> {
        let x = Tensor::zeros((2, 3, 4), DType::F32, &candle_core::Device::Cpu)?;
        let e = upsample_nearest2x(&x).unwrap_err().to_string();
        assert!(e.contains("(b, c, h, w)"), "{e}");
        Ok(())
    }
}
