//! Vectorisable f32 kernels for the inference fast path: exp, erf-GELU, softmax, LayerNorm.
//!
//! Each kernel is plain arithmetic that LLVM turns into SIMD code. The slice functions are
//! compiled twice, once for AVX2+FMA (chosen at run time when the CPU has them) and once for
//! the baseline target. The approximations are checked against `std` in the tests below.

pub(crate) use kernels::consts::{ERF_CLAMP, ERF_P, ERF_Q, EXP_P, LN2_HI, LN2_LO};

/// exp(x) to about 1 ulp (Cephes' expf: range reduction by ln 2, degree-5 polynomial).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// erf(x) within 3.5e-7: Eigen's rational approximation, clamped at ±`ERF_CLAMP`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-ERF_CLAMP, ERF_CLAMP);
    let x2 = x * x;
    let mut p = ERF_P[0];
    for c in &ERF_P[1..] {
        p = p * x2 + c;
    }
    let p = p * x;
    let mut q = ERF_Q[0];
    for c in &ERF_Q[1..] {
        q = q * x2 + c;
    }
    p / q
}

/// GELU as BERT defines it: `x / 2 * (1 + erf(x / sqrt 2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Runs `$body` with AVX2+FMA code generation when the CPU supports it.
macro_rules! dispatch {
    ($name:ident, ($($arg:ident : $ty:ty),*), $body:block) => {
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) { imp($($arg),*) }
                if has_avx2_fma() {
                    // SAFETY: the CPU supports the features enabled on `fast`.
                    return unsafe { fast($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
use kernels::cpu::has_avx2_fma;

dispatch!(gelu_inplace, (x: &mut [f32]), {
    for v in x.iter_mut() {
        *v = gelu(*v);
    }
});

dispatch!(gelu_grad_inplace, (grad: &mut [f32], x: &[f32]), {
    // d/dx GELU = (1 + erf(x / sqrt 2)) / 2 + x * exp(-x^2 / 2) / sqrt(2 pi)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for (g, &x) in grad.iter_mut().zip(x) {
        let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
        *g *= cdf + x * pdf;
    }
});

dispatch!(softmax_portable, (row: &mut [f32]), {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
});

dispatch!(softmax_grad_inplace, (grad: &mut [f32], y: &[f32]), {
    // The softmax's backward pass on one row: grad = y * (grad - sum(grad * y)).
    let dot: f32 = grad.iter().zip(y).map(|(g, y)| g * y).sum();
    for (g, y) in grad.iter_mut().zip(y) {
        *g = y * (*g - dot);
    }
});

dispatch!(add_layer_norm_portable, (x: &mut [f32], residual: &[f32], weight: &[f32], bias: &[f32], eps: f32), {
    // x = LayerNorm(x + residual), one row of `weight.len()` values.
    let n = x.len() as f32;
    let mut sum = 0.0f32;
    for (v, r) in x.iter_mut().zip(residual) {
        *v += *r;
        sum += *v;
    }
    let mean = sum / n;
    let mut var = 0.0f32;
    for v in x.iter() {
        let d = *v - mean;
        var += d * d;
    }
    let inv = 1.0 / (var / n + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(weight).zip(bias) {
        *v = (*v - mean) * inv * *w + *b;
    }
});

dispatch!(layer_norm_portable, (x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32), {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let mut var = 0.0f32;
    for v in x.iter() {
        let d = *v - mean;
        var += d * d;
    }
    let inv = 1.0 / (var / n + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(weight).zip(bias) {
        *v = (*v - mean) * inv * *w + *b;
    }
});

/// Softmax of one row in place (AVX-512 or AVX2 when the CPU has it).
pub fn softmax_inplace(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernels::cpu::has_avx512f() {
        // SAFETY: the CPU has avx512f.
        return unsafe { super::simd::softmax(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has avx2 and fma.
        return unsafe { super::simd_avx2::softmax(row) };
    }
    softmax_portable(row)
}

/// `x = LayerNorm(x + residual)` on one row of `weight.len()` values (AVX-512 or AVX2 when
/// the CPU has it).
pub fn add_layer_norm_inplace(
    x: &mut [f32],
    residual: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if kernels::cpu::has_avx512f() {
        // SAFETY: the CPU has avx512f.
        return unsafe { super::simd::layer_norm(x, Some(residual), weight, bias, eps) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has avx2 and fma.
        return unsafe { super::simd_avx2::layer_norm(x, Some(residual), weight, bias, eps) };
    }
    add_layer_norm_portable(x, residual, weight, bias, eps)
}

/// LayerNorm of one row in place (AVX-512 or AVX2 when the CPU has it).
pub fn layer_norm_inplace(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if kernels::cpu::has_avx512f() {
        // SAFETY: the CPU has avx512f.
        return unsafe { super::simd::layer_norm(x, None, weight, bias, eps) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has avx2 and fma.
        return unsafe { super::simd_avx2::layer_norm(x, None, weight, bias, eps) };
    }
    layer_norm_portable(x, weight, bias, eps)
}

#[cfg(test)]
mod tests {
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
}
