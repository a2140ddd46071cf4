//! int8 kernel for AVX-VNNI (the VEX form of VNNI on CPUs without, or besides, AVX-512):
//! `vpdpbusd` on 256-bit vectors, a 6-row x 16-column register tile (12 accumulators).

use std::arch::x86_64::*;

use super::{tile_shapes, Entry, Tile, BLOCK};
use crate::quant::{Int8, TileBuf, LANES, PANEL};

pub(crate) const INT8: Entry<Int8> = Entry {
    name: "avxvnni",
    cpuinfo: &["avx2", "avx_vnni"],
    supported: || is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni"),
    tile: (6, 1),
    block: BLOCK,
    run,
};

/// Exact `dot(u8 row, s8 column)` for the tile's rows and panels (one panel at a time).
///
/// # Safety
/// The CPU has avx2 and avxvnni.
unsafe fn run(t: &Tile<'_, Int8>, out: &mut TileBuf<i32>) {
    t.check(INT8.tile);
    let (a, kp) = (t.a.as_ptr(), t.kp);
    for p in 0..t.np {
        let (bp, o) = (t.b[p * kp * PANEL..].as_ptr(), p * PANEL);
        // SAFETY: the CPU has the features (this function's contract); `check` verified
        // mr <= 6 and that `a` holds mr rows of kp bytes and panel p kp * 16 bytes.
        unsafe { tile_shapes!(t.mr; [1 2 3 4 5 6]; tile(a, kp, bp, kp, out, o)) }
    }
}

#[target_feature(enable = "avx2,avxvnni")]
unsafe fn tile<const MR: usize>(
    a: *const u8,
    lda: usize,
    b: *const i8,
    kp: usize,
    out: &mut TileBuf<i32>,
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
        let d = out.as_mut_ptr().add(r * LANES + o);
        // SAFETY: r < 6 and o + 16 <= 64: within `out`.
        unsafe {
            _mm256_storeu_si256(d as *mut _, acc[0]);
            _mm256_storeu_si256(d.add(8) as *mut _, acc[1]);
        }
    }
}
