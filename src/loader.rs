//! Turns a resolved model folder into what the code runs: config, pipeline, tokenizer, weights.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::hub::{self, ModelFiles, ModelRef};
use crate::model::bert::{BertConfig, BertEncoder};
use crate::model::encoder::{Encoder, InferenceEncoder};
use crate::model::fast::{FastEncoder, LongEncoder};
use crate::model::freeze::FreezePlan;
use crate::model::multitask::{HeadInit, HeadsSpec, MultiTaskModel};
use crate::model::quant::Dtype;
use crate::model::weights::{ParamRegistry, ParamSource, TrainablePredicate, WeightFile};
use crate::pipeline::Pipeline;
use crate::tokenize::TextTokenizer;

/// A setting the model cannot take. The messages name no flags; the CLI adds them.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "a maximum sequence length of {asked} is larger than the model's limit of {limit} \
         positions (max_position_embeddings in {config}{offset})"
    )]
    SeqLengthOverLimit {
        asked: usize,
        limit: usize,
        config: String,
        /// How the architecture's position offset lowers the limit, or "".
        offset: String,
    },
    #[error(
        "a maximum sequence length of {asked} leaves no room for [CLS] and [SEP]; use 2 or more"
    )]
    SeqLengthTooShort { asked: usize },
    #[error(
        "max_seq_length {asked} in the model's sentence_bert_config.json leaves no room for \
         [CLS] and [SEP]; fix the file or give a maximum sequence length of 2 or more"
    )]
    ModelSeqLengthTooShort { asked: usize },
}

/// A model's files, read and checked, ready to build an encoder from.
pub struct ModelAssets {
    pub files: ModelFiles,
    pub config: BertConfig,
    pub pipeline: Pipeline,
    pub tokenizer: TextTokenizer,
    pub weights: Arc<WeightFile>,
}

impl ModelAssets {
    /// Resolves `model` and reads its files. `max_seq_length` overrides the model's own limit.
    pub fn load(model: &ModelRef, max_seq_length: Option<usize>) -> Result<Self> {
        let files = hub::resolve(model)?;
        Self::from_files(files, max_seq_length)
    }

    pub fn from_files(files: ModelFiles, max_seq_length: Option<usize>) -> Result<Self> {
        let text = std::fs::read_to_string(&files.config)
            .with_context(|| format!("reading {}", files.config.display()))?;
        let config = BertConfig::parse(&text)
            .with_context(|| format!("parsing {}", files.config.display()))?;
        config
            .validate()
            .with_context(|| format!("checking {}", files.config.display()))?;
        let pipeline = Pipeline::from_files(&files, config.hidden_size)?;
        let limit = config.max_tokens();
        let max_len = match max_seq_length {
            Some(n) if n > limit => {
                return Err(LoadError::SeqLengthOverLimit {
                    asked: n,
                    limit,
                    config: files.config.display().to_string(),
                    offset: match config.position_offset() {
                        0 => String::new(),
                        o => format!(
                            ", less the {o} that {} positions start at",
                            config.arch.name()
                        ),
                    },
                }
                .into())
            }
            Some(n) if n < 2 => return Err(LoadError::SeqLengthTooShort { asked: n }.into()),
            Some(n) => n,
            None => match pipeline.max_seq_length {
                Some(n) if n < 2 => {
                    return Err(LoadError::ModelSeqLengthTooShort { asked: n }.into())
                }
                Some(n) => n.min(limit),
                None => limit,
            },
        };
        let tokenizer = TextTokenizer::load(
            &files.tokenizer,
            max_len,
            pipeline.lowercase_input,
            config.pad_token_id as u32,
        )?
        .with_vocab_limit(config.vocab_size);
        let weights = Arc::new(WeightFile::open(&files.weights)?.with_architecture(config.arch));
        Ok(Self {
            files,
            config,
            pipeline,
            tokenizer,
            weights,
        })
    }

    /// The prompt to prepend ([`Pipeline::resolve_prompt`]), refused when it leaves too
    /// little room for the sentence ([`TextTokenizer::check_prompt`]).
    pub fn prompt(&self, prompt: Option<&str>, name: Option<&str>) -> Result<Option<String>> {
        let text = self.pipeline.resolve_prompt(prompt, name)?;
        if let Some(t) = &text {
            let name = match prompt {
                Some(_) => None,
                None => name.or(self.pipeline.default_prompt_name.as_deref()),
            };
            self.tokenizer.check_prompt(t, name)?;
        }
        Ok(text)
    }

    /// The inference encoder in `dtype`: for the BERT family the fast path, loaded one layer
    /// at a time (see [`FastEncoder::load`]; with int8 or bf16, only the converted weights
    /// stay resident); for the long-context architectures their fast path
    /// ([`LongEncoder`]), converted from the float32 encoder one layer at a time.
    pub fn inference_encoder(&self, dtype: Dtype, device: &Device) -> Result<InferenceEncoder> {
        if self.config.arch.is_long() {
            let vb = ParamSource::unrecorded(vec![self.weights.clone()]).into_var_builder(device);
            let encoder = Encoder::load(vb, &self.config)
                .and_then(|e| LongEncoder::new(e, dtype))
                .with_context(|| self.loading_context())?;
            crate::alloc::release_freed();
            return Ok(InferenceEncoder::Long(Box::new(encoder)));
        }
        let vb = ParamSource::unrecorded(vec![self.weights.clone()]).into_var_builder(device);
        let encoder =
            FastEncoder::load(vb, &self.config, dtype).with_context(|| self.loading_context())?;
        crate::alloc::release_freed();
        Ok(InferenceEncoder::Fast(Box::new(encoder)))
    }

    /// "loading the encoder weights of MODEL from FILE", for errors.
    fn loading_context(&self) -> String {
        format!(
            "loading the encoder weights of {} from {}",
            self.files.model.id,
            self.files.weights.display()
        )
    }

    /// Builds the encoder with every weight frozen (inference), whatever the architecture.
    pub fn frozen(&self, device: &Device) -> Result<Encoder> {
        self.encoder(
            vec![self.weights.clone()],
            Arc::new(|_| false),
            ParamRegistry::new(),
            device,
        )
    }

    /// Builds the BERT-family encoder with every weight frozen (inference); an error for
    /// the long-context architectures, which [`Self::frozen`] builds.
    pub fn frozen_encoder(&self, device: &Device) -> Result<BertEncoder> {
        match self.frozen(device)? {
            Encoder::Bert(e) => Ok(e),
            _ => anyhow::bail!(
                "{} is a {} model, not of the BERT family",
                self.files.model.id,
                self.config.arch.name()
            ),
        }
    }

    /// Builds the multitask model on this encoder: encoder weights from `encoder_files` (first
    /// match wins), heads as `init` says, trainable parameters as `plan` says.
    pub fn multitask(
        &self,
        encoder_files: Vec<Arc<WeightFile>>,
        spec: HeadsSpec,
        plan: FreezePlan,
        init: HeadInit,
        device: &Device,
    ) -> Result<MultiTaskModel> {
        let registry = ParamRegistry::new();
        let encoder = self.encoder(encoder_files, plan.trainable(), registry.clone(), device)?;
        MultiTaskModel::build(encoder, registry, spec, plan, init, device)
    }

    /// Builds the encoder from `files` (first match wins), making trainable what `trainable`
    /// selects and recording every parameter in `registry`.
    pub fn encoder(
        &self,
        files: Vec<Arc<WeightFile>>,
        trainable: TrainablePredicate,
        registry: Arc<ParamRegistry>,
        device: &Device,
    ) -> Result<Encoder> {
        let vb = ParamSource::from_files(files, registry)
            .with_trainable(trainable)
            .into_var_builder(device);
        Encoder::load(vb, &self.config).with_context(|| {
            format!(
                "loading the encoder weights of {} from {}",
                self.files.model.id,
                self.files.weights.display()
            )
        })
    }
}
