//! Building blocks the long-context encoders share ([`super::modernbert`],
//! [`super::nomic_bert`], [`super::jina_bert`]): dense layers and LayerNorms whose bias may be
//! absent, the word-embedding lookup, gated feed-forward activations, and self-attention over
//! a packed batch with rotary positions, ALiBi or a sliding window.
//!
//! Every block runs in two modes ([`Mode`]): inference, where attention is the memory-bounded
//! tiled kernel of [`super::attention_tiled`]; and training, where every op has a backward
//! pass (candle ops, and the fused ops of [`super::ops`]) and attention is computed per
//! sequence with its full score matrix: `heads x m x m` floats kept for the backward pass per
//! layer (an 8,192-token sequence on a 12-head model: 3.2 GB per layer and tensor), so
//! training is meant for sentence-length inputs.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::attention_tiled::{attend_packed, AttentionSpec};
use super::batch::PackedBatch;
use super::bert::{Mode, SparseTap};
use super::rotary::{self, RotaryTable};

/// `x` with dropout `p` in training, as it is in inference.
pub fn dropout(x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Infer => Ok(x.clone()),
        Mode::Train(d) => d.apply(x, p),
    }
}

/// A dense layer `x W^T (+ b)`; the bias is absent in the no-bias layers of these models.
#[derive(Clone)]
pub struct Dense {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Zeros in place of an absent bias (a constant, not a parameter).
    zero: Tensor,
}

impl Dense {
    /// Reads `weight` `[out, in]` and, when `bias`, `bias` `[out]` under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = match bias {
            true => Some(vb.get_with_hints(out_dim, "bias", init)?),
            false => None,
        };
        let zero = Tensor::zeros(out_dim, DType::F32, vb.device())?;
        Ok(Self { weight, bias, zero })
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::ops::linear(x, &self.weight, self.bias.as_ref().unwrap_or(&self.zero))
    }
}

/// LayerNorm over the last dimension, its bias optional (ModernBERT's have none).
#[derive(Clone)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    zero: Tensor,
    eps: f64,
}

impl Norm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let bias = match bias {
            true => Some(vb.get_with_hints(size, "bias", Init::Const(0.0))?),
            false => None,
        };
        let zero = Tensor::zeros(size, DType::F32, vb.device())?;
        Ok(Self {
            weight,
            bias,
            zero,
            eps,
        })
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// candle's fused op in inference (no backward), ours with a backward pass in training.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let b = self.bias.as_ref().unwrap_or(&self.zero);
        match mode {
            Mode::Infer => {
                candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, b, self.eps as f32)
            }
            Mode::Train(_) => super::ops::layer_norm(x, &self.weight, b, self.eps),
        }
    }
}

/// An embedding table `[rows, hidden]` read under `vb` as `weight`.
pub fn table(vb: VarBuilder, rows: usize, hidden: usize, stdev: f64) -> Result<Tensor> {
    vb.get_with_hints((rows, hidden), "weight", Init::Randn { mean: 0.0, stdev })
}

/// The word embeddings of a packed batch, `[T, hidden]`: in training with sparse gradients
/// on, the rows looked up become a leaf of their own (see [`SparseTap`]).
pub fn word_embeddings(
    words: &Tensor,
    sparse: &SparseTap,
    batch: &PackedBatch,
    mode: Mode,
) -> Result<Tensor> {
    let ids = Tensor::from_slice(&batch.input_ids, batch.tokens(), words.device())?;
    match mode {
        Mode::Train(_) => sparse.lookup(words, &ids, &batch.input_ids),
        Mode::Infer => words.index_select(&ids, 0),
    }
}

/// The gate of a gated feed-forward layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// GELU (erf form): GeGLU.
    Gelu,
    /// SiLU: SwiGLU.
    Silu,
    /// ReLU: ReGLU.
    Relu,
    /// Sigmoid: GLU.
    Sigmoid,
}

impl Gate {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Gate::Gelu => super::ops::gelu(x),
            Gate::Silu => x.silu(),
            Gate::Relu => x.relu(),
            Gate::Sigmoid => candle_nn::ops::sigmoid(x),
        }
    }
}

/// `gate(x[.., :n]) * x[.., n:]` for `x` `[.., 2n]`: the activation of the fused gated
/// layers of ModernBERT (`Wi`) and JinaBERT (`gated_layers`), which gate the first half.
pub fn gate_first_half(x: &Tensor, gate: Gate) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)? / 2;
    let a = x.narrow(candle_core::D::Minus1, 0, n)?.contiguous()?;
    let b = x.narrow(candle_core::D::Minus1, n, n)?;
    gate.apply(&a)? * b
}

/// How one layer's self-attention places its tokens.
#[derive(Clone, Default)]
pub struct Positions<'a> {
    /// Rotary embeddings applied to queries and keys (ModernBERT, NomicBERT).
    pub rotary: Option<&'a RotaryTable>,
    /// ALiBi slopes per head (JinaBERT).
    pub alibi: Option<&'a [f32]>,
    /// A sliding window of `|i - j| <= window` (ModernBERT's local layers).
    pub window: Option<usize>,
}

/// Self-attention of packed `qkv` (`[T, 3 * hidden]`, rows `q | k | v`) for sequences at
/// `offsets`: the context `[T, hidden]`, scores scaled by `1 / sqrt(head_dim)`. Inference
/// runs the tiled kernel; training the differentiable composite, with dropout `p` on the
/// probabilities.
pub fn self_attention(
    qkv: &Tensor,
    offsets: &[usize],
    heads: usize,
    pos: &Positions,
    p: f64,
    mode: Mode,
) -> Result<Tensor> {
    let (t, three_h) = qkv.dims2()?;
    let hidden = three_h / 3;
    let head_dim = hidden / heads;
    match mode {
        Mode::Infer => {
            let mut v = qkv.flatten_all()?.to_vec1::<f32>()?;
            if let Some(r) = pos.rotary {
                r.rotate_packed(&mut v, offsets, heads)?;
            }
            let spec = AttentionSpec {
                heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
                alibi: pos.alibi.map(<[f32]>::to_vec),
                window: pos.window,
                bf16: None,
            };
            let mut ctx = vec![0f32; t * hidden];
            attend_packed(&v, offsets, &spec, &mut ctx)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Tensor::from_vec(ctx, (t, hidden), qkv.device())
        }
        Mode::Train(_) => {
            let mut parts = Vec::with_capacity(offsets.len());
            for w in offsets.windows(2) {
                let (a, m) = (w[0], w[1] - w[0]);
                if m > 0 {
                    let rows = qkv.narrow(0, a, m)?;
                    parts.push(sequence_attention(&rows, heads, pos, p, mode)?);
                }
            }
            if parts.is_empty() {
                return Tensor::zeros((0, hidden), DType::F32, qkv.device());
            }
            Tensor::cat(&parts, 0)
        }
    }
}

/// One sequence's attention with candle ops (differentiable): `rows` `[m, 3 * hidden]`.
fn sequence_attention(
    rows: &Tensor,
    heads: usize,
    pos: &Positions,
    p: f64,
    mode: Mode,
) -> Result<Tensor> {
    let (m, three_h) = rows.dims2()?;
    let hidden = three_h / 3;
    let d = hidden / heads;
    // [3, heads, m, d]
    let qkv = rows.reshape((m, 3, heads, d))?.permute((1, 2, 0, 3))?;
    let (mut q, mut k) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?);
    let v = qkv.get(2)?.contiguous()?;
    if let Some(r) = pos.rotary {
        let (cos, sin) = r.tensors(m, rows.device())?;
        q = rotary::apply(&q, &cos, &sin)?;
        k = rotary::apply(&k, &cos, &sin)?;
    }
    // [heads, m, m]
    let mut scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    if let Some(bias) = position_bias(m, heads, pos, rows.device())? {
        scores = scores.broadcast_add(&bias)?;
    }
    let probs = dropout(&super::ops::softmax_last_dim(&scores)?, p, mode)?;
    // [m, hidden]
    probs
        .matmul(&v)?
        .permute((1, 0, 2))?
        .contiguous()?
        .reshape((m, hidden))
}

/// The constant added to a sequence's scores for ALiBi and the window: `[heads or 1, m, m]`,
/// or `None` when neither applies.
fn position_bias(
    m: usize,
    heads: usize,
    pos: &Positions,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    if pos.alibi.is_none() && pos.window.is_none() {
        return Ok(None);
    }
    let rows = if pos.alibi.is_some() { heads } else { 1 };
    let mut bias = vec![0f32; rows * m * m];
    for (h, block) in bias.chunks_exact_mut(m * m).enumerate() {
        for (i, row) in block.chunks_exact_mut(m).enumerate() {
            for (j, b) in row.iter_mut().enumerate() {
                let dist = i.abs_diff(j);
                if pos.window.is_some_and(|w| dist > w) {
                    *b = f32::NEG_INFINITY;
                } else if let Some(slopes) = pos.alibi {
                    *b = -slopes[h] * dist as f32;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(bias, (rows, m, m), device)?))
}
