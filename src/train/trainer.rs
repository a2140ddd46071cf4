//! The training loop: AdamW with separate encoder and head learning rates, linear warm-up then
//! linear decay, gradient clipping, the masked multitask loss, and a fast path that trains the
//! heads on cached sentence vectors when no encoder weight trains.
//!
//! This file holds what a run is asked and what it reports; `trainer/state.rs` sets a run
//! up (optimizers, where the heads' inputs come from), `trainer/step.rs` is one optimizer
//! step, and `trainer/epochs.rs` the loop over epochs with its evaluations.

use std::time::Instant;

use anyhow::Result;
use candle_core::Var;
use serde::{Deserialize, Serialize};

use super::embedding_cache::EmbeddingCache;
use super::metrics::{HeadMetrics, Metric};
pub use super::prefix_cache::PREFIX_CACHE_MAX_BYTES;
pub use super::schedule::{epoch_batches, lr_factor};
use crate::model::multitask::MultiTaskModel;
use crate::model::names::is_head;

mod epochs;
mod state;
mod step;
use state::Trainer;

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate of the encoder.
    pub lr: f64,
    /// Peak learning rate of the heads.
    pub head_lr: f64,
    /// Fraction of all steps spent warming the learning rate up from 0.
    pub warmup: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// `[w_a, w_b]` in `w_a * CE_a + w_b * CE_b`.
    pub loss_weights: [f64; 2],
    /// Seeds head initialisation, dropout and shuffling.
    pub seed: u64,
    /// Gradients are scaled down when their global L2 norm exceeds this.
    pub max_grad_norm: f64,
    /// Train the heads on cached sentence vectors when no encoder weight trains.
    pub cache_features: bool,
    /// Form each batch from examples of similar length (see [`epoch_batches`]).
    pub group_by_length: bool,
    /// Micro-batches of `batch_size` per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Evaluate every this many optimizer steps (besides each epoch's end).
    pub eval_every: Option<usize>,
    /// Keep the weights of the best evaluation by this metric, not the last ones.
    pub keep_best: Option<Metric>,
    /// Stop after this many evaluations without improvement of `keep_best`'s metric.
    pub early_stop: Option<usize>,
    /// Weight each head's loss by inverse label frequency (`--class-weights auto`).
    pub class_weights: bool,
    /// Train the word embeddings with row-wise (sparse) gradients and a lazy AdamW (see
    /// `train::sparse`); off gives candle's dense gradient and the dense AdamW.
    pub sparse_embeddings: bool,
}

impl TrainSettings {
    /// Rows per optimizer step: `batch_size * grad_accum`.
    pub fn step_rows(&self) -> usize {
        self.batch_size * self.grad_accum.max(1)
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 32,
            lr: 2e-5,
            head_lr: 1e-3,
            warmup: 0.1,
            weight_decay: 0.01,
            loss_weights: [1.0, 1.0],
            seed: 42,
            max_grad_norm: 1.0,
            cache_features: true,
            group_by_length: true,
            grad_accum: 1,
            eval_every: None,
            keep_best: None,
            early_stop: None,
            class_weights: false,
            sparse_embeddings: true,
        }
    }
}

pub use super::prepared::Prepared;

/// The loss stopped being a finite number: training stops before anything is saved.
#[derive(Debug, thiserror::Error)]
#[error(
    "training diverged at epoch {epoch}, step {step}: the loss is {loss} (class {}, sentiment {}){}. \
     Nothing was saved",
    heads[0],
    heads[1],
    if self.weights_overflow() {
        ": each head's loss is finite, so the loss weights make their weighted sum overflow"
    } else {
        ""
    }
)]
pub struct Diverged {
    pub epoch: usize,
    pub step: usize,
    pub loss: f64,
    /// Each head's loss, before the loss weights.
    pub heads: [f64; 2],
}

/// Training left the model computing numbers that are not finite, although the loss was
/// finite (the last update overflowed, as with a far too large learning rate): a trained
/// tensor holds one, or the evaluation set's outputs do. Training stops; nothing is saved.
#[derive(Debug, thiserror::Error)]
#[error("training diverged by step {step}: {what}. Nothing was saved")]
pub struct DivergedWeights {
    pub step: usize,
    /// What is not finite.
    pub what: String,
}

impl Diverged {
    /// True when the heads' own losses are finite and only their weighted sum is not: the
    /// loss weights, not the learning rates, are at fault.
    pub fn weights_overflow(&self) -> bool {
        self.heads.iter().all(|h| h.is_finite())
    }
}

/// What one epoch did.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    /// Mean loss of each head over the epoch's labelled rows.
    pub loss: [f64; 2],
    /// Mean of the combined loss over the epoch's steps.
    pub total_loss: f64,
    pub eval: Option<[HeadMetrics; 2]>,
    /// Training time of the epoch (evaluation excluded).
    pub seconds: f64,
}

/// What training did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainOutcome {
    pub epochs: Vec<EpochReport>,
    pub steps: usize,
    /// Wall time of the training loop, feature caching included, evaluation excluded.
    pub train_seconds: f64,
    /// True when sentence vectors were computed once and the heads trained on them.
    pub cached_features: bool,
    /// True when the frozen layers' output was computed once and the upper layers trained
    /// on it.
    pub cached_prefix: bool,
    /// Every evaluation, in order (each epoch's end, and every `--eval-every` steps).
    pub evaluations: Vec<StepEval>,
    /// With `--keep-best`: the evaluation whose weights the model now has.
    pub best: Option<BestCheckpoint>,
    /// True when `--early-stop` ended training before the last epoch.
    pub stopped_early: bool,
}

/// The evaluation that `--keep-best` kept.
#[derive(Debug, Clone, Serialize)]
pub struct BestCheckpoint {
    pub metric: String,
    pub value: f64,
    pub step: usize,
    pub epoch: usize,
    pub eval: [HeadMetrics; 2],
}

impl TrainOutcome {
    pub fn final_loss(&self) -> Option<f64> {
        self.epochs.last().map(|e| e.total_loss)
    }
}

/// One evaluation during training (`--eval-every`, or the end of an epoch).
#[derive(Debug, Clone, Serialize)]
pub struct StepEval {
    pub step: usize,
    pub epoch: usize,
    pub metrics: [HeadMetrics; 2],
}

/// Splits the trainable variables into encoder and head groups.
fn var_groups(model: &MultiTaskModel) -> (Vec<Var>, Vec<Var>) {
    let (mut enc, mut heads) = (Vec::new(), Vec::new());
    for p in model.registry.params() {
        if let Some(v) = p.var {
            if is_head(&p.name) {
                heads.push(v);
            } else {
                enc.push(v);
            }
        }
    }
    (enc, heads)
}

/// Trains `model` on `data`, evaluating on `eval` after each epoch (and every
/// `eval_every` steps); `on_epoch` sees each epoch's report as it ends. Returns without
/// training when nothing is trainable.
pub fn train(
    model: &MultiTaskModel,
    data: &Prepared,
    eval: Option<&Prepared>,
    s: &TrainSettings,
    cache: Option<&mut EmbeddingCache>,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainOutcome> {
    let (enc, heads) = var_groups(model);
    if enc.is_empty() && heads.is_empty() {
        return Ok(TrainOutcome::default());
    }
    let started = Instant::now();
    let trainer = Trainer::new(model, data, eval, s, cache)?;
    // Computing cached vectors or the frozen prefix counts as training time.
    let setup_seconds = started.elapsed().as_secs_f64();
    let mut outcome = trainer.run(on_epoch)?;
    outcome.train_seconds += setup_seconds;
    Ok(outcome)
}
