//! A model's embedding pipeline as its folder describes it: pooling, normalisation, max length.
//!
//! sentence-transformers folders list their steps in `modules.json` (Transformer, Pooling,
//! Normalize), give the pooling mode in `1_Pooling/config.json` and the max length in
//! `sentence_bert_config.json`. A plain BERT folder has none of these: mean pooling, no
//! normalisation, and the position-embedding limit.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::hub::ModelFiles;
use crate::model::pooling::Pooling;

/// What happens after the encoder, and how long inputs may be.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub pooling: Pooling,
    pub normalize: bool,
    /// The model's own max length in tokens, when its folder sets one.
    pub max_seq_length: Option<usize>,
    /// sentence-transformers lower-cases the text itself before tokenising.
    pub lowercase_input: bool,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            pooling: Pooling::Mean,
            normalize: false,
            max_seq_length: None,
            lowercase_input: false,
        }
    }
}

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn modules(path: &Path) -> Result<Vec<Module>> {
    read_json(path)
}

/// The folder of the Pooling module listed in `modules.json`, if any.
pub fn pooling_module_path(modules_json: &Path) -> Result<Option<String>> {
    Ok(modules(modules_json)?
        .into_iter()
        .find(|m| m.kind.ends_with(".Pooling"))
        .map(|m| m.path))
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

impl Pipeline {
    /// Reads the pipeline from the model's files; plain BERT gets the defaults.
    pub fn from_files(files: &ModelFiles) -> Result<Self> {
        let mut p = Pipeline::default();
        if let Some(path) = &files.modules {
            for m in modules(path)? {
                let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
                match kind {
                    "Transformer" | "Pooling" => {}
                    "Normalize" => p.normalize = true,
                    other => bail!(
                        "{} lists a {other} module, which fetch-ml does not implement; its \
                         embeddings would be wrong, so the model is refused",
                        path.display()
                    ),
                }
            }
        }
        if let Some(path) = &files.pooling_config {
            let c: PoolingConfig = read_json(path)?;
            let modes = [
                (c.pooling_mode_mean_tokens, Some(Pooling::Mean)),
                (c.pooling_mode_cls_token, Some(Pooling::Cls)),
                (c.pooling_mode_max_tokens, Some(Pooling::Max)),
                (
                    c.pooling_mode_mean_sqrt_len_tokens,
                    Some(Pooling::MeanSqrtLen),
                ),
                (c.pooling_mode_weightedmean_tokens, None),
                (c.pooling_mode_lasttoken, None),
            ];
            let chosen: Vec<_> = modes.iter().filter(|(on, _)| *on).collect();
            p.pooling = match chosen.as_slice() {
                [(_, Some(mode))] => *mode,
                [] => bail!("{}: no pooling mode is enabled", path.display()),
                [(_, None)] => bail!(
                    "{}: the pooling mode (weighted mean or last token) is not supported; \
                     supported: mean, cls, max, mean_sqrt_len",
                    path.display()
                ),
                _ => bail!(
                    "{}: several pooling modes are enabled at once; fetch-ml supports one",
                    path.display()
                ),
            };
        }
        if let Some(path) = &files.sentence_bert_config {
            let c: SentenceBertConfig = read_json(path)?;
            p.max_seq_length = c.max_seq_length;
            p.lowercase_input = c.do_lower_case;
        }
        Ok(p)
    }
}
