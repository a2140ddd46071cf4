//! Row kernels on f32 slices: exp, erf, GELU, softmax and LayerNorm, each on any slice (one
//! attention row, one token's hidden state, a chunk of an FFN intermediate).
//!
//! The scalar functions are plain arithmetic that LLVM vectorises; the slice functions run
//! that arithmetic compiled for AVX2+FMA when the CPU has them ([`multiversion`]), and
//! softmax and LayerNorm have hand-written AVX-512 and AVX2 versions (`avx512.rs`,
//! `avx2.rs`) with lane-wise partial sums, since the portable ones reduce serially. A row's
//! result depends on that row alone (its reduction order is fixed by its length), so every
//! kernel here keeps batch invariance. The approximations are checked against f64 maths in
//! the tests below, and the vector versions against the portable ones in theirs.

use crate::consts::{
    ERF_CLAMP, ERF_P, ERF_Q, EXP_MAX, EXP_MIN, EXP_P, GELU_TANH_A, GELU_TANH_B, INV_SQRT_2PI,
    LN2_HI, LN2_LO,
};
use crate::cpu::{has_avx2_fma, has_avx512f, multiversion};

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
mod glu;
mod online;
pub use glu::{glu_row, glu_rows, sigmoid, silu, Glu};
pub use online::{softmax_block_row, softmax_block_row_bf16, BlockRow, RunningRow};
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

/// exp(x) to about 1 ulp (Cephes' expf: range reduction by ln 2, degree-5 polynomial).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(EXP_MIN, EXP_MAX);
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

/// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let y = GELU_TANH_A * (x + GELU_TANH_B * x * x * x);
    0.5 * x * (1.0 + y.tanh())
}

multiversion! {
    /// GELU in place (erf form, the scalar arithmetic of [`gelu`] on every value).
    pub fn gelu_inplace(x: &mut [f32]) for [Avx2 => "avx2,fma"] {
        for v in x.iter_mut() {
            *v = gelu(*v);
        }
    }
}

multiversion! {
    /// `grad *= GELU'(x)`, element by element (`grad` and `x` of the same length).
    pub fn gelu_grad_inplace(grad: &mut [f32], x: &[f32]) for [Avx2 => "avx2,fma"] {
        // d/dx GELU = (1 + erf(x / sqrt 2)) / 2 + x * exp(-x^2 / 2) / sqrt(2 pi)
        for (g, &x) in grad.iter_mut().zip(x) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            *g *= cdf + x * pdf;
        }
    }
}

multiversion! {
    /// Softmax of one row in place, in plain Rust (the reference of the vector versions).
    pub fn softmax_portable(row: &mut [f32]) for [Avx2 => "avx2,fma"] {
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
    }
}

multiversion! {
    /// The softmax's backward pass on one row: `grad = y * (grad - sum(grad * y))`.
    pub fn softmax_grad_inplace(grad: &mut [f32], y: &[f32]) for [Avx2 => "avx2,fma"] {
        let dot: f32 = grad.iter().zip(y).map(|(g, y)| g * y).sum();
        for (g, y) in grad.iter_mut().zip(y) {
            *g = y * (*g - dot);
        }
    }
}

multiversion! {
    /// `x = LayerNorm(x + residual)` on one row, in plain Rust.
    pub fn add_layer_norm_portable(x: &mut [f32], residual: &[f32], weight: &[f32], bias: &[f32], eps: f32)
        for [Avx2 => "avx2,fma"]
    {
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
    }
}

multiversion! {
    /// LayerNorm of one row in place, in plain Rust.
    pub fn layer_norm_portable(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32)
        for [Avx2 => "avx2,fma"]
    {
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
    }
}

/// Softmax of one row in place (AVX-512 or AVX2 when the CPU has it). A row holding NaN or
/// infinity becomes NaN.
pub fn softmax_inplace(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has avx512f.
        return unsafe { avx512::softmax(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has avx2 and fma.
        return unsafe { avx2::softmax(row) };
    }
    softmax_portable(row)
}

/// Panics unless `weight`, `bias` (and `residual`) cover the row `x`.
fn check_row(what: &str, n: usize, weight: &[f32], bias: &[f32], residual: Option<&[f32]>) {
    assert!(
        weight.len() >= n && bias.len() >= n && residual.is_none_or(|r| r.len() >= n),
        "{what}: a row of {n} values with {} weights, {} biases{}",
        weight.len(),
        bias.len(),
        residual.map_or(String::new(), |r| format!(" and {} residuals", r.len()))
    );
}

/// `x = LayerNorm(x + residual)` on one row of `x.len()` values (AVX-512 or AVX2 when the CPU
/// has it). Panics unless `residual`, `weight` and `bias` are as long as the row at least.
pub fn add_layer_norm_inplace(
    x: &mut [f32],
    residual: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) {
    check_row("add_layer_norm", x.len(), weight, bias, Some(residual));
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has avx512f.
        return unsafe { avx512::layer_norm(x, Some(residual), weight, bias, eps) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has avx2 and fma.
        return unsafe { avx2::layer_norm(x, Some(residual), weight, bias, eps) };
    }
    add_layer_norm_portable(x, residual, weight, bias, eps)
}

/// LayerNorm of one row in place (AVX-512 or AVX2 when the CPU has it). Panics unless
/// `weight` and `bias` are as long as the row at least.
pub fn layer_norm_inplace(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    check_row("layer_norm", x.len(), weight, bias, None);
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has avx512f.
        return unsafe { avx512::layer_norm(x, None, weight, bias, eps) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has avx2 and fma.
        return unsafe { avx2::layer_norm(x, None, weight, bias, eps) };
    }
    layer_norm_portable(x, weight, bias, eps)
}

#[cfg(test)]
mod tests;
