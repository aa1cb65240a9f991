use super::*;
use crate::nn::kernels::test_util::{
    assert_matches, assert_same_bits_at_any_thread_count, check_fd, grads, max_abs, max_diff, rand,
};
use crate::nn::ops::reference;
use candle_core::DType;
use candle_core::Var;

/// (b, cin, h, w, cout, k, stride, pad, bias)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize, bool);
const CASES: &[Case] = &[
    (2, 3, 5, 7, 4, 3, 1, 1, true),     // odd image, 3×3 pad 1
    (1, 5, 6, 6, 3, 1, 1, 0, true),     // 1×1, batch 1
    (3, 4, 7, 5, 6, 3, 2, 1, true),     // stride 2 pad 1, odd sizes
    (2, 3, 8, 6, 5, 3, 2, 0, false),    // VAE-style stride 2 pad 0, no bias
    (1, 2, 4, 4, 3, 3, 1, 0, true),     // valid 3×3
    (5, 9, 3, 4, 7, 3, 1, 1, true),     // batch > threads, channels not a multiple of 8
    (3, 5, 6, 7, 17, 3, 1, 1, true),    // dWᵀ path (cout ≥ 16), samples grouped
    (2, 4, 9, 7, 16, 3, 2, 1, true),    // dWᵀ path with col2im (stride 2)
    (1, 16, 33, 31, 16, 3, 1, 1, true), // dWᵀ path, image tiled over rows
    (1, 2, 1, 1, 3, 5, 1, 2, true),     // padding wider than the image (panicked)
    (2, 2, 3, 2, 3, 7, 1, 3, false),    // 7×7 pad 3 on rows two wide
];

fn inputs(c: &Case, dt: DType) -> Result<Vec<Tensor>> {
    let &(b, cin, h, w, cout, k, _, _, bias) = c;
    let mut v = vec![
        rand(&[b, cin, h, w], 1, dt)?,
        rand(&[cout, cin, k, k], 2, dt)?,
    ];
    if bias {
        v.push(rand(&[cout], 3, dt)?);
    }
    Ok(v)
}

#[test]
fn conv_forward_and_grads_match_candle_f32_at_any_thread_count() -> Result<()> {
    for c in CASES {
        let (s, p) = (c.6, c.7);
        let ins = inputs(c, DType::F32)?;
        let vars = ins
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let probe_dims = {
            let y = conv2d(&ins[0], &ins[1], ins.get(2), s, p)?;
            y.dims().to_vec()
        };
        let probe = rand(&probe_dims, 9, DType::F32)?;
        let (y1, g1) = grads(&vars, &probe, &|t| conv2d(&t[0], &t[1], t.get(2), s, p))?;
        let (y2, g2) = grads(&vars, &probe, &|t| {
            reference::conv2d(&t[0], &t[1], t.get(2), s, p)
        })?;
        assert_matches(&format!("{c:?}"), (&y1, &g1), (&y2, &g2), 1e-5)?;
        assert_same_bits_at_any_thread_count(&format!("{c:?}"), &vars, &probe, &|t| {
            conv2d(&t[0], &t[1], t.get(2), s, p)
        })?;
    }
    Ok(())
}

#[test]
fn conv_matches_candle_for_any_thread_count() -> Result<()> {
    // 1 thread: the forward's whole batch in one chunk (multi-sample
    // GEMMs); 7 threads: fewer samples than threads (parallel GEMMs).
    for t in [1, 7] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        pool.install(|| -> Result<()> {
            for c in CASES {
                let (s, p) = (c.6, c.7);
                let ins = inputs(c, DType::F32)?;
                let vars = ins
                    .iter()
                    .map(Var::from_tensor)
                    .collect::<Result<Vec<_>>>()?;
                let dims = conv2d(&ins[0], &ins[1], ins.get(2), s, p)?.dims().to_vec();
                let probe = rand(&dims, 9, DType::F32)?;
                let (y1, g1) = grads(&vars, &probe, &|t| conv2d(&t[0], &t[1], t.get(2), s, p))?;
                let (y2, g2) = grads(&vars, &probe, &|t| {
                    reference::conv2d(&t[0], &t[1], t.get(2), s, p)
                })?;
                assert!(
                    max_diff(&y1, &y2)? < 1e-5 * (1.0 + max_abs(&y2)?),
                    "{t} threads {c:?}"
                );
                for (a, b) in g1.iter().zip(&g2) {
                    assert!(
                        max_diff(a, b)? < 1e-4 * (1.0 + max_abs(b)?),
                        "{t} threads {c:?}"
                    );
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn conv_grads_match_finite_differences_f64() -> Result<()> {
    for c in CASES {
        let (s, p) = (c.6, c.7);
        let ins = inputs(c, DType::F64)?;
        check_fd(&ins, &|t| conv2d(&t[0], &t[1], t.get(2), s, p), 12, 1e-6)?;
    }
    Ok(())
}

#[test]
fn conv_tiles_large_images_exactly() -> Result<()> {
    // 1 × 130 × 12 × 40: k·ow = 1170·40 > COL_BUDGET / 12 rows ⇒ several tiles.
    let g = ConvGeom::new(&[1, 130, 12, 700], &[2, 130, 3, 3], 1, 1)?;
    assert!(g.tile_rows() < g.oh, "test must exercise tiling");
    let x = rand(&[1, 130, 12, 700], 4, DType::F32)?;
    let w = rand(&[2, 130, 3, 3], 5, DType::F32)?;
    let a = conv2d(&x, &w, None, 1, 1)?;
    let b = reference::conv2d(&x, &w, None, 1, 1)?;
    assert!(max_diff(&a, &b)? < 1e-4);
    Ok(())
}

#[test]
fn untracked_input_gets_no_gradient() -> Result<()> {
    let x = rand(&[2, 3, 5, 5], 1, DType::F32)?; // plain tensor, not a Var
    let w = Var::from_tensor(&rand(&[4, 3, 3, 3], 2, DType::F32)?)?;
    let y = conv2d(&x, w.as_tensor(), None, 1, 1)?;
    let g = y.sum_all()?.backward()?;
    assert!(g.get(&x).is_none());
    assert!(g.get(w.as_tensor()).is_some());
    Ok(())
}
