//! The loop over epochs: each epoch's steps in batches of similar length, the evaluations
//! `--eval-every` asks for and one at each epoch's end, `--keep-best` and `--early-stop`.

use std::time::Instant;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::state::{Best, Inputs, Trainer};
use super::step::trace_rss;
use super::{epoch_batches, BestCheckpoint, DivergedWeights, EpochReport, StepEval, TrainOutcome};
use crate::output::progress_bar;
use crate::train::evaluate::evaluate;
use crate::train::metrics::HeadMetrics;

impl Trainer<'_> {
    /// Trains every epoch (or until early stopping), then restores the best weights when
    /// `--keep-best` asks for them.
    pub fn run(mut self, on_epoch: &mut dyn FnMut(&EpochReport)) -> Result<TrainOutcome> {
        let s = self.s;
        trace_rss("trainer ready");
        let started = Instant::now();
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
        for epoch in 1..=s.epochs {
            let (report, stop) = self.epoch(epoch, group_lengths.as_deref(), &mut shuffle_rng)?;
            outcome.train_seconds += report.seconds;
            on_epoch(&report);
            outcome.epochs.push(report);
            if stop {
                outcome.stopped_early = true;
                break;
            }
        }
        self.finish(outcome)
    }

    /// One epoch: its steps (with the evaluations `--eval-every` asks for), then an
    /// evaluation unless one just ran. Says whether `--early-stop` ends training.
    fn epoch(
        &mut self,
        epoch: usize,
        lengths: Option<&[usize]>,
        rng: &mut StdRng,
    ) -> Result<(EpochReport, bool)> {
        let s = self.s;
        let n = self.data.encoded.len();
        let epoch_start = Instant::now();
        let mut eval_seconds = 0.0;
        let steps = epoch_batches(n, s.step_rows(), lengths, rng);
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
            if s.eval_every.is_some_and(|k| self.step.is_multiple_of(k)) && self.eval.is_some() {
                let t0 = Instant::now();
                let m = self.evaluate_now(epoch)?.expect("an evaluation set");
                eval_seconds += t0.elapsed().as_secs_f64();
                bar.suspend(|| crate::note!("{}", step_line(self.step, epoch, &m)));
                last_eval = Some(m);
                if self.should_stop() {
                    bar.finish_and_clear();
                    let (count, at) = (steps.len(), (epoch_start, eval_seconds));
                    let report = self.epoch_report(epoch, sums, total, count, last_eval, at);
                    return Ok((report, true));
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
        let at = (epoch_start, 0.0);
        let mut report = self.epoch_report(epoch, sums, total, steps.len(), last_eval, at);
        report.seconds = seconds_before_eval;
        Ok((report, self.should_stop()))
    }

    /// The end of a run: the step count, the best weights restored (`--keep-best`), the
    /// evaluations, and the word embeddings back to dense gradients.
    fn finish(mut self, mut outcome: TrainOutcome) -> Result<TrainOutcome> {
        let s = self.s;
        outcome.steps = self.step;
        if let Some(best) = self.best.take() {
            let metric = s.keep_best.expect("best implies keep_best").name();
            if outcome.stopped_early {
                let n = self.stale_evals;
                crate::note!(
                    "early stop after step {}: {n} evaluation{} in a row did not improve {metric}",
                    self.step,
                    if n == 1 { "" } else { "s" }
                );
            }
            crate::note!(
                "keeping the weights of step {} (epoch {}), the best {metric}: {:.4}",
                best.step,
                best.epoch,
                best.value
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
        self.check_last_update(s.batch_size.min(self.data.texts.len()))?;
        Ok(outcome)
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

    /// An epoch's report: mean losses per head and per step, its last evaluation, and its
    /// time since `start` less `eval_seconds` (the `at` pair).
    fn epoch_report(
        &self,
        epoch: usize,
        sums: [(f64, f64); 2],
        total: f64,
        steps: usize,
        eval: Option<[HeadMetrics; 2]>,
        (start, eval_seconds): (Instant, f64),
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

/// The stderr line of an evaluation within an epoch.
fn step_line(step: usize, epoch: usize, m: &[HeadMetrics; 2]) -> String {
    format!(
        "  step {step} (epoch {epoch}): class acc {:.3} F1 {:.3}, sentiment acc {:.3} F1 {:.3}",
        m[0].accuracy, m[0].macro_f1, m[1].accuracy, m[1].macro_f1
    )
}
