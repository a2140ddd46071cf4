//! int8 kernel for AVX-512 VNNI: `vpdpbusd` on 512-bit vectors, a 6-row x 64-column register
//! tile (24 accumulators), one 16-column panel per vector.

use std::arch::x86_64::*;

use super::{MAX_MR, MAX_NP, PANEL};

/// Exact `dot(u8 row, s8 column)` for `mr` rows and `np` panels.
///
/// # Safety
/// The CPU has avx512f, avx512bw and avx512vnni; `a` covers `mr` rows of `kp` bytes at stride
/// `lda`; `b` covers `np` panels of `kp * 16` bytes; `mr <= 6`, `np <= 4`, `kp % 4 == 0`.
pub unsafe fn int8_tile(
    a: *const u8,
    lda: usize,
    mr: usize,
    b: *const i8,
    np: usize,
    kp: usize,
    out: &mut [i32; MAX_MR * MAX_NP * PANEL],
) {
    macro_rules! go {
        ($($mr:literal)*; $($np:literal)*) => {
            go!(@rows [$($mr)*] [$($np)*])
        };
        (@rows [$($mr:literal)*] $nps:tt) => {
            match mr {
                $($mr => go!(@cols $mr $nps),)*
                _ => unreachable!("tile rows"),
            }
        };
        (@cols $mr:literal [$($np:literal)*]) => {
            match np {
                // SAFETY: forwarded from this function's contract.
                $($np => unsafe { tile::<$mr, $np>(a, lda, b, kp, out) },)*
                _ => unreachable!("tile panels"),
            }
        };
    }
    go!(1 2 3 4 5 6; 1 2 3 4)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const MR: usize, const NP: usize>(
    a: *const u8,
    lda: usize,
    b: *const i8,
    kp: usize,
    out: &mut [i32; MAX_MR * MAX_NP * PANEL],
) {
    let mut acc = [[_mm512_setzero_si512(); NP]; MR];
    let pstride = kp * PANEL;
    for g in 0..kp / 4 {
        let mut bv = [_mm512_setzero_si512(); NP];
        for (p, v) in bv.iter_mut().enumerate() {
            // SAFETY: panel p holds kp / 4 groups of 64 bytes.
            *v = unsafe { _mm512_loadu_si512(b.add(p * pstride + g * 64) as *const _) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r holds kp bytes; 4 g + 4 <= kp.
            let av = _mm512_set1_epi32(unsafe {
                (a.add(r * lda + g * 4) as *const i32).read_unaligned()
            });
            for p in 0..NP {
                acc[p] = _mm512_dpbusd_epi32(acc[p], av, bv[p]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (p, v) in acc.iter().enumerate() {
            // SAFETY: r < 6, p < 4: within `out`.
            unsafe {
                _mm512_storeu_si512(
                    out.as_mut_ptr().add(r * MAX_NP * PANEL + p * PANEL) as *mut _,
                    *v,
                )
            };
        }
    }
}
