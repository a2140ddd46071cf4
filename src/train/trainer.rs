//! The training loop: AdamW with separate encoder and head learning rates, linear warm-up then
//! linear decay, gradient clipping, the masked multitask loss, and a fast path that trains the
//! heads on cached sentence vectors when no encoder weight trains.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::adamw::{clip_gradients, AdamW};
use super::embedding_cache::EmbeddingCache;
use super::evaluate::{cached_features, evaluate};
use super::loss::{multitask_loss, HeadTargets};
use super::metrics::HeadMetrics;
use crate::model::dropout::Dropout;
use crate::model::multitask::{MultiTaskModel, HEAD_NAMES};
use crate::output::progress_bar;
use crate::tokenize::{Encoded, TextTokenizer};

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
        }
    }
}

/// Tokenized sentences with their label indices.
pub struct Prepared {
    pub texts: Vec<String>,
    pub encoded: Vec<Encoded>,
    pub labels: Vec<[Option<u32>; 2]>,
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
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub epochs: Vec<EpochReport>,
    pub steps: usize,
    /// Wall time of the training loop, feature caching included, evaluation excluded.
    pub train_seconds: f64,
    /// True when sentence vectors were computed once and the heads trained on them.
    pub cached_features: bool,
}

impl TrainOutcome {
    pub fn final_loss(&self) -> Option<f64> {
        self.epochs.last().map(|e| e.total_loss)
    }
}

/// Mega-batches hold this many batches; each is sorted by length before it is cut.
const GROUP: usize = 8;

/// One epoch's batches: a seeded shuffle, cut into batches of `batch_size`. With `lengths`,
/// the shuffle is cut into groups of [`GROUP`] batches, each group is sorted by length and
/// cut, and the batch order is shuffled again: batches stay random but pad little
/// (the `group_by_length` of Hugging Face's Trainer).
pub fn epoch_batches(
    n: usize,
    batch_size: usize,
    lengths: Option<&[usize]>,
    rng: &mut StdRng,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let Some(lengths) = lengths else {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for group in order.chunks_mut(batch_size * GROUP) {
        group.sort_by_key(|&i| lengths[i]);
        batches.extend(group.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// Linear warm-up over `warmup` steps, then linear decay to 0 at `total`.
pub fn lr_factor(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        (total - step) as f64 / (total - warmup).max(1) as f64
    }
}

/// Splits the trainable variables into encoder and head groups.
fn var_groups(model: &MultiTaskModel) -> (Vec<Var>, Vec<Var>) {
    let (mut enc, mut heads) = (Vec::new(), Vec::new());
    for p in model.registry.params() {
        if let Some(v) = p.var {
            if HEAD_NAMES.iter().any(|h| p.name.starts_with(h)) {
                heads.push(v);
            } else {
                enc.push(v);
            }
        }
    }
    (enc, heads)
}

/// Trains `model` on `data`, evaluating on `eval` after each epoch; `on_epoch` sees each
/// epoch's report as it ends. Returns without training when nothing is trainable.
pub fn train(
    model: &MultiTaskModel,
    tok: &TextTokenizer,
    data: &Prepared,
    eval: Option<&Prepared>,
    s: &TrainSettings,
    mut cache: Option<&mut EmbeddingCache>,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainOutcome> {
    let dev: Device = model.encoder.device().clone();
    let (enc_vars, head_vars) = var_groups(model);
    let mut outcome = TrainOutcome {
        epochs: Vec::new(),
        steps: 0,
        train_seconds: 0.0,
        cached_features: false,
    };
    if enc_vars.is_empty() && head_vars.is_empty() {
        return Ok(outcome);
    }
    let all_vars: Vec<Var> = enc_vars.iter().chain(&head_vars).cloned().collect();
    let adamw = |vars: Vec<Var>, lr: f64| -> Result<Option<AdamW>> {
        if vars.is_empty() {
            return Ok(None);
        }
        Ok(Some(AdamW::new(vars, lr, s.weight_decay)?))
    };
    let mut opt_enc = adamw(enc_vars.clone(), s.lr)?;
    let mut opt_head = adamw(head_vars, s.head_lr)?;

    let started = Instant::now();
    let num_layers = model.encoder.layers.len();
    let use_cache = s.cache_features && model.plan.encoder_frozen(num_layers);
    outcome.cached_features = use_cache;
    let train_features = match use_cache {
        true => Some(cached_features(
            model,
            data,
            s.batch_size,
            cache.as_deref_mut(),
        )?),
        false => None,
    };
    let caching_time = started.elapsed().as_secs_f64();
    // Evaluation vectors are cached too; their cost counts as evaluation, not training.
    let eval_features = match (use_cache, eval) {
        (true, Some(e)) => Some(cached_features(model, e, s.batch_size, cache)?),
        _ => None,
    };

    let n = data.encoded.len();
    let steps_per_epoch = n.div_ceil(s.batch_size);
    let total_steps = steps_per_epoch * s.epochs;
    let warmup_steps = (s.warmup * total_steps as f64).round() as usize;
    let dropout = Dropout::new(s.seed.wrapping_add(1));
    // Batches of similar length pad less. The cached path, which has no padding, forms the
    // same batches, so both paths train the heads identically.
    let lengths: Vec<usize> = data.encoded.iter().map(|e| e.ids.len()).collect();
    let group_lengths = s.group_by_length.then_some(lengths);
    let mut shuffle_rng = StdRng::seed_from_u64(s.seed.wrapping_add(2));
    let mut step = 0usize;
    let mut train_time = caching_time;

    for epoch in 1..=s.epochs {
        let epoch_start = Instant::now();
        let batches = epoch_batches(n, s.batch_size, group_lengths.as_deref(), &mut shuffle_rng);
        let bar = progress_bar(Some(n as u64), &format!("epoch {epoch}/{}", s.epochs));
        let mut sums = [0.0f64; 2];
        let mut counts = [0usize; 2];
        let mut total_sum = 0.0;
        for idx in batches.iter().map(Vec::as_slice) {
            let labels: Vec<[Option<u32>; 2]> = idx.iter().map(|&i| data.labels[i]).collect();
            let targets = [
                HeadTargets::new(&labels.iter().map(|l| l[0]).collect::<Vec<_>>(), &dev)?,
                HeadTargets::new(&labels.iter().map(|l| l[1]).collect::<Vec<_>>(), &dev)?,
            ];
            let logits = match &train_features {
                Some(f) => {
                    let rows =
                        Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev)?;
                    model.head_logits(&f.index_select(&rows, 0)?, Some(&dropout))?
                }
                None => {
                    let items: Vec<&Encoded> = idx.iter().map(|&i| &data.encoded[i]).collect();
                    model.forward(&tok.batch(&items, &dev)?, Some(&dropout))?
                }
            };
            let (loss, parts) = multitask_loss(&logits, &targets, s.loss_weights)?;
            let values = [
                parts[0].to_scalar::<f32>()? as f64,
                parts[1].to_scalar::<f32>()? as f64,
            ];
            let total = loss.to_scalar::<f32>()? as f64;
            if !total.is_finite() {
                bail!(
                    "training diverged at epoch {epoch}, step {}: the loss is {total} (class {}, \
                     sentiment {}). Nothing was saved; try a lower --lr or --head-lr",
                    step + 1,
                    values[0],
                    values[1]
                );
            }
            let mut grads = loss.backward()?;
            clip_gradients(&mut grads, &all_vars, s.max_grad_norm)?;
            let factor = lr_factor(step, warmup_steps, total_steps);
            if let Some(o) = opt_enc.as_mut() {
                o.lr = s.lr * factor;
                o.step(&grads)?;
            }
            if let Some(o) = opt_head.as_mut() {
                o.lr = s.head_lr * factor;
                o.step(&grads)?;
            }
            for t in 0..2 {
                sums[t] += values[t] * targets[t].count as f64;
                counts[t] += targets[t].count;
            }
            total_sum += total;
            step += 1;
            bar.inc(idx.len() as u64);
        }
        bar.finish_and_clear();
        let seconds = epoch_start.elapsed().as_secs_f64();
        train_time += seconds;
        let eval_metrics = match eval {
            Some(e) => Some(evaluate(model, e, s.batch_size, eval_features.as_ref())?),
            None => None,
        };
        let report = EpochReport {
            epoch,
            loss: [
                sums[0] / counts[0].max(1) as f64,
                sums[1] / counts[1].max(1) as f64,
            ],
            total_loss: total_sum / steps_per_epoch as f64,
            eval: eval_metrics,
            seconds,
        };
        on_epoch(&report);
        outcome.epochs.push(report);
    }
    outcome.steps = step;
    outcome.train_seconds = train_time;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_batches_cover_every_example_once_and_grouping_pads_less() {
        let lengths: Vec<usize> = (0..1000).map(|i| 5 + (i * 7919) % 60).collect();
        let padded = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap())
                .sum()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let plain = epoch_batches(1000, 32, None, &mut rng);
        let grouped = epoch_batches(1000, 32, Some(&lengths), &mut rng);
        for batches in [&plain, &grouped] {
            let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..1000).collect::<Vec<_>>());
            assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 32));
        }
        assert!(
            padded(&grouped) * 10 < padded(&plain) * 7,
            "{} vs {}",
            padded(&grouped),
            padded(&plain)
        );
        let again = epoch_batches(1000, 32, Some(&lengths), &mut StdRng::seed_from_u64(1));
        let first = epoch_batches(1000, 32, Some(&lengths), &mut StdRng::seed_from_u64(1));
        assert_eq!(again, first, "the same seed gives the same batches");
    }

    #[test]
    fn learning_rate_warms_up_then_decays_to_zero() {
        let f: Vec<f64> = (0..10).map(|s| lr_factor(s, 2, 10)).collect();
        assert_eq!(f[0], 0.5);
        assert_eq!(f[1], 1.0);
        assert_eq!(f[2], 1.0);
        assert!((f[9] - 0.125).abs() < 1e-12);
        assert!(f.windows(2).skip(2).all(|w| w[1] < w[0]));
    }
}
