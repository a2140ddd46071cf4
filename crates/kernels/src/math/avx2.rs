//! AVX2+FMA versions of the row kernels of [`super`] (softmax, LayerNorm, GELU), for CPUs
//! without AVX-512 (AMD Zen 2 and 3, Intel client CPUs): 8 lanes with lane-wise partial
//! maxima and sums, the tail through masked loads and stores, as [`super::avx512`] does with
//! 16. The portable kernels reduce serially, which left softmax 7.5% of an int8 run on AMD
//! Zen 2. A row's result depends on that row alone, so batch invariance holds.

use std::arch::x86_64::*;

use crate::consts::{ERF_CLAMP, ERF_P, ERF_Q, EXP_MAX, EXP_MIN, EXP_P, LN2_HI, LN2_LO};

/// The mask of the 8-lane chunk starting at `i` of `n` values: lanes below `n - i` set.
///
/// # Safety
/// The CPU has avx2 (the caller is compiled with it); `i < n`.
#[inline(always)]
pub(crate) unsafe fn lane_mask(i: usize, n: usize) -> __m256i {
    // SAFETY: the caller runs with avx2 and fma (this function's contract).
    unsafe {
        let left = (n - i).min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(left),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
}

/// The 8 values at `p + i` of a row of `n` (`i < n`); lanes at or past `n` read 0. A full
/// chunk is a plain load: AMD Zen 2 runs masked moves far slower (a masked epilogue made an
/// int8 run 2-4% slower there).
///
/// # Safety
/// The CPU has avx2 (the caller is compiled with it); `p` points to at least `n` readable
/// values; `i < n`.
#[inline(always)]
pub(crate) unsafe fn load8(p: *const f32, i: usize, n: usize) -> __m256 {
    // SAFETY: i + 8 <= n values, or the mask covers elements i..n only (contract).
    unsafe {
        if n - i >= 8 {
            _mm256_loadu_ps(p.add(i))
        } else {
            _mm256_maskload_ps(p.add(i), lane_mask(i, n))
        }
    }
}

/// [`load8`] for i32 values.
///
/// # Safety
/// As [`load8`].
#[inline(always)]
pub(crate) unsafe fn load8i(p: *const i32, i: usize, n: usize) -> __m256i {
    // SAFETY: as in load8.
    unsafe {
        if n - i >= 8 {
            _mm256_loadu_si256(p.add(i) as *const __m256i)
        } else {
            _mm256_maskload_epi32(p.add(i), lane_mask(i, n))
        }
    }
}

/// Stores the lanes of `v` below `n - i` at `p + i`: a plain store for a full chunk, a masked
/// one for the tail (see [`load8`]).
///
/// # Safety
/// The CPU has avx2 (the caller is compiled with it); `p` points to at least `n` writable
/// values; `i < n`.
#[inline(always)]
pub(crate) unsafe fn store8(p: *mut f32, i: usize, n: usize, v: __m256) {
    // SAFETY: i + 8 <= n values, or the mask covers elements i..n only (contract).
    unsafe {
        if n - i >= 8 {
            _mm256_storeu_ps(p.add(i), v)
        } else {
            _mm256_maskstore_ps(p.add(i), lane_mask(i, n), v)
        }
    }
}

/// Horizontal sum of 8 lanes, in a fixed order.
#[inline(always)]
unsafe fn sum8(v: __m256) -> f32 {
    // SAFETY: the caller runs with avx2 and fma (this function's contract).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

/// Horizontal maximum of 8 lanes.
#[inline(always)]
unsafe fn max8(v: __m256) -> f32 {
    // SAFETY: the caller runs with avx2 and fma (this function's contract).
    unsafe {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

/// [`super::exp`] on 8 lanes (the same reduction and polynomial, with FMAs).
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: the caller runs with avx2 and fma (this function's contract).
    unsafe {
        let c = |v: f32| _mm256_set1_ps(v);
        // max/min return their second operand when either is NaN: x last, so NaN propagates
        // (as the portable `clamp` does) and a NaN or infinite row gives NaN, not a number.
        let x = _mm256_min_ps(c(EXP_MAX), _mm256_max_ps(c(EXP_MIN), x));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(0.5)));
        let r = _mm256_fnmadd_ps(n, c(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, c(LN2_LO), r);
        let mut p = c(EXP_P[0]);
        for &k in &EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, c(k));
        }
        let y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, c(1.0)));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }
}

/// Softmax of one row in place.
///
/// # Safety
/// The CPU has avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softmax(row: &mut [f32]) {
    let n = row.len();
    let p = row.as_mut_ptr();
    let neg = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut mx = neg;
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: load8 reads elements i..min(i + 8, n) only.
        let v = unsafe { load8(p, i, n) };
        // Masked-off lanes load 0: take -inf there instead.
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg, v, _mm256_castsi256_ps(m)));
        i += 8;
    }
    let max = _mm256_set1_ps(max8(mx));
    let mut sum = _mm256_setzero_ps();
    i = 0;
    while i < n {
        let m = lane_mask(i, n);
        let mf = _mm256_castsi256_ps(m);
        // SAFETY: as above.
        unsafe {
            let e = exp8(_mm256_sub_ps(load8(p, i, n), max));
            sum = _mm256_add_ps(sum, _mm256_and_ps(e, mf));
            store8(p, i, n, e);
        }
        i += 8;
    }
    let inv = _mm256_set1_ps(1.0 / sum8(sum));
    i = 0;
    while i < n {
        // SAFETY: as above.
        unsafe {
            let v = load8(p, i, n);
            store8(p, i, n, _mm256_mul_ps(v, inv));
        }
        i += 8;
    }
}

/// `x = LayerNorm(x + residual)` (residual optional) on one row of `weight.len()` values.
///
/// # Safety
/// The CPU has avx2 and fma.
#[target_feature(enable = "avx2,fma")]
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
    let mut sum = _mm256_setzero_ps();
    let mut i = 0;
    while i < n {
        // SAFETY: load8 and store8 touch elements i..min(i + 8, n) only, within every slice
        // (asserted); lanes past n read 0.
        unsafe {
            let mut v = load8(p, i, n);
            if let Some(r) = residual {
                v = _mm256_add_ps(v, load8(r.as_ptr(), i, n));
                store8(p, i, n, v);
            }
            sum = _mm256_add_ps(sum, v);
        }
        i += 8;
    }
    let mean = _mm256_set1_ps(sum8(sum) / n as f32);
    let mut var = _mm256_setzero_ps();
    i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: as above.
        unsafe {
            let d = _mm256_and_ps(_mm256_sub_ps(load8(p, i, n), mean), _mm256_castsi256_ps(m));
            var = _mm256_fmadd_ps(d, d, var);
        }
        i += 8;
    }
    let inv = _mm256_set1_ps(1.0 / (sum8(var) / n as f32 + eps).sqrt());
    i = 0;
    while i < n {
        // SAFETY: as above.
        unsafe {
            let d = _mm256_mul_ps(_mm256_sub_ps(load8(p, i, n), mean), inv);
            let w = load8(weight.as_ptr(), i, n);
            let b = load8(bias.as_ptr(), i, n);
            store8(p, i, n, _mm256_fmadd_ps(d, w, b));
        }
        i += 8;
    }
}

/// BERT's GELU on 8 lanes: the erf of [`super::erf`] (same coefficients),
/// with FMAs and an IEEE division. Unlike `gelu16`, no reciprocal estimate: `vrcpps` is only
/// bounded (relative error <= 1.5 * 2^-12), so its bits may differ between CPU makers, while
/// FMAs and divisions give the same bits on every AVX2 CPU; and on AMD Zen 2 the division was
/// no slower over a whole int8 run (340 against 334 sentences/s, side by side). Edge values
/// as `gelu16`: GELU(-inf) is NaN and GELU(-0) is +0 (the portable GELU gives -inf and -0).
#[inline(always)]
pub(crate) unsafe fn gelu8(v: __m256) -> __m256 {
    // SAFETY: the caller runs with avx2 and fma (this function's contract).
    unsafe {
        let c = |v: f32| _mm256_set1_ps(v);
        let z = _mm256_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
        // max/min return their second operand when either is NaN: z last, so NaN propagates.
        let z = _mm256_min_ps(c(ERF_CLAMP), _mm256_max_ps(c(-ERF_CLAMP), z));
        let z2 = _mm256_mul_ps(z, z);
        let mut p = c(ERF_P[0]);
        for &k in &ERF_P[1..] {
            p = _mm256_fmadd_ps(p, z2, c(k));
        }
        let p = _mm256_mul_ps(p, z);
        let mut q = c(ERF_Q[0]);
        for &k in &ERF_Q[1..] {
            q = _mm256_fmadd_ps(q, z2, c(k));
        }
        let erf = _mm256_div_ps(p, q);
        let half_x = _mm256_mul_ps(v, c(0.5));
        _mm256_fmadd_ps(half_x, erf, half_x)
    }
}

/// GELU in place, 8 lanes at a time; every value, the tail included, goes through the same
/// vector code.
///
/// # Safety
/// The CPU has avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gelu_avx2(x: &mut [f32]) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // SAFETY: load8 and store8 touch elements i..min(i + 8, n) only.
        unsafe {
            store8(p, i, n, gelu8(load8(p, i, n)));
        }
        i += 8;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{add_layer_norm_portable, layer_norm_portable, softmax_portable};
    use crate::cpu::avx2_or_fail_in_ci;

    /// Called directly (not through the dispatch), so that an AVX-512 machine tests them too.
    #[test]
    fn avx2_row_kernels_match_the_portable_ones() {
        if !avx2_or_fail_in_ci() {
            return;
        }
        for n in [1usize, 7, 8, 9, 15, 17, 37, 64, 384, 1000] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() * 6.0 + 0.5).collect();
            let r: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos()).collect();
            let w: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.01).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * -0.02).collect();
            // Both reduce in f32 in different orders: LayerNorm's outputs (of order 1) agree to
            // 1e-5 absolute, as the f64 check in kernels.rs asks of each; softmax's (small
            // probabilities) to 2e-6 relative.
            let close = |a: &[f32], p: &[f32], what: &str| {
                for (i, (a, p)) in a.iter().zip(p).enumerate() {
                    let tol = if what == "softmax" {
                        2e-6 * p.abs() + 1e-30
                    } else {
                        1e-5 * p.abs().max(1.0)
                    };
                    assert!((a - p).abs() <= tol, "{what} n={n} [{i}]: {a} vs {p}");
                }
            };
            // Rows of mixed signs, all negative (max < 0), and of large values.
            let shifted: Vec<f32> = x.iter().map(|v| v - 20.0).collect();
            let large: Vec<f32> = x.iter().map(|v| v * 15.0).collect();
            for row in [&x, &shifted, &large] {
                let (mut a, mut p) = (row.clone(), row.clone());
                // SAFETY: the CPU has avx2 and fma (checked above).
                unsafe { super::softmax(&mut a) };
                softmax_portable(&mut p);
                close(&a, &p, "softmax");
            }
            // A NaN or infinite value makes the whole row NaN, as in the portable kernel,
            // wherever it sits.
            for bad in [f32::NAN, f32::INFINITY] {
                for at in [0, n / 2, n - 1] {
                    let mut a = x.clone();
                    a[at] = bad;
                    // SAFETY: as above.
                    unsafe { super::softmax(&mut a) };
                    assert!(
                        a.iter().all(|v| v.is_nan()),
                        "softmax n={n} with {bad} at {at}"
                    );
                }
            }
            let mut a = vec![f32::NEG_INFINITY; n];
            // SAFETY: as above.
            unsafe { super::softmax(&mut a) };
            assert!(
                a.iter().all(|v| v.is_nan()),
                "softmax of an all -inf row, n={n}"
            );
            let (mut a, mut p) = (x.clone(), x.clone());
            // SAFETY: as above.
            unsafe { super::layer_norm(&mut a, None, &w, &b, 1e-5) };
            layer_norm_portable(&mut p, &w, &b, 1e-5);
            close(&a, &p, "layer_norm");
            let (mut a, mut p) = (x.clone(), x.clone());
            // SAFETY: as above.
            unsafe { super::layer_norm(&mut a, Some(&r), &w, &b, 1e-12) };
            add_layer_norm_portable(&mut p, &r, &w, &b, 1e-12);
            close(&a, &p, "add_layer_norm");
        }
    }

    /// gelu8 against the portable GELU: a scaled absolute error below 1e-6 everywhere, and a
    /// relative one below 2e-6 for 1e-30 <= |x| <= 1, where the value is about x / 2 (so a
    /// GELU that flushed small values to 0 fails).
    #[test]
    fn gelu8_matches_the_f32_gelu() {
        if !avx2_or_fail_in_ci() {
            return;
        }
        let mut xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 / 1000.0).collect();
        let small = [1e-3, -1e-3, 1e-5, -1e-5, 1e-30, -1e-30];
        xs.extend(small);
        xs.extend([0.0, -0.0, 50.0, -50.0, f32::MAX, f32::MIN]);
        let mut got = xs.clone();
        // Two calls, both ending with a partial chunk (24,006 and 7 values): the small and
        // the edge values go through the masked tail.
        let cut = got.len() - 7;
        // SAFETY: the CPU has avx2 and fma (checked).
        unsafe {
            super::gelu_avx2(&mut got[..cut]);
            super::gelu_avx2(&mut got[cut..]);
        }
        let (mut worst, mut worst_rel) = (0f32, 0f32);
        for (x, g) in xs.iter().zip(&got) {
            let want = super::super::gelu(*x);
            worst = worst.max((g - want).abs() / x.abs().max(1.0));
            if (1e-30..=1.0).contains(&x.abs()) {
                worst_rel = worst_rel.max((g - want).abs() / want.abs());
            }
        }
        assert!(worst < 1e-6, "gelu8: max scaled error {worst}");
        assert!(
            worst_rel < 2e-6,
            "gelu8: max relative error {worst_rel} for |x| <= 1"
        );
        let mut nan = [f32::NAN; 3];
        // SAFETY: as above.
        unsafe { super::gelu_avx2(&mut nan) };
        assert!(
            nan.iter().all(|v| v.is_nan()),
            "GELU of NaN is NaN: {nan:?}"
        );
    }
}
