//! int8 kernel for AVX2 without VNNI. `vpmaddubsw` would saturate (255 x 127 x 2 > i16::MAX),
//! so both operands are widened to i16 and multiplied with `vpmaddwd`, whose pair sums are
//! exact in i32. A 2-row x 16-column register tile: the 4 weight vectors a panel group widens
//! to are shared by the rows.

use std::arch::x86_64::*;

use super::{MAX_MR, MAX_NP, PANEL};

/// Exact `dot(u8 row, s8 column)` for `mr` rows and `np` panels (one at a time).
///
/// # Safety
/// The CPU has avx2; `a` covers `mr` rows of `kp` bytes at stride `lda`; `b` covers `np`
/// panels of `kp * 16` bytes; `mr <= 6`, `np <= 4`, `kp % 4 == 0`.
pub unsafe fn int8_tile(
    a: *const u8,
    lda: usize,
    mr: usize,
    b: *const i8,
    np: usize,
    kp: usize,
    out: &mut [i32; MAX_MR * MAX_NP * PANEL],
) {
    for p in 0..np {
        let bp = b.add(p * kp * PANEL);
        let mut r = 0;
        while r < mr {
            let ap = a.add(r * lda);
            let o = r * MAX_NP * PANEL + p * PANEL;
            // SAFETY: forwarded from this function's contract, for rows r.. and panel p.
            unsafe {
                if mr - r >= 2 {
                    tile::<2>(ap, lda, bp, kp, out, o);
                    r += 2;
                } else {
                    tile::<1>(ap, lda, bp, kp, out, o);
                    r += 1;
                }
            }
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn tile<const MR: usize>(
    a: *const u8,
    lda: usize,
    b: *const i8,
    kp: usize,
    out: &mut [i32; MAX_MR * MAX_NP * PANEL],
    o: usize,
) {
    // acc[r][q]: columns 4q..4q+4, two i32 partial sums per column (k0 k1 | k2 k3).
    let mut acc = [[_mm256_setzero_si256(); 4]; MR];
    for g in 0..kp / 4 {
        let mut bv = [_mm256_setzero_si256(); 4];
        for (q, v) in bv.iter_mut().enumerate() {
            // SAFETY: the panel holds kp / 4 groups of 64 bytes; 16 bytes = 4 columns x 4 k.
            *v = _mm256_cvtepi8_epi16(unsafe {
                _mm_loadu_si128(b.add(g * 64 + q * 16) as *const _)
            });
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r holds kp bytes; 4 g + 4 <= kp.
            let quad = unsafe { (a.add(r * lda + g * 4) as *const i32).read_unaligned() };
            // 4 u8 -> 4 i16, repeated over the 4 columns of a vector.
            let av = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(quad)));
            for q in 0..4 {
                acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(av, bv[q]));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // hadd within 128-bit lanes gives [c0 c1 c4 c5 | c2 c3 c6 c7]; the permute orders it.
        let lo = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(acc[0], acc[1]));
        let hi = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(acc[2], acc[3]));
        let d = out.as_mut_ptr().add(o + r * MAX_NP * PANEL);
        // SAFETY: o + r * 64 + 16 stays within `out` (rows < 6, panel offset < 64).
        unsafe {
            _mm256_storeu_si256(d as *mut _, lo);
            _mm256_storeu_si256(d.add(8) as *mut _, hi);
        }
    }
}
