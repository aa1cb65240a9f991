use super::*;

#[test]
fn exp_f32_matches_libm() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let a = exp_f32(x) as f64;
        let b = (x as f64).exp();
        worst = worst.max(((a - b) / b).abs());
        x += 0.0137;
    }
    assert!(worst < 5e-7, "relative error {worst}");
    assert_eq!(exp_f32(-200.0), 0.0);
    assert_eq!(exp_f32(200.0), f32::INFINITY);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert!(exp_f32(f32::NAN).is_nan());
    assert_eq!(exp_f32(0.0), 1.0);
}

#[test]
fn matmul_matches_naive() -> Result<()> {
    let (m, k, n) = (5, 7, 3);
    let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
    let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect();
    let mut c = vec![1.0f64; m * n];
    // c += 2 · a · bᵀ with b stored (n, k)
    matmul(
        &mut c,
        n,
        Mat::n(&a, m, k),
        Mat::t(&b, n, k),
        true,
        2.0,
        false,
    )?;
    for i in 0..m {
        for j in 0..n {
            let r: f64 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
            assert!((c[i * n + j] - (1.0 + 2.0 * r)).abs() < 1e-12);
        }
    }
    Ok(())
}
