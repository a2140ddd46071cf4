//! The running (online) softmax of tiled attention, one row of a block of scores at a time:
//! the scores of one query against a block of keys become weights `exp(s - max)`, and the
//! row's running maximum and sum are updated, with the factor by which the values
//! accumulated so far must be rescaled (Milakov and Gimelshein, 2018; flash-attention).
//!
//! ALiBi's bias and a sliding window are applied here: keys outside the window weigh exactly
//! 0. The maximum and the sum are taken lane-wise (16 partial results in the portable code,
//! 4 x 16 in AVX-512, combined in a fixed order), so that the row vectorises and its result
//! depends on its own scores only. A block's maximum may come with the scores instead
//! ([`BlockRow::max`], from the f32 scores' product): a maximum is exact in any order, so the
//! weights are the same bits either way for rows without NaN (a NaN row gives NaN either
//! way).

use super::exp;
use crate::cpu::multiversion;

/// A query row's running softmax state: the largest score so far and the sum of the
/// weights, both relative to that maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningRow {
    pub max: f32,
    pub sum: f32,
}

impl Default for RunningRow {
    fn default() -> Self {
        Self {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }
}

/// Where a block of scores sits: the query's position `q` in its sequence, the block's first
/// key `k0`, the keys the query may see (`lo..hi`, positions in the sequence), and the ALiBi
/// slope (0 for none: `-slope * |q - k|` is added to each score). `max`, when the caller has
/// it ([`crate::attention_blocks::scores`] gives it), is the largest of the block's scores as
/// given; it spares the row a pass where it is the largest visible one (no ALiBi, every key
/// of the block visible) and is ignored elsewhere.
#[derive(Debug, Clone, Copy)]
pub struct BlockRow {
    pub q: usize,
    pub k0: usize,
    pub lo: usize,
    pub hi: usize,
    pub slope: f32,
    pub max: Option<f32>,
}

impl BlockRow {
    /// `max`, where it is the largest visible score of the block's `n` keys.
    fn known_max(&self, n: usize) -> Option<f32> {
        let whole = self.lo <= self.k0 && self.hi >= self.k0 + n;
        self.max.filter(|_| whole && self.slope == 0.0)
    }
}

const LANES: usize = 16;

/// Lane-wise maximum of `s` (`NEG_INFINITY` when empty).
#[inline(always)]
fn lane_max(s: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        acc[l] = acc[l].max(v);
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `s[j] = exp(s[j] - m)`, returning the lane-wise sum.
#[inline(always)]
fn exp_sum(s: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - m);
            acc[l] += c[l];
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        *v = exp(*v - m);
        acc[l] += *v;
    }
    let mut total = 0.0;
    for a in acc {
        total += a;
    }
    total
}

multiversion! {
    /// See [`softmax_block_row`]; `out` receives the rescale factor.
    fn block_row(s: &mut [f32], at: BlockRow, state: &mut RunningRow, out: &mut f32)
        for [Avx512 => "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma", Avx2 => "avx2,fma"]
    {
        let n = s.len();
        // The keys of the block the query sees, as indices into `s`.
        let lo = at.lo.clamp(at.k0, at.k0 + n) - at.k0;
        let hi = at.hi.clamp(at.k0, at.k0 + n) - at.k0;
        if lo >= hi {
            s.fill(0.0);
            *out = 1.0;
            return;
        }
        if at.slope != 0.0 {
            let q = at.q as f32;
            for (j, v) in s[lo..hi].iter_mut().enumerate() {
                let k = (at.k0 + lo + j) as f32;
                *v -= at.slope * (q - k).abs();
            }
        }
        let block_max = at.known_max(n).unwrap_or_else(|| lane_max(&s[lo..hi]));
        let new_max = state.max.max(block_max);
        let rescale = exp(state.max - new_max);
        let sum = exp_sum(&mut s[lo..hi], new_max);
        s[..lo].fill(0.0);
        s[hi..].fill(0.0);
        state.sum = state.sum * rescale + sum;
        state.max = new_max;
        *out = rescale;
    }
}

/// One query row of a block of scores `s` (against keys `at.k0..at.k0 + s.len()`): adds the
/// ALiBi bias, gives keys outside `at.lo..at.hi` weight 0, turns the scores into weights
/// `exp(s - max)` with `max` the row's running maximum after this block, updates `state`, and
/// returns the factor by which the row's accumulated weighted values must be multiplied
/// (1 when the block holds no visible key). Positions must stay below 2^24 (exact in f32).
pub fn softmax_block_row(s: &mut [f32], at: BlockRow, state: &mut RunningRow) -> f32 {
    let mut rescale = 1.0;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::level() == crate::cpu::Level::Avx512 {
        // SAFETY: level Avx512 means the CPU has avx512f, bw, dq and vl.
        unsafe { block_row_avx512(s, at, state, &mut rescale, None) };
        return rescale;
    }
    block_row(s, at, state, &mut rescale);
    rescale
}

/// As [`softmax_block_row`], and the weights rounded to bf16 (to nearest even, as
/// [`crate::quant::to_bf16`]) into `out`, whose values past `s.len()` are zeroed: a row of the
/// bf16 product with the block's values. Panics when `out` is shorter than `s`.
pub fn softmax_block_row_bf16(
    s: &mut [f32],
    at: BlockRow,
    state: &mut RunningRow,
    out: &mut [u16],
) -> f32 {
    assert!(
        out.len() >= s.len(),
        "softmax_block_row_bf16: {} outputs for {} weights",
        out.len(),
        s.len()
    );
    let mut rescale = 1.0;
    out[s.len()..].fill(0);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::level() == crate::cpu::Level::Avx512 {
        // SAFETY: level Avx512 means the CPU has avx512f, bw, dq and vl; `out` covers `s`.
        unsafe { block_row_avx512(s, at, state, &mut rescale, Some(out)) };
        return rescale;
    }
    block_row(s, at, state, &mut rescale);
    for (o, &v) in out.iter_mut().zip(s.iter()) {
        *o = crate::quant::to_bf16(v);
    }
    rescale
}

/// [`block_row`] in AVX-512: 16 keys a vector, four vectors a step, the tail masked, the same
/// arithmetic as the portable version's (`exp16_nonpositive` is [`exp`] on 16 lanes, with
/// FMAs) up to the order of the sum's terms; with `out16`, the weights also as bf16 bits.
///
/// # Safety
/// The CPU has avx512f, avx512bw, avx512dq and avx512vl; `out16`, when given, is at least as
/// long as `s`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn block_row_avx512(
    s: &mut [f32],
    at: BlockRow,
    state: &mut RunningRow,
    out: &mut f32,
    mut out16: Option<&mut [u16]>,
) {
    let n = s.len();
    let lo = at.lo.clamp(at.k0, at.k0 + n) - at.k0;
    let hi = at.hi.clamp(at.k0, at.k0 + n) - at.k0;
    if let Some(o) = out16.as_deref_mut() {
        assert!(o.len() >= n, "bf16 weights: {} outputs for {n}", o.len());
        o[..lo.min(hi)].fill(0);
        o[hi.max(lo)..n].fill(0);
    }
    if lo >= hi {
        s.fill(0.0);
        *out = 1.0;
        return;
    }
    let (head, rest) = s.split_at_mut(lo);
    let (row, tail) = rest.split_at_mut(hi - lo);
    head.fill(0.0);
    tail.fill(0.0);
    let first = (at.k0 + lo) as f32;
    let block_max = match at.known_max(n) {
        Some(m) => m,
        // SAFETY: the CPU has the features (this function's contract); `row` is the slice
        // given.
        None => unsafe { vector::max_pass(row, at, first) },
    };
    let new_max = state.max.max(block_max);
    let o16 = out16.map(|o| &mut o[lo..hi]);
    // SAFETY: as above; `o16`, when given, is as long as `row` (asserted above: `hi <= n`).
    let sum = unsafe { vector::exp_pass(row, new_max, o16) };
    let rescale = exp(state.max - new_max);
    state.sum = state.sum * rescale + sum;
    state.max = new_max;
    *out = rescale;
}

/// The two passes of [`block_row_avx512`] over a row's visible scores. Each takes four
/// vectors per step, each into its own accumulator: one chain of dependent max (or add)
/// instructions would wait on its own latency at every vector.
#[cfg(target_arch = "x86_64")]
mod vector {
    use std::arch::x86_64::*;

    use super::BlockRow;
    use crate::math::avx512::{exp16_nonpositive, lane_mask};

    /// ALiBi's bias added in place (when `at.slope` is not 0; `row[0]` is key `first`), and
    /// the row's maximum.
    ///
    /// # Safety
    /// The CPU has avx512f, avx512bw, avx512dq and avx512vl.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn max_pass(row: &mut [f32], at: BlockRow, first: f32) -> f32 {
        let (m, p) = (row.len(), row.as_mut_ptr());
        let iota = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let (q, slope) = (_mm512_set1_ps(at.q as f32), _mm512_set1_ps(at.slope));
        let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        for i in (0..m).step_by(64) {
            for (u, acc) in mx.iter_mut().enumerate() {
                let j = i + 16 * u;
                if j >= m {
                    break;
                }
                let mask = lane_mask(j, m);
                // SAFETY: the mask covers elements j..min(j + 16, m) of `row` only.
                unsafe {
                    let mut v = _mm512_maskz_loadu_ps(mask, p.add(j));
                    if at.slope != 0.0 {
                        let k = _mm512_add_ps(_mm512_set1_ps(first + j as f32), iota);
                        let dist = _mm512_abs_ps(_mm512_sub_ps(q, k));
                        v = _mm512_fnmadd_ps(slope, dist, v);
                        _mm512_mask_storeu_ps(p.add(j), mask, v);
                    }
                    *acc = _mm512_mask_max_ps(*acc, mask, *acc, v);
                }
            }
        }
        let mx = _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]));
        _mm512_reduce_max_ps(mx)
    }

    /// `row[j] = exp(row[j] - max)` (and, with `o16`, its bf16 bits rounded to nearest even
    /// into `o16[j]`); returns the sum of the weights. `max` is at least every score of the
    /// row, so `exp` sees values at most 0 (lanes past the row load `max` itself: 0).
    ///
    /// # Safety
    /// The CPU has avx512f, avx512bw, avx512dq and avx512vl; `o16`, when given, is at least
    /// as long as `row`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn exp_pass(row: &mut [f32], max: f32, o16: Option<&mut [u16]>) -> f32 {
        let (m, p) = (row.len(), row.as_mut_ptr());
        let o16 = o16.map(|o| {
            assert!(o.len() >= m, "bf16 weights: {} outputs for {m}", o.len());
            o.as_mut_ptr()
        });
        let nm = _mm512_set1_ps(max);
        let (c7fff, one) = (_mm512_set1_epi32(0x7fff), _mm512_set1_epi32(1));
        let mut sums = [_mm512_setzero_ps(); 4];
        for i in (0..m).step_by(64) {
            for (u, sum) in sums.iter_mut().enumerate() {
                let j = i + 16 * u;
                if j >= m {
                    break;
                }
                let mask = lane_mask(j, m);
                // SAFETY: the mask covers elements j..min(j + 16, m) of `row`, and of `o16`
                // (at least as long, asserted) only.
                unsafe {
                    let x = _mm512_mask_loadu_ps(nm, mask, p.add(j));
                    let e = exp16_nonpositive(_mm512_sub_ps(x, nm));
                    *sum = _mm512_mask_add_ps(*sum, mask, *sum, e);
                    _mm512_mask_storeu_ps(p.add(j), mask, e);
                    if let Some(o) = o16 {
                        // Round to nearest even: add 0x7fff plus the lowest kept bit, keep the
                        // top half (the weights are finite).
                        let b = _mm512_castps_si512(e);
                        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), one);
                        let r = _mm512_add_epi32(b, _mm512_add_epi32(c7fff, lsb));
                        let r = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(r));
                        _mm256_mask_storeu_epi16(o.add(j) as *mut i16, mask, r);
                    }
                }
            }
        }
        let sum = _mm512_add_ps(
            _mm512_add_ps(sums[0], sums[1]),
            _mm512_add_ps(sums[2], sums[3]),
        );
        _mm512_reduce_add_ps(sum)
    }
}

#[cfg(test)]
mod tests;
