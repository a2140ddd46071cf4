//! The encoder seam: one type for every architecture, so the multitask model, training,
//! freezing, checkpoints and task 1 do not care which one runs.
//!
//! [`Encoder`] is BERT's encoder (which also runs RoBERTa, XLM-RoBERTa, DistilBERT and MPNet)
//! or one of the long-context encoders, ModernBERT, NomicBERT and JinaBERT, each in its own
//! file. All of them take packed batches, in inference or training mode. For task 1,
//! [`InferenceEncoder`] is the fast path in f32, bf16 or int8: [`FastEncoder`] for the BERT
//! family, [`LongEncoder`] for the others. [`Encoder::forward_packed`] (the candle blocks in
//! inference mode, f32, tiled attention too) stays as their reference and for encoders that
//! train.

use std::borrow::Cow;

use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::batch::PackedBatch;
use super::bert::{AttentionMask, BertConfig, BertEncoder, Mode, SparseTap};
use super::fast::{FastEncoder, LongEncoder, PackedEncoder, Workspace};
use super::jina_bert::{JinaBertConfig, JinaBertEncoder};
use super::modernbert::{ModernBertConfig, ModernBertEncoder};
use super::nomic_bert::{NomicBertConfig, NomicBertEncoder};
use super::quant::Dtype;
use crate::tokenize::Encoded;

/// The configuration a long-context architecture adds to the shape in [`BertConfig`].
#[derive(Debug, Clone)]
pub enum LongConfig {
    ModernBert(ModernBertConfig),
    NomicBert(NomicBertConfig),
    JinaBert(JinaBertConfig),
}

/// Any encoder fetch-ml runs.
#[derive(Clone)]
pub enum Encoder {
    Bert(BertEncoder),
    ModernBert(ModernBertEncoder),
    NomicBert(NomicBertEncoder),
    JinaBert(JinaBertEncoder),
}

impl Encoder {
    /// Loads the encoder `cfg` describes.
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        Ok(match &cfg.long {
            None => Encoder::Bert(BertEncoder::load(vb, cfg)?),
            Some(LongConfig::ModernBert(c)) => {
                Encoder::ModernBert(ModernBertEncoder::load(vb, cfg, c)?)
            }
            Some(LongConfig::NomicBert(c)) => {
                Encoder::NomicBert(NomicBertEncoder::load(vb, cfg, c)?)
            }
            Some(LongConfig::JinaBert(c)) => Encoder::JinaBert(JinaBertEncoder::load(vb, cfg, c)?),
        })
    }

    pub fn config(&self) -> &BertConfig {
        match self {
            Encoder::Bert(e) => &e.config,
            Encoder::ModernBert(e) => &e.config,
            Encoder::NomicBert(e) => &e.config,
            Encoder::JinaBert(e) => &e.config,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Encoder::Bert(e) => e.layers.len(),
            Encoder::ModernBert(e) => e.layers.len(),
            Encoder::NomicBert(e) => e.layers.len(),
            Encoder::JinaBert(e) => e.layers.len(),
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Encoder::Bert(e) => e.device(),
            Encoder::ModernBert(e) => e.tok_embeddings.device(),
            Encoder::NomicBert(e) => e.word_embeddings.device(),
            Encoder::JinaBert(e) => e.word_embeddings.device(),
        }
    }

    /// Where the word-embedding rows of training passes are recorded (sparse gradients).
    pub fn sparse(&self) -> &SparseTap {
        match self {
            Encoder::Bert(e) => &e.embeddings.sparse,
            Encoder::ModernBert(e) => &e.sparse,
            Encoder::NomicBert(e) => &e.sparse,
            Encoder::JinaBert(e) => &e.sparse,
        }
    }

    /// The BERT-family encoder, if this is one.
    pub fn as_bert(&self) -> Option<&BertEncoder> {
        match self {
            Encoder::Bert(e) => Some(e),
            _ => None,
        }
    }

    /// The embeddings of a packed batch, `[T, hidden]`.
    pub fn embed_packed(&self, batch: &PackedBatch, mode: Mode) -> Result<Tensor> {
        match self {
            Encoder::Bert(e) => e.embeddings.forward_packed(batch, mode),
            Encoder::ModernBert(e) => e.embed_packed(batch, mode),
            Encoder::NomicBert(e) => e.embed_packed(batch, mode),
            Encoder::JinaBert(e) => e.embed_packed(batch, mode),
        }
    }

    /// Layers `range` on the packed states `x` of `batch`. (ModernBERT's final LayerNorm
    /// belongs to its last layer: it runs when `range` ends there.)
    pub fn forward_layers(
        &self,
        x: &Tensor,
        batch: &PackedBatch,
        range: std::ops::Range<usize>,
        mode: Mode,
    ) -> Result<Tensor> {
        match self {
            Encoder::Bert(e) => e.forward_layers(x, &AttentionMask::packed(batch), range, mode),
            Encoder::ModernBert(e) => e.forward_layers(x, batch, range, mode),
            Encoder::NomicBert(e) => e.forward_layers(x, batch, range, mode),
            Encoder::JinaBert(e) => e.forward_layers(x, batch, range, mode),
        }
    }

    /// The last hidden states of `seqs`, packed (`[T, hidden]` in order), in inference mode:
    /// the float32 fast path for the BERT family, the candle path with tiled attention for
    /// the long-context architectures.
    pub fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<Cow<'w, [f32]>> {
        if let Encoder::Bert(e) = self {
            return Ok(Cow::Borrowed(e.forward_packed(seqs, ws)?));
        }
        let batch = PackedBatch::new(seqs);
        check_lengths(self.config(), seqs)?;
        let x = self.embed_packed(&batch, Mode::Infer)?;
        let x = self.forward_layers(&x, &batch, 0..self.num_layers(), Mode::Infer)?;
        Ok(Cow::Owned(x.flatten_all()?.to_vec1::<f32>()?))
    }
}

/// Sequences longer than the model's positions and token ids outside its vocabulary are
/// errors, before any lookup.
pub(crate) fn check_lengths(cfg: &BertConfig, seqs: &[&Encoded]) -> Result<()> {
    let max = cfg.max_tokens();
    if let Some(s) = seqs.iter().find(|s| s.ids.len() > max) {
        candle_core::bail!(
            "a sequence of {} tokens is longer than the model's {max} positions",
            s.ids.len()
        );
    }
    if seqs
        .iter()
        .flat_map(|s| &s.ids)
        .any(|&id| id as usize >= cfg.vocab_size)
    {
        candle_core::bail!("a token id is outside the vocabulary of {}", cfg.vocab_size);
    }
    let types = cfg.type_vocab_size.max(1);
    if seqs
        .iter()
        .flat_map(|s| &s.type_ids)
        .any(|&t| t as usize >= types)
    {
        candle_core::bail!(
            "a token type id is outside the model's {} types",
            cfg.type_vocab_size
        );
    }
    Ok(())
}

impl PackedEncoder for Encoder {
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }
    fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<Cow<'w, [f32]>> {
        Encoder::forward_packed(self, seqs, ws)
    }
}

/// Task 1's encoder: the fast path in a chosen dtype, for the BERT family or a long-context
/// architecture.
pub enum InferenceEncoder {
    Fast(Box<FastEncoder>),
    Long(Box<LongEncoder>),
}

impl InferenceEncoder {
    /// The fast path of a frozen `encoder` in `dtype`, sharing its tensors where it can.
    pub fn from_encoder(encoder: &Encoder, dtype: Dtype) -> Result<Self> {
        Ok(match encoder {
            Encoder::Bert(b) => {
                InferenceEncoder::Fast(Box::new(FastEncoder::from_encoder(b, dtype)?))
            }
            other => InferenceEncoder::Long(Box::new(LongEncoder::from_encoder(other, dtype)?)),
        })
    }

    /// The kernel of the dense layers, for messages.
    pub fn kernel_name(&self) -> &'static str {
        match self {
            InferenceEncoder::Fast(f) => f.kernel_name(),
            InferenceEncoder::Long(l) => l.kernel_name(),
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            InferenceEncoder::Fast(f) => f.dtype(),
            InferenceEncoder::Long(l) => l.dtype(),
        }
    }

    pub fn config(&self) -> &BertConfig {
        match self {
            InferenceEncoder::Fast(f) => f.config(),
            InferenceEncoder::Long(l) => l.config(),
        }
    }

    /// Last hidden states of `seqs`, packed (`[T, hidden]`), in `ws`.
    pub fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        match self {
            InferenceEncoder::Fast(f) => f.forward_packed(seqs, ws),
            InferenceEncoder::Long(l) => l.forward_packed(seqs, ws),
        }
    }
}

impl PackedEncoder for InferenceEncoder {
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }
    fn forward_packed<'w>(
        &self,
        seqs: &[&Encoded],
        ws: &'w mut Workspace,
    ) -> Result<Cow<'w, [f32]>> {
        Ok(Cow::Borrowed(InferenceEncoder::forward_packed(
            self, seqs, ws,
        )?))
    }
}
