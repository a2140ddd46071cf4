//! Padded batches of token ids, and the grouping of sentences into length-sorted batches.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::Encoded;

/// Model inputs for one batch, padded to its longest sentence.
pub struct Batch {
    /// `[batch, seq]` u32
    pub input_ids: Tensor,
    /// `[batch, seq]` u32
    pub token_type_ids: Tensor,
    /// `[batch, seq]` f32, 1 for real tokens and 0 for padding
    pub attention_mask: Tensor,
}

impl Batch {
    pub fn new(items: &[&Encoded], pad_id: u32, device: &Device) -> Result<Self> {
        let b = items.len();
        let seq = items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = vec![pad_id; b * seq];
        let mut types = vec![0u32; b * seq];
        let mut mask = vec![0f32; b * seq];
        for (row, e) in items.iter().enumerate() {
            let off = row * seq;
            ids[off..off + e.ids.len()].copy_from_slice(&e.ids);
            types[off..off + e.type_ids.len()].copy_from_slice(&e.type_ids);
            mask[off..off + e.ids.len()].fill(1.0);
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, seq), device)?,
            token_type_ids: Tensor::from_vec(types, (b, seq), device)?,
            attention_mask: Tensor::from_vec(mask, (b, seq), device)?,
        })
    }
}

/// Groups indices of `lengths` into batches, shortest first, so each batch pads little: at
/// most `batch_size` sentences and, when given, `max_tokens` tokens (a sentence longer than
/// that gets a batch of its own). Returns the original indices of each batch.
pub fn length_sorted_batches(
    lengths: &[usize],
    batch_size: usize,
    max_tokens: Option<usize>,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut tokens = 0;
    for i in order {
        let full = current.len() >= batch_size.max(1)
            || max_tokens.is_some_and(|m| !current.is_empty() && tokens + lengths[i] > m);
        if full {
            batches.push(std::mem::take(&mut current));
            tokens = 0;
        }
        tokens += lengths[i];
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_sentence_and_token_budgets() {
        let lengths = [5, 40, 3, 12, 7, 100, 9];
        let b = length_sorted_batches(&lengths, 3, None);
        assert_eq!(b, vec![vec![2, 0, 4], vec![6, 3, 1], vec![5]]);
        let b = length_sorted_batches(&lengths, 32, Some(30));
        assert_eq!(b, vec![vec![2, 0, 4, 6], vec![3], vec![1], vec![5]]);
        let all: usize = b.iter().map(Vec::len).sum();
        assert_eq!(all, lengths.len());
    }
}
