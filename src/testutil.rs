//! Tiny random BERT models written in Hugging Face layout, for tests and benchmarks.
//!
//! The files go through the same loading code as a real model: `config.json`, `vocab.txt`
//! and/or `tokenizer.json`, `model.safetensors`, optionally the sentence-transformers files.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::weights::standard_normal;

/// Words the tiny vocabulary knows whole; anything else falls back to characters.
const WORDS: &[&str] = &[
    "the", "a", "an", "is", "was", "it", "this", "that", "and", "or", "not", "very", "good", "bad",
    "great", "terrible", "love", "hate", "hello", "world", "team", "game", "won", "lost", "phone",
    "app", "battery", "food", "pizza", "tasty", "flight", "hotel", "trip", "bank", "stock",
    "price", "money", "today", "i", "we", "they", "my", "our", "to", "of", "in", "on", "for",
    "with", "was", "are", "be", "cat", "dog", "sat", "mat", "happy", "sad", "ok",
];

/// Shape and options of a tiny random BERT.
#[derive(Debug, Clone)]
pub struct TinyBert {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub seed: u64,
    /// Write `tokenizer.json` (else only `vocab.txt`).
    pub tokenizer_json: bool,
    /// Name tensors as `bert-base-uncased` does: `bert.` prefix and `LayerNorm.gamma`/`beta`.
    pub hf_legacy_names: bool,
    /// Write sentence-transformers files: (pooling mode name, normalize, max_seq_length).
    pub sentence_transformers: Option<(&'static str, bool, usize)>,
    /// Vocabulary size of the embeddings; `None` for the tiny vocabulary's. A larger size is
    /// for pairing the weights with a real tokenizer copied in afterwards.
    pub vocab_size: Option<usize>,
}

impl Default for TinyBert {
    fn default() -> Self {
        Self {
            hidden: 32,
            layers: 3,
            heads: 4,
            intermediate: 64,
            max_positions: 64,
            seed: 7,
            tokenizer_json: true,
            hf_legacy_names: false,
            sentence_transformers: None,
            vocab_size: None,
        }
    }
}

/// The tiny vocabulary, one token per line, `[PAD]` first.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for w in WORDS {
        if seen.insert(*w) {
            v.push(w.to_string());
        }
    }
    for c in ('a'..='z').chain('0'..='9') {
        if !seen.contains(c.to_string().as_str()) {
            v.push(c.to_string());
        }
        v.push(format!("##{c}"));
    }
    for p in ['.', ',', '!', '?', '\'', '"', '-', ':', ';', '(', ')'] {
        v.push(p.to_string());
    }
    v
}

impl TinyBert {
    fn vocab_len(&self) -> usize {
        self.vocab_size.unwrap_or_else(|| vocab().len())
    }

    /// The `config.json` contents.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_len(),
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.intermediate,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": self.max_positions,
            "type_vocab_size": 2,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
        })
    }

    /// Random weights, keyed by Hugging Face names (without any prefix).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let dev = Device::Cpu;
        self.weight_specs()
            .into_iter()
            .map(|(name, dims, mean, std)| {
                let n: usize = dims.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| (mean + std * standard_normal(&mut rng)) as f32)
                    .collect();
                Ok((name, Tensor::from_vec(v, dims, &dev)?))
            })
            .collect()
    }

    /// Every weight as (name, shape, mean, standard deviation), in the order they are drawn.
    fn weight_specs(&self) -> Vec<(String, Vec<usize>, f64, f64)> {
        let (h, i) = (self.hidden, self.intermediate);
        // Larger than BERT's 0.02 so that a tiny model's outputs differ visibly per token.
        let s = 0.2;
        let mut specs: Vec<(String, Vec<usize>, f64, f64)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![self.vocab_len(), h],
                0.0,
                1.0,
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![self.max_positions, h],
                0.0,
                0.5,
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![2, h],
                0.0,
                0.5,
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h], 1.0, 0.1),
            ("embeddings.LayerNorm.bias".into(), vec![h], 0.0, 0.1),
        ];
        for l in 0..self.layers {
            let p = format!("encoder.layer.{l}");
            for m in ["query", "key", "value"] {
                specs.push((format!("{p}.attention.self.{m}.weight"), vec![h, h], 0.0, s));
                specs.push((format!("{p}.attention.self.{m}.bias"), vec![h], 0.0, s));
            }
            specs.extend([
                (
                    format!("{p}.attention.output.dense.weight"),
                    vec![h, h],
                    0.0,
                    s,
                ),
                (format!("{p}.attention.output.dense.bias"), vec![h], 0.0, s),
                (
                    format!("{p}.attention.output.LayerNorm.weight"),
                    vec![h],
                    1.0,
                    0.1,
                ),
                (
                    format!("{p}.attention.output.LayerNorm.bias"),
                    vec![h],
                    0.0,
                    0.1,
                ),
                (format!("{p}.intermediate.dense.weight"), vec![i, h], 0.0, s),
                (format!("{p}.intermediate.dense.bias"), vec![i], 0.0, s),
                (format!("{p}.output.dense.weight"), vec![h, i], 0.0, s),
                (format!("{p}.output.dense.bias"), vec![h], 0.0, s),
                (format!("{p}.output.LayerNorm.weight"), vec![h], 1.0, 0.1),
                (format!("{p}.output.LayerNorm.bias"), vec![h], 0.0, 0.1),
            ]);
        }
        specs
    }

    /// Writes the model folder into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config_json())?,
        )?;
        std::fs::write(dir.join("vocab.txt"), vocab().join("\n") + "\n")?;
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"do_lower_case": true, "model_max_length": 512}"#,
        )?;
        if self.tokenizer_json {
            let tok = crate::tokenize::TextTokenizer::load(
                &crate::hub::TokenizerFiles::Vocab {
                    vocab: dir.join("vocab.txt"),
                    tokenizer_config: None,
                },
                self.max_positions,
                false,
                0,
            )?;
            let mut inner = tok.inner().clone();
            inner.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
            inner
                .save(dir.join("tokenizer.json"), true)
                .map_err(|e| anyhow!("{e}"))?;
        }
        let weights: HashMap<String, Tensor> = self
            .weights()?
            .into_iter()
            .map(|(k, v)| {
                let k = if self.hf_legacy_names {
                    format!("bert.{}", k)
                        .replace("LayerNorm.weight", "LayerNorm.gamma")
                        .replace("LayerNorm.bias", "LayerNorm.beta")
                } else {
                    k
                };
                (k, v)
            })
            .collect();
        candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
        if let Some((mode, normalize, max_len)) = self.sentence_transformers {
            let mut modules = vec![
                serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
                serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
            ];
            if normalize {
                modules.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
            }
            std::fs::write(dir.join("modules.json"), serde_json::to_string(&modules)?)?;
            std::fs::create_dir_all(dir.join("1_Pooling"))?;
            let pooling = serde_json::json!({
                "word_embedding_dimension": self.hidden,
                "pooling_mode_cls_token": mode == "cls",
                "pooling_mode_mean_tokens": mode == "mean",
                "pooling_mode_max_tokens": mode == "max",
                "pooling_mode_mean_sqrt_len_tokens": mode == "mean_sqrt_len",
            });
            std::fs::write(dir.join("1_Pooling/config.json"), pooling.to_string())?;
            std::fs::write(
                dir.join("sentence_bert_config.json"),
                serde_json::json!({"max_seq_length": max_len, "do_lower_case": false}).to_string(),
            )?;
        }
        Ok(())
    }
}

/// Lays out `model_dir`'s files as the hub cache does under `hf_home`:
/// `hub/models--ORG--NAME/refs/main` and `snapshots/<commit>/...`.
pub fn write_hub_cache(
    hf_home: &Path,
    repo_id: &str,
    commit: &str,
    model_dir: &Path,
) -> Result<()> {
    let repo = hf_home
        .join("hub")
        .join(format!("models--{}", repo_id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), commit)?;
    let snap = repo.join("snapshots").join(commit);
    copy_dir(model_dir, &snap)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// A random sentence of `words` words from the tiny vocabulary, some of them unknown words.
pub fn random_sentence(rng: &mut StdRng, words: usize) -> String {
    (0..words)
        .map(|_| {
            if rng.random_bool(0.1) {
                "zyx".to_string()
            } else {
                WORDS[rng.random_range(0..WORDS.len())].to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
