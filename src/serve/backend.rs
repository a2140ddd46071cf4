//! The served model behind the routes: loads it once, tokenizes requests (with their prompt,
//! truncation and limit), and runs a batch of sentences through the same packed encoder and
//! pipeline as `--task=1` ([`Embedder`]) or the multitask model's heads as `--task=2`.

use anyhow::{Context, Result};
use candle_core::Device;

use super::config::ServedModel;
use super::errors::{ApiError, ErrorKind};
use super::types::{Token, TruncationDirection};
use crate::embed::Embedder;
use crate::hub::ModelRef;
use crate::loader::ModelAssets;
use crate::model::encoder::InferenceEncoder;
use crate::model::fast::PackedEncoder;
use crate::model::multitask::MultiTaskModel;
use crate::tokenize::{Encoded, TextTokenizer, TokenizeError};
use crate::train::checkpoint::Checkpoint;

/// The encoder the server runs.
enum Encoder {
    /// Task 1's encoder (the fast path, or a long-context encoder in f32).
    Fast(Box<InferenceEncoder>),
    /// A `--task=2` checkpoint: its encoder embeds, its heads predict.
    Multitask(Box<MultiTaskModel>),
}

/// How a request's texts are tokenized.
#[derive(Debug, Clone, Default)]
pub struct TokenizeOptions {
    /// Text prepended to every input.
    pub prompt: Option<String>,
    /// Cut inputs over the model's limit instead of refusing them.
    pub truncate: bool,
    pub direction: TruncationDirection,
}

/// The loaded model and its settings.
pub struct Backend {
    pub assets: ModelAssets,
    encoder: Encoder,
    /// The tokenizer again, cutting long inputs from the start.
    keep_end: TextTokenizer,
    /// The model's (or the flags') normalisation, when a request does not say.
    pub normalize: bool,
    /// The prompt when a request names none.
    pub prompt: Option<String>,
    /// The Matryoshka truncation when a request does not ask for one.
    pub truncate_dim: Option<usize>,
    /// Sentences per forward pass.
    pub batch_size: usize,
    /// Width of the vectors before any truncation.
    pub dimension: usize,
    pub model_ref: ModelRef,
    pub served: ServedModel,
    /// A token id whose batches fail (or panic) on purpose (FETCH_ML_SERVE_FAULT_TOKEN, tests
    /// only).
    fault_token: Option<Fault>,
}

impl Backend {
    /// Loads the model (and the checkpoint) as `--task=1` (and `--task=2 --checkpoint`) do.
    pub fn load(served: &ServedModel) -> Result<Self> {
        let device = Device::Cpu;
        let (assets, encoder, model_ref) = match &served.checkpoint {
            None => {
                let assets = ModelAssets::load(&served.model, served.max_seq_length)?;
                let fast = assets.inference_encoder(served.dtype, &device)?;
                (assets, Encoder::Fast(Box::new(fast)), served.model.clone())
            }
            Some(dir) => {
                let ckpt = Checkpoint::load(dir)?;
                let base = &ckpt.meta.base_model;
                let model_ref = if served.model_given {
                    served.model.clone()
                } else {
                    ModelRef {
                        id: base.id.clone(),
                        revision: base.revision.clone(),
                        ..served.model.clone()
                    }
                };
                let max_len = served.max_seq_length.or(Some(base.max_seq_length));
                let assets = ModelAssets::load(&model_ref, max_len).with_context(|| {
                    format!(
                        "loading the base model {} of the checkpoint in {}",
                        model_ref.id,
                        dir.display()
                    )
                })?;
                let model = ckpt.model(&assets, &device)?.with_dtype(served.dtype)?;
                (assets, Encoder::Multitask(Box::new(model)), model_ref)
            }
        };
        let pipeline = &assets.pipeline;
        let dimension = pipeline.dimension(assets.config.hidden_size);
        if let Some(n) = served.truncate_dim.filter(|&n| n > dimension) {
            anyhow::bail!(
                "cannot truncate the vectors to {n} dimensions: the model has {dimension}"
            );
        }
        let prompt = assets.prompt(served.prompt.as_deref(), served.prompt_name.as_deref())?;
        let keep_end = assets.tokenizer.keeping_end()?;
        Ok(Self {
            normalize: served.normalize.unwrap_or(pipeline.normalize),
            prompt,
            truncate_dim: served.truncate_dim,
            batch_size: served.batch_size,
            dimension,
            keep_end,
            encoder,
            assets,
            model_ref,
            served: served.clone(),
            fault_token: fault_token(),
        })
    }

    /// The packed encoder that embeds.
    pub fn encoder(&self) -> &dyn PackedEncoder {
        match &self.encoder {
            Encoder::Fast(f) => f.as_ref(),
            Encoder::Multitask(m) => m.inference_encoder(),
        }
    }

    /// The kernel of the dense layers.
    pub fn kernel(&self) -> &'static str {
        match &self.encoder {
            Encoder::Fast(f) => f.kernel_name(),
            Encoder::Multitask(m) => m.kernel_name(),
        }
    }

    /// The multitask model, when a checkpoint is served.
    pub fn multitask(&self) -> Option<&MultiTaskModel> {
        match &self.encoder {
            Encoder::Multitask(m) => Some(m),
            Encoder::Fast(_) => None,
        }
    }

    /// An embedder giving the pipeline's vectors before truncation and normalisation, which
    /// each request applies for itself ([`finish_vector`]).
    pub fn embedder(&self) -> Embedder<'_> {
        let mut e = Embedder::new(
            self.encoder(),
            &self.assets.tokenizer,
            self.assets.pipeline.pooling,
            false,
            self.batch_size,
        );
        e.dense = &self.assets.pipeline.dense;
        e
    }

    /// Vectors of `encoded`, in order, as [`Embedder::embed_encoded`] gives them.
    pub fn embed(&self, embedder: &Embedder, encoded: &[Encoded]) -> Result<Vec<Vec<f32>>> {
        self.check_fault(encoded)?;
        Ok(embedder
            .embed_encoded(encoded)
            .map_err(name_input)?
            .into_iter()
            .map(|e| e.vector)
            .collect())
    }

    /// Each head's probabilities for each of `encoded`: `[input][head][label]`, as
    /// `--task=2 --checkpoint` computes them.
    pub fn predict(&self, encoded: &[Encoded]) -> Result<Vec<[Vec<f32>; 2]>> {
        self.check_fault(encoded)?;
        let model = self
            .multitask()
            .context("no multitask model is served (--checkpoint)")?;
        let [a, b] = crate::train::evaluate::predict_probs(model, encoded, self.batch_size, None)
            .map_err(name_input)?;
        Ok(a.into_iter().zip(b).map(|(a, b)| [a, b]).collect())
    }

    fn check_fault(&self, encoded: &[Encoded]) -> Result<()> {
        if let Some(Fault { token: t, panics }) = self.fault_token {
            if encoded.iter().any(|e| e.ids.contains(&t)) {
                let why =
                    format!("a batch with token {t} fails on purpose (FETCH_ML_SERVE_FAULT_TOKEN)");
                if panics {
                    panic!("{why}");
                }
                anyhow::bail!(why);
            }
        }
        Ok(())
    }

    /// The prompt of a request naming `name` (or none: the server's).
    pub fn prompt(&self, name: Option<&str>) -> Result<Option<String>, ApiError> {
        match name {
            None => Ok(self.prompt.clone()),
            Some(n) => self
                .assets
                .prompt(None, Some(n))
                .map_err(|e| ApiError::invalid("prompt_name", format!("{e:#}"))),
        }
    }

    /// The tokens the model sees for `texts`, or 422 for a text the tokenizer refuses and 413
    /// for one over the model's limit (unless `opts.truncate`).
    pub fn tokenize(
        &self,
        texts: &[String],
        opts: &TokenizeOptions,
    ) -> Result<Vec<Encoded>, ApiError> {
        let tokenizer = match opts.direction {
            TruncationDirection::Right => &self.assets.tokenizer,
            TruncationDirection::Left => &self.keep_end,
        };
        let encoded = match &opts.prompt {
            Some(p) => {
                let prompted: Vec<String> = texts.iter().map(|t| format!("{p}{t}")).collect();
                tokenizer.encode(&prompted)
            }
            None => tokenizer.encode(texts),
        };
        let encoded = encoded.map_err(|e| match e.downcast_ref::<TokenizeError>() {
            Some(t) => ApiError::new(
                ErrorKind::Validation,
                format!("input {}: {}", t.index, t.message),
            ),
            None => ApiError::new(ErrorKind::Validation, format!("tokenizing: {e:#}")),
        })?;
        if !opts.truncate {
            if let Some(i) = encoded.iter().position(|e| e.truncated) {
                return Err(self.too_long(i));
            }
        }
        Ok(encoded)
    }

    /// Inputs given as token ids: checked against the vocabulary and the model's limit.
    pub fn token_inputs(
        &self,
        ids: Vec<Vec<u32>>,
        truncate: bool,
    ) -> Result<Vec<Encoded>, ApiError> {
        let vocab = self.assets.config.vocab_size;
        let max = self.assets.tokenizer.max_len();
        ids.into_iter()
            .enumerate()
            .map(|(i, mut ids)| {
                if ids.is_empty() {
                    return Err(ApiError::invalid(
                        "input",
                        format!("input {i} has no token ids"),
                    ));
                }
                if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ApiError::invalid(
                        "input",
                        format!(
                            "input {i}: token id {id} is outside the model's vocabulary of {vocab}"
                        ),
                    ));
                }
                let truncated = ids.len() > max;
                if truncated && !truncate {
                    return Err(self.too_long(i));
                }
                ids.truncate(max);
                Ok(Encoded {
                    type_ids: vec![0; ids.len()],
                    ids,
                    truncated,
                })
            })
            .collect()
    }

    fn too_long(&self, i: usize) -> ApiError {
        ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "input {i} is longer than the model's limit of {} tokens; send a shorter text, \
                 or set \"truncate\": true to cut it",
                self.assets.tokenizer.max_len()
            ),
        )
        .with_param("input")
    }

    /// The tokens of one text with their byte offsets, as `/tokenize` shows them.
    pub fn tokens(&self, text: &str, add_special: bool) -> Result<Vec<Token>, ApiError> {
        let enc = self
            .assets
            .tokenizer
            .encode_detailed(text, add_special)
            .map_err(|e| ApiError::new(ErrorKind::Validation, format!("{e:#}")))?;
        let specials = enc.get_special_tokens_mask();
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_tokens())
            .zip(enc.get_offsets())
            .enumerate()
            .map(|(i, ((&id, text), &(start, stop)))| {
                let special = specials.get(i).is_some_and(|&s| s == 1);
                Token {
                    id,
                    text: text.clone(),
                    special,
                    start: (!special).then_some(start),
                    stop: (!special).then_some(stop),
                }
            })
            .collect())
    }
}

/// A request's own truncation and normalisation of one vector, in `--task=1`'s order.
pub fn finish_vector(mut v: Vec<f32>, dimensions: Option<usize>, normalize: bool) -> Vec<f32> {
    if let Some(n) = dimensions {
        v.truncate(n);
    }
    if normalize {
        crate::model::pooling::normalize_l2(&mut v);
    }
    v
}

/// A token whose batches fail: with an error, or (`panic:ID`) with a panic.
#[derive(Debug, Clone, Copy)]
struct Fault {
    token: u32,
    panics: bool,
}

/// The token of FETCH_ML_SERVE_FAULT_TOKEN (`ID` or `panic:ID`), honoured only in builds for
/// the tests.
#[cfg(feature = "test-support")]
fn fault_token() -> Option<Fault> {
    let v = std::env::var("FETCH_ML_SERVE_FAULT_TOKEN").ok()?;
    let (panics, id) = match v.strip_prefix("panic:") {
        Some(id) => (true, id),
        None => (false, v.as_str()),
    };
    Some(Fault {
        token: id.parse().ok()?,
        panics,
    })
}

#[cfg(not(feature = "test-support"))]
fn fault_token() -> Option<Fault> {
    None
}

/// Names the input of an error about one input (a vector that is not finite) by its position
/// in the request, as the other errors about one input do.
fn name_input(e: anyhow::Error) -> anyhow::Error {
    crate::tokenize::name_sentence(e, |i| format!("input {i}"))
}
