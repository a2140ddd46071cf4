//! The inference fast path: the whole encoder on packed tokens, with reused buffers.
//!
//! The sentences of a batch are concatenated without padding (`offsets` marks where each
//! starts), so no work is spent on padding and a sentence's result does not depend on its
//! batch, bit for bit (the gemm crate's products give a row the same bits for any row count
//! but one, whose matrix-vector path [`product`] avoids; on the checkpoint's layout, layers
//! of tiny test models, with `out x rows` at most 256, are the exception: see [`product`]).
//! Dense layers are `gemm` products over all tokens (the FFN over chunks of rows, which
//! bounds its intermediate; a few rows' product as column tasks), with the bias, when the
//! layer has one, preloaded into the output; attention runs per (sentence, head) in
//! parallel, reading Q, K and V in place from the fused projection buffer; GELU, softmax and
//! LayerNorm are the vectorised kernels of the kernel crate (`kernels::math`). Buffers live
//! in a [`Workspace`] that grows with the batches and is reused, so a run allocates almost
//! nothing per batch. [`BertEncoder::forward_packed`] reads the weights in place from the
//! candle tensors (the multitask model, whose encoder may train, runs it); [`FastEncoder`]
//! (`fast/quantized.rs`), task 1's and the server's encoder, converts them at load: float32
//! transposed (`fast/dense_f32.rs`), int8 or bf16.
//! The training path (candle ops with a backward pass) is in [`super::bert`].

use std::borrow::Cow;

use candle_core::{bail, CpuStorage, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::HiddenAct;
use rayon::prelude::*;

use super::bert::{BertConfig, BertEmbeddings, BertEncoder, BertLayer, LayerNorm, Linear};
use kernels::attention::{attend_head, for_each_head, head_views, HeadSplit};
use kernels::math;
use kernels::matmul::{matmul, matmul_column_tasks, parallelism, MatMut, MatRef, Parallelism};

use super::mpnet::{self, RelativeBias};
use super::pooling::Pooling;
use super::quant;
use crate::tokenize::Encoded;

mod dense_f32;
mod in_flight;
mod quantized;
#[cfg(test)]
mod tests;
pub use in_flight::{map_batches, WorkspacePool};
pub use quantized::{FastEncoder, LongEncoder};

/// Buffers of the fast path, reused across layers and batches.
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    tmp: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    inter: Vec<f32>,
    /// Quantized activations of the int8 and bf16 layers.
    quant: quant::Scratch,
}

/// At least `n` values in `v`; its contents are scratch. A buffer that must grow is freed
/// before its successor is allocated (nothing is copied), with half as much again of room,
/// so that the growing batches of a length-sorted run reallocate only now and then.
fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() >= n {
        return;
    }
    if v.capacity() < n {
        let room = n.max(v.capacity() + v.capacity() / 2);
        *v = Vec::new();
        v.reserve_exact(room);
    }
    v.resize(n, 0.0);
}

/// Runs `f` on the f32 data of a contiguous CPU tensor, without copying it.
fn view<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        bail!("fast path: expected an f32 CPU tensor")
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        bail!("fast path: expected a contiguous tensor")
    };
    Ok(f(&data[a..b]))
}

/// `dst[r, col .. col + out] = x[r, ..] W^T + b` for `rows` rows; `dst` has row stride `ld`.
/// `W` is read in place from the candle tensor (`[out, in]`); the inference encoders keep
/// theirs transposed instead ([`dense_f32::F32Linear`]), which gives the same bits faster.
fn linear(
    x: &[f32],
    rows: usize,
    lin: &Linear,
    dst: &mut [f32],
    ld: usize,
    col: usize,
) -> Result<()> {
    let (out, in_dim) = lin.weight.dims2()?;
    view(&lin.weight, |w| {
        view(&lin.bias, |b| {
            let rhs = MatRef::transposed(w, in_dim, out, in_dim);
            product(x, rows, rhs, b, dst, ld, col)
        })
    })??
}

/// Products of at most this many rows run as [`matmul_column_tasks`].
const COLUMN_TASK_ROWS: usize = 256;

/// `dst[r, col .. col + out] = x[r, ..] rhs + bias` for `rows` rows, `rhs` the `[in, out]`
/// view of a dense layer's weights, in the checkpoint's layout (`[out, in]` storage) or
/// transposed (`[in, out]`). The two give the same bits wherever `out x rows` is above 256
/// (every layer of a real model, two rows or more): below that, the gemm crate sums the
/// checkpoint layout with other kernels. On the transposed layout a product of a few rows
/// runs as [`matmul_column_tasks`].
fn product(
    x: &[f32],
    rows: usize,
    rhs: MatRef<'_>,
    bias: &[f32],
    dst: &mut [f32],
    ld: usize,
    col: usize,
) -> Result<()> {
    let (in_dim, out) = rhs.shape();
    if x.len() < rows * in_dim || dst.len() < rows * ld || col + out > ld || bias.len() != out {
        bail!("fast path: linear layer buffer sizes do not match");
    }
    if rows == 1 {
        // The gemm crate takes its matrix-vector path for one row, whose sums round
        // otherwise than its matrix kernels: the row goes twice through a 2-row product, so
        // that it gets the bits it has in any other batch.
        let (x2, mut d2) = (x[..in_dim].repeat(2), vec![0f32; 2 * out]);
        product(&x2, 2, rhs, bias, &mut d2, out, 0)?;
        dst[col..col + out].copy_from_slice(&d2[..out]);
        return Ok(());
    }
    // A layer without bias (ModernBERT's and NomicBERT's, JinaBERT's gated layer) writes its
    // products without a pass that fills the rows with zeros and without reading them back:
    // the sums are the same (0 + s = s), but for the sign of an exact zero.
    let with_bias = bias.iter().any(|&b| b != 0.0);
    if with_bias {
        for r in 0..rows {
            dst[r * ld + col..r * ld + col + out].copy_from_slice(bias);
        }
    }
    let mut out_view = MatMut::rows(&mut dst[col..], rows, out, ld);
    let lhs = MatRef::rows(x, rows, in_dim, in_dim);
    let par = parallelism(rows * out * in_dim);
    if let (true, Parallelism::Rayon(threads)) = (rows <= COLUMN_TASK_ROWS, par) {
        // A few sentences' tokens: blocks of columns as rayon tasks, two per thread, so that
        // a thread held up elsewhere does not hold up the product (the server's one-request
        // batches). On the checkpoint layout this is the plain product.
        matmul_column_tasks(&mut out_view, with_bias, lhs, rhs, 1.0, 2 * threads);
    } else {
        matmul(&mut out_view, with_bias, lhs, rhs, 1.0, par);
    }
    Ok(())
}

/// MPNet's relative position bias table `[buckets, heads]` as values, with the buckets of
/// the distances in sequences of up to `longest` tokens.
struct BiasTable {
    table: Vec<f32>,
    buckets: Vec<u32>,
}

impl BiasTable {
    fn new(bias: Option<&RelativeBias>, offsets: &[usize]) -> Result<Option<Self>> {
        let Some(bias) = bias else { return Ok(None) };
        let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Ok(Some(Self {
            table: bias.table.flatten_all()?.to_vec1::<f32>()?,
            buckets: mpnet::distance_buckets(longest),
        }))
    }
}

/// Self-attention over packed sequences: `ctx[t, h*d..]` from `qkv` `[T, 3H]`, plus MPNet's
/// relative position bias when given.
fn attention(
    qkv: &[f32],
    ctx: &mut [f32],
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    bias: Option<&BiasTable>,
) -> Result<()> {
    let hidden = heads * head_dim;
    let ld = 3 * hidden;
    // The kernel below relies on these: every sequence's rows inside both buffers.
    let t = *offsets.last().unwrap_or(&0);
    if offsets.first() != Some(&0)
        || offsets.windows(2).any(|w| w[1] < w[0])
        || qkv.len() < t * ld
        || ctx.len() < t * hidden
    {
        bail!(
            "fast path: attention buffers ({} and {} values) do not hold {t} tokens of {hidden}",
            qkv.len(),
            ctx.len()
        );
    }
    if let Some(b) = bias {
        if b.table.len() < mpnet::BUCKETS * heads {
            bail!(
                "fast path: a relative bias table of {} values",
                b.table.len()
            );
        }
    }
    let lengths: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let split = HeadSplit {
        ld: hidden,
        starts: &offsets[..offsets.len() - 1],
        lengths: &lengths,
        heads,
        width: head_dim,
        groups: &[0],
    };
    let ctx = &mut ctx[..t * hidden];
    let init = || (Vec::new(), Vec::new());
    for_each_head(
        ctx,
        split,
        init,
        |(probs, rel): &mut (Vec<f32>, Vec<f32>), task| {
            let (h, m) = (task.head, task.len);
            if let Some(b) = bias {
                mpnet::head_bias(&b.table, heads, h, &b.buckets, m, rel);
            }
            let [q, k, v] = head_views(qkv, ld, (task.start, m), h * head_dim, head_dim, hidden);
            let rel = bias.map(|_| &rel[..]);
            attend_head(q, k, v, &mut task.block(0), probs, rel, None);
        },
    );
    Ok(())
}

/// Rows of `width` values, `x[r] = LayerNorm(x[r] + residual[r])` (residual optional).
fn layer_norm_rows(
    x: &mut [f32],
    residual: Option<&[f32]>,
    ln: &LayerNorm,
    width: usize,
) -> Result<()> {
    let eps = ln.eps() as f32;
    view(&ln.weight, |w| {
        view(&ln.bias, |b| {
            const ROWS: usize = 16;
            match residual {
                Some(res) => x
                    .par_chunks_mut(width * ROWS)
                    .zip(res.par_chunks(width * ROWS))
                    .for_each(|(xs, rs)| {
                        for (row, r) in xs.chunks_mut(width).zip(rs.chunks(width)) {
                            math::add_layer_norm_inplace(row, r, w, b, eps);
                        }
                    }),
                None => x.par_chunks_mut(width * ROWS).for_each(|xs| {
                    for row in xs.chunks_mut(width) {
                        math::layer_norm_inplace(row, w, b, eps);
                    }
                }),
            }
        })
    })?
}

fn activation(x: &mut [f32], act: HiddenAct) {
    match act {
        HiddenAct::Gelu => x.par_chunks_mut(1 << 14).for_each(math::gelu_inplace),
        HiddenAct::GeluApproximate => x.par_chunks_mut(1 << 14).for_each(|c| {
            for v in c {
                let y = 0.797_884_6 * (*v + 0.044_715 * *v * *v * *v);
                *v = 0.5 * *v * (1.0 + y.tanh());
            }
        }),
        HiddenAct::Relu => x
            .par_chunks_mut(1 << 14)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0))),
    }
}

/// Token offsets of packed sequences: sequence `i` is rows `offsets[i]..offsets[i + 1]`.
pub fn offsets(seqs: &[&Encoded]) -> Vec<usize> {
    let mut o = Vec::with_capacity(seqs.len() + 1);
    o.push(0);
    for s in seqs {
        o.push(o.last().expect("non-empty") + s.ids.len());
    }
    o
}

/// Grows the workspace for `t` tokens, of which the FFN's intermediate holds `inter_rows`.
fn grow_all(ws: &mut Workspace, t: usize, h: usize, inter: usize, inter_rows: usize) {
    grow(&mut ws.x, t * h);
    grow(&mut ws.tmp, t * h);
    grow(&mut ws.ctx, t * h);
    grow(&mut ws.qkv, t * 3 * h);
    grow(&mut ws.inter, inter_rows * inter);
}

/// Embeddings of packed `seqs` into `x` `[T, hidden]`: word + position + token type, then
/// LayerNorm.
fn embed_packed(
    e: &BertEmbeddings,
    cfg: &BertConfig,
    seqs: &[&Encoded],
    offs: &[usize],
    x: &mut [f32],
) -> Result<()> {
    let h = cfg.hidden_size;
    // Embeddings: word + position + token type, then LayerNorm.
    let max_pos = cfg.max_position_embeddings;
    let first = e.position_offset();
    if seqs.iter().any(|s| first + s.ids.len() > max_pos) {
        bail!(
            "a sequence is longer than the model's {} positions",
            max_pos.saturating_sub(first)
        );
    }
    // Checked before the lookups below, which would otherwise index out of bounds.
    if seqs
        .iter()
        .flat_map(|s| &s.ids)
        .any(|&id| id as usize >= cfg.vocab_size)
    {
        bail!("a token id is outside the vocabulary of {}", cfg.vocab_size);
    }
    // A model without token types (DistilBERT) takes type 0 only, and adds nothing for it.
    let types = cfg.type_vocab_size.max(1);
    if seqs
        .iter()
        .flat_map(|s| &s.type_ids)
        .any(|&t| t as usize >= types)
    {
        bail!(
            "a token type id is outside the model's {} types",
            cfg.type_vocab_size
        );
    }
    let fill = |word: &[f32], pos: &[f32], typ: Option<&[f32]>, x: &mut [f32]| {
        for (s, seq) in seqs.iter().enumerate() {
            for (p, (&id, &tt)) in seq.ids.iter().zip(&seq.type_ids).enumerate() {
                let row = &mut x[(offs[s] + p) * h..(offs[s] + p + 1) * h];
                let (id, tt) = (id as usize, tt as usize);
                let w = &word[id * h..(id + 1) * h];
                let pe = &pos[(first + p) * h..(first + p + 1) * h];
                match typ {
                    Some(typ) => {
                        let te = &typ[tt * h..(tt + 1) * h];
                        for i in 0..h {
                            row[i] = w[i] + pe[i] + te[i];
                        }
                    }
                    None => {
                        for i in 0..h {
                            row[i] = w[i] + pe[i];
                        }
                    }
                }
            }
        }
    };
    view(e.word_embeddings.embeddings(), |word| {
        view(e.position_embeddings.embeddings(), |pos| {
            match &e.token_type_embeddings {
                Some(t) => view(t.embeddings(), |typ| fill(word, pos, Some(typ), &mut *x)),
                None => {
                    fill(word, pos, None, &mut *x);
                    Ok(())
                }
            }
        })
    })???;
    layer_norm_rows(x, None, &e.layer_norm, h)
}

/// Rows per FFN chunk of the float32 fast path.
const FFN_ROWS_F32: usize = 512;

impl BertEncoder {
    /// Last hidden states of `seqs`, packed: `[T, hidden]` with `T` the total token count, in
    /// `ws`; rows of sequence `i` are `offsets(seqs)[i]..offsets(seqs)[i + 1]`.
    pub fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        let cfg = &self.config;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let offs = offsets(seqs);
        let t = *offs.last().expect("offsets");
        grow_all(ws, t, h, inter, t.min(FFN_ROWS_F32));

        embed_packed(&self.embeddings, cfg, seqs, &offs, &mut ws.x[..t * h])?;
        let bias = BiasTable::new(self.relative_bias.as_ref(), &offs)?;

        for layer in &self.layers {
            let a = &layer.attention;
            let (x, qkv) = (&ws.x[..t * h], &mut ws.qkv[..t * 3 * h]);
            linear(x, t, &a.query, qkv, 3 * h, 0)?;
            linear(x, t, &a.key, qkv, 3 * h, h)?;
            linear(x, t, &a.value, qkv, 3 * h, 2 * h)?;
            attention(
                &ws.qkv[..t * 3 * h],
                &mut ws.ctx[..t * h],
                &offs,
                a.heads(),
                a.head_dim(),
                bias.as_ref(),
            )?;
            linear(&ws.ctx[..t * h], t, &a.output, &mut ws.tmp[..t * h], h, 0)?;
            layer_norm_rows(&mut ws.tmp[..t * h], Some(&ws.x[..t * h]), &a.layer_norm, h)?;
            std::mem::swap(&mut ws.x, &mut ws.tmp);

            // FFN_ROWS_F32 rows at a time (rows are independent): the intermediate holds no
            // more, which bounds the workspace of each batch in flight.
            let mut r0 = 0;
            while r0 < t {
                let n = FFN_ROWS_F32.min(t - r0);
                let (rows, mid) = (r0 * h..(r0 + n) * h, &mut ws.inter[..n * inter]);
                linear(&ws.x[rows.clone()], n, &layer.intermediate, mid, inter, 0)?;
                activation(mid, layer.act());
                linear(mid, n, &layer.output, &mut ws.tmp[rows.clone()], h, 0)?;
                layer_norm_rows(
                    &mut ws.tmp[rows.clone()],
                    Some(&ws.x[rows]),
                    &layer.layer_norm,
                    h,
                )?;
                r0 += n;
            }
            std::mem::swap(&mut ws.x, &mut ws.tmp);
        }
        Ok(&ws.x[..t * h])
    }
}

/// An encoder that turns packed sequences into pooled sentence vectors for inference: the
/// float32 [`BertEncoder`] or a [`FastEncoder`] in a chosen dtype. Callers pick by type.
pub trait PackedEncoder: Sync {
    /// Width of the vectors.
    fn hidden_size(&self) -> usize;

    /// Last hidden states of `seqs`, packed: `[T, hidden]`, the rows of sequence `i` at
    /// `offsets(seqs)[i]..offsets(seqs)[i + 1]`; in `ws` for the fast path, owned for an
    /// encoder that computes elsewhere.
    fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<Cow<'w, [f32]>>;

    /// One pooled vector per sequence of `seqs`, in order.
    fn pooled_packed(
        &self,
        seqs: &[&Encoded],
        pooling: Pooling,
        ws: &mut Workspace,
    ) -> Result<Vec<Vec<f32>>> {
        let h = self.hidden_size();
        let x = self.forward_packed(seqs, ws)?;
        let offs = offsets(seqs);
        Ok((0..seqs.len())
            .map(|s| pooling.pool_rows(&x[offs[s] * h..offs[s + 1] * h], h))
            .collect())
    }
}

impl PackedEncoder for BertEncoder {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<Cow<'w, [f32]>> {
        Ok(Cow::Borrowed(BertEncoder::forward_packed(self, seqs, ws)?))
    }
}
