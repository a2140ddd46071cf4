//! The multitask model: the shared encoder, pooling, and two classification heads.
//!
//! Head A (`class_head`) classifies the sentence's class, head B (`sentiment_head`) its
//! sentiment. Each head is `fc1 -> ReLU -> dropout -> fc2`. Frozen parts run in inference
//! mode (no dropout, no gradient); the graph is cut after the frozen encoder prefix.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::batch::PackedBatch;
use super::bert::{AttentionMask, Linear, Mode};
use super::dropout::Dropout;
use super::encoder::{Encoder, InferenceEncoder};
use super::fast::{PackedEncoder, WorkspacePool};
use super::freeze::FreezePlan;
use super::pooling::Pooling;
use super::quant::Dtype;
use super::weights::{ParamRegistry, ParamSource, WeightFile};
use crate::tokenize::{Batch, Encoded};

/// An inference arithmetic other than f32 asked of an encoder that trains.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0} arithmetic applies to an encoder that does not train (a frozen encoder, or predicting \
     with a checkpoint); a trainable encoder trains and is evaluated in f32"
)]
pub struct TrainableDtype(pub Dtype);

/// The shape of the two heads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadsSpec {
    /// Width of each head's hidden layer.
    pub hidden: usize,
    /// Dropout between the two layers, in training.
    pub dropout: f64,
    /// Label names per head, sorted: `[class, sentiment]`.
    pub labels: [Vec<String>; 2],
}

pub use super::names::HEAD_NAMES;

/// Two fully connected layers with ReLU and dropout between them.
pub struct Head {
    pub fc1: Linear,
    pub fc2: Linear,
    dropout: f64,
}

impl Head {
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        hidden: usize,
        out: usize,
        dropout: f64,
    ) -> Result<Self> {
        Ok(Self {
            fc1: Linear::load(vb.pp("fc1"), in_dim, hidden)?,
            fc2: Linear::load(vb.pp("fc2"), hidden, out)?,
            dropout,
        })
    }

    /// `[batch, in]` -> logits `[batch, labels]`
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self.fc1.forward(x)?.relu()?;
        let h = match mode {
            Mode::Train(d) => d.apply(&h, self.dropout)?,
            Mode::Infer => h,
        };
        Ok(self.fc2.forward(&h)?)
    }
}

/// Where the heads' weights come from.
pub enum HeadInit {
    /// Fresh weights drawn from a generator seeded with this value.
    Seed(u64),
    /// Weights read from a checkpoint file.
    Checkpoint(Arc<WeightFile>),
}

/// The shared encoder plus mean pooling (whatever the model's own pooling) plus two heads.
pub struct MultiTaskModel {
    pub encoder: Encoder,
    pub pooling: Pooling,
    pub heads: [Head; 2],
    pub spec: HeadsSpec,
    pub plan: FreezePlan,
    /// Every parameter, with a `Var` for each trainable one.
    pub registry: Arc<ParamRegistry>,
    /// Buffers of the inference fast path, one per batch in flight.
    workspaces: WorkspacePool,
    /// The frozen encoder in another arithmetic (`--dtype`), for inference.
    fast: Option<InferenceEncoder>,
}

impl MultiTaskModel {
    /// Puts the model together around `encoder`, whose parameters `registry` holds: heads as
    /// `init` says, trainable as `plan` says. (`ModelAssets::multitask` builds the encoder
    /// and calls this.)
    pub fn build(
        encoder: Encoder,
        registry: Arc<ParamRegistry>,
        spec: HeadsSpec,
        plan: FreezePlan,
        init: HeadInit,
        device: &Device,
    ) -> Result<Self> {
        let source = match &init {
            HeadInit::Seed(seed) => {
                ParamSource::from_files(vec![], registry.clone()).with_init_seed(*seed)
            }
            HeadInit::Checkpoint(file) => {
                ParamSource::from_files(vec![file.clone()], registry.clone())
            }
        };
        let vb = source
            .with_trainable(plan.trainable())
            .into_var_builder(device);
        let hidden = encoder.config().hidden_size;
        let head = |t: usize| {
            Head::load(
                vb.pp(HEAD_NAMES[t]),
                hidden,
                spec.hidden,
                spec.labels[t].len(),
                spec.dropout,
            )
            .with_context(|| format!("loading the {} weights", HEAD_NAMES[t]))
        };
        let heads = [head(0)?, head(1)?];
        Ok(Self {
            encoder,
            pooling: Pooling::Mean,
            heads,
            spec,
            plan,
            registry,
            workspaces: WorkspacePool::default(),
            fast: None,
        })
    }

    /// Runs the encoder's inference (sentence vectors for the heads) in `dtype`. Only for an
    /// encoder that does not train: a trainable one changes every step and is evaluated in
    /// float32.
    ///
    /// Loading ends here, so the heap pages it freed go back to the system
    /// ([`crate::alloc::release_freed`]): the batches that follow allocate on other threads.
    pub fn with_dtype(mut self, dtype: Dtype) -> anyhow::Result<Self> {
        if dtype != Dtype::F32 {
            let layers = self.encoder.num_layers();
            if !self.plan.encoder_frozen(layers) {
                return Err(TrainableDtype(dtype).into());
            }
            let fast = InferenceEncoder::from_encoder(&self.encoder, dtype)?;
            crate::note!(
                "encoder in {dtype}: dense layers on the {} kernel",
                fast.kernel_name()
            );
            self.fast = Some(fast);
        }
        crate::alloc::release_freed();
        Ok(self)
    }

    /// Frees the inference workspaces not in use (see [`Self::features_infer`]).
    pub fn release_workspaces(&self) {
        self.workspaces.clear();
    }

    /// The encoder of inference: the `--dtype` one, or the float32 encoder.
    pub fn inference_encoder(&self) -> &dyn PackedEncoder {
        match &self.fast {
            Some(f) => f,
            None => &self.encoder,
        }
    }

    /// The kernel of the inference encoder's dense layers.
    pub fn kernel_name(&self) -> &'static str {
        self.fast.as_ref().map_or("gemm-f32", |f| f.kernel_name())
    }

    /// Pooled sentence vectors `[batch, hidden]` in inference mode, through the encoder's
    /// fast path; equal to `features(batch, None)` to float rounding.
    pub fn features_infer(&self, items: &[&Encoded]) -> Result<Tensor> {
        let encoder = self.inference_encoder();
        let rows = self
            .workspaces
            .with(|ws| encoder.pooled_packed(items, self.pooling, ws))?;
        let h = self.encoder.config().hidden_size;
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        Ok(Tensor::from_vec(
            flat,
            (items.len(), h),
            self.encoder.device(),
        )?)
    }

    /// Pooled sentence vectors `[batch, hidden]`. With `dropout`, the trainable part of the
    /// encoder runs in training mode; the frozen prefix always runs in inference mode and
    /// its output is detached, so no gradient is computed for it.
    pub fn features(&self, batch: &Batch, dropout: Option<&Dropout>) -> Result<Tensor> {
        let Encoder::Bert(encoder) = &self.encoder else {
            // The long-context encoders take packed batches only.
            return self.features_packed(&unpad(batch)?, dropout);
        };
        let train = dropout.map_or(Mode::Infer, Mode::Train);
        let layers = encoder.layers.len();
        let frozen = self.plan.frozen_layers();
        let emb_mode = if self.plan.encoder_prefix.is_some() {
            Mode::Infer
        } else {
            train
        };
        let mask = AttentionMask::new(&batch.attention_mask)?;
        let x = encoder
            .embeddings
            .forward(&batch.input_ids, &batch.token_type_ids, emb_mode)?;
        let mut x = encoder.forward_layers(&x, &mask, 0..frozen, Mode::Infer)?;
        if self.plan.encoder_prefix.is_some() {
            x = x.detach();
        }
        let x = encoder.forward_layers(&x, &mask, frozen..layers, train)?;
        Ok(self.pooling.forward(&x, &batch.attention_mask)?)
    }

    /// Pooled (mean) sentence vectors `[batch, hidden]` of a packed batch: the same as
    /// [`Self::features`] on the padded batch, with no work on padding. With `dropout`, the
    /// trainable part runs in training mode; the frozen prefix in inference mode, detached.
    pub fn features_packed(
        &self,
        batch: &PackedBatch,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let prefix = match self.plan.encoder_prefix {
            Some(_) => Some(self.frozen_prefix_packed(batch)?),
            None => None,
        };
        self.features_from_prefix(prefix.as_ref(), batch, dropout)
    }

    /// The frozen part of the encoder on a packed batch: `[T, hidden]` after the embeddings
    /// and the frozen layers (inference mode, detached). Only meaningful with a frozen prefix
    /// (`--freeze-layers` or a frozen encoder).
    pub fn frozen_prefix_packed(&self, batch: &PackedBatch) -> Result<Tensor> {
        let frozen = self.plan.frozen_layers();
        let x = self.encoder.embed_packed(batch, Mode::Infer)?;
        let x = self
            .encoder
            .forward_layers(&x, batch, 0..frozen, Mode::Infer)?;
        Ok(x.detach())
    }

    /// Pooled vectors from the output of the frozen prefix `prefix` `[T, hidden]` (see
    /// [`Self::frozen_prefix_packed`]), or, with no frozen prefix (`None`), from the
    /// embeddings computed in the requested mode.
    pub fn features_from_prefix(
        &self,
        prefix: Option<&Tensor>,
        batch: &PackedBatch,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let train = dropout.map_or(Mode::Infer, Mode::Train);
        let layers = self.encoder.num_layers();
        let frozen = self.plan.frozen_layers();
        let x = match prefix {
            Some(x) => x.clone(),
            None => self.encoder.embed_packed(batch, train)?,
        };
        let x = self
            .encoder
            .forward_layers(&x, batch, frozen..layers, train)?;
        Ok(self.pooling.forward_packed(&x, batch)?)
    }

    /// Logits of both heads for a packed batch.
    pub fn forward_packed(
        &self,
        batch: &PackedBatch,
        dropout: Option<&Dropout>,
    ) -> Result<[Tensor; 2]> {
        let features = self.features_packed(batch, dropout)?;
        self.head_logits(&features, dropout)
    }

    /// Logits of both heads for pooled vectors `[batch, hidden]`.
    pub fn head_logits(&self, features: &Tensor, dropout: Option<&Dropout>) -> Result<[Tensor; 2]> {
        let frozen = [self.plan.class_head, self.plan.sentiment_head];
        let logits = |t: usize| -> Result<Tensor> {
            let mode = match dropout {
                Some(d) if !frozen[t] => Mode::Train(d),
                _ => Mode::Infer,
            };
            self.heads[t].forward(features, mode)
        };
        Ok([logits(0)?, logits(1)?])
    }

    /// Logits of both heads for a batch.
    pub fn forward(&self, batch: &Batch, dropout: Option<&Dropout>) -> Result<[Tensor; 2]> {
        let features = self.features(batch, dropout)?;
        self.head_logits(&features, dropout)
    }
}

/// The real tokens of a padded batch (rows padded at their end), packed.
fn unpad(batch: &Batch) -> Result<PackedBatch> {
    let ids = batch.input_ids.to_vec2::<u32>()?;
    let types = batch.token_type_ids.to_vec2::<u32>()?;
    let mask = batch.attention_mask.to_vec2::<f32>()?;
    let encoded: Vec<Encoded> = (0..ids.len())
        .map(|r| {
            let n = mask[r].iter().take_while(|&&m| m > 0.5).count();
            Encoded {
                ids: ids[r][..n].to_vec(),
                type_ids: types[r][..n].to_vec(),
                truncated: false,
            }
        })
        .collect();
    Ok(PackedBatch::new(&encoded.iter().collect::<Vec<_>>()))
}
