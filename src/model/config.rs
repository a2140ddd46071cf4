//! `config.json` as the encoder reads it ([`BertConfig`]), for every architecture, and the
//! numbers both the BERT blocks and MPNet's relative position bias read from it (so that
//! neither imports the other for them).

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

use super::arch::Architecture;
use super::encoder::LongConfig;
use super::jina_bert::JinaBertConfig;
use super::modernbert::ModernBertConfig;
use super::nomic_bert::NomicBertConfig;

/// The buckets of MPNet's relative position bias: Hugging Face's `compute_position_bias`
/// uses its default `num_buckets=32`, whatever the config says (the config's count is only
/// the table's size, `relative_attention_num_buckets`).
pub const MPNET_BUCKETS: usize = 32;

/// `config.json` of a BERT model: candle-transformers' `Config` plus the attention dropout.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    #[serde(flatten)]
    pub base: candle_transformers::models::bert::Config,
    /// Dropout on attention probabilities; BERT's default is 0.1.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Rows of MPNet's relative position bias table (0 for other architectures).
    #[serde(default)]
    pub relative_attention_num_buckets: usize,
    /// The architecture `config.json` names (set by [`BertConfig::parse`]).
    #[serde(skip)]
    pub arch: Architecture,
    /// What a long-context architecture (ModernBERT, NomicBERT, JinaBERT) adds; `None` for
    /// the BERT family (set by [`BertConfig::parse`]).
    #[serde(skip)]
    pub long: Option<LongConfig>,
}

fn default_dropout() -> f64 {
    0.1
}

impl std::ops::Deref for BertConfig {
    type Target = candle_transformers::models::bert::Config;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

impl BertConfig {
    /// `config.json` as our BERT config: the architecture chosen ([`Architecture`]), its keys
    /// mapped onto BERT's.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let value: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let arch = Architecture::from_config(&value)?;
        let (value, long) = match arch {
            Architecture::ModernBert => {
                let c = ModernBertConfig::parse(&value)?;
                (c.as_bert(), Some(LongConfig::ModernBert(c)))
            }
            Architecture::NomicBert => {
                let c = NomicBertConfig::parse(&value)?;
                (c.as_bert(), Some(LongConfig::NomicBert(c)))
            }
            Architecture::JinaBert => {
                let c = JinaBertConfig::parse(&value)?;
                (JinaBertConfig::strip(&value), Some(LongConfig::JinaBert(c)))
            }
            _ => (arch.as_bert(value)?, None),
        };
        let mut config: BertConfig = serde_json::from_value(value)
            .with_context(|| format!("reading config.json as a {} config", arch.name()))?;
        config.arch = arch;
        config.long = long;
        Ok(config)
    }

    /// The position id of a sentence's first token (`pad_token_id + 1` for RoBERTa).
    pub fn position_offset(&self) -> usize {
        self.arch.position_offset(self.pad_token_id)
    }

    /// The most tokens a sentence may have: the position table less its offset (514 RoBERTa
    /// positions with pad id 1 give 512 tokens).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// Checks the numbers the encoder relies on.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not a multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        anyhow::ensure!(self.num_hidden_layers > 0, "num_hidden_layers is 0");
        anyhow::ensure!(self.vocab_size > 0, "vocab_size is 0");
        anyhow::ensure!(
            self.pad_token_id < self.vocab_size,
            "pad_token_id {} is outside the vocabulary of {} (vocab_size)",
            self.pad_token_id,
            self.vocab_size
        );
        anyhow::ensure!(
            self.max_tokens() >= 2,
            "max_position_embeddings {} leaves no room for [CLS] and [SEP]{}",
            self.max_position_embeddings,
            match self.position_offset() {
                0 => String::new(),
                o => format!(" (a {} model's positions start at {o})", self.arch.name()),
            }
        );
        // DistilBERT, MPNet and ModernBERT have no token types (NomicBERT may have none); every
        // other architecture has one at least.
        anyhow::ensure!(
            self.type_vocab_size > 0
                || matches!(
                    self.arch,
                    Architecture::DistilBert
                        | Architecture::Mpnet
                        | Architecture::ModernBert
                        | Architecture::NomicBert
                ),
            "type_vocab_size is 0"
        );
        anyhow::ensure!(
            self.arch != Architecture::Mpnet
                || self.relative_attention_num_buckets >= MPNET_BUCKETS,
            "relative_attention_num_buckets is {}; MPNet looks up {} buckets",
            self.relative_attention_num_buckets,
            MPNET_BUCKETS
        );
        anyhow::ensure!(
            self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0,
            "layer_norm_eps {} is not a non-negative number",
            self.layer_norm_eps
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpnet_config_has_no_token_types_and_positions_from_2() {
        let text = |buckets: usize| {
            format!(
                r#"{{"model_type": "mpnet", "vocab_size": 50, "hidden_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 66,
                "initializer_range": 0.02, "layer_norm_eps": 1e-5, "pad_token_id": 1,
                "relative_attention_num_buckets": {buckets}}}"#
            )
        };
        let c = BertConfig::parse(&text(32)).unwrap();
        assert_eq!(c.arch, Architecture::Mpnet);
        assert_eq!(
            (c.type_vocab_size, c.relative_attention_num_buckets),
            (0, 32)
        );
        assert_eq!((c.position_offset(), c.max_tokens()), (2, 64));
        c.validate().unwrap();
        let e = BertConfig::parse(&text(16))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("relative_attention_num_buckets is 16"), "{e}");
    }

    #[test]
    fn distilbert_config_maps_to_bert() {
        let c = BertConfig::parse(
            r#"{"model_type": "distilbert", "vocab_size": 50, "dim": 32, "n_layers": 2,
                "n_heads": 4, "hidden_dim": 64, "activation": "gelu",
                "max_position_embeddings": 40, "pad_token_id": 0, "dropout": 0.1,
                "attention_dropout": 0.1, "initializer_range": 0.02,
                "sinusoidal_pos_embds": false}"#,
        )
        .unwrap();
        assert_eq!(c.arch, Architecture::DistilBert);
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (32, 2, 4)
        );
        assert_eq!((c.intermediate_size, c.type_vocab_size), (64, 0));
        assert_eq!(c.position_offset(), 0);
    }

    #[test]
    fn jina_config_reads_as_bert_shape_plus_alibi() {
        let c = BertConfig::parse(
            r#"{"model_type": "bert", "position_embedding_type": "alibi",
                "feed_forward_type": "geglu", "vocab_size": 50, "hidden_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "max_position_embeddings": 8192,
                "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
                "pad_token_id": 0, "emb_pooler": "mean"}"#,
        )
        .unwrap();
        assert_eq!(c.arch, Architecture::JinaBert);
        assert!(matches!(c.long, Some(LongConfig::JinaBert(_))));
        assert_eq!((c.max_tokens(), c.hidden_size), (8192, 32));
        c.validate().unwrap();
    }
}
