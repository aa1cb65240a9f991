//! Tests of the softmax and attention kernels against the composite
//! reference and finite differences.

use super::*;
use crate::nn::kernels::test_util::{assert_matches, check_fd, grads, max_diff, rand};
use crate::nn::ops::reference;
use candle_core::DType;
use candle_core::Var;

#[test]
fn softmax_matches_reference_f32_and_fd_f64() -> Result<()> {
    for dims in [vec![3, 7], vec![2, 3, 5], vec![1, 1]] {
        let x = (rand(&dims, 1, DType::F32)? * 4.0)?;
        let vars = [Var::from_tensor(&x)?];
        let probe = rand(&dims, 2, DType::F32)?;
        let (y1, g1) = grads(&vars, &probe, &|t| softmax_last_dim(&t[0]))?;
        let (y2, g2) = grads(&vars, &probe, &|t| reference::softmax_last_dim(&t[0]))?;
        assert!(max_diff(&y1, &y2)? < 1e-6);
        assert!(max_diff(&g1[0], &g2[0])? < 1e-5);
        check_fd(
            &[rand(&dims, 3, DType::F64)?],
            &|t| softmax_last_dim(&t[0]),
            10,
            1e-6,
        )?;
    }
    Ok(())
}

/// (batch, heads, sq, sk, d, dv, causal)
const CASES: &[(usize, usize, usize, usize, usize, usize, bool)] = &[
    (2, 3, 5, 7, 4, 6, false),
    (1, 1, 9, 9, 8, 8, true),
    (3, 2, 6, 4, 5, 3, false),
    (1, 2, 7, 5, 3, 3, true), // sq > sk with causal: last rows unmasked
    (1, 1, 1, 1, 2, 2, false),
];

fn inputs(c: &(usize, usize, usize, usize, usize, usize, bool), dt: DType) -> Result<Vec<Tensor>> {
    let &(b, h, sq, sk, d, dv, _) = c;
    Ok(vec![
        (rand(&[b, h, sq, d], 1, dt)? * 2.0)?,
        (rand(&[b, h, sk, d], 2, dt)? * 2.0)?,
        rand(&[b, h, sk, dv], 3, dt)?,
    ])
}

#[test]
fn attention_forward_and_grads_match_reference_f32() -> Result<()> {
    for c in CASES {
        let (causal, scale) = (c.6, 1.0 / (c.4 as f64).sqrt());
        let ins = inputs(c, DType::F32)?;
        let vars = ins
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let probe = rand(&[c.0, c.1, c.2, c.5], 9, DType::F32)?;
        let (y1, g1) = grads(&vars, &probe, &|t| {
            attention(&t[0], &t[1], &t[2], scale, causal)
        })?;
        let (y2, g2) = grads(&vars, &probe, &|t| {
            reference::attention(&t[0], &t[1], &t[2], scale, causal)
        })?;
        assert_matches(&format!("{c:?}"), (&y1, &g1), (&y2, &g2), 1e-5)?;
    }
    Ok(())
}

#[test]
fn attention_grads_match_finite_differences_f64() -> Result<()> {
    for c in CASES {
        let (causal, scale) = (c.6, 1.0 / (c.4 as f64).sqrt());
        let ins = inputs(c, DType::F64)?;
        check_fd(
            &ins,
            &|t| attention(&t[0], &t[1], &t[2], scale, causal),
            12,
            1e-6,
        )?;
    }
    Ok(())
}

/// Packed (b, s, heads·d) cases: (b, sq, sk, heads, d, dv, causal).
const PACKED: &[(usize, usize, usize, usize, usize, usize, bool)] = &[
    (2, 5, 7, 3, 4, 2, false), // cross-attention, dv ≠ d
    (1, 6, 6, 2, 3, 3, true),  // batch 1 (tasks < threads), causal
    (3, 9, 4, 1, 5, 6, false), // one head
    (1, 1, 1, 4, 2, 2, false), // single token
];

fn packed_inputs(
    c: &(usize, usize, usize, usize, usize, usize, bool),
    dt: DType,
) -> Result<Vec<Tensor>> {
    let (b, sq, sk, h, d, dv, _) = *c;
    Ok(vec![
        rand(&[b, sq, h * d], 11, dt)?,
        rand(&[b, sk, h * d], 12, dt)?,
        rand(&[b, sk, h * dv], 13, dt)?,
    ])
}

#[test]
fn packed_attention_matches_reference_f32_and_fd_f64() -> Result<()> {
    for c in PACKED {
        let (h, d, causal) = (c.3, c.4, c.6);
        let scale = 1.0 / (d as f64).sqrt();
        let vars = packed_inputs(c, DType::F32)?
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let probe = rand(&[c.0, c.1, h * c.5], 14, DType::F32)?;
        let ours = grads(&vars, &probe, &|t| {
            attention_packed(&t[0], &t[1], &t[2], h, scale, causal)
        })?;
        let theirs = grads(&vars, &probe, &|t| {
            reference::attention_packed(&t[0], &t[1], &t[2], h, scale, causal)
        })?;
        let label = format!("{c:?}");
        assert_matches(&label, (&ours.0, &ours.1), (&theirs.0, &theirs.1), 1e-5)?;
        let ins = packed_inputs(c, DType::F64)?;
        check_fd(
            &ins,
            &|t| attention_packed(&t[0], &t[1], &t[2], h, scale, causal),
            12,
            1e-6,
        )?;
    }
    Ok(())
}

#[test]
fn packed_attention_rejects_heads_that_do_not_divide() {
    let q = Tensor::zeros((1, 2, 6), DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = attention_packed(&q, &q, &q, 4, 1.0, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit 4 heads"), "{err}");
}

#[test]
fn attention_blocks_long_sequences_exactly() -> Result<()> {
    // sk = 40000 > SCORE_BUDGET / 30 rows ⇒ several query blocks.
    let g = AttnGeom::new(&[1, 1, 60, 4], &[1, 1, 40000, 4], &[1, 1, 40000, 2])?;
    assert!(g.rows() < g.sq, "test must exercise blocking");
    let q = Var::from_tensor(&rand(&[1, 1, 60, 4], 1, DType::F32)?)?;
    let k = Var::from_tensor(&rand(&[1, 1, 40000, 4], 2, DType::F32)?)?;
    let v = Var::from_tensor(&rand(&[1, 1, 40000, 2], 3, DType::F32)?)?;
    let vars = [q, k, v];
    let probe = rand(&[1, 1, 60, 2], 4, DType::F32)?;
    let (y1, g1) = grads(&vars, &probe, &|t| {
        attention(&t[0], &t[1], &t[2], 0.5, true)
    })?;
    let (y2, g2) = grads(&vars, &probe, &|t| {
        reference::attention(&t[0], &t[1], &t[2], 0.5, true)
    })?;
    assert!(max_diff(&y1, &y2)? < 1e-5);
    for (a, b) in g1.iter().zip(&g2) {
        assert!(max_diff(a, b)? < 1e-5);
    }
    Ok(())
}
