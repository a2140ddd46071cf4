//! The frozen prefix of the encoder, run once: its output for every training sentence, kept
//! in memory so that training the layers above it does not recompute it each epoch.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::prepared::Prepared;
use crate::model::batch::PackedBatch;
use crate::model::multitask::MultiTaskModel;
use crate::tokenize::Encoded;

/// The output of the frozen layers for every training sentence, computed once: the frozen
/// prefix runs in inference mode (no dropout), so it is the same every epoch.
pub(super) struct PrefixCache {
    /// `[tokens, hidden]` rows of each sentence, in data order.
    rows: Vec<Vec<f32>>,
    hidden: usize,
}

/// Largest frozen-prefix cache kept in memory; above it the prefix is recomputed per step.
pub const PREFIX_CACHE_MAX_BYTES: usize = 2 << 30;

impl PrefixCache {
    /// Bytes the cache would take for `data`: 4 per value, `hidden` values per token.
    pub(super) fn bytes(data: &Prepared, hidden: usize) -> usize {
        data.encoded.iter().map(|e| e.ids.len()).sum::<usize>() * hidden * 4
    }

    /// Runs the frozen prefix over every sentence of `data`, in length-sorted batches.
    pub(super) fn build(
        model: &MultiTaskModel,
        data: &Prepared,
        batch_size: usize,
    ) -> Result<Self> {
        let hidden = model.encoder.config().hidden_size;
        let lengths: Vec<usize> = data.encoded.iter().map(|e| e.ids.len()).collect();
        let mut rows = vec![Vec::new(); data.encoded.len()];
        for idx in crate::tokenize::length_sorted_batches(&lengths, batch_size, None) {
            let items: Vec<&Encoded> = idx.iter().map(|&i| &data.encoded[i]).collect();
            let batch = PackedBatch::new(&items);
            let x: Vec<f32> = model
                .frozen_prefix_packed(&batch)?
                .flatten_all()?
                .to_vec1()?;
            for (k, &i) in idx.iter().enumerate() {
                rows[i] = x[batch.offsets[k] * hidden..batch.offsets[k + 1] * hidden].to_vec();
            }
        }
        Ok(Self { rows, hidden })
    }

    /// The cached prefix output of the sentences `idx`, packed in that order: `[T, hidden]`.
    pub(super) fn gather(&self, idx: &[usize], dev: &Device) -> Result<Tensor> {
        let flat: Vec<f32> = idx
            .iter()
            .flat_map(|&i| self.rows[i].iter().copied())
            .collect();
        let t = flat.len() / self.hidden;
        Ok(Tensor::from_vec(flat, (t, self.hidden), dev)?)
    }
}
