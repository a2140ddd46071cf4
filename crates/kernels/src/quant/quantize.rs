//! Activations quantized for the int8 kernels: each token row its own u8 scale and zero point
//! (so a row's result never depends on its batch-mates), with the row's range found by AVX-512,
//! AVX2 or portable code that all give the same bits.

use crate::cpu::{level, Level};

/// Rounds `v` (|v| < 2^22) to the nearest integer, ties to even: adding and subtracting
/// 1.5 * 2^23 leaves no fraction bits under the current (default) rounding mode. Plain IEEE
/// additions, so it vectorizes (`round_ties_even` can become a libm call per value).
#[inline(always)]
pub(crate) fn round_small(v: f32) -> f32 {
    (v + MAGIC) - MAGIC
}

/// 1.5 * 2^23: for 0 <= v < 2^22, `v + MAGIC` is `MAGIC + round(v)` exactly.
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: u32 = 0x4B40_0000;

/// Quantizes one row of `x` into `a` (length `kp` >= x.len()); returns (scale, zero point).
#[inline(always)]
pub(crate) fn quantize_row_imp(x: &[f32], a: &mut [u8]) -> (f32, i32) {
    let (lo, hi) = row_range(x);
    quantize_in_range(x, a, lo, hi)
}

/// The minimum and maximum of `x` and 0 (NaNs skipped). Exact whatever the order.
#[inline(always)]
pub(crate) fn row_range(x: &[f32]) -> (f32, f32) {
    // Min and max over 16 lanes (comparisons, so it vectorizes; NaNs are skipped), starting
    // from 0 so that the range holds 0.
    const L: usize = 16;
    let (mut lo, mut hi) = ([0f32; L], [0f32; L]);
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
    }
    let lo = lo.iter().fold(0f32, |m, &v| if v < m { v } else { m });
    let hi = hi.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    (lo, hi)
}

/// [`row_range`] with AVX-512 minima and maxima: `vminps(v, lo)` keeps `lo` when `v` is NaN
/// and takes `v` only when `v < lo`, the comparison of the portable loop, so the result is
/// the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn row_range_avx512(x: &[f32]) -> (f32, f32) {
    use crate::math::avx512::lane_mask;
    use std::arch::x86_64::*;
    let n = x.len();
    // Four accumulators of each, so that the minima do not wait on each other.
    let mut lo = [_mm512_setzero_ps(); 4];
    let mut hi = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        let j = (i / 16) % 4;
        // SAFETY: the mask covers elements i..min(i + 16, n) only; masked-off lanes load 0,
        // which the range holds already.
        let v = unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().add(i)) };
        lo[j] = _mm512_min_ps(v, lo[j]);
        hi[j] = _mm512_max_ps(v, hi[j]);
        i += 16;
    }
    let lo = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
    let hi = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
    (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi))
}

/// [`row_range`] with AVX2 minima and maxima, as [`row_range_avx512`] (the portable loop
/// compiled for AVX2 went through byte masks and blends: 4.8% of an int8 run on AMD Zen 2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn row_range_avx2(x: &[f32]) -> (f32, f32) {
    use crate::math::avx2::load8;
    use std::arch::x86_64::*;
    let n = x.len();
    let mut lo = [_mm256_setzero_ps(); 4];
    let mut hi = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        let j = (i / 8) % 4;
        // SAFETY: load8 reads elements i..min(i + 8, n) only; lanes past n read 0,
        // which the range holds already.
        let v = unsafe { load8(x.as_ptr(), i, n) };
        lo[j] = _mm256_min_ps(v, lo[j]);
        hi[j] = _mm256_max_ps(v, hi[j]);
        i += 8;
    }
    let lo = _mm256_min_ps(_mm256_min_ps(lo[0], lo[1]), _mm256_min_ps(lo[2], lo[3]));
    let hi = _mm256_max_ps(_mm256_max_ps(hi[0], hi[1]), _mm256_max_ps(hi[2], hi[3]));
    let lo = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps::<1>(lo));
    let hi = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps::<1>(hi));
    let (mut l, mut h) = ([0f32; 4], [0f32; 4]);
    // SAFETY: 4 f32 lanes into 4-element arrays.
    unsafe {
        _mm_storeu_ps(l.as_mut_ptr(), lo);
        _mm_storeu_ps(h.as_mut_ptr(), hi);
    }
    // No NaN reaches the lanes (vminps keeps its second operand), so plain min/max is exact.
    (
        l.into_iter().fold(0f32, f32::min),
        h.into_iter().fold(0f32, f32::max),
    )
}

/// Quantizes `x` into `a` with the range `lo <= 0 <= hi` of [`row_range`].
#[inline(always)]
pub(crate) fn quantize_in_range(x: &[f32], a: &mut [u8], lo: f32, hi: f32) -> (f32, i32) {
    let range = hi - lo;
    if !range.is_finite() || range <= 0.0 {
        // All zeros (or non-finite input, which int8 cannot represent): the row becomes 0.
        a.iter_mut().for_each(|v| *v = 0);
        return (0.0, 0);
    }
    let scale = range / 255.0;
    let inv = 255.0 / range;
    // lo <= 0 <= hi, so the zero point is in [0, 255].
    let zero = round_small((-lo * inv).clamp(0.0, 255.0));
    for (q, &v) in a.iter_mut().zip(x) {
        // The clamp gives [0, 255] (NaN stays NaN); adding 1.5 * 2^23 rounds to the nearest
        // integer, ties to even, and leaves it in the low mantissa bits, read as an integer
        // (no float-to-int conversion, which LLVM does not vectorize when saturating).
        let bits = ((v * inv + zero).clamp(0.0, 255.0) + MAGIC).to_bits();
        *q = bits.wrapping_sub(MAGIC_BITS) as u8;
    }
    let z = zero as u8;
    a[x.len()..].iter_mut().for_each(|v| *v = z);
    (scale, zero as i32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_row_avx2(x: &[f32], a: &mut [u8]) -> (f32, i32) {
    // SAFETY: this function's features include avx2.
    let (lo, hi) = unsafe { row_range_avx2(x) };
    quantize_in_range(x, a, lo, hi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(crate) unsafe fn quantize_row_avx512(x: &[f32], a: &mut [u8]) -> (f32, i32) {
    // SAFETY: this function's features include avx512f.
    let (lo, hi) = unsafe { row_range_avx512(x) };
    quantize_in_range(x, a, lo, hi)
}

/// Quantizes one row of `x` into `a` (at least as long; the rest of `a` gets the zero point)
/// and returns its (scale, zero point): `x[i] ~ scale * (a[i] - zero)`. The same result
/// whichever code path runs: only IEEE operations without contraction, and an
/// order-independent min/max.
pub fn quantize_row(x: &[f32], a: &mut [u8]) -> (f32, i32) {
    assert!(
        a.len() >= x.len(),
        "quantize_row: output shorter than input"
    );
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the CPU has the features the function is compiled for.
        Level::Avx512 => return unsafe { quantize_row_avx512(x, a) },
        // SAFETY: as above.
        Level::Avx2 => return unsafe { quantize_row_avx2(x, a) },
        Level::Portable => {}
    }
    quantize_row_imp(x, a)
}
