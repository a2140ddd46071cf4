//! The embeddings of the encoder: word, position and token-type tables, summed and
//! normalised, for padded and packed batches; in training, the word rows a batch looked up as
//! sparse leaves ([`SparseTap`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::batch::PackedBatch;
use super::config::BertConfig;
use super::layers::{LayerNorm, Mode};

/// Records, in training, the word-embedding rows each forward pass looked up as leaves of
/// their own, so the trainer can apply their gradient row-wise (see `train::sparse`) instead
/// of candle building a dense gradient of the whole vocabulary.
#[derive(Default)]
pub struct SparseTap {
    enabled: std::sync::atomic::AtomicBool,
    leaves: std::sync::Mutex<Vec<(candle_core::Var, Vec<u32>)>>,
}

impl SparseTap {
    pub fn enable(&self, on: bool) {
        self.enabled.store(on, std::sync::atomic::Ordering::SeqCst);
    }
    fn enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// The leaves recorded since the last call, with the token ids of their rows.
    pub fn take(&self) -> Vec<(candle_core::Var, Vec<u32>)> {
        std::mem::take(&mut *self.leaves.lock().expect("sparse tap lock"))
    }

    /// Rows `ids` (`raw` as values) of the embedding `table` in training: when the tap is on,
    /// a leaf of their own, recorded; else a plain lookup.
    pub fn lookup(&self, table: &Tensor, ids: &Tensor, raw: &[u32]) -> Result<Tensor> {
        if !self.enabled() {
            return table.index_select(ids, 0);
        }
        let leaf = candle_core::Var::from_tensor(&table.detach().index_select(ids, 0)?)?;
        let t = leaf.as_tensor().clone();
        let mut leaves = self.leaves.lock().expect("sparse tap lock");
        leaves.push((leaf, raw.to_vec()));
        Ok(t)
    }
}

/// Word, position and token-type embeddings, summed and normalised.
#[derive(Clone)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    /// `None` when the model has no token types (DistilBERT: `type_vocab_size` 0).
    pub token_type_embeddings: Option<Embedding>,
    pub layer_norm: LayerNorm,
    dropout: f64,
    /// Word-embedding rows as sparse leaves in training, when the trainer asks for it.
    pub sparse: std::sync::Arc<SparseTap>,
    /// The position id of each sentence's first token (see [`BertConfig::position_offset`]).
    position_offset: u32,
}

impl BertEmbeddings {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let emb = |n: usize, name: &str| -> Result<Embedding> {
            let w = vb.pp(name).get_with_hints(
                (n, cfg.hidden_size),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: cfg.initializer_range,
                },
            )?;
            Ok(Embedding::new(w, cfg.hidden_size))
        };
        Ok(Self {
            word_embeddings: emb(cfg.vocab_size, "word_embeddings")?,
            position_embeddings: emb(cfg.max_position_embeddings, "position_embeddings")?,
            token_type_embeddings: match cfg.type_vocab_size {
                0 => None,
                n => Some(emb(n, "token_type_embeddings")?),
            },
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
            sparse: Default::default(),
            position_offset: cfg.position_offset() as u32,
        })
    }

    /// The position id of each sentence's first token.
    pub fn position_offset(&self) -> usize {
        self.position_offset as usize
    }

    /// `input_ids`, `token_type_ids`: `[batch, seq]` u32 -> `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (_b, seq) = input_ids.dims2()?;
        let first = self.position_offset;
        let positions = Tensor::arange(first, first + seq as u32, input_ids.device())?;
        let mut x = self.word_embeddings.forward(input_ids)?;
        if let Some(types) = &self.token_type_embeddings {
            x = x.add(&types.forward(token_type_ids)?)?;
        }
        let x = x.broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        let x = self.layer_norm.forward(&x, mode)?;
        mode.dropout(&x, self.dropout)
    }

    /// A packed batch -> `[T, hidden]`.
    pub fn forward_packed(&self, batch: &PackedBatch, mode: Mode) -> Result<Tensor> {
        let dev = self.word_embeddings.embeddings().device();
        let t = batch.tokens();
        let ids = Tensor::from_slice(&batch.input_ids, t, dev)?;
        let positions = match self.position_offset {
            0 => Tensor::from_slice(&batch.positions, t, dev)?,
            first => {
                let shifted: Vec<u32> = batch.positions.iter().map(|p| p + first).collect();
                Tensor::from_vec(shifted, t, dev)?
            }
        };
        let mut x = match mode {
            Mode::Train(_) if self.sparse.enabled() => {
                // A leaf of its own: its gradient is exactly the rows' gradient.
                let rows = self
                    .word_embeddings
                    .embeddings()
                    .detach()
                    .index_select(&ids, 0)?;
                let leaf = candle_core::Var::from_tensor(&rows)?;
                let t = leaf.as_tensor().clone();
                self.sparse
                    .leaves
                    .lock()
                    .expect("sparse tap lock")
                    .push((leaf, batch.input_ids.clone()));
                t
            }
            _ => self.word_embeddings.forward(&ids)?,
        };
        if let Some(table) = &self.token_type_embeddings {
            let types = Tensor::from_slice(&batch.type_ids, t, dev)?;
            x = x.add(&table.forward(&types)?)?;
        }
        let x = x.add(&self.position_embeddings.forward(&positions)?)?;
        let x = self.layer_norm.forward(&x, mode)?;
        mode.dropout(&x, self.dropout)
    }
}
