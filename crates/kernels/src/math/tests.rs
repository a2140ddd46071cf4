use super::*;

fn libm_erf(x: f64) -> f64 {
    // erf by its Taylor series (|x| < 3) or the asymptotic complement, in f64.
    if x.abs() < 3.0 {
        let mut sum = x;
        let mut term = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc's asymptotic series, four terms: relative error < 1e-3 of erfc(3) = 2e-5.
        let a = x.abs();
        let z = 1.0 / (2.0 * a * a);
        let series = 1.0 - z + 3.0 * z * z - 15.0 * z * z * z;
        x.signum() * (1.0 - (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * series)
    }
}

#[test]
fn exp_is_accurate() {
    let mut worst = 0f64;
    for i in -87_000..=88_000 {
        let x = i as f32 / 1000.0;
        let want = (x as f64).exp();
        worst = worst.max(((exp(x) as f64 - want) / want).abs());
    }
    assert!(worst < 3e-7, "max relative error {worst}");
    assert_eq!(exp(-1e30), exp(-87.0));
}

#[test]
fn erf_and_gelu_are_accurate() {
    let mut worst = 0f64;
    for i in -8_000..=8_000 {
        let x = i as f32 / 1000.0;
        worst = worst.max((erf(x) as f64 - libm_erf(x as f64)).abs());
    }
    assert!(worst < 3.5e-7, "erf max abs error {worst}");
    let mut worst_gelu = 0f64;
    for i in -12_000..=12_000 {
        let x = i as f32 / 1000.0;
        let want = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / 2f64.sqrt()));
        // Relative to max(1, |x|): the error of x/2 * erf grows with x.
        worst_gelu = worst_gelu.max((gelu(x) as f64 - want).abs() / (x.abs() as f64).max(1.0));
    }
    assert!(worst_gelu < 2e-7, "gelu max scaled error {worst_gelu}");
}

#[test]
fn slice_kernels_match_scalar_maths() {
    let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
    let want: Vec<f64> = {
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    let mut portable = row.clone();
    softmax_portable(&mut portable);
    softmax_inplace(&mut row);
    for ((a, p), b) in row.iter().zip(&portable).zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-7);
        assert!((*p as f64 - b).abs() < 1e-7);
    }
    let mut x: Vec<f32> = (0..64).map(|i| i as f32 * 0.1 - 3.0).collect();
    let res: Vec<f32> = (0..64).map(|i| (i as f32).cos()).collect();
    let w: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 * 0.01).collect();
    let b: Vec<f32> = (0..64).map(|i| i as f32 * -0.02).collect();
    let summed: Vec<f64> = x.iter().zip(&res).map(|(a, r)| (*a + *r) as f64).collect();
    let mean = summed.iter().sum::<f64>() / 64.0;
    let var = summed.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 64.0;
    let mut portable = x.clone();
    add_layer_norm_portable(&mut portable, &res, &w, &b, 1e-12);
    add_layer_norm_inplace(&mut x, &res, &w, &b, 1e-12);
    for i in 0..64 {
        let want = (summed[i] - mean) / var.sqrt() * w[i] as f64 + b[i] as f64;
        assert!((x[i] as f64 - want).abs() < 1e-5, "{i}: {} vs {want}", x[i]);
        assert!(
            (portable[i] as f64 - want).abs() < 1e-5,
            "{i}: {}",
            portable[i]
        );
    }
    // Odd lengths (the masked tail) and LayerNorm without a residual.
    for n in [1usize, 15, 17, 37, 384] {
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() * 3.0 + 0.5).collect();
        let w: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * -0.02).collect();
        let (mut fast, mut slow) = (x.clone(), x.clone());
        layer_norm_inplace(&mut fast, &w, &b, 1e-5);
        layer_norm_portable(&mut slow, &w, &b, 1e-5);
        let (mut sf, mut ss) = (x.clone(), x.clone());
        softmax_inplace(&mut sf);
        softmax_portable(&mut ss);
        for i in 0..n {
            assert!((fast[i] - slow[i]).abs() < 1e-4, "n={n} layer norm {i}");
            assert!((sf[i] - ss[i]).abs() < 1e-6, "n={n} softmax {i}");
        }
    }
}

/// The AVX-512 exp of a softmax (`n` rounded with 1.5 * 2^23, `scalef` applying the power of
/// two) is within 1e-7 of exp on `-87..=0`, clamps below (to its own value at -87) and keeps
/// NaN.
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exp_is_accurate() {
    use std::arch::x86_64::*;
    /// # Safety
    /// The CPU has avx512f.
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: both arrays hold 16 values; avx512f is this function's contract.
        unsafe {
            let e = avx512::exp16_nonpositive(_mm512_loadu_ps(x.as_ptr()));
            _mm512_storeu_ps(out.as_mut_ptr(), e);
        }
        out
    }
    if crate::cpu::level() != crate::cpu::Level::Avx512 {
        eprintln!("SKIPPED: this CPU lacks AVX-512");
        return;
    }
    // SAFETY (here and below): the CPU has AVX-512 (checked above).
    let at_clamp = unsafe { exp16(&[-87.0; 16]) }[0];
    let xs: Vec<f32> = (0..=87_000)
        .map(|i| -(i as f32) / 1000.0)
        .chain([-86.99, -87.01, -1e30, f32::NEG_INFINITY, -0.0, f32::NAN])
        .collect();
    let mut worst = 0f64;
    for chunk in xs.chunks(16) {
        let mut lanes = [0f32; 16];
        lanes[..chunk.len()].copy_from_slice(chunk);
        let got = unsafe { exp16(&lanes) };
        for (&x, g) in chunk.iter().zip(got) {
            match x {
                x if x.is_nan() => assert!(g.is_nan(), "exp(NaN) gave {g}"),
                x if x < -87.0 => assert_eq!(g, at_clamp, "exp({x}) is not clamped"),
                x => {
                    let want = (x as f64).exp();
                    worst = worst.max(((g as f64 - want) / want).abs());
                }
            }
        }
    }
    // 7.0e-8 measured; 1.2e-7 before `n` was rounded to nearest and the polynomial ended in
    // Horner form (one change: which of the two gained it was not separated).
    assert!(worst < 1e-7, "max relative error {worst}");
}
