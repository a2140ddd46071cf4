//! int8 kernel for AVX-512 VNNI: `vpdpbusd` on 512-bit vectors, a 6-row x 64-column register
//! tile (24 accumulators), one 16-column panel per vector.

use std::arch::x86_64::*;

use super::{tile_shapes, Entry, Tile, BLOCK};
use crate::quant::{Int8, TileBuf, LANES, PANEL};

pub(crate) const INT8: Entry<Int8> = Entry {
    name: "avx512vnni",
    cpuinfo: &["avx512f", "avx512bw", "avx512_vnni"],
    supported: || {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    },
    tile: (6, 4),
    block: BLOCK,
    run,
};

/// Exact `dot(u8 row, s8 column)` for the tile's rows and panels.
///
/// # Safety
/// The CPU has avx512f, avx512bw and avx512vnni.
unsafe fn run(t: &Tile<'_, Int8>, out: &mut TileBuf<i32>) {
    t.check(INT8.tile);
    let (a, b, kp) = (t.a.as_ptr(), t.b.as_ptr(), t.kp);
    // SAFETY: the CPU has the features (this function's contract); `check` verified mr <= 6,
    // np <= 4 and that `a` holds mr rows of kp bytes and `b` np panels of kp * 16.
    unsafe { tile_shapes!(t.mr, t.np; [1 2 3 4 5 6] x [1 2 3 4]; tile(a, kp, b, kp, out)) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const MR: usize, const NP: usize>(
    a: *const u8,
    lda: usize,
    b: *const i8,
    kp: usize,
    out: &mut TileBuf<i32>,
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
                _mm512_storeu_si512(out.as_mut_ptr().add(r * LANES + p * PANEL) as *mut _, *v)
            };
        }
    }
}
