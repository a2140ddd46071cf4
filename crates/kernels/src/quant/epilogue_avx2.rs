//! The AVX2+FMA version of the tile epilogue in `epilogue.rs`, 8 lanes at a time with masked
//! tails, for CPUs without AVX-512. On AMD Zen 2 the per-row epilogue was 6-7% of an int8
//! run.

use std::arch::x86_64::*;

use super::{TileBuf, TileQuant, LANES, MAX_MR};
use crate::math::avx2::{gelu8, load8, load8i, store8};

/// The epilogue of a whole tile, as `epilogue_tile_avx512` computes it, 8 lanes at a time:
/// int8 (`q` = per-row zero points and scales, per-column weight sums and scales):
/// `act(cvt(acc - zero * colsum) * (scale * wscale) + bias)`, one FMA; bf16 (`q` = None,
/// `acc` holds f32 bits): `act(acc + bias)`.
///
/// # Safety
/// The CPU has avx2 and fma; `out` covers `mr` rows of `cols` values at stride `ld`, and no
/// other thread touches them.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn epilogue_tile_avx2<T: Copy>(
    acc: &TileBuf<T>,
    mr: usize,
    cols: usize,
    q: Option<TileQuant<'_>>,
    bias: &[f32],
    gelu: bool,
    out: *mut f32,
    ld: usize,
) {
    assert!(std::mem::size_of::<T>() == 4);
    assert!(mr <= MAX_MR && cols <= LANES && bias.len() >= cols);
    if let Some(q) = q {
        assert!(q.zero.len() >= mr && q.scale.len() >= mr);
        assert!(q.colsum.len() >= cols && q.wscale.len() >= cols);
    }
    let accp = acc.as_ptr() as *const u8;
    let mut j = 0;
    while j < cols {
        // SAFETY: load8 and store8 touch columns j..min(j + 8, cols), within every slice
        // (asserted) and every row of `acc` (cols <= LANES, 4-byte lanes); rows
        // i < mr <= MAX_MR of `acc`, and of `out` by this function's contract.
        unsafe {
            let b = load8(bias.as_ptr(), j, cols);
            let at = |i: usize| accp.add(i * LANES * 4);
            match q {
                Some(q) => {
                    let cs = load8i(q.colsum.as_ptr(), j, cols);
                    let ws = load8(q.wscale.as_ptr(), j, cols);
                    for i in 0..mr {
                        let a = load8i(at(i) as *const i32, j, cols);
                        let z = _mm256_set1_epi32(q.zero[i]);
                        let a = _mm256_cvtepi32_ps(_mm256_sub_epi32(a, _mm256_mullo_epi32(z, cs)));
                        let w = _mm256_mul_ps(_mm256_set1_ps(q.scale[i]), ws);
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
    use super::super::{Activation, RowQuant, MAX_NP, PANEL};
    use super::*;
    use crate::cpu::avx2_or_fail_in_ci;
    use rand::{Rng, SeedableRng};

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
                let q = TileQuant {
                    zero: &zero,
                    scale: &scale,
                    colsum: &colsum,
                    wscale: &wscale,
                };
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
                        let (zero, scale) = (zero[i], scale[i]);
                        let r = RowQuant {
                            zero,
                            scale,
                            colsum: &colsum,
                            wscale: &wscale,
                        };
                        epilogue_i8(acc, r, &bias, act, &mut want);
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
