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

    /// `config.json`'s keys mapped onto BERT's for this architecture of the BERT family
    /// (DistilBERT's renamed, MPNet's missing token types added); `BertConfig::parse` reads
    /// the result (and the long-context architectures' own configs).
    pub fn as_bert(self, value: Value) -> Result<Value> {
        Ok(match self {
            Architecture::DistilBert => distilbert_as_bert(&value)?,
            Architecture::Mpnet => mpnet_as_bert(value),
            _ => value,
        })
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
        crate::note!(
            "note: sinusoidal_pos_embds is true; the stored position table is used as it is"
        );
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
mod tests;
