//! int8 kernel for AVX2 without VNNI. `vpmaddubsw` would saturate (255 x 127 x 2 > i16::MAX),
//! so both operands are widened to i16 and multiplied with `vpmaddwd`, whose pair sums are
//! exact in i32. The activation rows are widened once per call (per chunk of k) into a small
//! buffer, so the inner loop broadcasts them with one load; the register tile is 6 rows x 8
//! columns (12 accumulators), and each pair of weight vectors is widened once for the 6 rows.

use std::arch::x86_64::*;

use super::{MAX_MR, MAX_NP, PANEL};

/// Rows of the register tile.
const ROWS: usize = 6;
/// Input values per chunk: the widened rows of a chunk take `ROWS * KC * 2` = 6 KiB.
const KC: usize = 512;

#[repr(C, align(32))]
struct Wide([i16; ROWS * KC]);

/// Exact `dot(u8 row, s8 column)` for `mr` rows and `np` panels.
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
    debug_assert!(mr <= ROWS && np <= MAX_NP && kp.is_multiple_of(4));
    for r in 0..mr {
        out[r * MAX_NP * PANEL..][..np * PANEL].fill(0);
    }
    let mut wide = Wide([0; ROWS * KC]);
    let mut k0 = 0;
    while k0 < kp {
        // A multiple of 4, since kp and KC are.
        let kc = KC.min(kp - k0);
        for r in 0..mr {
            // SAFETY: row r holds kp bytes, k0 + kc <= kp; the chunk row has KC >= kc slots.
            unsafe { widen_row(a.add(r * lda + k0), kc, wide.0.as_mut_ptr().add(r * KC)) };
        }
        for p in 0..np {
            for h in 0..2 {
                // Group g of panel p starts at p * kp * 16 + g * 64; columns 8h.. are the
                // second 32 bytes of each group when h = 1.
                // SAFETY: within panel p (kp * 16 bytes), since k0 + kc <= kp.
                let bp = unsafe { b.add(p * kp * PANEL + k0 * PANEL + h * 32) };
                let o = p * PANEL + h * 8;
                let w = wide.0.as_ptr();
                let groups = kc / 4;
                // SAFETY: forwarded from this function's contract; `w` holds mr rows of kc.
                unsafe {
                    match mr {
                        1 => half::<1>(w, bp, groups, out, o),
                        2 => half::<2>(w, bp, groups, out, o),
                        3 => half::<3>(w, bp, groups, out, o),
                        4 => half::<4>(w, bp, groups, out, o),
                        5 => half::<5>(w, bp, groups, out, o),
                        6 => half::<6>(w, bp, groups, out, o),
                        _ => unreachable!("tile rows"),
                    }
                }
            }
        }
        k0 += kc;
    }
}

/// Zero-extends `n` bytes at `src` to i16 at `dst`.
#[target_feature(enable = "avx2")]
unsafe fn widen_row(src: *const u8, n: usize, dst: *mut i16) {
    let mut j = 0;
    while j + 16 <= n {
        // SAFETY: j + 16 <= n bytes at src and i16 slots at dst.
        unsafe {
            let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(src.add(j) as *const _));
            _mm256_storeu_si256(dst.add(j) as *mut _, v);
        }
        j += 16;
    }
    while j < n {
        // SAFETY: j < n.
        unsafe { *dst.add(j) = *src.add(j) as i16 };
        j += 1;
    }
}

/// Adds the products of `MR` widened rows and 8 columns (`bp`: the 32 bytes of those columns
/// in each 64-byte group) over `groups` groups of 4 k to `out[r * 64 + o..][..8]`.
#[target_feature(enable = "avx2")]
unsafe fn half<const MR: usize>(
    w: *const i16,
    bp: *const i8,
    groups: usize,
    out: &mut [i32; MAX_MR * MAX_NP * PANEL],
    o: usize,
) {
    // acc[r][q]: columns 4q..4q+4 of the 8, two i32 partial sums per column (k0 k1 | k2 k3).
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for g in 0..groups {
        // SAFETY: group g's 32 bytes at bp + 64 g lie within the panel (caller).
        let (b0, b1) = unsafe {
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(g * 64) as *const _)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(g * 64 + 16) as *const _)),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: widened row r holds `groups * 4` values from w + r * KC.
            let quad = unsafe { (w.add(r * KC + g * 4) as *const i64).read_unaligned() };
            // The 4 widened values, repeated over the 4 columns of a vector.
            let av = _mm256_set1_epi64x(quad);
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, b0));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(av, b1));
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // hadd within 128-bit lanes gives [c0 c1 c4 c5 | c2 c3 c6 c7]; the permute orders it.
        let v = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(acc[0], acc[1]));
        // SAFETY: o + r * 64 + 8 stays within `out` (r < 6, o <= 56).
        unsafe {
            let d = out.as_mut_ptr().add(o + r * MAX_NP * PANEL);
            _mm256_storeu_si256(
                d as *mut _,
                _mm256_add_epi32(_mm256_loadu_si256(d as *const _), v),
            );
        }
    }
}
