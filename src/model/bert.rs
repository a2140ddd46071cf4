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
use candle_nn::{Embedding, VarBuilder};
use candle_transformers::models::bert::HiddenAct;
use serde::Deserialize;

use super::arch::Architecture;
use super::batch::PackedBatch;
use super::dropout::Dropout;
use super::mpnet::RelativeBias;

/// `config.json` of a BERT model: candle-transformers' `Config` plus the attention dropout.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    #[serde(flatten)]
    pub base: candle_transformers::models::bert::Config,
    /// Dropout on attention probabilities; BERT's default is 0.1.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Rows of MPNet's relative position bias table (0 for other architectures).
    #[serde(default)]
    pub relative_attention_num_buckets: usize,
    /// The architecture `config.json` names (set by [`Architecture::parse_config`]).
    #[serde(skip)]
    pub arch: Architecture,
    /// What a long-context architecture (ModernBERT, NomicBERT, JinaBERT) adds; `None` for
    /// the BERT family (set by [`Architecture::parse_config`]).
    #[serde(skip)]
    pub long: Option<super::encoder::LongConfig>,
}

fn default_dropout() -> f64 {
    0.1
}

impl std::ops::Deref for BertConfig {
    type Target = candle_transformers::models::bert::Config;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

impl BertConfig {
    /// The position id of a sentence's first token (`pad_token_id + 1` for RoBERTa).
    pub fn position_offset(&self) -> usize {
        self.arch.position_offset(self.pad_token_id)
    }

    /// The most tokens a sentence may have: the position table less its offset (514 RoBERTa
    /// positions with pad id 1 give 512 tokens).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// Checks the numbers the encoder relies on.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not a multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        anyhow::ensure!(self.num_hidden_layers > 0, "num_hidden_layers is 0");
        anyhow::ensure!(self.vocab_size > 0, "vocab_size is 0");
        anyhow::ensure!(
            self.pad_token_id < self.vocab_size,
            "pad_token_id {} is outside the vocabulary of {} (vocab_size)",
            self.pad_token_id,
            self.vocab_size
        );
        anyhow::ensure!(
            self.max_tokens() >= 2,
            "max_position_embeddings {} leaves no room for [CLS] and [SEP]{}",
            self.max_position_embeddings,
            match self.position_offset() {
                0 => String::new(),
                o => format!(" (a {} model's positions start at {o})", self.arch.name()),
            }
        );
        // DistilBERT, MPNet and ModernBERT have no token types (NomicBERT may have none); every
        // other architecture has one at least.
        anyhow::ensure!(
            self.type_vocab_size > 0
                || matches!(
                    self.arch,
                    Architecture::DistilBert
                        | Architecture::Mpnet
                        | Architecture::ModernBert
                        | Architecture::NomicBert
                ),
            "type_vocab_size is 0"
        );
        anyhow::ensure!(
            self.arch != Architecture::Mpnet
                || self.relative_attention_num_buckets >= super::mpnet::BUCKETS,
            "relative_attention_num_buckets is {}; MPNet looks up {} buckets",
            self.relative_attention_num_buckets,
            super::mpnet::BUCKETS
        );
        anyhow::ensure!(
            self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0,
            "layer_norm_eps {} is not a non-negative number",
            self.layer_norm_eps
        );
        Ok(())
    }
}

/// How a block runs: inference (fused ops, no dropout) or training (differentiable, dropout).
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    Infer,
    Train(&'a Dropout),
}

impl Mode<'_> {
    fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self {
            Mode::Infer => Ok(x.clone()),
            Mode::Train(d) => d.apply(x, p),
        }
    }
}

/// A dense layer `y = x W^T + b`: one matrix product over all leading dims, fused backward.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// Reads `weight` `[out, in]` and `bias` `[out]` under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = vb.get_with_hints(out_dim, "bias", init)?;
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::ops::linear(x, &self.weight, &self.bias)
    }
}

/// LayerNorm over the last dim: candle's fused op in inference (no backward), our fused op
/// with a backward pass in training.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            Mode::Train(_) => super::ops::layer_norm(x, &self.weight, &self.bias, self.eps),
        }
    }
}

/// Softmax over the last dim: candle's fused op in inference, ours (with backward) in training.
fn softmax(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Infer => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        Mode::Train(_) => super::ops::softmax_last_dim(x),
    }
}

/// Records, in training, the word-embedding rows each forward pass looked up as leaves of
/// their own, so the trainer can apply their gradient row-wise (see `train::sparse`) instead
/// of candle building a dense gradient of the whole vocabulary.
#[derive(Default)]
pub struct SparseTap {
    enabled: std::sync::atomic::AtomicBool,
    leaves: std::sync::Mutex<Vec<(candle_core::Var, Vec<u32>)>>,
}

impl SparseTap {
    pub fn enable(&self, on: bool) {
        self.enabled.store(on, std::sync::atomic::Ordering::SeqCst);
    }
    fn enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// The leaves recorded since the last call, with the token ids of their rows.
    pub fn take(&self) -> Vec<(candle_core::Var, Vec<u32>)> {
        std::mem::take(&mut *self.leaves.lock().expect("sparse tap lock"))
    }

    /// Rows `ids` (`raw` as values) of the embedding `table` in training: when the tap is on,
    /// a leaf of their own, recorded; else a plain lookup.
    pub fn lookup(&self, table: &Tensor, ids: &Tensor, raw: &[u32]) -> Result<Tensor> {
        if !self.enabled() {
            return table.index_select(ids, 0);
        }
        let leaf = candle_core::Var::from_tensor(&table.detach().index_select(ids, 0)?)?;
        let t = leaf.as_tensor().clone();
        let mut leaves = self.leaves.lock().expect("sparse tap lock");
        leaves.push((leaf, raw.to_vec()));
        Ok(t)
    }
}

/// Word, position and token-type embeddings, summed and normalised.
#[derive(Clone)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    /// `None` when the model has no token types (DistilBERT: `type_vocab_size` 0).
    pub token_type_embeddings: Option<Embedding>,
    pub layer_norm: LayerNorm,
    dropout: f64,
    /// Word-embedding rows as sparse leaves in training, when the trainer asks for it.
    pub sparse: std::sync::Arc<SparseTap>,
    /// The position id of each sentence's first token (see [`BertConfig::position_offset`]).
    position_offset: u32,
}

impl BertEmbeddings {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let emb = |n: usize, name: &str| -> Result<Embedding> {
            let w = vb.pp(name).get_with_hints(
                (n, cfg.hidden_size),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: cfg.initializer_range,
                },
            )?;
            Ok(Embedding::new(w, cfg.hidden_size))
        };
        Ok(Self {
            word_embeddings: emb(cfg.vocab_size, "word_embeddings")?,
            position_embeddings: emb(cfg.max_position_embeddings, "position_embeddings")?,
            token_type_embeddings: match cfg.type_vocab_size {
                0 => None,
                n => Some(emb(n, "token_type_embeddings")?),
            },
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
            sparse: Default::default(),
            position_offset: cfg.position_offset() as u32,
        })
    }

    /// The position id of each sentence's first token.
    pub fn position_offset(&self) -> usize {
        self.position_offset as usize
    }

    /// `input_ids`, `token_type_ids`: `[batch, seq]` u32 -> `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (_b, seq) = input_ids.dims2()?;
        let first = self.position_offset;
        let positions = Tensor::arange(first, first + seq as u32, input_ids.device())?;
        let mut x = self.word_embeddings.forward(input_ids)?;
        if let Some(types) = &self.token_type_embeddings {
            x = x.add(&types.forward(token_type_ids)?)?;
        }
        let x = x.broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        let x = self.layer_norm.forward(&x, mode)?;
        mode.dropout(&x, self.dropout)
    }

    /// A packed batch -> `[T, hidden]`.
    pub fn forward_packed(&self, batch: &PackedBatch, mode: Mode) -> Result<Tensor> {
        let dev = self.word_embeddings.embeddings().device();
        let t = batch.tokens();
        let ids = Tensor::from_slice(&batch.input_ids, t, dev)?;
        let positions = match self.position_offset {
            0 => Tensor::from_slice(&batch.positions, t, dev)?,
            first => {
                let shifted: Vec<u32> = batch.positions.iter().map(|p| p + first).collect();
                Tensor::from_vec(shifted, t, dev)?
            }
        };
        let mut x = match mode {
            Mode::Train(_) if self.sparse.enabled() => {
                // A leaf of its own: its gradient is exactly the rows' gradient.
                let rows = self
                    .word_embeddings
                    .embeddings()
                    .detach()
                    .index_select(&ids, 0)?;
                let leaf = candle_core::Var::from_tensor(&rows)?;
                let t = leaf.as_tensor().clone();
                self.sparse
                    .leaves
                    .lock()
                    .expect("sparse tap lock")
                    .push((leaf, batch.input_ids.clone()));
                t
            }
            _ => self.word_embeddings.forward(&ids)?,
        };
        if let Some(table) = &self.token_type_embeddings {
            let types = Tensor::from_slice(&batch.type_ids, t, dev)?;
            x = x.add(&table.forward(&types)?)?;
        }
        let x = x.add(&self.position_embeddings.forward(&positions)?)?;
        let x = self.layer_norm.forward(&x, mode)?;
        mode.dropout(&x, self.dropout)
    }
}

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
