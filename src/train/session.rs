//! One training run from start to end: load and check the model and data before anything
//! trains, then snapshot, train, evaluate and verify the freeze. Shared by `--task=2` and
//! `--task=3`.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Result};
use serde::Serialize;

use super::embedding_cache::{CacheKey, EmbeddingCache};
use super::evaluate::evaluate;
use super::memory;
use super::metrics::HeadMetrics;
use super::trainer::{train, EpochReport, Prepared, TrainOutcome, TrainSettings};
use super::verify::{FreezeCheck, ParamCounts, Snapshot};
use crate::data::{DataSource, Dataset, TASKS};
use crate::hub::ModelRef;
use crate::loader::ModelAssets;
use crate::model::freeze::{FreezePart, FreezePlan};
use crate::model::multitask::{HeadsSpec, MultiTaskModel};
use crate::model::quant::Dtype;

/// Training settings shared by `--task=2` and `--task=3`.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The base model.
    pub model: ModelRef,
    /// True when `--model` was given (a checkpoint otherwise names its own base).
    pub model_given: bool,
    pub max_seq_length: Option<usize>,
    pub train_file: DataSource,
    /// `None`: no evaluation.
    pub eval_file: Option<DataSource>,
    pub settings: TrainSettings,
    /// Width of each head's hidden layer.
    pub head_hidden: usize,
    /// Dropout between each head's two layers.
    pub head_dropout: f64,
    pub freeze: Vec<FreezePart>,
    pub freeze_layers: Option<usize>,
    /// Train on at most this many rows.
    pub max_train_examples: Option<usize>,
    /// Folder for cached sentence vectors of a frozen encoder.
    pub embedding_cache: Option<PathBuf>,
    /// Arithmetic of the encoder where it does not train (frozen-encoder vectors,
    /// predictions with a checkpoint); an error with a trainable encoder.
    pub dtype: Dtype,
}

/// Evaluation during training (periodic evaluation, keeping the best epoch) was asked for
/// without an evaluation set.
#[derive(Debug, thiserror::Error)]
#[error("evaluating during training needs an evaluation set, and this run has none")]
pub struct NoEvalSet;

/// A data set, tokenized and labelled.
pub struct DataPart {
    pub name: String,
    pub prepared: Prepared,
}

/// Fewer training rows than this get a warning: a head fits them exactly.
const FEW_ROWS: usize = 10;

/// The model files and both data sets of a run, validated.
pub struct Setup {
    pub assets: ModelAssets,
    /// Sorted label names per head, from the training data.
    pub labels: [Vec<String>; 2],
    pub train: DataPart,
    pub eval: Option<DataPart>,
    /// The on-disk cache of frozen-encoder vectors, with `--embedding-cache`.
    pub cache: Mutex<Option<EmbeddingCache>>,
}

impl Setup {
    /// Reads everything a training run needs; every data error surfaces here, before any
    /// training.
    pub fn load(cfg: &TrainConfig) -> Result<Self> {
        let mut train = Dataset::load(&cfg.train_file)?;
        if let Some(n) = cfg.max_train_examples {
            train.truncate(n);
        }
        let eval = cfg.eval_file.as_ref().map(Dataset::load).transpose()?;
        let s = &cfg.settings;
        if eval.is_none() && (s.eval_every.is_some() || s.keep_best.is_some()) {
            return Err(NoEvalSet.into());
        }
        let labels = train.label_sets();
        let rows = train.examples.len();
        if rows < FEW_ROWS {
            crate::note!(
                "warning: {} has only {rows} row{}: the heads will fit {} (loss near 0) and learn \
                 little that carries over to other sentences",
                train.name,
                if rows == 1 { "" } else { "s" },
                if rows == 1 { "it" } else { "them" }
            );
        }
        for t in 0..2 {
            if labels[t].is_empty() {
                bail!(
                    "{}: no row has a {} label, so that head cannot be trained",
                    train.name,
                    TASKS[t]
                );
            }
            if labels[t].len() == 1 {
                crate::note!(
                    "warning: every {} label in {} is {:?}: that head can only ever predict it \
                     (its loss is 0 from the start)",
                    TASKS[t],
                    train.name,
                    labels[t][0]
                );
            }
        }
        let train_ids = train.label_ids(&labels)?;
        let eval_ids = eval.as_ref().map(|e| e.label_ids(&labels)).transpose()?;
        let assets = ModelAssets::load(&cfg.model, cfg.max_seq_length)?;
        let prepare = |d: &Dataset, ids: Vec<[Option<u32>; 2]>| -> Result<DataPart> {
            Ok(DataPart {
                name: d.name.clone(),
                prepared: Prepared::tokenize(d, ids, &assets.tokenizer)?,
            })
        };
        let train_part = prepare(&train, train_ids)?;
        let eval_part = match (&eval, eval_ids) {
            (Some(e), Some(ids)) => Some(prepare(e, ids)?),
            _ => None,
        };
        let cache = match &cfg.embedding_cache {
            Some(dir) => {
                let key = CacheKey {
                    model: cfg.model.id.clone(),
                    revision: cfg.model.revision.clone(),
                    fingerprint: assets.weights.fingerprint()?,
                    max_seq_length: assets.tokenizer.max_len(),
                    pooling: "mean".into(),
                    dimension: assets.config.hidden_size,
                    dtype: cfg.dtype.name().into(),
                };
                let cache = EmbeddingCache::open(dir, key)?;
                if let Some(note) = &cache.note {
                    crate::note!("embedding cache: {note}");
                }
                Some(cache)
            }
            None => None,
        };
        Ok(Self {
            assets,
            labels,
            train: train_part,
            eval: eval_part,
            cache: Mutex::new(cache),
        })
    }

    pub fn heads_spec(&self, cfg: &TrainConfig) -> HeadsSpec {
        HeadsSpec {
            hidden: cfg.head_hidden,
            dropout: cfg.head_dropout,
            labels: self.labels.clone(),
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub parameters: ParamCounts,
    pub training: TrainOutcome,
    /// Final evaluation, when there is an evaluation set.
    pub eval: Option<[HeadMetrics; 2]>,
    pub freeze_check: FreezeCheck,
}

/// Snapshots the parameters, trains (unless nothing is trainable), evaluates, and checks
/// that frozen tensors are bit-identical and trainable ones changed. A violation is an error.
pub fn fit(
    model: &MultiTaskModel,
    setup: &Setup,
    settings: &TrainSettings,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<RunResult> {
    check_memory(setup, &model.plan)?;
    let parameters = ParamCounts::of(model);
    let snapshot = Snapshot::take(model)?;
    let eval = setup.eval.as_ref().map(|e| &e.prepared);
    let mut cache = setup.cache.lock().expect("cache lock");
    let training = train(
        model,
        &setup.train.prepared,
        eval,
        settings,
        cache.as_mut(),
        on_epoch,
    )?;
    // With --keep-best the model holds the best evaluation's weights: report that one.
    let last = training
        .best
        .as_ref()
        .map(|b| b.eval.clone())
        .or_else(|| training.evaluations.last().map(|e| e.metrics.clone()));
    let final_eval = match last {
        Some(m) => Some(m),
        None => eval
            .map(|e| evaluate(model, e, settings.batch_size, None))
            .transpose()?,
    };
    let freeze_check = snapshot.compare(model)?;
    freeze_check.ensure()?;
    Ok(RunResult {
        parameters,
        training,
        eval: final_eval,
        freeze_check,
    })
}

/// Refuses a run whose longest training row's attention cannot fit in memory while the
/// encoder trains under `plan` ([`memory`]); nothing to check when it is frozen or the
/// memory unknown. Task 3 checks every scenario's plan before the first trains.
pub fn check_memory(setup: &Setup, plan: &FreezePlan) -> Result<()> {
    let layers = setup.assets.config.num_hidden_layers;
    let heads = setup.assets.config.num_attention_heads;
    if plan.encoder_frozen(layers) {
        return Ok(());
    }
    let trainable = layers.saturating_sub(plan.frozen_layers());
    let p = &setup.train.prepared;
    let longest = p
        .encoded
        .iter()
        .enumerate()
        .max_by_key(|(_, e)| e.ids.len());
    let (Some((i, e)), Some(available)) = (longest, memory::available()?) else {
        return Ok(());
    };
    let row = || format!("{}, line {}", setup.train.name, p.lines[i]);
    memory::check_row(row, e.ids.len(), (trainable, heads), available)?;
    Ok(())
}
