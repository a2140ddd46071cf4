//! int8 kernel for AVX2 without VNNI. `vpmaddubsw(u8, s8)` would saturate on u8 activations
//! (255 x 127 x 2 > i16::MAX), so the rows are shifted to signed, `a' = a - 128` in
//! [-128, 127], and multiplied as `vpmaddubsw(|a'|, sign(w, a'))`: |a'| <= 128 and
//! |w| <= 127 (the packing refuses -128), so a pair sums to at most 32,512 and never
//! saturates. `vpmaddwd` with ones widens the pairs to i32, and the exact
//! `dot(a, w) = dot(a', w) + 128 * colsum(w)` is restored at the end. Measured on AMD Zen 2
//! in a C register-tile microbenchmark, one core: 44 G multiply-adds/s, against 35 for
//! widening both operands to i16 and using `vpmaddwd` alone (worth about 5% on a whole int8
//! run).
//! Register tile: 4 rows x 16 columns (8 accumulators); the shifted rows and their absolute
//! values are prepared once per call (per chunk of k).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::{tile_shapes, Entry, Tile, BLOCK};
use crate::quant::{Int8, TileBuf, LANES, MAX_NP, PANEL};

/// Rows of the register tile.
const ROWS: usize = 4;
/// Input values per chunk: the prepared rows of a chunk take `2 * ROWS * KC` = 8 KiB.
const KC: usize = 1024;

#[repr(C, align(32))]
struct Rows([u8; ROWS * KC]);

pub(crate) const INT8: Entry<Int8> = Entry {
    name: "avx2",
    cpuinfo: &["avx2"],
    supported: || is_x86_feature_detected!("avx2"),
    tile: (ROWS, MAX_NP),
    block: BLOCK,
    run,
};

/// Exact `dot(u8 row, s8 column)` for the tile's rows and panels.
///
/// # Safety
/// The CPU has avx2; the panels were packed by `Packed::<Int8>::pack`, so no weight is -128.
unsafe fn run(t: &Tile<'_, Int8>, out: &mut TileBuf<i32>) {
    t.check(INT8.tile);
    let (a, b, colsum) = (t.a.as_ptr(), t.b.as_ptr(), t.colsum.as_ptr());
    // SAFETY: forwarded: `check` verified the operands' sizes and the tile shape.
    unsafe { int8_tile(a, t.kp, t.mr, b, t.np, t.kp, colsum, out) }
}

/// Exact `dot(u8 row, s8 column)` for `mr` rows and `np` panels; `colsum` holds the column
/// sums of the `np` panels' weights.
///
/// # Safety
/// The CPU has avx2; `a` covers `mr` rows of `kp` bytes at stride `lda`; `b` covers `np`
/// panels of `kp * 16` bytes, none of them -128; `colsum` covers `np * 16` values;
/// `mr <= 4`, `np <= 4`, `kp % 4 == 0`.
#[allow(clippy::too_many_arguments)]
unsafe fn int8_tile(
    a: *const u8,
    lda: usize,
    mr: usize,
    b: *const i8,
    np: usize,
    kp: usize,
    colsum: *const i32,
    out: &mut TileBuf<i32>,
) {
    assert!(
        mr <= ROWS && np <= MAX_NP && kp.is_multiple_of(4),
        "avx2 tile shape"
    );
    if mr == 0 {
        return;
    }
    for r in 0..mr {
        for c in 0..np * PANEL {
            // SAFETY: c < np * 16 column sums (contract).
            out[r * LANES + c] = unsafe { *colsum.add(c) }.wrapping_mul(128);
        }
    }
    // The shifted rows a' (as s8 bytes) and their absolute values |a'| (as u8). Left
    // uninitialised (zeroing 8 KiB per call cost 2% of the run): only the kc values of each
    // chunk row that `prepare_row` writes are read.
    let mut shifted = MaybeUninit::<Rows>::uninit();
    let mut abs = MaybeUninit::<Rows>::uninit();
    let (sp, up) = (shifted.as_mut_ptr() as *mut u8, abs.as_mut_ptr() as *mut u8);
    let mut k0 = 0;
    while k0 < kp {
        // A multiple of 4, since kp and KC are.
        let kc = KC.min(kp - k0);
        for r in 0..mr {
            // SAFETY: row r holds kp bytes, k0 + kc <= kp; the chunk rows have KC >= kc slots.
            unsafe { prepare_row(a.add(r * lda + k0), kc, sp.add(r * KC), up.add(r * KC)) };
        }
        let (s, u) = (sp as *const i8, up as *const u8);
        for p in 0..np {
            // Group g of panel p starts at p * kp * 16 + g * 64.
            // SAFETY: within panel p (kp * 16 bytes), since k0 + kc <= kp.
            let bp = unsafe { b.add(p * kp * PANEL + k0 * PANEL) };
            let (o, groups) = (p * PANEL, kc / 4);
            // SAFETY: forwarded from this function's contract; the chunk rows hold kc values.
            unsafe { tile_shapes!(mr; [1 2 3 4]; panel(s, u, bp, groups, out, o)) }
        }
        k0 += kc;
    }
}

/// Writes `a - 128` (as s8) and `|a - 128|` (as u8) of `n` bytes at `src`.
#[target_feature(enable = "avx2")]
unsafe fn prepare_row(src: *const u8, n: usize, shifted: *mut u8, abs: *mut u8) {
    let flip = _mm256_set1_epi8(-128);
    let mut j = 0;
    while j + 32 <= n {
        // SAFETY: j + 32 <= n bytes at src, shifted and abs.
        unsafe {
            let v = _mm256_xor_si256(_mm256_loadu_si256(src.add(j) as *const _), flip);
            _mm256_storeu_si256(shifted.add(j) as *mut _, v);
            // |-128| is 0x80, which reads as 128 unsigned.
            _mm256_storeu_si256(abs.add(j) as *mut _, _mm256_abs_epi8(v));
        }
        j += 32;
    }
    while j < n {
        // SAFETY: j < n.
        unsafe {
            let v = (*src.add(j) ^ 0x80) as i8;
            *shifted.add(j) = v as u8;
            *abs.add(j) = v.unsigned_abs();
        }
        j += 1;
    }
}

/// Adds `dot(a', w)` of `MR` prepared rows and one panel's 16 columns (`bp`: 64 bytes per
/// group of 4 k) over `groups` groups to `out[r * 64 + o..][..16]`.
#[target_feature(enable = "avx2")]
unsafe fn panel<const MR: usize>(
    s: *const i8,
    u: *const u8,
    bp: *const i8,
    groups: usize,
    out: &mut TileBuf<i32>,
    o: usize,
) {
    let ones = _mm256_set1_epi16(1);
    // acc[r][h]: columns 8h..8h+8, one i32 lane per column.
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for g in 0..groups {
        // Each 32-bit lane holds one column's 4 weights.
        // SAFETY: group g's 64 bytes at bp + 64 g lie within the panel (caller).
        let w = unsafe {
            [
                _mm256_loadu_si256(bp.add(g * 64) as *const _),
                _mm256_loadu_si256(bp.add(g * 64 + 32) as *const _),
            ]
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: prepared row r holds `groups * 4` values from r * KC.
            let (x, ux) = unsafe {
                (
                    _mm256_set1_epi32((s.add(r * KC + g * 4) as *const i32).read_unaligned()),
                    _mm256_set1_epi32((u.add(r * KC + g * 4) as *const i32).read_unaligned()),
                )
            };
            for h in 0..2 {
                // |a'| x (w with a''s sign) = a' x w; pairs within +-32,512.
                let pairs = _mm256_maddubs_epi16(ux, _mm256_sign_epi8(w[h], x));
                acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: o + r * 64 + 16 stays within `out` (r < 4, o <= 48).
        unsafe {
            let d = out.as_mut_ptr().add(o + r * LANES);
            for (h, v) in acc.iter().enumerate() {
                let d = d.add(8 * h) as *mut __m256i;
                _mm256_storeu_si256(d, _mm256_add_epi32(_mm256_loadu_si256(d), *v));
            }
        }
    }
}
