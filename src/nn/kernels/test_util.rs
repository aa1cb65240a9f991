//! Helpers shared by the kernel tests: random tensors, max-abs
//! differences and central finite differences in f64.
use candle_core::{DType, Device, Result, Tensor, Var};

/// Deterministic pseudo-random tensor in (-1, 1) (no global RNG state).
pub fn rand(dims: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// max |a − b| over all elements.
pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

/// max |a| over all elements.
pub fn max_abs(a: &Tensor) -> Result<f64> {
    a.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

/// Gradients of `sum(f(vars) ∘ probe)` for every var (one backward).
pub fn grads(
    vars: &[Var],
    probe: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let loss = (&y * probe)?.sum_all()?;
    let g = loss.backward()?;
    let gs = vars
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((y, gs))
}

/// Asserts that [`grads`] of `f` (the output and every gradient) has
/// the same bits on pools of 1, 2, 3 and 7 threads (`SUM_PIECES`).
pub fn assert_same_bits_at_any_thread_count(
    label: &str,
    vars: &[Var],
    probe: &Tensor,
    f: &(dyn Fn(&[Tensor]) -> Result<Tensor> + Sync),
) -> Result<()> {
    let bits = |t: usize| -> Result<Vec<Vec<u64>>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        pool.install(|| {
            let (y, g) = grads(vars, probe, f)?;
            std::iter::once(&y)
                .chain(&g)
                .map(|t| {
                    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    Ok(v.into_iter().map(f64::to_bits).collect())
                })
                .collect()
        })
    };
    let one = bits(1)?;
    for t in [2, 3, 7] {
        let other = bits(t)?;
        for (i, (a, b)) in one.iter().zip(&other).enumerate() {
            let what = if i == 0 {
                "output".to_string()
            } else {
                format!("gradient {}", i - 1)
            };
            assert!(a == b, "{label}: {what} differs between 1 and {t} threads");
        }
    }
    Ok(())
}

/// Asserts that a kernel's output `y` and gradients `g` (from [`grads`])
/// match the reference's: output within `fwd_tol · (1 + max|y_ref|)`,
/// every gradient within `1e-4 · (1 + max|g_ref|)`.
pub fn assert_matches(
    label: &str,
    (y, g): (&Tensor, &[Tensor]),
    (y_ref, g_ref): (&Tensor, &[Tensor]),
    fwd_tol: f64,
) -> Result<()> {
    let d = max_diff(y, y_ref)?;
    assert!(
        d < fwd_tol * (1.0 + max_abs(y_ref)?),
        "{label}: forward diff {d}"
    );
    assert_eq!(g.len(), g_ref.len(), "{label}: gradient count");
    for (i, (a, b)) in g.iter().zip(g_ref).enumerate() {
        let d = max_diff(a, b)?;
        assert!(
            d < 1e-4 * (1.0 + max_abs(b)?),
            "{label}: gradient {i} diff {d}"
        );
    }
    Ok(())
}

/// Checks the analytic f64 gradient of `sum(f(inputs) ∘ probe)` against
/// central finite differences at `samples` coordinates of every input.
pub fn check_fd(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    samples: usize,
    tol: f64,
) -> Result<()> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64)?))
        .collect::<Result<Vec<_>>>()?;
    let y0 = f(&vars
        .iter()
        .map(|v| v.as_tensor().clone())
        .collect::<Vec<_>>())?;
    let probe = rand(y0.dims(), 777, DType::F64)?;
    let (_, analytic) = grads(&vars, &probe, f)?;
    let loss_at =
        |ts: &[Tensor]| -> Result<f64> { (f(ts)? * &probe)?.sum_all()?.to_scalar::<f64>() };
    let h = 1e-6;
    for (i, v) in vars.iter().enumerate() {
        let base: Vec<f64> = v.as_tensor().flatten_all()?.to_vec1()?;
        let ga: Vec<f64> = analytic[i].flatten_all()?.to_vec1()?;
        let n = base.len();
        let step = (n / samples.max(1)).max(1);
        for j in (0..n).step_by(step).take(samples) {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[j] += delta;
                let mut ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
                ts[i] = Tensor::from_vec(p, v.dims(), &Device::Cpu)?;
                loss_at(&ts)
            };
            let fd = (eval(h)? - eval(-h)?) / (2.0 * h);
            let err = (fd - ga[j]).abs();
            assert!(
                err <= tol * (1.0 + fd.abs()),
                "input {i} element {j}: finite difference {fd} vs analytic {}",
                ga[j]
            );
        }
    }
    Ok(())
}
