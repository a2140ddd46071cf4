//! Memory-bounded multi-head self-attention over packed sequences (inference).
//!
//! The sentences of a batch are concatenated without padding (`offsets`, the
//! `cu_seqlens` of flash-attention: sequence `i` is rows `offsets[i]..offsets[i + 1]`) and
//! each token attends to the tokens of its own sequence only. Queries are taken in tiles of
//! [`QUERY_TILE`] rows and keys in tiles of [`KEY_TILE`]; a running (online) softmax keeps,
//! per query row, the largest score so far, the sum of exponentials and the weighted sum of
//! values, rescaling them when a larger score arrives (Milakov and Gimelshein, 2018; the
//! flash-attention recurrence). So a task never holds more than one
//! `QUERY_TILE x KEY_TILE` block of scores, whatever the sequence length: memory grows with
//! the tokens, not with their square.
//!
//! Position information comes in three forms: rotary embeddings, applied to the queries and
//! keys before this runs ([`super::rotary`]); ALiBi, a bias of `-slope * |i - j|` per head
//! (JinaBERT); and a sliding window, in which query `i` sees only keys with `|i - j| <=
//! window` of its own sequence (ModernBERT's local layers: `local_attention / 2`). Key
//! tiles wholly outside the window are skipped, so windowed layers cost linear time.
//!
//! Safe Rust: each parallel task owns the output rows of one query tile of one sequence (a
//! contiguous block of the output), and the inner loops are plain slices that the compiler
//! vectorises.

use rayon::prelude::*;

use kernels::math::exp;

/// Query rows per task.
pub const QUERY_TILE: usize = 64;
/// Keys per block of scores.
pub const KEY_TILE: usize = 64;

/// What the attention of one layer looks like.
#[derive(Debug, Clone, Default)]
pub struct AttentionSpec {
    pub heads: usize,
    pub head_dim: usize,
    /// Multiplies `q . k` (`1 / sqrt(head_dim)` for all three models).
    pub scale: f32,
    /// ALiBi slopes, one per head: `-slope * |i - j|` is added to the scaled score.
    pub alibi: Option<Vec<f32>>,
    /// Keys farther than this from the query (in its own sequence) are not attended.
    pub window: Option<usize>,
}

/// Buffers that do not fit the sequences or the heads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttentionError {
    #[error("attention: {values} values of q, k and v do not hold {tokens} tokens of {hidden}")]
    Qkv {
        values: usize,
        tokens: usize,
        hidden: usize,
    },
    #[error("attention: an output of {values} values for {tokens} tokens of {hidden}")]
    Output {
        values: usize,
        tokens: usize,
        hidden: usize,
    },
    #[error("attention: sequence offsets {0:?} do not start at 0 and grow")]
    Offsets(Vec<usize>),
    #[error("attention: {slopes} ALiBi slopes for {heads} heads")]
    Slopes { slopes: usize, heads: usize },
}

/// The attention context `ctx` (`[T, heads * head_dim]`) of packed `qkv` rows
/// (`[T, 3 * heads * head_dim]`, each row `q | k | v`, head `h` at columns
/// `h * head_dim..`), sequence `i` being rows `offsets[i]..offsets[i + 1]`.
pub fn attend_packed(
    qkv: &[f32],
    offsets: &[usize],
    spec: &AttentionSpec,
    ctx: &mut [f32],
) -> Result<(), AttentionError> {
    let hidden = spec.heads * spec.head_dim;
    let tokens = *offsets.last().unwrap_or(&0);
    if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[1] < w[0]) {
        return Err(AttentionError::Offsets(offsets.to_vec()));
    }
    if qkv.len() != tokens * 3 * hidden {
        return Err(AttentionError::Qkv {
            values: qkv.len(),
            tokens,
            hidden,
        });
    }
    if ctx.len() != tokens * hidden {
        return Err(AttentionError::Output {
            values: ctx.len(),
            tokens,
            hidden,
        });
    }
    if let Some(s) = &spec.alibi {
        if s.len() != spec.heads {
            return Err(AttentionError::Slopes {
                slopes: s.len(),
                heads: spec.heads,
            });
        }
    }
    // One task per (sequence, query tile), owning that tile's rows of `ctx`.
    let mut tasks: Vec<(Tile, &mut [f32])> = Vec::new();
    let mut rest = ctx;
    for w in offsets.windows(2) {
        let (start, len) = (w[0], w[1] - w[0]);
        for q0 in (0..len).step_by(QUERY_TILE) {
            let rows = QUERY_TILE.min(len - q0);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows * hidden);
            rest = tail;
            tasks.push((
                Tile {
                    start,
                    len,
                    q0,
                    rows,
                },
                mine,
            ));
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, (tile, out)| {
            for head in 0..spec.heads {
                attend_tile(qkv, spec, &tile, head, scratch, out);
            }
        });
    Ok(())
}

/// The query rows `q0..q0 + rows` of the sequence at row `start` of `len` tokens.
#[derive(Debug, Clone, Copy)]
struct Tile {
    start: usize,
    len: usize,
    q0: usize,
    rows: usize,
}

/// One task's working memory: a few tiles, whatever the sequence length.
#[derive(Default)]
struct Scratch {
    /// Scaled queries, `[rows, d]`.
    q: Vec<f32>,
    /// Keys transposed, `[d, KEY_TILE]`.
    kt: Vec<f32>,
    /// Scores, then probabilities, `[rows, KEY_TILE]`.
    s: Vec<f32>,
    /// Weighted sums of values, `[rows, d]`.
    o: Vec<f32>,
    /// Running maximum and sum of exponentials per row.
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// The keys query tile `tile` may see: all of its sequence, or those within the window.
fn key_range(tile: &Tile, window: Option<usize>) -> (usize, usize) {
    match window {
        Some(w) => (
            tile.q0.saturating_sub(w),
            (tile.q0 + tile.rows + w).min(tile.len),
        ),
        None => (0, tile.len),
    }
}

/// Attention of one head for one query tile, written into its columns of `out` (the
/// tile's rows of the context, `[rows, heads * d]`).
fn attend_tile(
    qkv: &[f32],
    spec: &AttentionSpec,
    tile: &Tile,
    head: usize,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    let d = spec.head_dim;
    let hidden = spec.heads * d;
    let ld = 3 * hidden;
    let rows = tile.rows;
    sc.q.clear();
    for i in 0..rows {
        let r = (tile.start + tile.q0 + i) * ld + head * d;
        sc.q.extend(qkv[r..r + d].iter().map(|v| v * spec.scale));
    }
    sc.o.clear();
    sc.o.resize(rows * d, 0.0);
    sc.max.clear();
    sc.max.resize(rows, f32::NEG_INFINITY);
    sc.sum.clear();
    sc.sum.resize(rows, 0.0);
    let slope = spec.alibi.as_ref().map(|s| s[head]);
    let (lo, hi) = key_range(tile, spec.window);
    let mut k0 = lo;
    while k0 < hi {
        let nk = KEY_TILE.min(hi - k0);
        scores(qkv, spec, tile, head, k0, nk, sc);
        for i in 0..rows {
            let qi = tile.q0 + i;
            let s = &mut sc.s[i * KEY_TILE..i * KEY_TILE + nk];
            if spec.window.is_some() || slope.is_some() {
                for (j, v) in s.iter_mut().enumerate() {
                    let dist = qi.abs_diff(k0 + j);
                    if spec.window.is_some_and(|w| dist > w) {
                        *v = f32::NEG_INFINITY;
                    } else if let Some(slope) = slope {
                        *v += -slope * dist as f32;
                    }
                }
            }
            let block_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if block_max == f32::NEG_INFINITY {
                // Every key of this block is outside the window: nothing to add.
                s.fill(0.0);
                continue;
            }
            let new_max = sc.max[i].max(block_max);
            let rescale = (sc.max[i] - new_max).exp();
            sc.max[i] = new_max;
            let mut sum = 0.0;
            for v in s.iter_mut() {
                // Keys outside the window weigh exactly 0 (`exp` clamps its argument).
                *v = match *v == f32::NEG_INFINITY {
                    true => 0.0,
                    false => exp(*v - new_max),
                };
                sum += *v;
            }
            sc.sum[i] = sc.sum[i] * rescale + sum;
            if rescale != 1.0 {
                sc.o[i * d..(i + 1) * d]
                    .iter_mut()
                    .for_each(|o| *o *= rescale);
            }
        }
        accumulate_values(qkv, spec, tile, head, k0, nk, sc);
        k0 += nk;
    }
    for i in 0..rows {
        // Every query sees at least itself, so the sum is positive.
        let inv = 1.0 / sc.sum[i];
        let dst = &mut out[i * hidden + head * d..i * hidden + (head + 1) * d];
        for (o, v) in dst.iter_mut().zip(&sc.o[i * d..(i + 1) * d]) {
            *o = v * inv;
        }
    }
}

/// `sc.s[i, j] = q_i . k_{k0 + j}` for the tile's rows and `nk` keys.
fn scores(
    qkv: &[f32],
    spec: &AttentionSpec,
    tile: &Tile,
    head: usize,
    k0: usize,
    nk: usize,
    sc: &mut Scratch,
) {
    let d = spec.head_dim;
    let hidden = spec.heads * d;
    let ld = 3 * hidden;
    sc.kt.clear();
    sc.kt.resize(d * KEY_TILE, 0.0);
    for j in 0..nk {
        let r = (tile.start + k0 + j) * ld + hidden + head * d;
        for (c, &k) in qkv[r..r + d].iter().enumerate() {
            sc.kt[c * KEY_TILE + j] = k;
        }
    }
    sc.s.clear();
    sc.s.resize(tile.rows * KEY_TILE, 0.0);
    for (q, s) in sc.q.chunks_exact(d).zip(sc.s.chunks_exact_mut(KEY_TILE)) {
        for (&qc, kt) in q.iter().zip(sc.kt.chunks_exact(KEY_TILE)) {
            for (sj, &kj) in s.iter_mut().zip(kt) {
                *sj += qc * kj;
            }
        }
    }
}

/// `sc.o[i] += sum_j p[i, j] v_{k0 + j}`.
fn accumulate_values(
    qkv: &[f32],
    spec: &AttentionSpec,
    tile: &Tile,
    head: usize,
    k0: usize,
    nk: usize,
    sc: &mut Scratch,
) {
    let d = spec.head_dim;
    let hidden = spec.heads * d;
    let ld = 3 * hidden;
    for (p, o) in sc.s.chunks_exact(KEY_TILE).zip(sc.o.chunks_exact_mut(d)) {
        for (j, &pj) in p[..nk].iter().enumerate() {
            if pj == 0.0 {
                continue;
            }
            let r = (tile.start + k0 + j) * ld + 2 * hidden + head * d;
            for (oc, &vc) in o.iter_mut().zip(&qkv[r..r + d]) {
                *oc += pj * vc;
            }
        }
    }
}

/// ALiBi slopes of `heads` heads, as JinaBERT (and the ALiBi paper) define them: the
/// geometric sequence `2^(-8/n), 2^(-16/n), ...` for the power of two `n` at or below
/// `heads`, then every other slope of the sequence for `2n` for the heads beyond it.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    fn power_of_2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if heads == 0 {
        return Vec::new();
    }
    let closest = 1usize << heads.ilog2();
    let mut slopes = power_of_2(closest);
    if closest < heads {
        let extra = power_of_2(2 * closest);
        slopes.extend(extra.iter().step_by(2).take(heads - closest));
    }
    slopes.into_iter().map(|s| s as f32).collect()
}

#[cfg(test)]
mod tests;
