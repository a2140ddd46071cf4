//! int8 kernel for AVX-VNNI (the VEX form of VNNI on CPUs without, or besides, AVX-512):
//! `vpdpbusd` on 256-bit vectors, a 6-row x 16-column register tile (12 accumulators).

use std::arch::x86_64::*;

use super::{MAX_MR, MAX_NP, PANEL};

/// Exact `dot(u8 row, s8 column)` for `mr` rows and `np` panels (one at a time).
///
/// # Safety
/// The CPU has avx2 and avxvnni; `a` covers `mr` rows of `kp` bytes at stride `lda`; `b` covers
/// `np` panels of `kp * 16` bytes; `mr <= 6`, `np <= 4`, `kp % 4 == 0`.
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
        let o = p * PANEL;
        // SAFETY: forwarded from this function's contract, for panel p.
        unsafe {
            match mr {
                1 => tile::<1>(a, lda, bp, kp, out, o),
                2 => tile::<2>(a, lda, bp, kp, out, o),
                3 => tile::<3>(a, lda, bp, kp, out, o),
                4 => tile::<4>(a, lda, bp, kp, out, o),
                5 => tile::<5>(a, lda, bp, kp, out, o),
                6 => tile::<6>(a, lda, bp, kp, out, o),
                _ => unreachable!("tile rows"),
            }
        }
    }
}

#[target_feature(enable = "avx2,avxvnni")]
unsafe fn tile<const MR: usize>(
    a: *const u8,
    lda: usize,
    b: *const i8,
    kp: usize,
    out: &mut [i32; MAX_MR * MAX_NP * PANEL],
    o: usize,
) {
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for g in 0..kp / 4 {
        // SAFETY: the panel holds kp / 4 groups of 64 bytes.
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_si256(b.add(g * 64) as *const _),
                _mm256_loadu_si256(b.add(g * 64 + 32) as *const _),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r holds kp bytes; 4 g + 4 <= kp.
            let av = _mm256_set1_epi32(unsafe {
                (a.add(r * lda + g * 4) as *const i32).read_unaligned()
            });
            acc[0] = _mm256_dpbusd_avx_epi32(acc[0], av, b0);
            acc[1] = _mm256_dpbusd_avx_epi32(acc[1], av, b1);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let d = out.as_mut_ptr().add(r * MAX_NP * PANEL + o);
        // SAFETY: r < 6 and o + 16 <= 64: within `out`.
        unsafe {
            _mm256_storeu_si256(d as *mut _, acc[0]);
            _mm256_storeu_si256(d.add(8) as *mut _, acc[1]);
        }
    }
}
