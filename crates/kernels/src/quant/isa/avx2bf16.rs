//! bf16 kernel for CPUs with AVX2 and FMA but no BF16 instructions (AMD Zen 2 and 3, most
//! Intel client CPUs). A bf16 value is the top half of an f32, so the weights are widened by
//! a shift or a mask, and each pair of k runs as two FMAs in `vdpbf16ps`'s order: the odd
//! product first, then the even one. The product of two bf16 values is exact in f32, so
//! `fma(a, b, acc)` rounds exactly as the portable kernel's `acc + a * b` does: the results
//! are the portable kernel's, bit for bit (away from f32 underflow and overflow). Register
//! tile: 4 rows x 16 columns (8 accumulators); the activation rows are widened to f32 once
//! per chunk of k.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::{tile_shapes, Entry, Tile, BLOCK};
use crate::quant::{Bf16, TileBuf, LANES, MAX_NP, PANEL};

/// Rows of the register tile.
const ROWS: usize = 4;
/// Input values per chunk: the widened rows of a chunk take `ROWS * KC * 4` = 8 KiB.
const KC: usize = 512;

#[repr(C, align(32))]
struct Wide([f32; ROWS * KC]);

pub(crate) const BF16: Entry<Bf16> = Entry {
    name: "avx2bf16",
    cpuinfo: &["avx2", "fma"],
    supported: crate::cpu::has_avx2_fma,
    tile: (ROWS, MAX_NP),
    block: BLOCK,
    run,
};

/// bf16 products with f32 accumulation for the tile's rows and panels.
///
/// # Safety
/// The CPU has avx2 and fma.
unsafe fn run(t: &Tile<'_, Bf16>, out: &mut TileBuf<f32>) {
    t.check(BF16.tile);
    // SAFETY: forwarded: `check` verified the operands' sizes and the tile shape.
    unsafe { bf16_tile(t.a.as_ptr(), t.kp, t.mr, t.b.as_ptr(), t.np, t.kp, out) }
}

/// bf16 products with f32 accumulation for `mr` rows and `np` panels.
///
/// # Safety
/// The CPU has avx2 and fma; `a` covers `mr` rows of `kp` values at stride `lda`; `b` covers
/// `np` panels of `kp * 16` values; `mr <= 4`, `np <= 4`, `kp % 2 == 0`.
unsafe fn bf16_tile(
    a: *const u16,
    lda: usize,
    mr: usize,
    b: *const u16,
    np: usize,
    kp: usize,
    out: &mut TileBuf<f32>,
) {
    assert!(
        mr <= ROWS && np <= MAX_NP && kp.is_multiple_of(2),
        "avx2bf16 tile shape"
    );
    if mr == 0 {
        return;
    }
    for r in 0..mr {
        out[r * LANES..][..np * PANEL].fill(0.0);
    }
    // Left uninitialised: only the kc values of each chunk row that `widen_row` writes are read.
    let mut wide = MaybeUninit::<Wide>::uninit();
    let wp = wide.as_mut_ptr() as *mut f32;
    let mut k0 = 0;
    while k0 < kp {
        // Even, since kp and KC are.
        let kc = KC.min(kp - k0);
        for r in 0..mr {
            // SAFETY: row r holds kp values, k0 + kc <= kp; the chunk row has KC >= kc slots.
            unsafe { widen_row(a.add(r * lda + k0), kc, wp.add(r * KC)) };
        }
        for p in 0..np {
            // Pair g of panel p starts at p * kp * 16 + g * 32 values.
            // SAFETY: within panel p (kp * 16 values), since k0 + kc <= kp.
            let bp = unsafe { b.add(p * kp * PANEL + k0 * PANEL) };
            let w = wp as *const f32;
            let o = p * PANEL;
            // SAFETY: forwarded from this function's contract; `w` holds mr rows of kc.
            unsafe { tile_shapes!(mr; [1 2 3 4]; panel(w, bp, kc / 2, out, o)) }
        }
        k0 += kc;
    }
}

/// Widens `n` bf16 values at `src` to f32 at `dst`.
#[target_feature(enable = "avx2")]
unsafe fn widen_row(src: *const u16, n: usize, dst: *mut f32) {
    let mut j = 0;
    while j + 8 <= n {
        // SAFETY: j + 8 <= n values at src and slots at dst.
        unsafe {
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(src.add(j) as *const _));
            _mm256_storeu_si256(dst.add(j) as *mut _, _mm256_slli_epi32::<16>(v));
        }
        j += 8;
    }
    while j < n {
        // SAFETY: j < n.
        unsafe { *dst.add(j) = f32::from_bits((*src.add(j) as u32) << 16) };
        j += 1;
    }
}

/// Continues the sums of `MR` widened rows and one panel's 16 columns (`bp`: 32 values per
/// pair of k) over `pairs` pairs, in `out[r * 64 + o..][..16]`.
#[target_feature(enable = "avx2,fma")]
unsafe fn panel<const MR: usize>(
    w: *const f32,
    bp: *const u16,
    pairs: usize,
    out: &mut TileBuf<f32>,
    o: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for (r, acc) in acc.iter_mut().enumerate() {
        // SAFETY: o + r * 64 + 16 stays within `out` (r < 4, o <= 48).
        unsafe {
            let d = out.as_ptr().add(o + r * LANES);
            acc[0] = _mm256_loadu_ps(d);
            acc[1] = _mm256_loadu_ps(d.add(8));
        }
    }
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    for g in 0..pairs {
        // Each 32-bit lane holds one column's (k0, k1) pair: k0 in the low half.
        // SAFETY: pair g's 32 values at bp + 32 g lie within the panel (caller).
        let (v0, v1) = unsafe {
            (
                _mm256_loadu_si256(bp.add(g * 32) as *const _),
                _mm256_loadu_si256(bp.add(g * 32 + 16) as *const _),
            )
        };
        let even = [
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v0)),
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v1)),
        ];
        let odd = [
            _mm256_castsi256_ps(_mm256_and_si256(v0, high)),
            _mm256_castsi256_ps(_mm256_and_si256(v1, high)),
        ];
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: widened row r holds `pairs * 2` values from w + r * KC.
            let (a0, a1) = unsafe {
                (
                    _mm256_broadcast_ss(&*w.add(r * KC + 2 * g)),
                    _mm256_broadcast_ss(&*w.add(r * KC + 2 * g + 1)),
                )
            };
            for h in 0..2 {
                acc[h] = _mm256_fmadd_ps(a1, odd[h], acc[h]);
                acc[h] = _mm256_fmadd_ps(a0, even[h], acc[h]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: as above.
        unsafe {
            let d = out.as_mut_ptr().add(o + r * LANES);
            _mm256_storeu_ps(d, acc[0]);
            _mm256_storeu_ps(d.add(8), acc[1]);
        }
    }
}
