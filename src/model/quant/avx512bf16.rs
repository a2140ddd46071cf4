//! bf16 kernel for AVX-512 BF16: `vdpbf16ps` (2 bf16 x 2 bf16 added to an f32 lane) on
//! 512-bit vectors, a 6-row x 64-column register tile. Each column is one lane that
//! accumulates the k pairs in order, whatever the tile: batch invariant.

use std::arch::x86_64::*;

use super::{MAX_MR, MAX_NP, PANEL};

/// bf16 products with f32 accumulation for `mr` rows and `np` panels.
///
/// # Safety
/// The CPU has avx512f and avx512bf16; `a` covers `mr` rows of `kp` values at stride `lda`;
/// `b` covers `np` panels of `kp * 16` values; `mr <= 6`, `np <= 4`, `kp % 2 == 0`.
pub unsafe fn bf16_tile(
    a: *const u16,
    lda: usize,
    mr: usize,
    b: *const u16,
    np: usize,
    kp: usize,
    out: &mut [f32; MAX_MR * MAX_NP * PANEL],
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

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const MR: usize, const NP: usize>(
    a: *const u16,
    lda: usize,
    b: *const u16,
    kp: usize,
    out: &mut [f32; MAX_MR * MAX_NP * PANEL],
) {
    let mut acc = [[_mm512_setzero_ps(); NP]; MR];
    let pstride = kp * PANEL;
    for g in 0..kp / 2 {
        let mut bv = [_mm512_setzero_si512(); NP];
        for (p, v) in bv.iter_mut().enumerate() {
            // SAFETY: panel p holds kp / 2 pairs of 16 x 2 values (64 bytes).
            *v = unsafe { _mm512_loadu_si512(b.add(p * pstride + g * 32) as *const _) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r holds kp values; 2 g + 2 <= kp.
            let av = _mm512_set1_epi32(unsafe {
                (a.add(r * lda + g * 2) as *const i32).read_unaligned()
            });
            let av: __m512bh = std::mem::transmute(av);
            for p in 0..NP {
                acc[p] =
                    _mm512_dpbf16_ps(acc[p], av, std::mem::transmute::<__m512i, __m512bh>(bv[p]));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (p, v) in acc.iter().enumerate() {
            // SAFETY: r < 6, p < 4: within `out`.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * MAX_NP * PANEL + p * PANEL), *v) };
        }
    }
}
