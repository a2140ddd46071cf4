//! AVX2+FMA versions of the AVX-512 epilogue pieces in `epilogue.rs` (the GELU and the tile
//! epilogue), 8 lanes at a time with masked tails, for CPUs without AVX-512. On AMD Zen 2
//! the per-row epilogue was 6-7% of an int8 run.

use std::arch::x86_64::*;

use super::{TileBuf, MAX_MR, MAX_NP, PANEL};
use crate::model::simd_avx2::{load8, load8i, store8};
use kernels::consts::{ERF_CLAMP, ERF_P, ERF_Q};

/// BERT's GELU on 8 lanes: the erf of [`crate::model::kernels::erf`] (same coefficients),
/// with FMAs and an IEEE division. Unlike `gelu16`, no reciprocal estimate: `vrcpps` is only
/// bounded (relative error <= 1.5 * 2^-12), so its bits may differ between CPU makers, while
/// FMAs and divisions give the same bits on every AVX2 CPU; and on AMD Zen 2 the division was
/// no slower over a whole int8 run (340 against 334 sentences/s, side by side). Edge values
/// as `gelu16`: GELU(-inf) is NaN and GELU(-0) is +0 (the portable GELU gives -inf and -0).
#[inline(always)]
pub(crate) unsafe fn gelu8(v: __m256) -> __m256 {
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

/// The epilogue of a whole tile, as `epilogue_tile_avx512` computes it, 8 lanes at a time:
/// int8 (`q` = per-row zero points and scales, per-column weight sums and scales):
/// `act(cvt(acc - zero * colsum) * (scale * wscale) + bias)`, one FMA; bf16 (`q` = None,
/// `acc` holds f32 bits): `act(acc + bias)`.
///
/// # Safety
/// The CPU has avx2 and fma; `out` covers `mr` rows of `cols` values at stride `ld`, and no
/// other thread touches them.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) unsafe fn epilogue_tile_avx2<T: Copy>(
    acc: &TileBuf<T>,
    mr: usize,
    cols: usize,
    q: Option<(&[i32], &[f32], &[i32], &[f32])>,
    bias: &[f32],
    gelu: bool,
    out: *mut f32,
    ld: usize,
) {
    assert!(std::mem::size_of::<T>() == 4);
    assert!(mr <= MAX_MR && cols <= MAX_NP * PANEL && bias.len() >= cols);
    if let Some((zero, scale, colsum, wscale)) = q {
        assert!(zero.len() >= mr && scale.len() >= mr);
        assert!(colsum.len() >= cols && wscale.len() >= cols);
    }
    let accp = acc.as_ptr() as *const u8;
    let mut j = 0;
    while j < cols {
        // SAFETY: load8 and store8 touch columns j..min(j + 8, cols), within every slice
        // (asserted) and every row of `acc` (cols <= MAX_NP * PANEL, 4-byte lanes); rows
        // i < mr <= MAX_MR of `acc`, and of `out` by this function's contract.
        unsafe {
            let b = load8(bias.as_ptr(), j, cols);
            let at = |i: usize| accp.add(i * MAX_NP * PANEL * 4);
            match q {
                Some((zero, scale, colsum, wscale)) => {
                    let cs = load8i(colsum.as_ptr(), j, cols);
                    let ws = load8(wscale.as_ptr(), j, cols);
                    for i in 0..mr {
                        let a = load8i(at(i) as *const i32, j, cols);
                        let z = _mm256_set1_epi32(zero[i]);
                        let a = _mm256_cvtepi32_ps(_mm256_sub_epi32(a, _mm256_mullo_epi32(z, cs)));
                        let w = _mm256_mul_ps(_mm256_set1_ps(scale[i]), ws);
                        let mut v = _mm256_fmadd_ps(a, w, b);
                        if gelu {
                            v = gelu8(v);
                        }
                        store8(out.add(i * ld), j, cols, v);
                    }
                }
                None => {
                    for i in 0..mr {
                        let a = load8(at(i) as *const f32, j, cols);
                        let mut v = _mm256_add_ps(a, b);
                        if gelu {
                            v = gelu8(v);
                        }
                        store8(out.add(i * ld), j, cols, v);
                    }
                }
            }
        }
        j += 8;
    }
}

#[cfg(test)]
mod tests {
    use super::super::epilogue::{epilogue_bf16, epilogue_i8};
    use super::super::Activation;
    use super::*;
    use crate::model::simd_avx2::avx2_or_fail_in_ci;
    use rand::{Rng, SeedableRng};

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
            gelu_avx2(&mut got[..cut]);
            gelu_avx2(&mut got[cut..]);
        }
        let (mut worst, mut worst_rel) = (0f32, 0f32);
        for (x, g) in xs.iter().zip(&got) {
            let want = crate::model::kernels::gelu(*x);
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
        unsafe { gelu_avx2(&mut nan) };
        assert!(
            nan.iter().all(|v| v.is_nan()),
            "GELU of NaN is NaN: {nan:?}"
        );
    }

    /// The tile epilogue against the per-row one on tiles with and without partial chunks
    /// (up to `MAX_MR` rows, up to the full `MAX_NP * PANEL` columns, tight and padded
    /// strides): the same values within rounding (one FMA against a multiply and an add), and
    /// nothing written outside the tile's `cols` columns of each row or past its last row.
    #[test]
    fn tile_epilogue_matches_the_row_epilogue_and_stays_in_its_columns() {
        if !avx2_or_fail_in_ci() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let shapes = [
            (5, 37, 41),
            (4, 64, 64),
            (MAX_MR, 64, 70),
            (1, 8, 8),
            (3, 13, 16),
        ];
        for (mr, cols, ld) in shapes {
            let mut acc_i = [0i32; MAX_MR * MAX_NP * PANEL];
            let mut acc_f = [0f32; MAX_MR * MAX_NP * PANEL];
            for i in 0..mr {
                for j in 0..cols {
                    acc_i[i * MAX_NP * PANEL + j] = rng.random_range(-400_000..400_000);
                    acc_f[i * MAX_NP * PANEL + j] = rng.random_range(-4.0..4.0);
                }
            }
            let zero: Vec<i32> = (0..mr).map(|_| rng.random_range(0..256)).collect();
            let scale: Vec<f32> = (0..mr).map(|_| rng.random_range(1e-3..2e-2)).collect();
            let colsum: Vec<i32> = (0..cols).map(|_| rng.random_range(-2000..2000)).collect();
            let wscale: Vec<f32> = (0..cols).map(|_| rng.random_range(1e-4..1e-3)).collect();
            let bias: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            for (int8, gelu) in [(true, false), (true, true), (false, false), (false, true)] {
                let act = if gelu {
                    Activation::Gelu
                } else {
                    Activation::None
                };
                let q = (&zero[..], &scale[..], &colsum[..], &wscale[..]);
                // A guard row of NaNs after the tile's mr rows.
                let mut got = vec![f32::NAN; (mr + 1) * ld];
                let out = got.as_mut_ptr();
                // SAFETY: avx2 and fma (checked); `got` holds mr rows of cols <= ld at
                // stride ld.
                unsafe {
                    if int8 {
                        epilogue_tile_avx2(&acc_i, mr, cols, Some(q), &bias, gelu, out, ld)
                    } else {
                        epilogue_tile_avx2(&acc_f, mr, cols, None, &bias, gelu, out, ld)
                    }
                }
                let what = format!("tile {mr}x{cols} (ld {ld}), int8 {int8}, gelu {gelu}");
                for i in 0..mr {
                    let mut want = vec![0f32; cols];
                    let at = i * MAX_NP * PANEL;
                    if int8 {
                        let acc = &acc_i[at..at + cols];
                        let (z, s) = (zero[i], scale[i]);
                        epilogue_i8(acc, z, s, &colsum, &wscale, &bias, act, &mut want);
                    } else {
                        epilogue_bf16(&acc_f[at..at + cols], &bias, act, &mut want);
                    }
                    for (j, w) in want.iter().enumerate() {
                        let g = got[i * ld + j];
                        let tol = 2e-6 * w.abs().max(1.0);
                        assert!((g - w).abs() <= tol, "{what} [{i}][{j}]: {g} vs {w}");
                    }
                    let outside = &got[i * ld + cols..(i + 1) * ld];
                    assert!(
                        outside.iter().all(|v| v.is_nan()),
                        "{what}: row {i} overflows"
                    );
                }
                let guard = &got[mr * ld..];
                assert!(
                    guard.iter().all(|v| v.is_nan()),
                    "{what}: written past row {mr}"
                );
            }
        }
    }
}
