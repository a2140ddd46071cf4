//! Sentence embeddings: prepend the prompt, tokenize, batch by length, encode (fast path),
//! pool, apply the Dense layers, truncate the dimensions, normalise, and return the vectors in
//! input order.
//!
//! Batches run side by side on the thread pool ([`map_batches`]), each with its own
//! workspace, and each batch's own products are parallel too. A sentence's vector does not
//! depend on which thread computed it. With a [`Chunker`], long inputs are split into
//! windows, embedded like sentences, and merged or returned one row per window.

use std::ops::Range;

use anyhow::Result;
use rayon::prelude::*;

use crate::chunk::{merge, ChunkMode, Chunker, Window};
use crate::model::fast::{map_batches, PackedEncoder, WorkspacePool};
use crate::model::pooling::{normalize_l2, Pooling};
use crate::pipeline::DenseLayer;
use crate::tokenize::{length_sorted_batches, Encoded, TextTokenizer};

/// One sentence's embedding and how it was tokenized.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub vector: Vec<f32>,
    /// Tokens the model saw, special tokens included.
    pub tokens: usize,
    pub truncated: bool,
}

/// One window of a chunked input, as an output row.
#[derive(Debug, Clone)]
pub struct WindowRow {
    pub embedding: Embedding,
    /// 0-based position among the input's windows.
    pub number: usize,
    /// The characters of the input it covers.
    pub chars: Range<usize>,
}

/// An input's result: one vector, or (`--chunks rows`) one row per window.
#[derive(Debug, Clone)]
pub enum Embedded {
    One(Embedding),
    Windows(Vec<WindowRow>),
}

/// Embeds sentences with a frozen encoder.
pub struct Embedder<'a> {
    pub encoder: &'a dyn PackedEncoder,
    pub tokenizer: &'a TextTokenizer,
    pub pooling: Pooling,
    pub normalize: bool,
    /// Sentences per forward pass, at most.
    pub batch_size: usize,
    /// Tokens per forward pass, at most (a batch always holds at least one sentence).
    pub max_batch_tokens: Option<usize>,
    /// sentence-transformers Dense modules, applied after pooling.
    pub dense: &'a [DenseLayer],
    /// Keep only the first N dimensions (before normalisation).
    pub truncate_dim: Option<usize>,
    /// Text prepended to every sentence before tokenization ([`Embedder::embed`]).
    pub prompt: Option<String>,
    /// Splits long inputs into windows ([`Embedder::embed_inputs`]); `None` truncates them.
    pub chunker: Option<Chunker<'a>>,
    workspaces: WorkspacePool,
}

impl<'a> Embedder<'a> {
    /// An embedder over `encoder`: the float32 [`crate::model::bert::BertEncoder`] or a
    /// [`crate::model::fast::FastEncoder`] in a chosen dtype.
    pub fn new(
        encoder: &'a dyn PackedEncoder,
        tokenizer: &'a TextTokenizer,
        pooling: Pooling,
        normalize: bool,
        batch_size: usize,
    ) -> Self {
        Self {
            encoder,
            tokenizer,
            pooling,
            normalize,
            batch_size,
            max_batch_tokens: None,
            dense: &[],
            truncate_dim: None,
            prompt: None,
            chunker: None,
            workspaces: WorkspacePool::default(),
        }
    }

    /// Pooled vectors of one batch, in its order, through the Dense layers, truncated and
    /// normalised as asked.
    pub fn embed_items(&self, items: &[&Encoded]) -> Result<Vec<Vec<f32>>> {
        let mut vectors = self
            .workspaces
            .with(|ws| self.encoder.pooled_packed(items, self.pooling, ws))?;
        for layer in self.dense {
            for v in &mut vectors {
                *v = layer.forward(v);
            }
        }
        if let Some(n) = self.truncate_dim {
            for v in &mut vectors {
                if n > v.len() {
                    anyhow::bail!(
                        "cannot truncate the vectors to {n} dimensions: they have only {}",
                        v.len()
                    );
                }
                v.truncate(n);
            }
        }
        if self.normalize {
            vectors.iter_mut().for_each(|v| normalize_l2(v));
        }
        Ok(vectors)
    }

    /// Embeds `texts`, returned in input order.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Embedding>> {
        let encoded = match &self.prompt {
            Some(p) => {
                let prompted: Vec<String> =
                    texts.iter().map(|t| format!("{p}{}", t.as_ref())).collect();
                self.tokenizer.encode(&prompted)?
            }
            None => self.tokenizer.encode(texts)?,
        };
        self.embed_encoded(&encoded)
    }

    /// Embeds `texts` as the run asks: one [`Embedded::One`] each, or, with a chunker, each
    /// input split into windows, merged (`mean`) or one row per window (`rows`).
    pub fn embed_inputs<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Embedded>> {
        let Some(chunker) = &self.chunker else {
            return Ok(self.embed(texts)?.into_iter().map(Embedded::One).collect());
        };
        let out = self.embed_windows(chunker, texts)?;
        // A merged vector is a mean of finite ones, which can still overflow.
        for (i, e) in out.iter().enumerate() {
            if let Embedded::One(e) = e {
                crate::finite::check_rows([e.vector.as_slice()], "vector")
                    .map_err(|n| crate::finite::NonFiniteOutput { index: i, ..n })?;
            }
        }
        Ok(out)
    }

    /// [`Self::embed_inputs`] with a chunker.
    fn embed_windows<S: AsRef<str> + Sync>(
        &self,
        chunker: &Chunker<'a>,
        texts: &[S],
    ) -> Result<Vec<Embedded>> {
        let split: Vec<Result<Vec<Window>>> = texts
            .par_iter()
            .enumerate()
            .map(|(i, t)| chunker.split(t.as_ref(), i))
            .collect();
        let windows = split.into_iter().collect::<Result<Vec<_>>>()?;
        let flat: Vec<crate::tokenize::Encoded> = windows
            .iter()
            .flatten()
            .map(|w| w.encoded.clone())
            .collect();
        // Window k belongs to input owner[k].
        let owner: Vec<usize> = windows
            .iter()
            .enumerate()
            .flat_map(|(i, ws)| std::iter::repeat_n(i, ws.len()))
            .collect();
        let mut vectors = self
            .embed_encoded(&flat)
            .map_err(|e| crate::finite::reindex(e, |k| owner[k]))?
            .into_iter();
        let mut out = Vec::with_capacity(texts.len());
        for ws in windows {
            let rows: Vec<WindowRow> = ws
                .into_iter()
                .map(|w| WindowRow {
                    embedding: vectors.next().expect("a vector per window"),
                    number: w.number,
                    chars: w.chars,
                })
                .collect();
            out.push(match chunker.spec().mode {
                ChunkMode::Rows => Embedded::Windows(rows),
                ChunkMode::Mean => {
                    let parts: Vec<(Vec<f32>, usize)> = rows
                        .iter()
                        .map(|r| (r.embedding.vector.clone(), r.embedding.tokens))
                        .collect();
                    Embedded::One(Embedding {
                        vector: merge(&parts, self.normalize),
                        tokens: parts.iter().map(|p| p.1).sum(),
                        truncated: false,
                    })
                }
            });
        }
        Ok(out)
    }

    /// Embeds already tokenized sentences, in their order. Batches run side by side
    /// ([`map_batches`]); the first failing batch (in batch order) gives the error. A vector
    /// that is not finite is a [`crate::finite::NonFiniteOutput`] naming its sentence.
    pub fn embed_encoded(&self, encoded: &[Encoded]) -> Result<Vec<Embedding>> {
        let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
        let batches = length_sorted_batches(&lengths, self.batch_size, self.max_batch_tokens);
        let tokens = |idx: &Vec<usize>| idx.iter().map(|&i| lengths[i]).sum();
        let pooled = map_batches(&batches, tokens, |idx| {
            let items: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
            self.embed_items(&items)
        })?;
        let mut out: Vec<Option<Embedding>> = vec![None; encoded.len()];
        for (idx, vectors) in batches.iter().zip(pooled) {
            for (&i, vector) in idx.iter().zip(vectors) {
                out[i] = Some(Embedding {
                    vector,
                    tokens: encoded[i].ids.len(),
                    truncated: encoded[i].truncated,
                });
            }
        }
        let out: Vec<Embedding> = out
            .into_iter()
            .map(|e| e.expect("every index is batched once"))
            .collect();
        crate::finite::check_rows(out.iter().map(|e| e.vector.as_slice()), "vector")?;
        Ok(out)
    }
}
