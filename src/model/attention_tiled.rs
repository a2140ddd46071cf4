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

use super::kernels::exp;

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
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Plain attention in f64 with the full score matrix of each (sequence, head).
    fn reference(qkv: &[f32], offsets: &[usize], spec: &AttentionSpec) -> Vec<f32> {
        let (hh, d) = (spec.heads, spec.head_dim);
        let hidden = hh * d;
        let ld = 3 * hidden;
        let t = *offsets.last().unwrap();
        let mut ctx = vec![0f32; t * hidden];
        for w in offsets.windows(2) {
            let (a, m) = (w[0], w[1] - w[0]);
            for h in 0..hh {
                for i in 0..m {
                    let q = &qkv[(a + i) * ld + h * d..][..d];
                    let mut s = vec![f64::NEG_INFINITY; m];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let dist = i.abs_diff(j);
                        if spec.window.is_some_and(|win| dist > win) {
                            continue;
                        }
                        let k = &qkv[(a + j) * ld + hidden + h * d..][..d];
                        let dot: f64 = q.iter().zip(k).map(|(x, y)| *x as f64 * *y as f64).sum();
                        *sj = dot * spec.scale as f64;
                        if let Some(sl) = &spec.alibi {
                            *sj -= sl[h] as f64 * dist as f64;
                        }
                    }
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                    let z: f64 = p.iter().sum();
                    for c in 0..d {
                        let o: f64 = (0..m)
                            .map(|j| p[j] * qkv[(a + j) * ld + 2 * hidden + h * d + c] as f64)
                            .sum();
                        ctx[(a + i) * hidden + h * d + c] = (o / z) as f32;
                    }
                }
            }
        }
        ctx
    }

    fn random_qkv(lengths: &[usize], hidden: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut offsets = vec![0];
        for l in lengths {
            offsets.push(offsets.last().unwrap() + l);
        }
        let t = *offsets.last().unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let qkv = (0..t * 3 * hidden)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        (qkv, offsets)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Lengths 1 to 4,096 in one packed batch (tile edges included), plain, with ALiBi,
    /// with a window, and with both: equal to the full-matrix attention within 1e-5.
    #[test]
    fn tiled_matches_plain_attention() {
        let lengths = [1, 2, 5, 63, 64, 65, 129, 130, 700, 1025, 4096];
        let (heads, d) = (2, 16);
        let (qkv, offsets) = random_qkv(&lengths, heads * d, 1);
        let base = AttentionSpec {
            heads,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            ..Default::default()
        };
        let specs = [
            ("plain", base.clone()),
            (
                "alibi",
                AttentionSpec {
                    alibi: Some(alibi_slopes(heads)),
                    ..base.clone()
                },
            ),
            (
                "window 64",
                AttentionSpec {
                    window: Some(64),
                    ..base.clone()
                },
            ),
            (
                "window 3 + alibi",
                AttentionSpec {
                    window: Some(3),
                    alibi: Some(vec![0.5, 0.01]),
                    ..base.clone()
                },
            ),
        ];
        for (what, spec) in specs {
            let mut ctx = vec![f32::NAN; qkv.len() / 3];
            attend_packed(&qkv, &offsets, &spec, &mut ctx).unwrap();
            let want = reference(&qkv, &offsets, &spec);
            let diff = max_diff(&ctx, &want);
            eprintln!("tiled attention, {what}: max abs diff {diff:.2e}");
            assert!(diff <= 1e-5, "{what}: max abs diff {diff}");
        }
    }

    #[test]
    fn a_window_sees_only_near_keys_of_its_own_sequence() {
        // Values are one-hot by token: the context says which keys were attended.
        let (heads, d) = (1, 16);
        let lengths = [10, 6];
        let t: usize = lengths.iter().sum();
        let mut qkv = vec![0f32; t * 3 * d];
        for r in 0..t {
            qkv[r * 3 * d + 2 * d + r] = 1.0; // v_r = e_r; q = k = 0: uniform weights
        }
        let spec = AttentionSpec {
            heads,
            head_dim: d,
            scale: 1.0,
            window: Some(2),
            ..Default::default()
        };
        let mut ctx = vec![0f32; t * d];
        attend_packed(&qkv, &[0, 10, 16], &spec, &mut ctx).unwrap();
        let row = |r: usize| &ctx[r * d..(r + 1) * d];
        // Token 0 sees 0, 1, 2; token 5 sees 3..=7; token 10 (first of the second sequence)
        // sees 10, 11, 12 and nothing of the first sequence.
        assert_eq!(row(0)[..4], [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
        assert!(row(5)[3..8].iter().all(|&v| (v - 0.2).abs() < 1e-7));
        assert_eq!(row(5)[2] + row(5)[8], 0.0);
        assert!(row(10)[..10].iter().all(|&v| v == 0.0));
        assert!((row(10)[10] - 1.0 / 3.0).abs() < 1e-7);
    }

    #[test]
    fn slopes_follow_the_alibi_recipe() {
        assert_eq!(alibi_slopes(4), vec![0.25, 0.0625, 0.015625, 0.00390625]);
        // 12 heads: the 8 of 2^(-k) then every other of the 16-head sequence.
        let s = alibi_slopes(12);
        assert_eq!(s.len(), 12);
        assert_eq!(s[0], 0.5);
        assert_eq!(s[7], 2f32.powi(-8));
        assert!((s[8] - 2f32.powf(-0.5)).abs() < 1e-7 && (s[11] - 2f32.powf(-3.5)).abs() < 1e-7);
    }

    #[test]
    fn bad_buffers_are_errors() {
        let spec = AttentionSpec {
            heads: 2,
            head_dim: 4,
            scale: 1.0,
            ..Default::default()
        };
        let mut ctx = vec![0f32; 16];
        let e = attend_packed(&[0.0; 10], &[0, 2], &spec, &mut ctx).unwrap_err();
        assert!(matches!(e, AttentionError::Qkv { .. }), "{e}");
        let e = attend_packed(&[0.0; 48], &[1, 2], &spec, &mut ctx).unwrap_err();
        assert!(matches!(e, AttentionError::Offsets(_)), "{e}");
        let spec = AttentionSpec {
            alibi: Some(vec![1.0]),
            ..spec
        };
        let e = attend_packed(&[0.0; 48], &[0, 2], &spec, &mut ctx).unwrap_err();
        assert!(matches!(e, AttentionError::Slopes { .. }), "{e}");
    }
}
