//! One optimizer step: the heads' logits for a step's rows (from cached vectors, a cached
//! prefix, or the encoder), `--grad-accum` micro-batches whose gradients add up, the loss
//! per head over the whole step's labels, clipping, and the optimizers' updates.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::state::{Inputs, Trainer};
use super::{lr_factor, Diverged};
use crate::model::batch::PackedBatch;
use crate::tokenize::Encoded;
use crate::train::adamw::clip_all_gradients;
use crate::train::loss::{weighted_ce_sum, HeadTargets};
use crate::train::sparse::SparseGrad;

/// Per-head sums of one optimizer step's losses, for the epoch means.
#[derive(Default)]
pub(super) struct StepLoss {
    /// `[head]` (weighted CE sum, denominator).
    pub heads: [(f64, f64); 2],
    pub total: f64,
}

impl Trainer<'_> {
    /// Logits of both heads for the rows `idx` of the training data, in training mode.
    pub fn logits(&self, idx: &[usize]) -> Result<[Tensor; 2]> {
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
    pub fn optimizer_step(&mut self, idx: &[usize], epoch: usize) -> Result<StepLoss> {
        let denom = self.denominators(idx)?;
        let mut out = StepLoss::default();
        let mut grads: Option<GradStore> = None;
        let width = self.model.encoder.config().hidden_size;
        let mut sparse = self.opt_words.as_ref().map(|_| SparseGrad::new(width));
        for micro in idx.chunks(self.s.batch_size) {
            let g = self.micro_batch(micro, &denom, &mut out, sparse.as_mut())?;
            grads = Some(match grads {
                None => g,
                Some(acc) => self.accumulate(acc, &g)?,
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
        clip_all_gradients(
            &mut grads,
            &self.vars,
            sparse.as_mut(),
            self.s.max_grad_norm,
        )?;
        self.update(&grads, sparse.as_ref())?;
        trace_rss("after optimizer step");
        self.step += 1;
        Ok(out)
    }

    /// The labels of head `t` for `rows`.
    fn labels(&self, t: usize, rows: &[usize]) -> Vec<Option<u32>> {
        rows.iter().map(|&i| self.data.labels[i][t]).collect()
    }

    /// Each head's loss denominator for the step's rows `idx`: its (weighted) label count,
    /// known before any micro-batch runs.
    fn denominators(&self, idx: &[usize]) -> Result<[f64; 2]> {
        let mut denom = [0f64; 2];
        for (t, d) in denom.iter_mut().enumerate() {
            let targets = HeadTargets::new(&self.labels(t, idx), &self.dev)?;
            *d = match &self.class_weights[t] {
                Some(w) => (w.index_select(&targets.ids, 0)? * &targets.mask)?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64,
                None => targets.count as f64,
            };
        }
        Ok(denom)
    }

    /// Forward and backward over one micro-batch: adds its losses to `out` and its word
    /// rows' gradients to `sparse`; returns its gradients.
    fn micro_batch(
        &self,
        micro: &[usize],
        denom: &[f64; 2],
        out: &mut StepLoss,
        mut sparse: Option<&mut SparseGrad>,
    ) -> Result<GradStore> {
        let s = self.s;
        trace_rss("step start");
        let logits = self.logits(micro)?;
        trace_rss("after forward");
        let mut loss: Option<Tensor> = None;
        for t in 0..2 {
            let targets = HeadTargets::new(&self.labels(t, micro), &self.dev)?;
            let (sum, _) = weighted_ce_sum(&logits[t], &targets, self.class_weights[t].as_ref())?;
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
            if let (Some(s), Some(rows)) = (sparse.as_deref_mut(), g.get(leaf.as_tensor())) {
                s.add(&ids, &rows.flatten_all()?.to_vec1::<f32>()?)?;
            }
        }
        Ok(g)
    }

    /// Adds the trainable variables' gradients in `g` to `acc`.
    fn accumulate(&self, mut acc: GradStore, g: &GradStore) -> Result<GradStore> {
        for v in &self.vars {
            if let Some(x) = g.get(v.as_tensor()) {
                let sum = match acc.get(v.as_tensor()) {
                    Some(a) => (a + x)?,
                    None => x.clone(),
                };
                acc.insert(v.as_tensor(), sum);
            }
        }
        Ok(acc)
    }

    /// The optimizers' updates at this step's learning rates (warm-up, then decay).
    fn update(&mut self, grads: &GradStore, sparse: Option<&SparseGrad>) -> Result<()> {
        let s = self.s;
        let factor = lr_factor(self.step, self.warmup_steps, self.total_steps);
        if let (Some(o), Some(g)) = (self.opt_words.as_mut(), sparse) {
            o.lr = s.lr * factor;
            o.step(g)?;
        }
        if let Some(o) = self.opt_enc.as_mut() {
            o.lr = s.lr * factor;
            o.step(grads)?;
        }
        if let Some(o) = self.opt_head.as_mut() {
            o.lr = s.head_lr * factor;
            o.step(grads)?;
        }
        Ok(())
    }
}

/// With `FETCH_ML_TRACE_RSS` set, prints the resident memory at a phase of training on
/// stderr (for finding where training memory goes; see BENCHMARKS.md).
pub(super) fn trace_rss(phase: &str) {
    if std::env::var_os("FETCH_ML_TRACE_RSS").is_none() {
        return;
    }
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let page = crate::sys::page_size();
    crate::note!("rss {phase}: {} MB", (pages * page) >> 20);
}
