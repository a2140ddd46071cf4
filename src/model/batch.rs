//! A packed batch: the sentences' tokens concatenated without padding, with per-sentence
//! offsets (text-embeddings-inference's `cumulative_seq_lengths`). Both the inference fast
//! path and the training path take it, so padding never costs work.

use candle_core::{Device, Result, Tensor};

use crate::tokenize::Encoded;

/// Sentence `i` is the tokens `offsets[i]..offsets[i + 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBatch {
    /// Token ids, `[T]`.
    pub input_ids: Vec<u32>,
    /// Token type ids, `[T]`.
    pub type_ids: Vec<u32>,
    /// Position of each token within its sentence, `[T]`.
    pub positions: Vec<u32>,
    /// `len() + 1` offsets, the first 0 and the last `T`.
    pub offsets: Vec<usize>,
}

impl PackedBatch {
    /// Packs tokenized sentences in their order.
    pub fn new(items: &[&Encoded]) -> Self {
        let total: usize = items.iter().map(|e| e.ids.len()).sum();
        let mut b = Self {
            input_ids: Vec::with_capacity(total),
            type_ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            offsets: Vec::with_capacity(items.len() + 1),
        };
        b.offsets.push(0);
        for e in items {
            b.input_ids.extend_from_slice(&e.ids);
            b.type_ids.extend_from_slice(&e.type_ids);
            b.positions.extend(0..e.ids.len() as u32);
            b.offsets.push(b.input_ids.len());
        }
        b
    }

    /// Sentences in the batch.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens in the batch, `T`.
    pub fn tokens(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }

    /// Tokens of sentence `i`.
    pub fn length(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }

    /// `[len, T]` with `1 / length` where token `t` belongs to sentence `i`: the mean pooling
    /// of packed states `[T, hidden]` is this matrix times them (differentiable).
    pub fn mean_matrix(&self, device: &Device) -> Result<Tensor> {
        let (n, t) = (self.len(), self.tokens());
        let mut m = vec![0f32; n * t];
        for i in 0..n {
            let w = 1.0 / self.length(i).max(1) as f32;
            m[i * t + self.offsets[i]..i * t + self.offsets[i + 1]].fill(w);
        }
        Tensor::from_vec(m, (n, t), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_order_and_offsets() {
        let a = Encoded {
            ids: vec![2, 7, 3],
            type_ids: vec![0, 0, 0],
            truncated: false,
        };
        let b = Encoded {
            ids: vec![2, 3],
            type_ids: vec![0, 1],
            truncated: false,
        };
        let p = PackedBatch::new(&[&a, &b]);
        assert_eq!(p.input_ids, vec![2, 7, 3, 2, 3]);
        assert_eq!(p.type_ids, vec![0, 0, 0, 0, 1]);
        assert_eq!(p.positions, vec![0, 1, 2, 0, 1]);
        assert_eq!(p.offsets, vec![0, 3, 5]);
        assert_eq!((p.len(), p.tokens(), p.length(1)), (2, 5, 2));
        let m = p
            .mean_matrix(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[1], vec![0.0, 0.0, 0.0, 0.5, 0.5]);
    }
}
