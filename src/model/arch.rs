//! The encoder architectures fetch-ml runs, chosen by `config.json`, and the one place that maps
//! each architecture's config keys and tensor names onto our canonical (BERT) ones.
//!
//! BERT, RoBERTa, XLM-RoBERTa, DistilBERT and MPNet share one block structure
//! (post-LayerNorm attention and feed-forward layers), so they all run through
//! [`super::bert`] and the fast path. ModernBERT, NomicBERT and JinaBERT (long-context
//! encoders with rotary positions or ALiBi and gated feed-forward layers) have their own
//! files ([`super::modernbert`], [`super::nomic_bert`], [`super::jina_bert`]) behind the same
//! seam ([`super::encoder`]). What differs is said here:
//! - the config: DistilBERT's keys (`dim`, `n_layers`, ...) become a BERT config;
//! - positions: RoBERTa and XLM-RoBERTa number tokens from `pad_token_id + 1`, MPNet from 2;
//! - token types: DistilBERT and MPNet have none (`type_vocab_size` 0);
//! - MPNet adds a relative position bias to the attention scores ([`super::mpnet`]);
//! - tensor names: every canonical name (`encoder.layer.0.attention.self.query.weight`) has
//!   its file names per architecture, with and without the model prefix (`roberta.`, ...).
//!   The long-context encoders keep their own names inside a layer, under the canonical
//!   `encoder.layer.{i}.` (ModernBERT's `layers.{i}.`, NomicBERT's `encoder.layers.{i}.`),
//!   with the word embeddings at `embeddings.word_embeddings` (ModernBERT's
//!   `embeddings.tok_embeddings`), NomicBERT's `emb_ln` at `embeddings.LayerNorm`, and
//!   ModernBERT's `final_norm` with its last layer (`encoder.layer.{L-1}.final_norm`);
//! - a JinaBERT config says `"model_type": "bert"`; its `"position_embedding_type": "alibi"`
//!   tells it apart.
//!
//! Freezing, checkpoints and the freeze check only ever see canonical names.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::bert::BertConfig;
use super::encoder::LongConfig;
use super::jina_bert::JinaBertConfig;
use super::modernbert::ModernBertConfig;
use super::nomic_bert::NomicBertConfig;

/// An encoder family, from `config.json`'s `model_type` (or its `architectures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Architecture {
    #[default]
    Bert,
    Roberta,
    XlmRoberta,
    DistilBert,
    Mpnet,
    ModernBert,
    NomicBert,
    JinaBert,
}

impl Architecture {
    /// Every supported architecture, by its `model_type`.
    pub const ALL: [Architecture; 8] = [
        Architecture::Bert,
        Architecture::Roberta,
        Architecture::XlmRoberta,
        Architecture::DistilBert,
        Architecture::Mpnet,
        Architecture::ModernBert,
        Architecture::NomicBert,
        Architecture::JinaBert,
    ];

    /// The `model_type` of `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::Roberta => "roberta",
            Architecture::XlmRoberta => "xlm-roberta",
            Architecture::DistilBert => "distilbert",
            Architecture::Mpnet => "mpnet",
            Architecture::ModernBert => "modernbert",
            Architecture::NomicBert => "nomic_bert",
            Architecture::JinaBert => "jina_bert",
        }
    }

    /// True for the long-context architectures, which have their own encoders (not the fast
    /// path's BERT blocks).
    pub fn is_long(self) -> bool {
        matches!(
            self,
            Architecture::ModernBert | Architecture::NomicBert | Architecture::JinaBert
        )
    }

    /// The supported `model_type`s, for messages: "bert, roberta, xlm-roberta, distilbert,
    /// mpnet, modernbert, nomic_bert, jina_bert".
    pub fn supported() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The prefix of the architecture's tensors in checkpoints of task models
    /// (`BertForMaskedLM`, ...): `bert.`, `roberta.`, `distilbert.`, `mpnet.`, and `model.`
    /// for ModernBERT (`ModernBertForMaskedLM`). NomicBERT's and JinaBERT's pre-training
    /// models hold theirs as `bert.` too (from memory of nomic's and Jina's code; their
    /// published embedding checkpoints have no prefix).
    pub fn prefix(self) -> &'static str {
        match self {
            Architecture::Bert | Architecture::NomicBert | Architecture::JinaBert => "bert.",
            Architecture::ModernBert => "model.",
            Architecture::Roberta | Architecture::XlmRoberta => "roberta.",
            Architecture::DistilBert => "distilbert.",
            Architecture::Mpnet => "mpnet.",
        }
    }

    /// The architecture `config.json` names: its `model_type`, else the first of its
    /// `architectures` (`XLMRobertaModel`, ...), else BERT (old configs name neither). A
    /// BERT config with `"position_embedding_type": "alibi"` is JinaBERT. Any other model
    /// type is an error that names it and lists the supported ones.
    pub fn from_config(config: &Value) -> Result<Self> {
        let alibi = config
            .get("position_embedding_type")
            .and_then(Value::as_str)
            == Some("alibi");
        let arch = Self::named_by(config)?;
        Ok(match arch {
            Architecture::Bert if alibi => Architecture::JinaBert,
            other => other,
        })
    }

    /// The architecture `model_type` or `architectures` names.
    fn named_by(config: &Value) -> Result<Self> {
        if let Some(t) = config.get("model_type").and_then(Value::as_str) {
            return match t.to_ascii_lowercase().replace('_', "-").as_str() {
                "bert" => Ok(Architecture::Bert),
                "modernbert" => Ok(Architecture::ModernBert),
                "nomic-bert" => Ok(Architecture::NomicBert),
                "jina-bert" => Ok(Architecture::JinaBert),
                "roberta" => Ok(Architecture::Roberta),
                "xlm-roberta" => Ok(Architecture::XlmRoberta),
                "distilbert" => Ok(Architecture::DistilBert),
                "mpnet" => Ok(Architecture::Mpnet),
                _ => bail!(
                    "model_type \"{t}\" is not supported; fetch-ml runs these model types: {}",
                    Self::supported()
                ),
            };
        }
        let first = config
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
        let Some(class) = first else {
            return Ok(Architecture::Bert);
        };
        // Longest family names first: "XLMRoberta" before "Roberta", "DistilBert" before "Bert".
        let families = [
            ("ModernBert", Architecture::ModernBert),
            ("NomicBert", Architecture::NomicBert),
            ("JinaBert", Architecture::JinaBert),
            ("XLMRoberta", Architecture::XlmRoberta),
            ("DistilBert", Architecture::DistilBert),
            ("MPNet", Architecture::Mpnet),
            ("Roberta", Architecture::Roberta),
            ("Bert", Architecture::Bert),
        ];
        match families.iter().find(|(f, _)| class.starts_with(f)) {
            Some((_, a)) => Ok(*a),
            None => bail!(
                "architecture \"{class}\" (config.json has no model_type) is not supported; \
                 fetch-ml runs these model types: {}",
                Self::supported()
            ),
        }
    }

    /// The first position id: 0 for BERT and DistilBERT, `pad_token_id + 1` for RoBERTa and
    /// XLM-RoBERTa (Hugging Face's `create_position_ids_from_input_ids`), and 2 for MPNet,
    /// whose `MPNetEmbeddings` fixes `padding_idx = 1` whatever the config's `pad_token_id`.
    pub fn position_offset(self, pad_token_id: usize) -> usize {
        match self {
            Architecture::Roberta | Architecture::XlmRoberta => pad_token_id + 1,
            Architecture::Mpnet => MPNET_PADDING_IDX + 1,
            Architecture::Bert
            | Architecture::DistilBert
            | Architecture::ModernBert
            | Architecture::NomicBert
            | Architecture::JinaBert => 0,
        }
    }

    /// The names under which a file of this architecture may store the canonical (BERT)
    /// parameter `canonical`, most likely first: without and then with the model prefix,
    /// plus the old `LayerNorm.gamma`/`beta` names.
    pub fn hf_names(self, canonical: &str) -> Vec<String> {
        let mut names = vec![self.rename(canonical)];
        if let Some(stem) = names[0].strip_suffix("LayerNorm.weight") {
            let gamma = format!("{stem}LayerNorm.gamma");
            names.push(gamma);
        }
        if let Some(stem) = names[0].strip_suffix("LayerNorm.bias") {
            let beta = format!("{stem}LayerNorm.beta");
            names.push(beta);
        }
        let prefixed: Vec<String> = names
            .iter()
            .map(|n| format!("{}{n}", self.prefix()))
            .collect();
        names.extend(prefixed);
        names
    }

    /// The architecture's own name of the canonical parameter `canonical` (no prefix): the
    /// name a Hugging Face model of this architecture stores it under.
    pub fn rename(self, canonical: &str) -> String {
        match self {
            Architecture::ModernBert | Architecture::NomicBert => {
                return long_rename(self, canonical)
            }
            _ => {}
        }
        let (layers, blocks): (&str, &[(&str, &str)]) = match self {
            Architecture::DistilBert => (
                "transformer.layer.",
                &[
                    ("attention.self.query.", "attention.q_lin."),
                    ("attention.self.key.", "attention.k_lin."),
                    ("attention.self.value.", "attention.v_lin."),
                    ("attention.output.dense.", "attention.out_lin."),
                    ("attention.output.LayerNorm.", "sa_layer_norm."),
                    ("intermediate.dense.", "ffn.lin1."),
                    ("output.dense.", "ffn.lin2."),
                    ("output.LayerNorm.", "output_layer_norm."),
                ],
            ),
            Architecture::Mpnet => (
                "encoder.layer.",
                &[
                    ("attention.self.query.", "attention.attn.q."),
                    ("attention.self.key.", "attention.attn.k."),
                    ("attention.self.value.", "attention.attn.v."),
                    ("attention.output.dense.", "attention.attn.o."),
                    ("attention.output.LayerNorm.", "attention.LayerNorm."),
                ],
            ),
            _ => return canonical.to_string(),
        };
        let Some(rest) = canonical.strip_prefix("encoder.layer.") else {
            return canonical.to_string();
        };
        let Some((i, tail)) = rest.split_once('.') else {
            return canonical.to_string();
        };
        for (bert, own) in blocks {
            if let Some(param) = tail.strip_prefix(bert) {
                return format!("{layers}{i}.{own}{param}");
            }
        }
        canonical.to_string()
    }

    /// `config.json` as our BERT config: the architecture chosen, DistilBERT's keys mapped,
    /// and a long-context architecture's own config read and checked.
    pub fn parse_config(text: &str) -> Result<BertConfig> {
        let value: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let arch = Self::from_config(&value)?;
        let (value, long) = match arch {
            Architecture::DistilBert => (distilbert_as_bert(&value)?, None),
            Architecture::Mpnet => (mpnet_as_bert(value), None),
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
            _ => (value, None),
        };
        let mut config: BertConfig = serde_json::from_value(value)
            .with_context(|| format!("reading config.json as a {} config", arch.name()))?;
        config.arch = arch;
        config.long = long;
        Ok(config)
    }
}

/// ModernBERT's and NomicBERT's file names of canonical names (see the module doc).
fn long_rename(arch: Architecture, canonical: &str) -> String {
    let (layers, word, emb_norm) = match arch {
        Architecture::ModernBert => ("layers.", "embeddings.tok_embeddings.", None),
        _ => (
            "encoder.layers.",
            "embeddings.word_embeddings.",
            Some("emb_ln."),
        ),
    };
    if let Some(p) = canonical.strip_prefix("embeddings.word_embeddings.") {
        return format!("{word}{p}");
    }
    if let (Some(p), Some(n)) = (canonical.strip_prefix("embeddings.LayerNorm."), emb_norm) {
        return format!("{n}{p}");
    }
    let Some((_, tail)) = canonical
        .strip_prefix("encoder.layer.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return canonical.to_string();
    };
    if arch == Architecture::ModernBert && tail.starts_with("final_norm.") {
        return tail.to_string();
    }
    let i = &canonical["encoder.layer.".len()..canonical.len() - tail.len() - 1];
    format!("{layers}{i}.{tail}")
}

/// MPNet's `padding_idx`, fixed in Hugging Face's `MPNetEmbeddings`.
const MPNET_PADDING_IDX: usize = 1;

/// MPNet's config as BERT's: no token types (its configs have no `type_vocab_size`).
fn mpnet_as_bert(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.entry("type_vocab_size").or_insert(json!(0));
    }
    v
}

/// DistilBERT's config keys as BERT's (its LayerNorms use eps 1e-12, fixed in its code).
fn distilbert_as_bert(v: &Value) -> Result<Value> {
    let get = |key: &str| -> Result<Value> {
        v.get(key)
            .cloned()
            .with_context(|| format!("the DistilBERT config has no \"{key}\""))
    };
    let or = |key: &str, default: Value| v.get(key).cloned().unwrap_or(default);
    if v.get("sinusoidal_pos_embds").and_then(Value::as_bool) == Some(true) {
        // The table is still stored in the weights (filled with sinusoids), so it loads as is.
        eprintln!("note: sinusoidal_pos_embds is true; the stored position table is used as it is");
    }
    Ok(json!({
        "vocab_size": get("vocab_size")?,
        "hidden_size": get("dim")?,
        "num_hidden_layers": get("n_layers")?,
        "num_attention_heads": get("n_heads")?,
        "intermediate_size": get("hidden_dim")?,
        "hidden_act": or("activation", json!("gelu")),
        "hidden_dropout_prob": or("dropout", json!(0.1)),
        "attention_probs_dropout_prob": or("attention_dropout", json!(0.1)),
        "max_position_embeddings": get("max_position_embeddings")?,
        "type_vocab_size": 0,
        "initializer_range": or("initializer_range", json!(0.02)),
        "layer_norm_eps": 1e-12,
        "pad_token_id": or("pad_token_id", json!(0)),
        "model_type": "distilbert",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_type_decides_and_unknown_is_named() {
        let arch = |v: Value| Architecture::from_config(&v);
        assert_eq!(arch(json!({})).unwrap(), Architecture::Bert);
        assert_eq!(
            arch(json!({"model_type": "xlm-roberta"})).unwrap(),
            Architecture::XlmRoberta
        );
        assert_eq!(
            arch(json!({"architectures": ["DistilBertModel"]})).unwrap(),
            Architecture::DistilBert
        );
        assert_eq!(
            arch(json!({"architectures": ["XLMRobertaModel"]})).unwrap(),
            Architecture::XlmRoberta
        );
        let e = arch(json!({"model_type": "t5"})).unwrap_err().to_string();
        assert!(
            e.contains("\"t5\"") && e.contains("xlm-roberta, distilbert, mpnet"),
            "{e}"
        );
        assert_eq!(
            arch(json!({"architectures": ["MPNetForMaskedLM"]})).unwrap(),
            Architecture::Mpnet
        );
        let e = arch(json!({"architectures": ["T5EncoderModel"]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("T5EncoderModel") && e.contains("bert"), "{e}");
    }

    #[test]
    fn tensor_names_per_architecture() {
        let d = Architecture::DistilBert;
        assert_eq!(
            d.hf_names("encoder.layer.3.attention.self.key.bias"),
            vec![
                "transformer.layer.3.attention.k_lin.bias",
                "distilbert.transformer.layer.3.attention.k_lin.bias"
            ]
        );
        assert_eq!(
            d.hf_names("encoder.layer.0.output.LayerNorm.weight")[0],
            "transformer.layer.0.output_layer_norm.weight"
        );
        assert_eq!(
            d.hf_names("encoder.layer.1.attention.output.dense.weight")[0],
            "transformer.layer.1.attention.out_lin.weight"
        );
        assert_eq!(
            d.hf_names("embeddings.LayerNorm.bias")[0],
            "embeddings.LayerNorm.bias"
        );
        let r = Architecture::Roberta.hf_names("embeddings.word_embeddings.weight");
        assert_eq!(
            r,
            vec![
                "embeddings.word_embeddings.weight",
                "roberta.embeddings.word_embeddings.weight"
            ]
        );
        let m = Architecture::Mpnet;
        assert_eq!(
            m.hf_names("encoder.layer.2.attention.output.dense.bias"),
            vec![
                "encoder.layer.2.attention.attn.o.bias",
                "mpnet.encoder.layer.2.attention.attn.o.bias"
            ]
        );
        assert_eq!(
            m.hf_names("encoder.layer.0.attention.output.LayerNorm.weight")[0],
            "encoder.layer.0.attention.LayerNorm.weight"
        );
        assert_eq!(
            m.hf_names("encoder.layer.0.output.LayerNorm.weight")[0],
            "encoder.layer.0.output.LayerNorm.weight"
        );
        assert_eq!(
            m.hf_names("encoder.relative_attention_bias.weight"),
            vec![
                "encoder.relative_attention_bias.weight",
                "mpnet.encoder.relative_attention_bias.weight"
            ]
        );
        let b = Architecture::Bert.hf_names("embeddings.LayerNorm.weight");
        assert_eq!(
            b,
            vec![
                "embeddings.LayerNorm.weight",
                "embeddings.LayerNorm.gamma",
                "bert.embeddings.LayerNorm.weight",
                "bert.embeddings.LayerNorm.gamma"
            ]
        );
    }

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
        let c = Architecture::parse_config(&text(32)).unwrap();
        assert_eq!(c.arch, Architecture::Mpnet);
        assert_eq!(
            (c.type_vocab_size, c.relative_attention_num_buckets),
            (0, 32)
        );
        assert_eq!((c.position_offset(), c.max_tokens()), (2, 64));
        c.validate().unwrap();
        let e = Architecture::parse_config(&text(16))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("relative_attention_num_buckets is 16"), "{e}");
    }

    #[test]
    fn long_context_architectures_are_recognised() {
        let arch = |v: Value| Architecture::from_config(&v).unwrap();
        assert_eq!(
            arch(json!({"model_type": "modernbert"})),
            Architecture::ModernBert
        );
        assert_eq!(
            arch(json!({"model_type": "nomic_bert"})),
            Architecture::NomicBert
        );
        assert_eq!(
            arch(json!({"model_type": "jina_bert"})),
            Architecture::JinaBert
        );
        // jina-embeddings-v2: a BERT config with ALiBi.
        let jina = json!({"model_type": "bert", "position_embedding_type": "alibi"});
        assert_eq!(arch(jina), Architecture::JinaBert);
        let bert = json!({"model_type": "bert", "position_embedding_type": "absolute"});
        assert_eq!(arch(bert), Architecture::Bert);
        assert_eq!(
            arch(json!({"architectures": ["NomicBertModel"]})),
            Architecture::NomicBert
        );
        assert_eq!(
            arch(json!({"architectures": ["ModernBertModel"]})),
            Architecture::ModernBert
        );
        assert_eq!(
            arch(json!({"architectures": ["JinaBertForMaskedLM"]})),
            Architecture::JinaBert
        );
        let e = Architecture::from_config(&json!({"model_type": "t5"})).unwrap_err();
        assert!(
            e.to_string().contains("modernbert, nomic_bert, jina_bert"),
            "{e}"
        );
    }

    #[test]
    fn long_context_tensor_names() {
        let m = Architecture::ModernBert;
        assert_eq!(
            m.hf_names("embeddings.word_embeddings.weight"),
            vec![
                "embeddings.tok_embeddings.weight",
                "model.embeddings.tok_embeddings.weight"
            ]
        );
        assert_eq!(m.rename("embeddings.norm.weight"), "embeddings.norm.weight");
        assert_eq!(
            m.rename("encoder.layer.12.attn.Wqkv.weight"),
            "layers.12.attn.Wqkv.weight"
        );
        assert_eq!(
            m.rename("encoder.layer.3.final_norm.weight"),
            "final_norm.weight"
        );
        let n = Architecture::NomicBert;
        assert_eq!(n.rename("embeddings.LayerNorm.bias"), "emb_ln.bias");
        assert_eq!(
            n.rename("embeddings.token_type_embeddings.weight"),
            "embeddings.token_type_embeddings.weight"
        );
        assert_eq!(
            n.rename("encoder.layer.0.mlp.fc11.weight"),
            "encoder.layers.0.mlp.fc11.weight"
        );
        let j = Architecture::JinaBert;
        assert_eq!(
            j.rename("encoder.layer.1.mlp.gated_layers.weight"),
            "encoder.layer.1.mlp.gated_layers.weight"
        );
    }

    #[test]
    fn jina_config_reads_as_bert_shape_plus_alibi() {
        let c = Architecture::parse_config(
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

    #[test]
    fn distilbert_config_maps_to_bert() {
        let c = Architecture::parse_config(
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
}
