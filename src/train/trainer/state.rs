//! A training run's state and its set-up: the optimizers of each parameter group, where the
//! heads' inputs come from (cached sentence vectors, a cached frozen prefix, or the encoder
//! every step), sparse word-embedding updates and class weights.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};

use super::{var_groups, Prepared, StepEval, TrainSettings, PREFIX_CACHE_MAX_BYTES};
use crate::model::dropout::Dropout;
use crate::model::multitask::MultiTaskModel;
use crate::model::names::WORD_EMBEDDINGS;
use crate::train::adamw::AdamW;
use crate::train::embedding_cache::EmbeddingCache;
use crate::train::evaluate::cached_features;
use crate::train::loss::balanced_weights;
use crate::train::metrics::HeadMetrics;
use crate::train::prefix_cache::PrefixCache;
use crate::train::sparse::LazyAdamW;

/// Where the heads' inputs come from in training.
pub(super) enum Inputs {
    /// Sentence vectors of a frozen encoder, `[n, hidden]` in data order.
    Features(Tensor),
    /// The frozen layers' output per sentence; the upper layers train on it.
    Prefix(PrefixCache),
    /// The whole trainable part of the encoder runs every step.
    Encoder,
}

/// The best evaluation seen and the trainable weights that gave it (`--keep-best`).
pub(super) struct Best {
    pub value: f64,
    pub step: usize,
    pub epoch: usize,
    pub metrics: [HeadMetrics; 2],
    pub weights: Vec<Tensor>,
}

/// One training run's state: the model, the optimizers, the schedule and the bookkeeping of
/// evaluations.
pub(super) struct Trainer<'a> {
    pub model: &'a MultiTaskModel,
    pub data: &'a Prepared,
    pub eval: Option<&'a Prepared>,
    pub s: &'a TrainSettings,
    pub dev: Device,
    pub vars: Vec<Var>,
    pub opt_enc: Option<AdamW>,
    pub opt_head: Option<AdamW>,
    /// The word embeddings' optimizer when they train with sparse gradients.
    pub opt_words: Option<LazyAdamW>,
    pub dropout: Dropout,
    pub inputs: Inputs,
    pub eval_features: Option<Tensor>,
    pub class_weights: [Option<Tensor>; 2],
    pub step: usize,
    pub total_steps: usize,
    pub warmup_steps: usize,
    pub best: Option<Best>,
    /// Evaluations since the best one (for `--early-stop`).
    pub stale_evals: usize,
    pub evaluations: Vec<StepEval>,
}

impl<'a> Trainer<'a> {
    /// Sets up a run: optimizers for the encoder and the heads (and the word embeddings'
    /// sparse one), the heads' inputs, class weights and the schedule's step counts.
    pub fn new(
        model: &'a MultiTaskModel,
        data: &'a Prepared,
        eval: Option<&'a Prepared>,
        s: &'a TrainSettings,
        cache: Option<&mut EmbeddingCache>,
    ) -> Result<Self> {
        let dev: Device = model.encoder.device().clone();
        let (mut enc_vars, head_vars) = var_groups(model);
        let adamw = |vars: Vec<Var>, lr: f64| -> Result<Option<AdamW>> {
            if vars.is_empty() {
                return Ok(None);
            }
            Ok(Some(AdamW::new(vars, lr, s.weight_decay)?))
        };
        let (inputs, eval_features) = heads_inputs(model, data, eval, s, cache)?;
        let opt_words = word_optimizer(model, s, &inputs, &mut enc_vars)?;
        let vars: Vec<Var> = enc_vars.iter().chain(&head_vars).cloned().collect();
        let class_weights = class_weights(model, data, s, &dev)?;
        let steps_per_epoch = data.encoded.len().div_ceil(s.step_rows());
        let total_steps = steps_per_epoch * s.epochs;
        Ok(Self {
            model,
            data,
            eval,
            s,
            dev,
            vars,
            opt_enc: adamw(enc_vars, s.lr)?,
            opt_head: adamw(head_vars, s.head_lr)?,
            opt_words,
            dropout: Dropout::new(s.seed.wrapping_add(1)),
            inputs,
            eval_features,
            class_weights,
            step: 0,
            total_steps,
            warmup_steps: (s.warmup * total_steps as f64).round() as usize,
            best: None,
            stale_evals: 0,
            evaluations: Vec::new(),
        })
    }
}

/// Where the heads' inputs come from, and the evaluation set's cached vectors if any: with a
/// frozen encoder, sentence vectors computed once; with a frozen prefix that fits
/// [`PREFIX_CACHE_MAX_BYTES`], its output computed once; else the encoder every step.
fn heads_inputs(
    model: &MultiTaskModel,
    data: &Prepared,
    eval: Option<&Prepared>,
    s: &TrainSettings,
    cache: Option<&mut EmbeddingCache>,
) -> Result<(Inputs, Option<Tensor>)> {
    let num_layers = model.encoder.num_layers();
    let frozen = model.plan.encoder_frozen(num_layers);
    if cache.is_some() && !(s.cache_features && frozen) {
        crate::note!(
            "note: the embedding cache is not used: part of the encoder trains, so the \
             sentence vectors change at every step; it is used only with the whole encoder \
             frozen"
        );
    }
    if s.cache_features && frozen {
        let mut cache = cache;
        let train = cached_features(model, data, s.batch_size, cache.as_deref_mut())
            .map_err(|e| name_example(e, data, "training"))?;
        // Evaluation vectors are cached too.
        let eval = match eval {
            Some(e) => Some(
                cached_features(model, e, s.batch_size, cache)
                    .map_err(|err| name_example(err, e, "evaluation"))?,
            ),
            None => None,
        };
        return Ok((Inputs::Features(train), eval));
    }
    if s.cache_features && model.plan.encoder_prefix.is_some() {
        let hidden = model.encoder.config().hidden_size;
        let bytes = PrefixCache::bytes(data, hidden);
        if bytes <= PREFIX_CACHE_MAX_BYTES {
            let prefix = PrefixCache::build(model, data, s.batch_size)?;
            return Ok((Inputs::Prefix(prefix), None));
        }
        crate::note!(
            "note: the frozen layers' output would take {} MB ({} bytes per token); \
             recomputing it every step instead",
            bytes >> 20,
            hidden * 4
        );
    }
    Ok((Inputs::Encoder, None))
}

/// The word embeddings train with sparse gradients when the embeddings run every step: their
/// optimizer then, and they leave the encoder group `enc_vars`.
fn word_optimizer(
    model: &MultiTaskModel,
    s: &TrainSettings,
    inputs: &Inputs,
    enc_vars: &mut Vec<Var>,
) -> Result<Option<LazyAdamW>> {
    let word_var = model
        .registry
        .params()
        .into_iter()
        .find(|p| p.name == WORD_EMBEDDINGS)
        .and_then(|p| p.var);
    Ok(match word_var {
        Some(var) if s.sparse_embeddings && matches!(inputs, Inputs::Encoder) => {
            enc_vars.retain(|v| v.as_tensor().id() != var.as_tensor().id());
            model.encoder.sparse().enable(true);
            Some(LazyAdamW::new(var, s.lr, s.weight_decay)?)
        }
        _ => None,
    })
}

/// With `--class-weights`, each head's balanced class weights.
fn class_weights(
    model: &MultiTaskModel,
    data: &Prepared,
    s: &TrainSettings,
    dev: &Device,
) -> Result<[Option<Tensor>; 2]> {
    if !s.class_weights {
        return Ok([None, None]);
    }
    let w = |t: usize| -> Result<Option<Tensor>> {
        let labels: Vec<Option<u32>> = data.labels.iter().map(|l| l[t]).collect();
        let w = balanced_weights(&labels, model.spec.labels[t].len());
        Ok(Some(Tensor::new(w, dev)?))
    };
    Ok([w(0)?, w(1)?])
}

/// Names the example of an error about one example of `data` (the `set` data) by its
/// position and the start of its text.
fn name_example(e: anyhow::Error, data: &Prepared, set: &str) -> anyhow::Error {
    crate::tokenize::name_sentence(e, |i| {
        let text: String = data.texts[i].chars().take(60).collect();
        format!("{set} example {} ({text:?})", i + 1)
    })
}
