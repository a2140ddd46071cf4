//! The long-context encoders (ModernBERT, NomicBERT, JinaBERT) on the fast path, in f32, bf16
//! or int8 ([`LongEncoder`]): the same packed layout, reused [`Workspace`] and dense layers
//! ([`Dense`]: `gemm` in f32, the kernel crate's int8/bf16 products otherwise) as the BERT
//! family's [`FastEncoder`], with what these architectures add:
//! - bias-less dense layers and LayerNorms (a zero bias: the products preload it anyway);
//! - gated feed-forward layers: the two input products fused into one `[2I, H]` product with
//!   the gated half first (NomicBERT's `fc12 | fc11`; ModernBERT's `Wi` and JinaBERT's
//!   `gated_layers` are already so), then [`kernels::math::glu_rows`] on each chunk of rows
//!   while it is in cache;
//! - rotary positions applied to Q and K in place (one table per base: ModernBERT's global
//!   and local layers differ), ALiBi slopes, and ModernBERT's sliding window per sequence;
//!   attention is the tiled kernel of [`crate::model::attention_tiled`], whose memory grows
//!   with the tokens, not their square;
//! - ModernBERT's pre-norm layers (LayerNorm before attention and FFN, none before layer 0's
//!   attention, a final LayerNorm), the others' post-norm layers as BERT's.
//!
//! It is built from the candle encoder ([`Encoder`]), consuming it one layer at a time, so
//! that the float32 layers are dropped as they are converted. LayerNorms, softmax, rotary
//! positions and the gates run in float32 whatever the dtype.

use rayon::prelude::*;

use super::*;
use crate::model::attention_tiled::{alibi_slopes, attend_packed, AttentionSpec};
use crate::model::blocks::Gate;
use crate::model::encoder::{check_lengths, Encoder};
use crate::model::modernbert::LayerKind;
use crate::model::rotary::RotaryTable;
use kernels::math::Glu;

mod convert;

/// A LayerNorm's parameters as values; the bias is zeros where the model has none.
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

/// Where a layer normalises: before each block (ModernBERT) or after each residual (BERT,
/// NomicBERT, JinaBERT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    PreNorm,
    PostNorm,
}

/// One layer: dense layers in the encoder's arithmetic, the rest in float32.
struct Layer {
    /// Pre-norm: before attention (`None` in ModernBERT's layer 0). Post-norm: after the
    /// attention's residual (always present).
    attn_norm: Option<Norm>,
    /// Q, K and V in one `[3H, H]` product.
    qkv: Dense,
    out: Dense,
    /// Pre-norm: before the FFN. Post-norm: after the FFN's residual.
    mlp_norm: Norm,
    /// `[2I, H]`, the gated half first.
    ffn_in: Dense,
    /// `[H, I]`.
    ffn_out: Dense,
    /// Index of the layer's rotary table in [`LongEncoder::ropes`], if it has one.
    rope: Option<usize>,
    spec: AttentionSpec,
}

/// Token embeddings: word (+ token type), then a LayerNorm.
struct Embeddings {
    words: Tensor,
    types: Option<Tensor>,
    norm: Norm,
}

/// A ModernBERT, NomicBERT or JinaBERT encoder for inference on the fast path.
pub struct LongEncoder {
    dtype: quant::Dtype,
    kernel: &'static str,
    kernels: Kernels,
    style: Style,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// ModernBERT's LayerNorm after the last layer.
    final_norm: Option<Norm>,
    ropes: Vec<RotaryTable>,
    gate: Glu,
    config: BertConfig,
}

/// The kernels for `dtype`: `FETCH_ML_KERNEL` or the CPU's best, as [`FastEncoder::new`].
fn select_kernels(dtype: quant::Dtype) -> Result<Kernels> {
    if dtype != quant::Dtype::F32 {
        note_amx_refused();
    }
    let int8 = match dtype {
        quant::Dtype::Int8 => quant::Int8Kernel::select().map_err(quant_err)?,
        _ => quant::Int8Kernel::best(),
    };
    let bf16 = match dtype {
        quant::Dtype::Bf16 => quant::Bf16Kernel::select().map_err(quant_err)?,
        _ => quant::Bf16Kernel::best(),
    };
    Ok(Kernels { int8, bf16 })
}

fn glu(gate: Gate) -> Glu {
    match gate {
        Gate::Gelu => Glu::Gelu,
        Gate::Silu => Glu::Silu,
        Gate::Relu => Glu::Relu,
        Gate::Sigmoid => Glu::Sigmoid,
    }
}

impl LongEncoder {
    /// Takes over `encoder` (a long-context one) and converts its dense layers to `dtype`, a
    /// layer at a time (each float32 layer is dropped once converted, unless another handle
    /// shares its tensors). Fails for a BERT-family encoder (see [`FastEncoder`]) and when
    /// `FETCH_ML_KERNEL` asks for a kernel this CPU lacks.
    pub fn new(encoder: Encoder, dtype: quant::Dtype) -> Result<Self> {
        let k = select_kernels(dtype)?;
        Self::with_kernels(encoder, dtype, k.int8, k.bf16)
    }

    /// As [`LongEncoder::new`] for an encoder the caller keeps (the converted dense layers are
    /// copies in every dtype, f32's transposed; the rest is shared).
    pub fn from_encoder(encoder: &Encoder, dtype: quant::Dtype) -> Result<Self> {
        Self::new(encoder.clone(), dtype)
    }

    /// As [`LongEncoder::new`] with the kernels named (for tests and benchmarks); errors when
    /// the CPU lacks the one `dtype` uses.
    pub fn with_kernels(
        encoder: Encoder,
        dtype: quant::Dtype,
        int8: quant::Int8Kernel,
        bf16: quant::Bf16Kernel,
    ) -> Result<Self> {
        let kernels = Kernels { int8, bf16 };
        let kernel = match dtype {
            quant::Dtype::F32 => "gemm-f32",
            quant::Dtype::Int8 if int8.supported() => int8.name(),
            quant::Dtype::Bf16 if bf16.supported() => bf16.name(),
            _ => bail!("this CPU lacks the instructions of the requested {dtype} kernel"),
        };
        let mut parts = match encoder {
            Encoder::Bert(_) => {
                bail!("fast path: a BERT-family encoder runs on FastEncoder, not LongEncoder")
            }
            Encoder::ModernBert(e) => convert::modernbert(e, dtype)?,
            Encoder::NomicBert(e) => convert::nomic_bert(e, dtype)?,
            Encoder::JinaBert(e) => convert::jina_bert(e, dtype)?,
        };
        if dtype == quant::Dtype::Bf16 {
            // The attention's products in bf16 too (its softmax stays f32).
            parts
                .layers
                .iter_mut()
                .for_each(|l| l.spec.bf16 = Some(bf16));
        }
        Ok(Self {
            dtype,
            kernel,
            kernels,
            style: parts.style,
            embeddings: parts.embeddings,
            layers: parts.layers,
            final_norm: parts.final_norm,
            ropes: parts.ropes,
            gate: parts.gate,
            config: parts.config,
        })
    }

    pub fn dtype(&self) -> quant::Dtype {
        self.dtype
    }

    /// The kernel of the dense layers: "gemm-f32", "avx512vnni", "avx512bf16", ...
    pub fn kernel_name(&self) -> &'static str {
        self.kernel
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Rows per FFN chunk: its `[rows, 3I]` intermediates stay in cache between the products.
    fn ffn_rows(&self) -> usize {
        match self.dtype {
            quant::Dtype::F32 => FFN_ROWS_F32,
            _ => FFN_ROWS,
        }
    }

    /// Last hidden states of `seqs`, packed (`[T, hidden]`, the rows of sequence `i` at
    /// `offsets(seqs)[i]..offsets(seqs)[i + 1]`), in `ws`.
    pub fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        check_lengths(&self.config, seqs)?;
        let (h, inter) = (self.config.hidden_size, self.config.intermediate_size);
        let offs = offsets(seqs);
        let t = *offs.last().expect("offsets");
        // The FFN's intermediate: the first product's [rows, 2I], then the gated [rows, I].
        grow_all(ws, t, h, 3 * inter, t.min(self.ffn_rows()));
        self.embed(seqs, &offs, &mut ws.x[..t * h])?;
        for layer in &self.layers {
            self.attention_block(layer, &offs, t, ws)?;
            self.ffn_block(layer, t, ws)?;
        }
        if let Some(n) = &self.final_norm {
            norm_rows(&mut ws.x[..t * h], None, n);
        }
        Ok(&ws.x[..t * h])
    }

    /// Word (+ token type) embeddings of `seqs` into `x` `[T, hidden]`, normalised.
    fn embed(&self, seqs: &[&Encoded], offs: &[usize], x: &mut [f32]) -> Result<()> {
        let h = self.config.hidden_size;
        let e = &self.embeddings;
        let fill = |word: &[f32], typ: Option<&[f32]>, x: &mut [f32]| {
            for (s, seq) in seqs.iter().enumerate() {
                for (p, (&id, &tt)) in seq.ids.iter().zip(&seq.type_ids).enumerate() {
                    let row = &mut x[(offs[s] + p) * h..(offs[s] + p + 1) * h];
                    let id = id as usize;
                    row.copy_from_slice(&word[id * h..(id + 1) * h]);
                    if let Some(typ) = typ {
                        let tt = tt as usize;
                        row.iter_mut()
                            .zip(&typ[tt * h..(tt + 1) * h])
                            .for_each(|(v, t)| *v += t);
                    }
                }
            }
        };
        view(&e.words, |word| match &e.types {
            Some(t) => view(t, |typ| fill(word, Some(typ), &mut *x)),
            None => {
                fill(word, None, &mut *x);
                Ok(())
            }
        })??;
        norm_rows(x, None, &e.norm);
        Ok(())
    }

    /// Self-attention and its residual: `x` becomes the block's output.
    fn attention_block(
        &self,
        l: &Layer,
        offs: &[usize],
        t: usize,
        ws: &mut Workspace,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        let k = self.kernels;
        let Workspace {
            x,
            tmp,
            qkv,
            ctx,
            quant: scratch,
            ..
        } = &mut *ws;
        let (xs, tmps) = (&mut x[..t * h], &mut tmp[..t * h]);
        let (qkv, ctx) = (&mut qkv[..t * 3 * h], &mut ctx[..t * h]);
        let input: &[f32] = match (self.style, &l.attn_norm) {
            (Style::PreNorm, Some(n)) => {
                tmps.copy_from_slice(xs);
                norm_rows(tmps, None, n);
                tmps
            }
            _ => xs,
        };
        l.qkv.forward(input, t, qkv, 3 * h, 0, None, k, scratch)?;
        if let Some(r) = l.rope {
            rotate(&self.ropes[r], qkv, offs, &l.spec)?;
        }
        attend_packed(qkv, offs, &l.spec, ctx)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        l.out.forward(ctx, t, tmps, h, 0, None, k, scratch)?;
        match (self.style, &l.attn_norm) {
            (Style::PreNorm, _) => add_rows(xs, tmps),
            (Style::PostNorm, Some(n)) => norm_rows(tmps, Some(xs), n),
            (Style::PostNorm, None) => bail!("fast path: a post-norm layer without its LayerNorm"),
        }
        if self.style == Style::PostNorm {
            std::mem::swap(&mut ws.x, &mut ws.tmp);
        }
        Ok(())
    }

    /// The gated feed-forward block and its residual, a chunk of rows at a time: `x`
    /// becomes the block's output.
    fn ffn_block(&self, l: &Layer, t: usize, ws: &mut Workspace) -> Result<()> {
        let (h, inter) = (self.config.hidden_size, self.config.intermediate_size);
        let k = self.kernels;
        let Workspace {
            x,
            tmp,
            inter: mid,
            quant: scratch,
            ..
        } = &mut *ws;
        let (x, tmp) = (&mut x[..t * h], &mut tmp[..t * h]);
        let mut r0 = 0;
        while r0 < t {
            let n = self.ffn_rows().min(t - r0);
            let rows = r0 * h..(r0 + n) * h;
            let (both, gated) = mid[..3 * n * inter].split_at_mut(2 * n * inter);
            let (xr, tr) = (&mut x[rows.clone()], &mut tmp[rows]);
            let input: &[f32] = match self.style {
                Style::PreNorm => {
                    tr.copy_from_slice(xr);
                    norm_rows(tr, None, &l.mlp_norm);
                    tr
                }
                Style::PostNorm => xr,
            };
            l.ffn_in
                .forward(input, n, both, 2 * inter, 0, None, k, scratch)?;
            glu_par(both, gated, inter, self.gate);
            l.ffn_out.forward(gated, n, tr, h, 0, None, k, scratch)?;
            match self.style {
                Style::PreNorm => add_rows(xr, tr),
                Style::PostNorm => norm_rows(tr, Some(xr), &l.mlp_norm),
            }
            r0 += n;
        }
        if self.style == Style::PostNorm {
            std::mem::swap(&mut ws.x, &mut ws.tmp);
        }
        Ok(())
    }
}

/// Rows of `norm`'s width: `x[r] = LayerNorm(x[r] + residual[r])` (residual optional).
fn norm_rows(x: &mut [f32], residual: Option<&[f32]>, norm: &Norm) {
    const ROWS: usize = 16;
    let (w, b, eps) = (&norm.weight[..], &norm.bias[..], norm.eps);
    let width = w.len();
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
}

/// `x += y`, element by element.
fn add_rows(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(a, b)| *a += b));
}

/// The gated rows of `both` (`[rows, 2n]`) into `gated` (`[rows, n]`), rows in parallel.
fn glu_par(both: &[f32], gated: &mut [f32], n: usize, gate: Glu) {
    const ROWS: usize = 8;
    gated
        .par_chunks_mut(n * ROWS)
        .zip(both.par_chunks(2 * n * ROWS))
        .for_each(|(g, b)| math::glu_rows(b, g, n, gate));
}

/// Rotates the queries and keys of packed `qkv` rows, each token to its position in its
/// sequence, tokens in parallel (see [`RotaryTable::rotate_packed`]).
fn rotate(
    table: &RotaryTable,
    qkv: &mut [f32],
    offs: &[usize],
    spec: &AttentionSpec,
) -> Result<()> {
    let hidden = spec.heads * spec.head_dim;
    if let Some(w) = offs.windows(2).find(|w| w[1] - w[0] > table.positions()) {
        bail!(
            "rotary: a sequence of {} tokens, but the table has {} positions",
            w[1] - w[0],
            table.positions()
        );
    }
    if hidden == 0 || qkv.len() != offs.last().unwrap_or(&0) * 3 * hidden {
        bail!(
            "rotary: {} values of q, k and v for {hidden} wide rows",
            qkv.len()
        );
    }
    for w in offs.windows(2) {
        qkv[w[0] * 3 * hidden..w[1] * 3 * hidden]
            .par_chunks_mut(3 * hidden)
            .enumerate()
            .for_each(|(p, row)| {
                for head in row[..2 * hidden].chunks_exact_mut(spec.head_dim) {
                    table.rotate(head, p);
                }
            });
    }
    Ok(())
}

impl PackedEncoder for LongEncoder {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<Cow<'w, [f32]>> {
        Ok(Cow::Borrowed(LongEncoder::forward_packed(self, seqs, ws)?))
    }
}
