//! AVX-512 versions of the row kernels of [`super`] (softmax, LayerNorm, GELU): 16 lanes
//! with lane-wise partial maxima and sums, the tail masked, so every value goes through the
//! same vector code. The portable kernels reduce serially, which on the short rows of
//! attention (one row per token and head) left softmax a sixth of an int8 run.
//!
//! A row's result depends on that row alone (the reduction order is fixed by its length), so
//! the kernels keep batch invariance.

use std::arch::x86_64::*;

use crate::consts::{ERF_CLAMP, ERF_P, ERF_Q, EXP_MIN, EXP_P, LN2_HI, LN2_LO};

/// The mask of the 16-lane chunk starting at `i` of `n` values.
#[inline(always)]
pub(crate) fn lane_mask(i: usize, n: usize) -> u16 {
    if n - i >= 16 {
        0xffff
    } else {
        (1u16 << (n - i)) - 1
    }
}

/// [`super::exp`] on 16 lanes (the same range reduction and polynomial, with FMAs and `n`
/// rounded to nearest, so the last bit can differ) for values at most 0 (or NaN), as a
/// softmax's `s - max` are: the upper clamp,
/// which cannot act on them, is left out. `max` returns its second operand when either is
/// NaN: x last, so NaN propagates (as the portable `clamp` does) and a NaN or infinite row
/// gives NaN.
#[inline(always)]
pub(crate) unsafe fn exp16_nonpositive(x: __m512) -> __m512 {
    // SAFETY: the caller runs with avx512f (this function's contract).
    unsafe { exp16_in_range(_mm512_max_ps(_mm512_set1_ps(EXP_MIN), x)) }
}

/// `exp` of values already clamped to `EXP_MIN..=EXP_MAX` (or NaN). `n = round(x log2 e)`
/// comes from adding 1.5 * 2^23 in the FMA that multiplies (the sum's last bit is then the
/// integer, rounded to nearest) and subtracting it again: two instructions where `roundscale`
/// takes two on one port and its FMA a third. The polynomial is [`super::exp`]'s, in Horner
/// form to the end (`1 + r (1 + r P)`, one instruction fewer than `P r^2 + r + 1`), and the
/// power of two is applied with `scalef`; `n` stays within -126..=127 there.
#[inline(always)]
unsafe fn exp16_in_range(x: __m512) -> __m512 {
    // SAFETY: the caller runs with avx512f (this function's contract).
    unsafe {
        let c = |v: f32| _mm512_set1_ps(v);
        let magic = c(ROUND_MAGIC);
        let n = _mm512_sub_ps(
            _mm512_fmadd_ps(x, c(std::f32::consts::LOG2_E), magic),
            magic,
        );
        let r = _mm512_fnmadd_ps(n, c(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, c(LN2_LO), r);
        let mut p = c(EXP_P[0]);
        for &k in &EXP_P[1..] {
            p = _mm512_fmadd_ps(p, r, c(k));
        }
        let y = _mm512_fmadd_ps(_mm512_fmadd_ps(p, r, c(1.0)), r, c(1.0));
        _mm512_scalef_ps(y, n)
    }
}

/// 1.5 * 2^23: added to an f32 of magnitude below 2^22, it leaves that value rounded to the
/// nearest integer in the sum's last bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Softmax of one row in place.
///
/// # Safety
/// The CPU has avx512f.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax(row: &mut [f32]) {
    let n = row.len();
    let p = row.as_mut_ptr();
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: the mask covers elements i..min(i + 16, n) only.
        let v = unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, p.add(i)) };
        mx = _mm512_max_ps(mx, v);
        i += 16;
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    let mut sum = _mm512_setzero_ps();
    i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: as above.
        unsafe {
            let e = exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), max));
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            _mm512_mask_storeu_ps(p.add(i), m, e);
        }
        i += 16;
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: as above.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, p.add(i));
            _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(v, inv));
        }
        i += 16;
    }
}

/// `x = LayerNorm(x + residual)` (residual optional) on one row of `weight.len()` values.
///
/// # Safety
/// The CPU has avx512f.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn layer_norm(
    x: &mut [f32],
    residual: Option<&[f32]>,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) {
    let n = x.len();
    assert!(weight.len() >= n && bias.len() >= n && residual.is_none_or(|r| r.len() >= n));
    let p = x.as_mut_ptr();
    let mut sum = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: the mask covers elements i..min(i + 16, n), within every slice (asserted).
        unsafe {
            let mut v = _mm512_maskz_loadu_ps(m, p.add(i));
            if let Some(r) = residual {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r.as_ptr().add(i)));
                _mm512_mask_storeu_ps(p.add(i), m, v);
            }
            sum = _mm512_add_ps(sum, v);
        }
        i += 16;
    }
    let mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / n as f32);
    let mut var = _mm512_setzero_ps();
    i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: as above.
        unsafe {
            let d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, p.add(i)), mean);
            var = _mm512_fmadd_ps(d, d, var);
        }
        i += 16;
    }
    let inv = _mm512_set1_ps(1.0 / (_mm512_reduce_add_ps(var) / n as f32 + eps).sqrt());
    i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: as above.
        unsafe {
            let d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), mean), inv);
            let w = _mm512_maskz_loadu_ps(m, weight.as_ptr().add(i));
            let b = _mm512_maskz_loadu_ps(m, bias.as_ptr().add(i));
            _mm512_mask_storeu_ps(p.add(i), m, _mm512_fmadd_ps(d, w, b));
        }
        i += 16;
    }
}

/// BERT's GELU on 16 lanes: the erf of [`super::erf`] (same coefficients), with
/// FMAs and its division replaced by a reciprocal estimate and one Newton step (within an ulp
/// or two of the division, which alone cost more than the int8 product of the FFN's first
/// layer).
#[inline(always)]
pub(crate) unsafe fn gelu16(v: __m512) -> __m512 {
    // SAFETY: the caller runs with avx512f (this function's contract).
    unsafe {
        let c = |v: f32| _mm512_set1_ps(v);
        let lim = c(ERF_CLAMP);
        let z = _mm512_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm512_min_ps(_mm512_max_ps(z, c(-ERF_CLAMP)), lim);
        let z2 = _mm512_mul_ps(z, z);
        let mut p = c(ERF_P[0]);
        for &k in &ERF_P[1..] {
            p = _mm512_fmadd_ps(p, z2, c(k));
        }
        let p = _mm512_mul_ps(p, z);
        let mut q = c(ERF_Q[0]);
        for &k in &ERF_Q[1..] {
            q = _mm512_fmadd_ps(q, z2, c(k));
        }
        let r = _mm512_rcp14_ps(q);
        // One Newton step: r (2 - q r).
        let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, c(2.0)));
        let erf = _mm512_mul_ps(p, r);
        let half_x = _mm512_mul_ps(v, c(0.5));
        _mm512_fmadd_ps(half_x, erf, half_x)
    }
}

/// GELU in place, 16 lanes at a time; every value, the tail included, goes through the same
/// vector code.
///
/// # Safety
/// The CPU has avx512f.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn gelu_avx512(x: &mut [f32]) {
    let n = x.len();
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: the mask covers elements i..min(i + 16, n) only.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), m, gelu16(v));
        }
        i += 16;
    }
}
