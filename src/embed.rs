//! Sentence embeddings: tokenize, batch by length, encode, pool, normalise, restore order.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::model::bert::{BertEncoder, Mode};
use crate::model::pooling::{l2_normalize, Pooling};
use crate::tokenize::{length_sorted_batches, Batch, Encoded, TextTokenizer};

/// One sentence's embedding and how it was tokenized.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub vector: Vec<f32>,
    /// Tokens the model saw, special tokens included.
    pub tokens: usize,
    pub truncated: bool,
}

/// Embeds sentences with a frozen encoder.
pub struct Embedder<'a> {
    pub encoder: &'a BertEncoder,
    pub tokenizer: &'a TextTokenizer,
    pub pooling: Pooling,
    pub normalize: bool,
    pub batch_size: usize,
}

impl Embedder<'_> {
    pub fn device(&self) -> &Device {
        self.encoder.device()
    }

    /// Pooled (and, if asked, normalised) vectors `[batch, hidden]` for one padded batch.
    pub fn embed_batch(&self, batch: &Batch) -> Result<Tensor> {
        let hidden = self.encoder.forward(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            Mode::Infer,
        )?;
        let pooled = self.pooling.forward(&hidden, &batch.attention_mask)?;
        Ok(if self.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        })
    }

    /// Embeds `texts`, returned in input order. `progress` is called with each batch's size.
    pub fn embed<S: AsRef<str>>(
        &self,
        texts: &[S],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Embedding>> {
        let encoded = self.tokenizer.encode(texts)?;
        self.embed_encoded(&encoded, &mut progress)
    }

    /// Embeds already tokenized sentences, in their order.
    pub fn embed_encoded(
        &self,
        encoded: &[Encoded],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Embedding>> {
        let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
        let mut out: Vec<Option<Embedding>> = vec![None; encoded.len()];
        for idx in length_sorted_batches(&lengths, self.batch_size) {
            let items: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
            let batch = self.tokenizer.batch(&items, self.device())?;
            let vectors = self.embed_batch(&batch)?.to_vec2::<f32>()?;
            for (&i, vector) in idx.iter().zip(vectors) {
                out[i] = Some(Embedding {
                    vector,
                    tokens: encoded[i].ids.len(),
                    truncated: encoded[i].truncated,
                });
            }
            progress(idx.len());
        }
        Ok(out
            .into_iter()
            .map(|e| e.expect("every index is batched once"))
            .collect())
    }
}
