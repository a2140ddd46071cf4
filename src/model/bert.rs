//! Our BERT encoder on candle: differentiable for training, fused ops for inference.
//!
//! Weight names follow Hugging Face BERT checkpoints (`embeddings.word_embeddings.weight`,
//! `encoder.layer.3.attention.self.query.weight`, ...); a `bert.` prefix and the old
//! `LayerNorm.gamma`/`beta` names are resolved by [`super::weights`]. RoBERTa, XLM-RoBERTa,
//! DistilBERT and MPNet run through the same blocks: [`super::arch`] maps their configs and
//! names, and [`super::mpnet`] holds MPNet's relative position bias. Unlike
//! candle-transformers' `BertModel`, every block is public, dropout is real in training, and
//! the LayerNorm and softmax used in training have a backward pass.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::HiddenAct;

use super::arch::Architecture;
use super::batch::PackedBatch;
use super::layers::softmax;
use super::mpnet::RelativeBias;

pub use super::config::BertConfig;
pub use super::embeddings::{BertEmbeddings, SparseTap};
pub use super::layers::{LayerNorm, Linear, Mode};

/// The additive attention mask: `None` when no position in the batch is padding.
#[derive(Clone)]
pub struct AttentionMask {
    /// 0 where attended, a large negative where padded (`[batch, 1, 1, seq]`); `None` when
    /// nothing is padded or when `lengths` describes the mask.
    additive: Option<Tensor>,
    /// Real tokens per row when every row is padded at its end only (as our batches are):
    /// the fused attention then skips padding entirely.
    lengths: Option<Vec<usize>>,
    /// Sequence offsets of packed states `[T, hidden]` (see [`PackedBatch`]).
    packed: Option<Vec<usize>>,
    /// MPNet's relative position bias table `[buckets, heads]`, added to every layer's scores
    /// (set by [`BertEncoder::forward_layers`] from the encoder's own table).
    bias: Option<Tensor>,
}

impl AttentionMask {
    /// From a `[batch, seq]` 0/1 mask (any dtype). 0 marks padding.
    pub fn new(mask: &Tensor) -> Result<Self> {
        let mask = mask.to_dtype(DType::F32)?;
        let (b, s) = mask.dims2()?;
        let rows = mask.to_vec2::<f32>()?;
        let lengths: Option<Vec<usize>> = rows
            .iter()
            .map(|r| {
                let n = r.iter().take_while(|&&v| v > 0.5).count();
                r[n..].iter().all(|&v| v <= 0.5).then_some(n)
            })
            .collect();
        // The additive form serves only the general (candle-ops) attention.
        let additive = if lengths.is_some() || rows.iter().flatten().all(|&v| v > 0.5) {
            None
        } else {
            // exp() of the large negative is exactly 0.
            Some(((mask - 1.0)? * 1e9)?.reshape((b, 1, 1, s))?)
        };
        Ok(Self {
            additive,
            lengths,
            packed: None,
            bias: None,
        })
    }

    /// For packed states `[T, hidden]`: each sequence attends to its own tokens only.
    pub fn packed(batch: &PackedBatch) -> Self {
        Self {
            additive: None,
            lengths: None,
            packed: Some(batch.offsets.clone()),
            bias: None,
        }
    }

    /// The mask with MPNet's relative position bias table `[buckets, heads]`.
    fn with_bias(&self, table: &Tensor) -> Self {
        Self {
            bias: Some(table.clone()),
            ..self.clone()
        }
    }
}

/// Where each sequence's rows are, for the fused attention.
#[derive(Clone, Copy)]
enum Layout<'a> {
    /// `[batch, seq, ..]`, row `i` holding `lengths[i]` real tokens then padding.
    Padded(&'a [usize]),
    /// `[T, ..]`, sequence `i` the rows `offsets[i]..offsets[i + 1]`.
    Packed(&'a [usize]),
}

/// Multi-head self-attention plus its output projection and LayerNorm.
#[derive(Clone)]
pub struct BertAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output: Linear,
    pub layer_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    attn_dropout: f64,
    hidden_dropout: f64,
}

impl BertAttention {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let sv = vb.pp("self");
        let ov = vb.pp("output");
        Ok(Self {
            query: Linear::load(sv.pp("query"), h, h)?,
            key: Linear::load(sv.pp("key"), h, h)?,
            value: Linear::load(sv.pp("value"), h, h)?,
            output: Linear::load(ov.pp("dense"), h, h)?,
            layer_norm: LayerNorm::load(ov.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            attn_dropout: cfg.attention_probs_dropout_prob,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// `[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]`
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    pub fn forward(&self, x: &Tensor, mask: &AttentionMask, mode: Mode) -> Result<Tensor> {
        let bias = mask.bias.as_ref();
        let ctx = match (&mask.packed, &mask.lengths) {
            (Some(offsets), _) => self.fused_context(x, Layout::Packed(offsets), bias, mode)?,
            (None, Some(lengths)) => self.fused_context(x, Layout::Padded(lengths), bias, mode)?,
            (None, None) => self.context(x, mask, mode)?,
        };
        let out = mode.dropout(&self.output.forward(&ctx)?, self.hidden_dropout)?;
        self.layer_norm.forward(&(out + x)?, mode)
    }

    /// Attention context through one fused projection and the fused attention op (batches
    /// padded at the end).
    fn fused_context(
        &self,
        x: &Tensor,
        layout: Layout,
        bias: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let w = Tensor::cat(
            &[&self.query.weight, &self.key.weight, &self.value.weight],
            0,
        )?;
        let b = Tensor::cat(&[&self.query.bias, &self.key.bias, &self.value.bias], 0)?;
        let qkv = Linear { weight: w, bias: b }.forward(x)?;
        let dropout = match mode {
            Mode::Train(d) => d.next_seed(self.attn_dropout),
            Mode::Infer => None,
        };
        let (heads, d) = (self.heads, self.head_dim);
        match layout {
            Layout::Padded(lengths) => {
                super::ops::attention(&qkv, lengths, heads, d, bias, dropout)
            }
            Layout::Packed(offsets) => {
                super::ops::attention_packed(&qkv, offsets, heads, d, bias, dropout)
            }
        }
    }

    /// Attention context with candle ops, for any mask.
    fn context(&self, x: &Tensor, mask: &AttentionMask, mode: Mode) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let q = self.split_heads(&self.query.forward(x)?)?;
        let k = self.split_heads(&self.key.forward(x)?)?;
        let v = self.split_heads(&self.value.forward(x)?)?;
        // [batch, heads, seq, seq]
        let mut scores = (q.matmul(&k.t()?)? * (1.0 / (self.head_dim as f64).sqrt()))?;
        if let Some(table) = &mask.bias {
            scores = scores.broadcast_add(&super::mpnet::bias_matrix(table, s)?)?;
        }
        if let Some(m) = &mask.additive {
            scores = scores.broadcast_add(m)?;
        }
        let probs = mode.dropout(&softmax(&scores, mode)?, self.attn_dropout)?;
        // [batch, seq, hidden]
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))
    }
}

/// One transformer layer: attention, then the feed-forward block.
#[derive(Clone)]
pub struct BertLayer {
    pub attention: BertAttention,
    pub intermediate: Linear,
    pub output: Linear,
    pub layer_norm: LayerNorm,
    act: HiddenAct,
    hidden_dropout: f64,
}

impl BertLayer {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            attention: BertAttention::load(vb.pp("attention"), cfg)?,
            intermediate: Linear::load(vb.pp("intermediate").pp("dense"), h, i)?,
            output: Linear::load(vb.pp("output").pp("dense"), i, h)?,
            layer_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn act(&self) -> HiddenAct {
        self.act
    }

    /// `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: &Tensor, mask: &AttentionMask, mode: Mode) -> Result<Tensor> {
        let a = self.attention.forward(x, mask, mode)?;
        let i = self.intermediate.forward(&a)?;
        let i = match self.act {
            HiddenAct::Gelu => super::ops::gelu(&i)?,
            HiddenAct::GeluApproximate => i.gelu()?,
            HiddenAct::Relu => i.relu()?,
        };
        let o = mode.dropout(&self.output.forward(&i)?, self.hidden_dropout)?;
        self.layer_norm.forward(&(o + a)?, mode)
    }
}

/// The BERT encoder: embeddings and a stack of layers, each reachable on its own.
#[derive(Clone)]
pub struct BertEncoder {
    pub embeddings: BertEmbeddings,
    pub layers: Vec<BertLayer>,
    /// MPNet's `encoder.relative_attention_bias`, shared by every layer; `None` otherwise.
    pub relative_bias: Option<RelativeBias>,
    pub config: BertConfig,
}

impl BertEncoder {
    /// Loads `embeddings.*`, `encoder.layer.{i}.*` and, for MPNet,
    /// `encoder.relative_attention_bias.*` from `vb`.
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let embeddings = BertEmbeddings::load(vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp(super::names::layer_prefix(i)), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            relative_bias: Self::load_relative_bias(&vb, cfg)?,
            config: cfg.clone(),
        })
    }

    /// MPNet's relative position bias table; `None` for the other architectures.
    pub fn load_relative_bias(vb: &VarBuilder, cfg: &BertConfig) -> Result<Option<RelativeBias>> {
        match cfg.arch {
            Architecture::Mpnet => Ok(Some(RelativeBias::load(
                vb.pp("encoder.relative_attention_bias"),
                cfg,
            )?)),
            _ => Ok(None),
        }
    }

    pub fn device(&self) -> &Device {
        self.embeddings.word_embeddings.embeddings().device()
    }

    /// Runs layers `range` on hidden states `x` `[batch, seq, hidden]`.
    pub fn forward_layers(
        &self,
        x: &Tensor,
        mask: &AttentionMask,
        range: std::ops::Range<usize>,
        mode: Mode,
    ) -> Result<Tensor> {
        let with_bias;
        let mask = match &self.relative_bias {
            Some(b) => {
                with_bias = mask.with_bias(&b.table);
                &with_bias
            }
            None => mask,
        };
        let mut x = x.clone();
        for layer in &self.layers[range] {
            x = layer.forward(&x, mask, mode)?;
        }
        Ok(x)
    }

    /// The last hidden state `[batch, seq, hidden]` for `input_ids` and a 0/1 `attention_mask`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let mask = AttentionMask::new(attention_mask)?;
        let x = self.embeddings.forward(input_ids, token_type_ids, mode)?;
        self.forward_layers(&x, &mask, 0..self.layers.len(), mode)
    }
}
