//! bf16 kernel for AVX-512 BF16: `vdpbf16ps` (2 bf16 x 2 bf16 added to an f32 lane) on
//! 512-bit vectors, a 6-row x 64-column register tile. Each column is one lane that
//! accumulates the k pairs in order, whatever the tile: batch invariant.

use std::arch::x86_64::*;

use super::{tile_shapes, Entry, Tile, BLOCK};
use crate::quant::{Bf16, TileBuf, LANES, PANEL};

pub(crate) const BF16: Entry<Bf16> = Entry {
    name: "avx512bf16",
    cpuinfo: &["avx512f", "avx512_bf16"],
    supported: || is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"),
    tile: (6, 4),
    block: BLOCK,
    run,
};

/// bf16 products with f32 accumulation for the tile's rows and panels.
///
/// # Safety
/// The CPU has avx512f and avx512bf16.
unsafe fn run(t: &Tile<'_, Bf16>, out: &mut TileBuf<f32>) {
    t.check(BF16.tile);
    let (a, b, kp) = (t.a.as_ptr(), t.b.as_ptr(), t.kp);
    // SAFETY: the CPU has the features (this function's contract); `check` verified mr <= 6,
    // np <= 4 and that `a` holds mr rows of kp values and `b` np panels of kp * 16.
    unsafe { tile_shapes!(t.mr, t.np; [1 2 3 4 5 6] x [1 2 3 4]; tile(a, kp, b, kp, out)) }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const MR: usize, const NP: usize>(
    a: *const u16,
    lda: usize,
    b: *const u16,
    kp: usize,
    out: &mut TileBuf<f32>,
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
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * LANES + p * PANEL), *v) };
        }
    }
}
