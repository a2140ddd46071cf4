//! The training loop: AdamW with separate encoder and head learning rates, linear warm-up then
//! linear decay, gradient clipping, the masked multitask loss, and a fast path that trains the
//! heads on cached sentence vectors when no encoder weight trains.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use candle_core::backprop::GradStore;

use super::adamw::{clip_all_gradients, AdamW};
use super::embedding_cache::EmbeddingCache;
use super::evaluate::{cached_features, evaluate};
use super::loss::{balanced_weights, weighted_ce_sum, HeadTargets};
use super::metrics::{HeadMetrics, Metric};
use super::prefix_cache::PrefixCache;
pub use super::prefix_cache::PREFIX_CACHE_MAX_BYTES;
pub use super::schedule::{epoch_batches, lr_factor};
use super::sparse::{LazyAdamW, SparseGrad};
use crate::model::batch::PackedBatch;
use crate::model::dropout::Dropout;
use crate::model::multitask::MultiTaskModel;
use crate::model::names::{is_head, WORD_EMBEDDINGS};
use crate::output::progress_bar;
use crate::tokenize::Encoded;

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

/// Where the heads' inputs come from in training.
enum Inputs {
    /// Sentence vectors of a frozen encoder, `[n, hidden]` in data order.
    Features(Tensor),
    /// The frozen layers' output per sentence; the upper layers train on it.
    Prefix(PrefixCache),
    /// The whole trainable part of the encoder runs every step.
    Encoder,
}

/// The best evaluation seen and the trainable weights that gave it (`--keep-best`).
struct Best {
    value: f64,
    step: usize,
    epoch: usize,
    metrics: [HeadMetrics; 2],
    weights: Vec<Tensor>,
}

/// One training run's state: the model, the optimizers, the schedule and the bookkeeping of
/// evaluations.
struct Trainer<'a> {
    model: &'a MultiTaskModel,
    data: &'a Prepared,
    eval: Option<&'a Prepared>,
    s: &'a TrainSettings,
    dev: Device,
    vars: Vec<Var>,
    opt_enc: Option<AdamW>,
    opt_head: Option<AdamW>,
    /// The word embeddings' optimizer when they train with sparse gradients.
    opt_words: Option<LazyAdamW>,
    dropout: Dropout,
    inputs: Inputs,
    eval_features: Option<Tensor>,
    class_weights: [Option<Tensor>; 2],
    step: usize,
    total_steps: usize,
    warmup_steps: usize,
    best: Option<Best>,
    /// Evaluations since the best one (for `--early-stop`).
    stale_evals: usize,
    evaluations: Vec<StepEval>,
}

/// One evaluation during training (`--eval-every`, or the end of an epoch).
#[derive(Debug, Clone, Serialize)]
pub struct StepEval {
    pub step: usize,
    pub epoch: usize,
    pub metrics: [HeadMetrics; 2],
}

/// Per-head sums of one optimizer step's losses, for the epoch means.
#[derive(Default)]
struct StepLoss {
    /// `[head]` (weighted CE sum, denominator).
    heads: [(f64, f64); 2],
    total: f64,
}

impl<'a> Trainer<'a> {
    fn new(
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
        let num_layers = model.encoder.num_layers();
        let frozen = model.plan.encoder_frozen(num_layers);
        if cache.is_some() && !(s.cache_features && frozen) {
            eprintln!(
                "note: the embedding cache is not used: part of the encoder trains, so the \
                 sentence vectors change at every step; it is used only with the whole encoder \
                 frozen"
            );
        }
        let (inputs, eval_features) = if s.cache_features && frozen {
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
            (Inputs::Features(train), eval)
        } else if s.cache_features && model.plan.encoder_prefix.is_some() {
            let hidden = model.encoder.config().hidden_size;
            let bytes = PrefixCache::bytes(data, hidden);
            if bytes <= PREFIX_CACHE_MAX_BYTES {
                (
                    Inputs::Prefix(PrefixCache::build(model, data, s.batch_size)?),
                    None,
                )
            } else {
                eprintln!(
                    "note: the frozen layers' output would take {} MB ({} bytes per token); \
                     recomputing it every step instead",
                    bytes >> 20,
                    hidden * 4
                );
                (Inputs::Encoder, None)
            }
        } else {
            (Inputs::Encoder, None)
        };
        // The word embeddings train with sparse gradients when the embeddings run every step.
        let word_var = model
            .registry
            .params()
            .into_iter()
            .find(|p| p.name == WORD_EMBEDDINGS)
            .and_then(|p| p.var);
        let opt_words = match word_var {
            Some(var) if s.sparse_embeddings && matches!(inputs, Inputs::Encoder) => {
                enc_vars.retain(|v| v.as_tensor().id() != var.as_tensor().id());
                model.encoder.sparse().enable(true);
                Some(LazyAdamW::new(var, s.lr, s.weight_decay)?)
            }
            _ => None,
        };
        let vars: Vec<Var> = enc_vars.iter().chain(&head_vars).cloned().collect();
        let class_weights = if s.class_weights {
            let w = |t: usize| -> Result<Option<Tensor>> {
                let labels: Vec<Option<u32>> = data.labels.iter().map(|l| l[t]).collect();
                let w = balanced_weights(&labels, model.spec.labels[t].len());
                Ok(Some(Tensor::new(w, &dev)?))
            };
            [w(0)?, w(1)?]
        } else {
            [None, None]
        };
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

    /// Logits of both heads for the rows `idx` of the training data, in training mode.
    fn logits(&self, idx: &[usize]) -> Result<[Tensor; 2]> {
        let m = self.model;
        let d = Some(&self.dropout);
        Ok(match &self.inputs {
            Inputs::Features(f) => {
                let rows =
                    Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), &self.dev)?;
                m.head_logits(&f.index_select(&rows, 0)?, d)?
            }
            Inputs::Prefix(cache) => {
                let items: Vec<&Encoded> = idx.iter().map(|&i| &self.data.encoded[i]).collect();
                let batch = PackedBatch::new(&items);
                let x = cache.gather(idx, &self.dev)?;
                m.head_logits(&m.features_from_prefix(Some(&x), &batch, d)?, d)?
            }
            Inputs::Encoder => {
                // Packed: no work on padding, whatever the batch order.
                let items: Vec<&Encoded> = idx.iter().map(|&i| &self.data.encoded[i]).collect();
                m.forward_packed(&PackedBatch::new(&items), d)?
            }
        })
    }

    /// One optimizer step over the rows `idx`: `--grad-accum` micro-batches of at most
    /// `batch_size` rows, their gradients summed, each head's loss divided by the whole
    /// step's (weighted) label count, so the step equals one large batch up to rounding.
    fn optimizer_step(&mut self, idx: &[usize], epoch: usize) -> Result<StepLoss> {
        let s = self.s;
        let labels = |t: usize, rows: &[usize]| -> Vec<Option<u32>> {
            rows.iter().map(|&i| self.data.labels[i][t]).collect()
        };
        // The step's denominators, known before any micro-batch runs.
        let mut denom = [0f64; 2];
        for (t, d) in denom.iter_mut().enumerate() {
            let targets = HeadTargets::new(&labels(t, idx), &self.dev)?;
            *d = match &self.class_weights[t] {
                Some(w) => (w.index_select(&targets.ids, 0)? * &targets.mask)?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64,
                None => targets.count as f64,
            };
        }
        let mut out = StepLoss::default();
        let mut grads: Option<GradStore> = None;
        let width = self.model.encoder.config().hidden_size;
        let mut sparse = self.opt_words.as_ref().map(|_| SparseGrad::new(width));
        for micro in idx.chunks(s.batch_size) {
            trace_rss("step start");
            let logits = self.logits(micro)?;
            trace_rss("after forward");
            let mut loss: Option<Tensor> = None;
            for t in 0..2 {
                let targets = HeadTargets::new(&labels(t, micro), &self.dev)?;
                let (sum, _) =
                    weighted_ce_sum(&logits[t], &targets, self.class_weights[t].as_ref())?;
                let term = (&sum * (s.loss_weights[t] / denom[t].max(1e-12)))?;
                out.heads[t].0 += sum.to_scalar::<f32>()? as f64;
                loss = Some(match loss {
                    Some(l) => (l + term)?,
                    None => term,
                });
            }
            let loss = loss.expect("two heads");
            out.total += loss.to_scalar::<f32>()? as f64;
            let g = loss.backward()?;
            trace_rss("after backward");
            for (leaf, ids) in self.model.encoder.sparse().take() {
                if let (Some(s), Some(rows)) = (sparse.as_mut(), g.get(leaf.as_tensor())) {
                    s.add(&ids, &rows.flatten_all()?.to_vec1::<f32>()?)?;
                }
            }
            grads = Some(match grads {
                None => g,
                Some(mut acc) => {
                    for v in &self.vars {
                        if let Some(x) = g.get(v.as_tensor()) {
                            let sum = match acc.get(v.as_tensor()) {
                                Some(a) => (a + x)?,
                                None => x.clone(),
                            };
                            acc.insert(v.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        out.heads[0].1 = denom[0];
        out.heads[1].1 = denom[1];
        if !out.total.is_finite() {
            return Err(Diverged {
                epoch,
                step: self.step + 1,
                loss: out.total,
                heads: [
                    out.heads[0].0 / out.heads[0].1.max(1e-12),
                    out.heads[1].0 / out.heads[1].1.max(1e-12),
                ],
            }
            .into());
        }
        let mut grads = grads.expect("at least one micro-batch");
        clip_all_gradients(&mut grads, &self.vars, sparse.as_mut(), s.max_grad_norm)?;
        let factor = lr_factor(self.step, self.warmup_steps, self.total_steps);
        if let (Some(o), Some(g)) = (self.opt_words.as_mut(), sparse.as_ref()) {
            o.lr = s.lr * factor;
            o.step(g)?;
        }
        if let Some(o) = self.opt_enc.as_mut() {
            o.lr = s.lr * factor;
            o.step(&grads)?;
        }
        if let Some(o) = self.opt_head.as_mut() {
            o.lr = s.head_lr * factor;
            o.step(&grads)?;
        }
        trace_rss("after optimizer step");
        self.step += 1;
        Ok(out)
    }

    /// Fails with [`DivergedWeights`] when a trained tensor holds a value that is not finite.
    /// One pass over the trained weights; run before each evaluation and at the end.
    fn check_finite(&self) -> Result<()> {
        for p in self.model.registry.params() {
            let Some(var) = p.var else { continue };
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            if let Some(bad) = crate::finite::non_finite(&values) {
                return Err(DivergedWeights {
                    step: self.step,
                    what: format!(
                        "tensor {} holds {} ({} of its {} values are not finite numbers)",
                        p.name,
                        bad.kind(),
                        bad.count,
                        bad.len
                    ),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Fails with [`DivergedWeights`] when the logits of the first `rows` training examples
    /// are not finite. Each step's loss checks the update before it; this checks the last one
    /// (at the cost of one batch's forward pass), so a model that overflows is not saved.
    fn check_last_update(&self, rows: usize) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let idx: Vec<usize> = (0..rows).collect();
        for (t, logits) in self.logits(&idx)?.iter().enumerate() {
            let v = logits.to_vec2::<f32>()?;
            if let Err(n) = crate::finite::check_rows(v.iter().map(Vec::as_slice), "logits") {
                return Err(DivergedWeights {
                    step: self.step,
                    what: format!(
                        "the {} logits of training example {} are not finite numbers, although \
                         the weights are",
                        crate::data::TASKS[t],
                        n.index + 1
                    ),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Evaluates now; with `--keep-best`, remembers the weights when the metric improved.
    /// Returns the metrics, or `None` without an evaluation set.
    fn evaluate_now(&mut self, epoch: usize) -> Result<Option<[HeadMetrics; 2]>> {
        let Some(e) = self.eval else {
            return Ok(None);
        };
        self.check_finite()?;
        let metrics = evaluate(
            self.model,
            e,
            self.s.batch_size,
            self.eval_features.as_ref(),
        )
        .map_err(
            |err| match err.downcast_ref::<crate::finite::NonFiniteOutput>() {
                Some(n) => DivergedWeights {
                    step: self.step,
                    what: format!(
                        "the {} of evaluation example {} are not finite numbers, although the \
                     weights are",
                        n.what,
                        n.index + 1
                    ),
                }
                .into(),
                None => err,
            },
        )?;
        self.evaluations.push(StepEval {
            step: self.step,
            epoch,
            metrics: metrics.clone(),
        });
        if let Some(metric) = self.s.keep_best {
            let value = metric.of(&metrics);
            if self.best.as_ref().is_none_or(|b| value > b.value) {
                let weights = self
                    .vars
                    .iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                self.best = Some(Best {
                    value,
                    step: self.step,
                    epoch,
                    metrics: metrics.clone(),
                    weights,
                });
                self.stale_evals = 0;
            } else {
                self.stale_evals += 1;
            }
        }
        Ok(Some(metrics))
    }

    /// True when `--early-stop` patience has run out.
    fn should_stop(&self) -> bool {
        self.s.early_stop.is_some_and(|p| self.stale_evals >= p)
    }

    /// Trains every epoch (or until early stopping), then restores the best weights when
    /// `--keep-best` asks for them.
    fn run(mut self, on_epoch: &mut dyn FnMut(&EpochReport)) -> Result<TrainOutcome> {
        let s = self.s;
        trace_rss("trainer ready");
        let started = Instant::now();
        let n = self.data.encoded.len();
        let mut outcome = TrainOutcome {
            epochs: Vec::new(),
            steps: 0,
            train_seconds: started.elapsed().as_secs_f64(),
            cached_features: matches!(self.inputs, Inputs::Features(_)),
            cached_prefix: matches!(self.inputs, Inputs::Prefix(_)),
            evaluations: Vec::new(),
            best: None,
            stopped_early: false,
        };
        // Batches of similar length help the optimiser see similar examples together; with
        // packed batches they no longer save work.
        let lengths: Vec<usize> = self.data.encoded.iter().map(|e| e.ids.len()).collect();
        let group_lengths = s.group_by_length.then_some(lengths);
        let mut shuffle_rng = StdRng::seed_from_u64(s.seed.wrapping_add(2));
        'epochs: for epoch in 1..=s.epochs {
            let epoch_start = Instant::now();
            let mut eval_seconds = 0.0;
            let steps = epoch_batches(n, s.step_rows(), group_lengths.as_deref(), &mut shuffle_rng);
            let bar = progress_bar(Some(n as u64), &format!("epoch {epoch}/{}", s.epochs));
            let mut sums = [(0f64, 0f64); 2];
            let mut total = 0.0;
            let mut last_eval = None;
            for idx in &steps {
                let l = self.optimizer_step(idx, epoch)?;
                for (sum, head) in sums.iter_mut().zip(&l.heads) {
                    sum.0 += head.0;
                    sum.1 += head.1;
                }
                total += l.total;
                bar.inc(idx.len() as u64);
                if s.eval_every.is_some_and(|k| self.step.is_multiple_of(k)) && self.eval.is_some()
                {
                    let t0 = Instant::now();
                    let m = self.evaluate_now(epoch)?.expect("an evaluation set");
                    eval_seconds += t0.elapsed().as_secs_f64();
                    bar.suspend(|| eprintln!("{}", step_line(self.step, epoch, &m)));
                    last_eval = Some(m);
                    if self.should_stop() {
                        bar.finish_and_clear();
                        outcome.stopped_early = true;
                        let report = self.epoch_report(
                            epoch,
                            sums,
                            total,
                            steps.len(),
                            last_eval,
                            epoch_start,
                            eval_seconds,
                        );
                        outcome.train_seconds += report.seconds;
                        on_epoch(&report);
                        outcome.epochs.push(report);
                        break 'epochs;
                    }
                }
            }
            bar.finish_and_clear();
            // An epoch ends with an evaluation, unless one just ran at its last step.
            let evaluated_at_end =
                last_eval.is_some() && s.eval_every.is_some_and(|k| self.step.is_multiple_of(k));
            let seconds_before_eval = epoch_start.elapsed().as_secs_f64() - eval_seconds;
            if !evaluated_at_end {
                last_eval = self.evaluate_now(epoch)?;
            }
            let mut report =
                self.epoch_report(epoch, sums, total, steps.len(), last_eval, epoch_start, 0.0);
            report.seconds = seconds_before_eval;
            outcome.train_seconds += report.seconds;
            on_epoch(&report);
            outcome.epochs.push(report);
            if self.should_stop() {
                outcome.stopped_early = true;
                break;
            }
        }
        outcome.steps = self.step;
        if let Some(best) = self.best.take() {
            let metric = s.keep_best.expect("best implies keep_best").name();
            if outcome.stopped_early {
                let n = self.stale_evals;
                eprintln!(
                    "early stop after step {}: {n} evaluation{} in a row did not improve {metric}",
                    self.step,
                    if n == 1 { "" } else { "s" }
                );
            }
            eprintln!(
                "keeping the weights of step {} (epoch {}), the best {metric}: {:.4}",
                best.step, best.epoch, best.value
            );
            for (v, w) in self.vars.iter().zip(&best.weights) {
                v.set(w)?;
            }
            outcome.best = Some(BestCheckpoint {
                metric: s
                    .keep_best
                    .expect("best implies keep_best")
                    .name()
                    .to_string(),
                value: best.value,
                step: best.step,
                epoch: best.epoch,
                eval: best.metrics,
            });
        }
        outcome.evaluations = std::mem::take(&mut self.evaluations);
        self.model.encoder.sparse().enable(false);
        self.check_finite()?;
        self.check_last_update(s.batch_size.min(n))?;
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    fn epoch_report(
        &self,
        epoch: usize,
        sums: [(f64, f64); 2],
        total: f64,
        steps: usize,
        eval: Option<[HeadMetrics; 2]>,
        start: Instant,
        eval_seconds: f64,
    ) -> EpochReport {
        EpochReport {
            epoch,
            loss: [
                sums[0].0 / sums[0].1.max(1e-12),
                sums[1].0 / sums[1].1.max(1e-12),
            ],
            total_loss: total / steps.max(1) as f64,
            eval,
            seconds: start.elapsed().as_secs_f64() - eval_seconds,
        }
    }
}

/// With `FETCH_ML_TRACE_RSS` set, prints the resident memory at a phase of training on
/// stderr (for finding where training memory goes; see BENCHMARKS.md).
fn trace_rss(phase: &str) {
    if std::env::var_os("FETCH_ML_TRACE_RSS").is_none() {
        return;
    }
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    eprintln!("rss {phase}: {} MB", (pages * page) >> 20);
}

/// Names the example of an error about one example of `data` (the `set` data) by its
/// position and the start of its text.
fn name_example(e: anyhow::Error, data: &Prepared, set: &str) -> anyhow::Error {
    crate::tokenize::name_sentence(e, |i| {
        let text: String = data.texts[i].chars().take(60).collect();
        format!("{set} example {} ({text:?})", i + 1)
    })
}

/// The stderr line of an evaluation within an epoch.
fn step_line(step: usize, epoch: usize, m: &[HeadMetrics; 2]) -> String {
    format!(
        "  step {step} (epoch {epoch}): class acc {:.3} F1 {:.3}, sentiment acc {:.3} F1 {:.3}",
        m[0].accuracy, m[0].macro_f1, m[1].accuracy, m[1].macro_f1
    )
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
