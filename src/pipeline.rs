//! A model's embedding pipeline as its folder describes it: prompts, pooling, Dense layers,
//! normalisation, max length.
//!
//! sentence-transformers folders list their steps in `modules.json` (Transformer, Pooling,
//! Dense, Normalize), give the pooling mode in `1_Pooling/config.json`, each Dense layer in
//! its own folder (`2_Dense/config.json` and `model.safetensors`), the max length in
//! `sentence_bert_config.json` and named prompts in `config_sentence_transformers.json`. A
//! plain BERT folder has none of these: mean pooling, no normalisation, and the
//! position-embedding limit.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::hub::ModelFiles;
use crate::model::pooling::Pooling;
use crate::st_modules::{modules, read_json};

/// What happens after the encoder, and how long inputs may be.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub pooling: Pooling,
    /// Dense layers applied to the pooled vector, in order, before normalisation.
    pub dense: Vec<DenseLayer>,
    pub normalize: bool,
    /// The model's own max length in tokens, when its folder sets one.
    pub max_seq_length: Option<usize>,
    /// sentence-transformers lower-cases the text itself before tokenising.
    pub lowercase_input: bool,
    /// Named prompts (`config_sentence_transformers.json`), such as `query` -> "query: ".
    pub prompts: BTreeMap<String, String>,
    /// The prompt used when none is asked for.
    pub default_prompt_name: Option<String>,
    /// False when the Pooling module leaves the prompt's tokens out (not implemented).
    pub include_prompt: bool,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            pooling: Pooling::Mean,
            dense: Vec::new(),
            normalize: false,
            max_seq_length: None,
            lowercase_input: false,
            prompts: BTreeMap::new(),
            default_prompt_name: None,
            include_prompt: true,
        }
    }
}

/// The activation of a sentence-transformers Dense module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseActivation {
    Identity,
    Tanh,
    Relu,
    Sigmoid,
    Gelu,
}

impl DenseActivation {
    /// From the torch class name of `activation_function` (Tanh when absent, as in
    /// sentence-transformers).
    fn parse(name: Option<&str>) -> Result<Self> {
        let Some(name) = name else {
            return Ok(DenseActivation::Tanh);
        };
        Ok(match name.rsplit('.').next().unwrap_or(name) {
            "Identity" => DenseActivation::Identity,
            "Tanh" => DenseActivation::Tanh,
            "ReLU" => DenseActivation::Relu,
            "Sigmoid" => DenseActivation::Sigmoid,
            "GELU" => DenseActivation::Gelu,
            _ => bail!(
                "activation {name} is not supported; supported: Identity, Tanh, ReLU, Sigmoid, \
                 GELU"
            ),
        })
    }

    fn apply(self, v: f32) -> f32 {
        match self {
            DenseActivation::Identity => v,
            DenseActivation::Tanh => v.tanh(),
            DenseActivation::Relu => v.max(0.0),
            DenseActivation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            DenseActivation::Gelu => {
                0.5 * v * (1.0 + kernels::math::erf(v / std::f32::consts::SQRT_2))
            }
        }
    }
}

/// A sentence-transformers Dense module: `act(W x + b)` on the pooled vector.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLayer {
    pub in_features: usize,
    pub out_features: usize,
    /// `[out, in]`, row-major.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub activation: DenseActivation,
}

#[derive(Deserialize)]
struct DenseConfig {
    in_features: usize,
    out_features: usize,
    #[serde(default = "yes")]
    bias: bool,
    activation_function: Option<String>,
}

fn yes() -> bool {
    true
}

impl DenseLayer {
    /// Reads a Dense module from its `config.json` and `model.safetensors` (`linear.weight`,
    /// `linear.bias`).
    pub fn load(config: &Path, weights: &Path) -> Result<Self> {
        let c: DenseConfig = read_json(config)?;
        for (field, n) in [
            ("in_features", c.in_features),
            ("out_features", c.out_features),
        ] {
            if n == 0 {
                bail!(
                    "{}: {field} is 0; a Dense module needs at least one {}",
                    config.display(),
                    if field == "in_features" {
                        "input"
                    } else {
                        "output"
                    }
                );
            }
        }
        let activation = DenseActivation::parse(c.activation_function.as_deref())
            .with_context(|| format!("{}", config.display()))?;
        let tensors = candle_core::safetensors::load(weights, &candle_core::Device::Cpu)
            .with_context(|| format!("reading {}", weights.display()))?;
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = tensors
                .get(name)
                .with_context(|| format!("{}: no tensor {name}", weights.display()))?;
            if t.dims() != shape {
                bail!(
                    "{}: tensor {name} has shape {:?} but {} says {:?}",
                    weights.display(),
                    t.dims(),
                    config.display(),
                    shape
                );
            }
            let v = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            crate::finite::check_weight(&v, shape, name, weights)?;
            Ok(v)
        };
        let weight = get("linear.weight", &[c.out_features, c.in_features])?;
        let bias = if c.bias {
            Some(get("linear.bias", &[c.out_features])?)
        } else {
            None
        };
        Ok(Self {
            in_features: c.in_features,
            out_features: c.out_features,
            weight,
            bias,
            activation,
        })
    }

    /// `act(W x + b)`; `x` has `in_features` values.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        (0..self.out_features)
            .map(|o| {
                let row = &self.weight[o * self.in_features..(o + 1) * self.in_features];
                let dot: f32 = row.iter().zip(x).map(|(w, v)| w * v).sum();
                let b = self.bias.as_ref().map_or(0.0, |b| b[o]);
                self.activation.apply(dot + b)
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct PoolingConfig {
    /// The width of the token vectors it pools: the encoder's.
    #[serde(default)]
    word_embedding_dimension: Option<usize>,
    /// sentence-transformers 5+: one mode name (or a list of them).
    #[serde(default)]
    pooling_mode: Option<serde_json::Value>,
    #[serde(default = "yes")]
    include_prompt: bool,
    // Older folders: one flag per mode.
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
struct StConfig {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    default_prompt_name: Option<String>,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

impl Pipeline {
    /// Reads the pipeline from the model's files; plain BERT gets the defaults. `hidden` is
    /// the encoder's width (`hidden_size` in `config.json`): the Pooling module must declare
    /// it, and the first Dense module must take it.
    pub fn from_files(files: &ModelFiles, hidden: usize) -> Result<Self> {
        let mut p = Pipeline::default();
        p.read_modules(files, hidden)?;
        if let Some(path) = &files.pooling_config {
            let c: PoolingConfig = read_json(path)?;
            if let Some(d) = c.word_embedding_dimension.filter(|&d| d != hidden) {
                bail!(
                    "{}: word_embedding_dimension is {d} but the encoder gives {hidden} values \
                     (hidden_size in config.json); the module belongs to another model",
                    path.display()
                );
            }
            p.include_prompt = c.include_prompt;
            p.pooling = match &c.pooling_mode {
                Some(mode) => {
                    pooling_from_mode(mode).with_context(|| format!("{}", path.display()))?
                }
                None => legacy_pooling(&c, path)?,
            };
        }
        if let Some(path) = &files.st_config {
            let c: StConfig = read_json(path)?;
            if let Some(name) = &c.default_prompt_name {
                if !c.prompts.contains_key(name) {
                    bail!(
                        "{}: default_prompt_name {name:?} is not one of its prompts ({})",
                        path.display(),
                        c.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
            }
            p.prompts = c.prompts;
            p.default_prompt_name = c.default_prompt_name;
        }
        if let Some(path) = &files.sentence_bert_config {
            let c: SentenceBertConfig = read_json(path)?;
            p.max_seq_length = c.max_seq_length;
            p.lowercase_input = c.do_lower_case;
        }
        Ok(p)
    }

    /// The modules `modules.json` lists, in order: Dense layers (each checked against the
    /// width before it) and Normalize; any other module is refused.
    fn read_modules(&mut self, files: &ModelFiles, hidden: usize) -> Result<()> {
        if let Some(path) = &files.modules {
            let mut dense = files.dense.iter();
            for m in modules(path)? {
                let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
                match kind {
                    "Transformer" | "Pooling" => {}
                    "Dense" if self.normalize => bail!(
                        "{} lists a Dense module after Normalize, which fetch-ml does not \
                         implement; its embeddings would be wrong, so the model is refused",
                        path.display()
                    ),
                    "Dense" => {
                        let Some(f) = dense.next() else {
                            bail!(
                                "{}: the files of Dense module {} were not found",
                                path.display(),
                                m.path
                            )
                        };
                        let layer = DenseLayer::load(&f.config, &f.weights)
                            .with_context(|| format!("loading Dense module {}", m.path))?;
                        let (want, from) = match self.dense.last() {
                            Some(d) => (d.out_features, "the Dense module before it gives"),
                            None => (hidden, "the encoder gives (hidden_size in config.json)"),
                        };
                        if want != layer.in_features {
                            bail!(
                                "{}: in_features is {} but {from} {want} values; the module \
                                 belongs to another model",
                                f.config.display(),
                                layer.in_features
                            );
                        }
                        self.dense.push(layer);
                    }
                    "Normalize" => self.normalize = true,
                    other => bail!(
                        "{} lists a {other} module, which fetch-ml does not implement; its \
                         embeddings would be wrong, so the model is refused",
                        path.display()
                    ),
                }
            }
        }
        Ok(())
    }

    /// The vector width after pooling and the Dense layers, for an encoder of `hidden`.
    pub fn dimension(&self, hidden: usize) -> usize {
        self.dense.last().map_or(hidden, |d| d.out_features)
    }

    /// Applies the Dense layers to a pooled vector.
    pub fn apply_dense(&self, v: Vec<f32>) -> Vec<f32> {
        self.dense.iter().fold(v, |v, d| d.forward(&v))
    }

    /// The prompt to prepend: `--prompt` as given, else `--prompt-name` looked up, else the
    /// folder's `default_prompt_name`; `None` for no prompt.
    pub fn resolve_prompt(
        &self,
        prompt: Option<&str>,
        prompt_name: Option<&str>,
    ) -> Result<Option<String>> {
        let text = match (prompt, prompt_name) {
            (Some(p), _) => Some(p.to_string()),
            (None, Some(name)) => match self.prompts.get(name) {
                Some(p) => Some(p.clone()),
                None => {
                    return Err(UnknownPrompt {
                        name: name.to_string(),
                        known: self.prompts.keys().cloned().collect(),
                    }
                    .into())
                }
            },
            (None, None) => self
                .default_prompt_name
                .as_ref()
                .and_then(|n| self.prompts.get(n).cloned()),
        };
        let text = text.filter(|t| !t.is_empty());
        if text.is_some() && !self.include_prompt {
            bail!(
                "the model's Pooling module leaves prompt tokens out (include_prompt false), which \
                 fetch-ml does not implement; its embeddings with a prompt would be wrong"
            );
        }
        Ok(text)
    }
}

/// A prompt asked for by a name the model's `config_sentence_transformers.json` lacks.
#[derive(Debug, thiserror::Error)]
#[error(
    "no prompt named {name:?}: {}",
    if known.is_empty() {
        "the model has no named prompts (config_sentence_transformers.json)".to_string()
    } else {
        format!("the model's prompts are {}", known.join(", "))
    }
)]
pub struct UnknownPrompt {
    pub name: String,
    pub known: Vec<String>,
}

/// The pooling of sentence-transformers 5+'s `pooling_mode` (a name, or a list of one).
fn pooling_from_mode(mode: &serde_json::Value) -> Result<Pooling> {
    let name = match mode {
        serde_json::Value::String(s) => s.as_str(),
        serde_json::Value::Array(a) if a.len() == 1 => a[0].as_str().unwrap_or(""),
        serde_json::Value::Array(_) => {
            bail!("several pooling modes are enabled at once; fetch-ml supports one")
        }
        _ => "",
    };
    Ok(match name {
        "mean" => Pooling::Mean,
        "cls" => Pooling::Cls,
        "max" => Pooling::Max,
        "mean_sqrt_len_tokens" => Pooling::MeanSqrtLen,
        other => bail!(
            "the pooling mode {other:?} is not supported; supported: mean, cls, max, \
             mean_sqrt_len_tokens"
        ),
    })
}

/// The pooling of older folders: one boolean per mode.
fn legacy_pooling(c: &PoolingConfig, path: &Path) -> Result<Pooling> {
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
    Ok(match chosen.as_slice() {
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
    })
}
