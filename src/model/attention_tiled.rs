//! Memory-bounded multi-head self-attention over packed sequences (inference).
//!
//! The sentences of a batch are concatenated without padding (`offsets`, the `cu_seqlens` of
//! flash-attention: sequence `i` is rows `offsets[i]..offsets[i + 1]`) and each token attends
//! to the tokens of its own sequence only. Queries are taken in tiles of [`QUERY_TILE`] rows
//! and keys in blocks of [`F32_KEY_TILE`] (f32) or [`KEY_TILE`] (bf16); a running (online)
//! softmax keeps, per query row, the largest score so far, the sum of exponentials and the
//! weighted sum of values, rescaling them when a larger score arrives (Milakov and
//! Gimelshein, 2018; the flash-attention recurrence). So a task never holds more than one
//! `QUERY_TILE x F32_KEY_TILE` block of scores, whatever the sequence length: memory grows with
//! the tokens, not with their square.
//!
//! Position information comes in three forms: rotary embeddings, applied to the queries and
//! keys before this runs ([`super::rotary`]); ALiBi, a bias of `-slope * |i - j|` per head
//! (JinaBERT); and a sliding window, in which query `i` sees only keys with `|i - j| <=
//! window` of its own sequence (ModernBERT's local layers: `local_attention / 2`). Key
//! tiles wholly outside the window are skipped, so windowed layers cost linear time.
//!
//! Each parallel task owns the output rows of one query tile of one sequence (a contiguous
//! block of the output); the heads run in turn, each over all tiles in parallel, so that the
//! tasks running at once share one head's keys and values in cache. Per block of keys, the
//! scores and the weighted values are two products (`kernels::attention_blocks`: AVX-512
//! register tiles on the head's queries (copied compact), keys and values, else `gemm`; in
//! bf16 the dense layers' kernels, see `bf16.rs`), and the running softmax is the kernel
//! crate's vectorised row kernel ([`math::softmax_block_row`]). A row's result depends only
//! on its own sequence (the blocks start at the sequence's first key), so it does not change
//! with the batch.

use rayon::prelude::*;

use kernels::attention_blocks::{self as blocks, HeadKv};
use kernels::math::{self, BlockRow, RunningRow};
use kernels::quant::{AlignedVec, Bf16Kernel};

mod bf16;

/// Query rows per task.
pub const QUERY_TILE: usize = 128;
/// Keys per block of scores (bf16, whose key and value blocks are packed to it).
pub const KEY_TILE: usize = 256;
/// Keys per block of scores in f32: longer rows spread each row's fixed cost (its two
/// reductions and the rescale) over more keys. 512 ran 1-9% faster than 256 in one process
/// taking turns, the attention alone on the nomic shape (2,048 to 8,192 tokens; BENCHMARKS.md,
/// "Long-context encoders").
pub const F32_KEY_TILE: usize = 512;

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
    /// Both products of each block in bf16 on this kernel (f32 sums; the softmax stays f32),
    /// as `--dtype bf16` runs them; `None`: f32 products.
    pub bf16: Option<Bf16Kernel>,
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
    #[error("attention: this CPU lacks the {0} kernel")]
    Kernel(&'static str),
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
    if let Some(k) = spec.bf16.filter(|k| !k.supported()) {
        return Err(AttentionError::Kernel(k.name()));
    }
    // bf16: each (sequence, head)'s keys and values packed once, in blocks of KEY_TILE.
    // f32: each (sequence, head)'s keys transposed and values compact, once.
    let (packs, kvs) = match spec.bf16 {
        Some(_) => (bf16::pack(qkv, offsets, spec), Vec::new()),
        None => (Vec::new(), head_kvs(qkv, offsets, spec)),
    };
    let mut tasks = tiles(offsets, hidden, ctx);
    let run = |scratch: &mut Scratch, tile: &Tile, head: usize, out: &mut [f32]| {
        let i = tile.seq * spec.heads + head;
        let products = match spec.bf16 {
            Some(kernel) => Products::Bf16 {
                kernel,
                blocks: &packs[i],
            },
            None => Products::F32 { kv: &kvs[i] },
        };
        attend_tile(qkv, spec, tile, head, products, scratch, out);
    };
    // Heads in turn, each over every tile in parallel: the tasks running at once read the same
    // head's keys and values (4 MB at 8,192 tokens), which then stay in L3, where running each
    // tile's heads in turn cycled through all heads' (48 MB) and fetched them again for every
    // tile.
    for head in 0..spec.heads {
        tasks
            .par_iter_mut()
            .for_each_init(Scratch::default, |scratch, (tile, out)| {
                run(scratch, tile, head, out)
            });
    }
    Ok(())
}

/// One task per (sequence, query tile), owning that tile's rows of `ctx` (`hidden` values
/// a row).
fn tiles<'a>(offsets: &[usize], hidden: usize, ctx: &'a mut [f32]) -> Vec<(Tile, &'a mut [f32])> {
    let mut tasks = Vec::new();
    let mut rest = ctx;
    for (seq, w) in offsets.windows(2).enumerate() {
        let (start, len) = (w[0], w[1] - w[0]);
        for q0 in (0..len).step_by(QUERY_TILE) {
            let rows = QUERY_TILE.min(len - q0);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows * hidden);
            rest = tail;
            let tile = Tile {
                seq,
                start,
                len,
                q0,
                rows,
            };
            tasks.push((tile, mine));
        }
    }
    tasks
}

/// Every (sequence, head)'s keys and values for the f32 products, indexed
/// `sequence * heads + head`.
fn head_kvs(qkv: &[f32], offsets: &[usize], spec: &AttentionSpec) -> Vec<HeadKv> {
    let (heads, d) = (spec.heads, spec.head_dim);
    let hidden = heads * d;
    let ld = 3 * hidden;
    let jobs: Vec<(usize, usize, usize)> = offsets
        .windows(2)
        .flat_map(|w| (0..heads).map(move |h| (w[0], w[1] - w[0], h)))
        .collect();
    jobs.into_par_iter()
        .map(|(start, len, head)| {
            let at = |part: usize| start * ld + part * hidden + head * d;
            // An empty sequence (equal offsets) starts past the end: no keys.
            let part = |p: usize| qkv.get(at(p)..).unwrap_or_default();
            let (k, v) = (part(1), part(2));
            HeadKv::new((k, ld), (v, ld), len, d)
        })
        .collect()
}

/// How the two products of a block are computed.
#[derive(Clone, Copy)]
enum Products<'a> {
    /// f32, against the (sequence, head)'s keys and values laid out once.
    F32 { kv: &'a HeadKv },
    /// bf16 on `kernel`, against the (sequence, head)'s packed key and value blocks.
    Bf16 {
        kernel: Bf16Kernel,
        blocks: &'a [bf16::Block],
    },
}

/// The query rows `q0..q0 + rows` of the sequence at row `start` of `len` tokens.
#[derive(Debug, Clone, Copy)]
struct Tile {
    /// Index of the sequence in the batch.
    seq: usize,
    start: usize,
    len: usize,
    q0: usize,
    rows: usize,
}

/// One task's working memory: a few tiles, whatever the sequence length.
#[derive(Default)]
struct Scratch {
    /// Scores, then weights, `[rows, keys per block]`.
    s: Vec<f32>,
    /// Weighted sums of values, `[rows, d]`.
    o: Vec<f32>,
    /// Each row's running maximum and sum.
    rows: Vec<RunningRow>,
    /// Each row's rescale factor for the current block.
    rescale: Vec<f32>,
    /// f32: each row's largest score in the current block, when the scores' product gives
    /// them.
    maxes: Vec<f32>,
    /// f32: the tile's queries of the current head, compact (`[rows, d]`).
    q: Vec<f32>,
    /// bf16: the tile's queries, and a block's weights, as kernel rows.
    q16: AlignedVec<u16>,
    p16: AlignedVec<u16>,
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
/// tile's rows of the context, `[rows, heads * d]`). Per block of keys: the scores
/// `scale * Q K^T` as one product, the running softmax row by row
/// ([`math::softmax_block_row`], with ALiBi and the window), then `O = O * rescale + P V` as
/// one product. In f32 the head's queries are copied compact once (`sc.q`) and the keys and
/// values are the layer's [`HeadKv`] (keys transposed, values compact), in blocks of
/// [`F32_KEY_TILE`]; in bf16 the blocks are those of the packing ([`bf16::pack`], aligned to
/// `KEY_TILE`).
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    qkv: &[f32],
    spec: &AttentionSpec,
    tile: &Tile,
    head: usize,
    products: Products,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    let d = spec.head_dim;
    let hidden = spec.heads * d;
    let ld = 3 * hidden;
    let rows = tile.rows;
    let at = |row: usize, part: usize| (tile.start + row) * ld + part * hidden + head * d;
    sc.o.clear();
    sc.o.resize(rows * d, 0.0);
    sc.rows.clear();
    sc.rows.resize(rows, RunningRow::default());
    sc.rescale.resize(rows, 1.0);
    sc.maxes.resize(rows, f32::NEG_INFINITY);
    // Keys per block, and the stride of the block's scores in `sc.s`.
    let kt = match products {
        Products::F32 { .. } => F32_KEY_TILE,
        Products::Bf16 { .. } => KEY_TILE,
    };
    sc.s.resize(rows * kt, 0.0);
    let (lo, hi) = key_range(tile, spec.window);
    let mut k0 = match products {
        // A multiple of the key panels' 16 (keys before `lo` weigh 0 in the softmax).
        Products::F32 { .. } => {
            sc.q.clear();
            for i in 0..rows {
                sc.q.extend_from_slice(&qkv[at(tile.q0 + i, 0)..][..d]);
            }
            lo / blocks::PANEL * blocks::PANEL
        }
        Products::Bf16 { .. } => {
            bf16::queries(qkv, at(tile.q0, 0), ld, rows, d, &mut sc.q16);
            lo / KEY_TILE * KEY_TILE
        }
    };
    while k0 < hi {
        let nk = match products {
            Products::F32 { .. } => kt.min(hi - k0),
            Products::Bf16 { .. } => KEY_TILE.min(tile.len - k0),
        };
        // Whether `sc.maxes` holds the block's row maxima.
        let maxes = match products {
            Products::F32 { kv } => {
                let (q, s) = ((&sc.q[..], d), (&mut sc.s[..], kt));
                blocks::scores(q, kv, (k0, nk), rows, spec.scale, s, &mut sc.maxes)
            }
            Products::Bf16 { kernel, blocks } => {
                let keys = &blocks[k0 / KEY_TILE].keys;
                let s = &mut sc.s;
                bf16::product(kernel, &sc.q16, rows, keys, spec.scale, false, s, KEY_TILE);
                false
            }
        };
        // bf16: the padded width of the weights' rows.
        let kp = nk.next_multiple_of(2);
        softmax_block(spec, tile, head, (k0, nk, kp, kt), (products, maxes), sc);
        match products {
            Products::F32 { kv } => {
                let p = (&sc.s[..], kt);
                blocks::weighted_values(p, kv, (k0, nk), rows, (&mut sc.o[..], d));
            }
            Products::Bf16 { kernel, blocks } => {
                let values = &blocks[k0 / KEY_TILE].values;
                debug_assert_eq!(values.kp, kp);
                bf16::product(kernel, &sc.p16, rows, values, 1.0, true, &mut sc.o, d);
            }
        }
        k0 += nk;
    }
    normalise_into(sc, rows, d, hidden, head, out);
}

/// The tile's rows of the context: the running sums `sc.o` divided by each row's softmax sum,
/// into head `head`'s columns of `out`.
fn normalise_into(
    sc: &Scratch,
    rows: usize,
    d: usize,
    hidden: usize,
    head: usize,
    out: &mut [f32],
) {
    for i in 0..rows {
        // Every query sees at least itself, so the sum is positive.
        let inv = 1.0 / sc.rows[i].sum;
        let dst = &mut out[i * hidden + head * d..i * hidden + (head + 1) * d];
        for (o, v) in dst.iter_mut().zip(&sc.o[i * d..(i + 1) * d]) {
            *o = v * inv;
        }
    }
}

/// The running softmax of every row of a block's scores (`sc.s`, keys `k0..k0 + nk`), with
/// ALiBi and the window; the rows' accumulated values rescaled. `maxes`: `sc.maxes` holds
/// the block's row maxima. bf16: the weights also as bf16 rows of `kp` values in `sc.p16`.
fn softmax_block(
    spec: &AttentionSpec,
    tile: &Tile,
    head: usize,
    (k0, nk, kp, kt): (usize, usize, usize, usize),
    (products, maxes): (Products, bool),
    sc: &mut Scratch,
) {
    let slope = spec.alibi.as_ref().map_or(0.0, |s| s[head]);
    if let Products::Bf16 { .. } = products {
        sc.p16.resize(tile.rows * kp);
    }
    for i in 0..tile.rows {
        let qi = tile.q0 + i;
        let (lo, hi) = match spec.window {
            Some(w) => (qi.saturating_sub(w), (qi + w + 1).min(tile.len)),
            None => (0, tile.len),
        };
        let block = BlockRow {
            q: qi,
            k0,
            lo,
            hi,
            slope,
            max: maxes.then(|| sc.maxes[i]),
        };
        let row = &mut sc.s[i * kt..i * kt + nk];
        sc.rescale[i] = match products {
            Products::F32 { .. } => math::softmax_block_row(row, block, &mut sc.rows[i]),
            // The weights straight into the bf16 rows of the values' product.
            Products::Bf16 { .. } => {
                let out = &mut sc.p16[i * kp..(i + 1) * kp];
                math::softmax_block_row_bf16(row, block, &mut sc.rows[i], out)
            }
        };
    }
    let d = spec.head_dim;
    for (o, &r) in sc.o.chunks_exact_mut(d).zip(&sc.rescale) {
        if r != 1.0 {
            o.iter_mut().for_each(|v| *v *= r);
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
