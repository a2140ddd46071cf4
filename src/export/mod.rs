//! `--task=2 --export DIR`: the trained model as a folder that sentence-transformers (and
//! `fetch-ml --task=1 --model DIR`) loads, plus the two heads.
//!
//! The encoder part is a standard sentence-transformers folder: `config.json` and the
//! tokenizer files copied from the base model, `model.safetensors` with every encoder tensor
//! under its Hugging Face name (the trained values, and the base model's other encoder tensors
//! such as the pooler, copied as they are), `modules.json`, `1_Pooling/config.json` (mean
//! pooling, as the heads were trained with), `sentence_bert_config.json`, and a Normalize step
//! when the base model had one. The heads are in `heads.safetensors`, described by
//! `heads.json` (layers, activation, label names, and which vector they take as input).
//!
//! A `README.md` model card ([`card`]) says which vector the heads take and how to run them
//! from Python.
//!
//! The folder is written under a locked temporary name beside DIR and renamed into place when
//! complete, with the user's permissions ([`crate::atomic`]); an existing DIR is replaced only
//! with `--overwrite`, only when it is an earlier export, and only when it holds nothing but
//! fetch-ml's own files ([`target`]).

mod card;
mod target;

pub use target::check_target;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use crate::atomic::NewDir;
use crate::loader::ModelAssets;
use crate::model::arch::Architecture;
use crate::model::multitask::{MultiTaskModel, HEAD_NAMES};

/// `heads.json`'s format name; an export folder is recognised by it.
pub const HEADS_FORMAT: &str = "fetch-ml-heads";
pub const HEADS_FILE: &str = "heads.json";
pub const HEADS_WEIGHTS: &str = "heads.safetensors";
/// Tokenizer files copied from the base model when it has them.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
];

/// What the export records about where the model came from.
pub struct Provenance {
    /// The checkpoint folder, when exporting a saved one.
    pub checkpoint: Option<PathBuf>,
    /// The base model's id or folder.
    pub base_model: String,
}

/// Writes `model` (built on `assets`) to `dir`; `normalize` adds a Normalize step.
pub fn export(
    dir: &Path,
    overwrite: bool,
    assets: &ModelAssets,
    model: &MultiTaskModel,
    normalize: bool,
    provenance: &Provenance,
) -> Result<()> {
    let dir = target::resolve(dir)?;
    check_target(&dir, overwrite)?;
    let parent = crate::atomic::parent_of(&dir);
    let tmp = NewDir::create_in(parent).with_context(|| {
        format!(
            "--export {}: cannot write in {}",
            dir.display(),
            parent.display()
        )
    })?;
    write_folder(tmp.path(), assets, model, normalize, provenance)
        .with_context(|| format!("--export {}", dir.display()))?;
    tmp.finish()
        .with_context(|| format!("--export {}: finishing the files", dir.display()))?;
    target::swap_in(tmp, &dir)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn write_folder(
    out: &Path,
    assets: &ModelAssets,
    model: &MultiTaskModel,
    normalize: bool,
    provenance: &Provenance,
) -> Result<()> {
    copy_model_files(out, assets)?;
    write_weights(out, assets, model)?;
    write_pipeline(out, assets, normalize)?;
    let hidden = assets.config.hidden_size;
    write_json(
        &out.join(HEADS_FILE),
        &heads_json(model, hidden, provenance),
    )?;
    let remote_code = matches!(
        assets.config.arch,
        Architecture::NomicBert | Architecture::JinaBert
    );
    if remote_code && !has_auto_map(&assets.files.config) {
        crate::note!(
            "note: the base model's config.json has no auto_map, so Python cannot find this \
             architecture's code even with trust_remote_code=True; fetch-ml loads the export"
        );
    }
    let card = card::model_card(&card::CardInfo {
        base_model: &provenance.base_model,
        dimension: hidden,
        normalize,
        labels: &model.spec.labels,
        remote_code,
    });
    std::fs::write(out.join(card::CARD_FILE), card).context("writing README.md")?;
    for f in ["model.safetensors", HEADS_WEIGHTS] {
        std::fs::File::open(out.join(f))
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {f}"))?;
    }
    Ok(())
}

/// Whether a `config.json` names the model's own Python code (`auto_map`).
fn has_auto_map(config: &Path) -> bool {
    std::fs::read_to_string(config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("auto_map").is_some())
}

/// The base model's files that the export keeps as they are: config, tokenizer, and
/// sentence-transformers' prompts.
fn copy_model_files(out: &Path, assets: &ModelAssets) -> Result<()> {
    let files = &assets.files;
    let copy = |from: &Path, name: &str| -> Result<()> {
        std::fs::copy(from, out.join(name))
            .map(|_| ())
            .with_context(|| format!("copying {}", from.display()))
    };
    copy(&files.config, "config.json")?;
    for name in TOKENIZER_FILES {
        let p = files.folder.join(name);
        if p.is_file() {
            copy(&p, name)?;
        }
    }
    let st_config = files.folder.join("config_sentence_transformers.json");
    if st_config.is_file() {
        copy(&st_config, "config_sentence_transformers.json")?;
    }
    Ok(())
}

/// `model.safetensors` (the encoder) and the heads' weights file. The encoder: every tensor
/// the model computes with, then the base model's other encoder tensors (pooler, position
/// ids) as they are, under the architecture's own names (MPNet's `attention.attn.q`,
/// DistilBERT's `transformer.layer`), so that transformers loads the folder.
fn write_weights(out: &Path, assets: &ModelAssets, model: &MultiTaskModel) -> Result<()> {
    let arch = assets.config.arch;
    let mut encoder: BTreeMap<String, Owned> = BTreeMap::new();
    let mut heads: BTreeMap<String, Owned> = BTreeMap::new();
    for p in model.registry.params() {
        let values: Vec<f32> = p.tensor.flatten_all()?.to_vec1()?;
        let t = Owned {
            dtype: Dtype::F32,
            shape: p.tensor.dims().to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        if crate::model::names::is_head(&p.name) {
            heads.insert(p.name, t);
        } else {
            encoder.insert(arch.rename(&p.name), t);
        }
    }
    for (name, t) in base_extras(&assets.files.weights, arch, &encoder)? {
        encoder.insert(name, t);
    }
    let format = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(
        views(&encoder)?,
        format.clone(),
        &out.join("model.safetensors"),
    )
    .context("writing model.safetensors")?;
    safetensors::serialize_to_file(views(&heads)?, format, &out.join(HEADS_WEIGHTS))
        .context("writing heads.safetensors")
}

/// sentence-transformers' pipeline files: `modules.json` (Transformer, mean Pooling, and
/// Normalize when the model normalises), `1_Pooling/config.json` and
/// `sentence_bert_config.json`.
fn write_pipeline(out: &Path, assets: &ModelAssets, normalize: bool) -> Result<()> {
    let hidden = assets.config.hidden_size;
    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if normalize {
        modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        std::fs::create_dir(out.join("2_Normalize"))?;
    }
    write_json(&out.join("modules.json"), &json!(modules))?;
    std::fs::create_dir(out.join("1_Pooling"))?;
    write_json(
        &out.join("1_Pooling/config.json"),
        &json!({
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": true,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": true
        }),
    )?;
    write_json(
        &out.join("sentence_bert_config.json"),
        &json!({
            "max_seq_length": assets.tokenizer.max_len(),
            "do_lower_case": assets.pipeline.lowercase_input
        }),
    )
}

/// `heads.json`: how to run the heads on top of the exported encoder.
fn heads_json(model: &MultiTaskModel, hidden: usize, provenance: &Provenance) -> serde_json::Value {
    let spec = &model.spec;
    let head = |t: usize, task: &str| {
        let p = HEAD_NAMES[t];
        let n = spec.labels[t].len();
        json!({
            "task": task,
            "prefix": p,
            "layers": [
                {"type": "linear", "weight": format!("{p}.fc1.weight"), "bias": format!("{p}.fc1.bias"),
                 "in_features": hidden, "out_features": spec.hidden},
                {"type": "relu"},
                {"type": "dropout", "p": spec.dropout, "training_only": true},
                {"type": "linear", "weight": format!("{p}.fc2.weight"), "bias": format!("{p}.fc2.bias"),
                 "in_features": spec.hidden, "out_features": n},
            ],
            "activation": "relu",
            "output": "logits over labels; softmax gives probabilities",
            "labels": spec.labels[t],
        })
    };
    json!({
        "format": HEADS_FORMAT,
        "version": 1,
        "weights": HEADS_WEIGHTS,
        "input": {
            "dimension": hidden,
            "pooling": "mean",
            "normalized": false,
            "description": "the mean-pooled encoder output (the Pooling module's output), before any Normalize step",
        },
        "linear": "y = x W^T + b with W of shape [out_features, in_features], as torch.nn.Linear",
        "heads": [head(0, "class"), head(1, "sentiment")],
        "source": {
            "base_model": provenance.base_model,
            "checkpoint": provenance.checkpoint.as_ref().map(|p| p.display().to_string()),
            "fetch_ml_version": env!("CARGO_PKG_VERSION"),
        },
    })
}

/// A tensor's bytes with its type and shape.
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn views(map: &BTreeMap<String, Owned>) -> Result<Vec<(String, TensorView<'_>)>> {
    map.iter()
        .map(|(n, t)| {
            let v = TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map_err(|e| anyhow::anyhow!("tensor {n}: {e}"))?;
            Ok((n.clone(), v))
        })
        .collect()
}

/// The Hugging Face name of a tensor of a checkpoint of `arch`: no `bert.` (`mpnet.`, ...)
/// prefix, and the `weight`/`bias` names of LayerNorm parameters.
fn canonical(name: &str, arch: Architecture) -> String {
    let n = name.strip_prefix(arch.prefix()).unwrap_or(name);
    if let Some(stem) = n.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = n.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        n.to_string()
    }
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Encoder tensors of the base weights (`embeddings.*`, `encoder.*`, `pooler.*`) that the
/// model does not compute with, read as stored, under their canonical names.
fn base_extras(
    path: &Path,
    arch: Architecture,
    have: &BTreeMap<String, Owned>,
) -> Result<Vec<(String, Owned)>> {
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact_at(&mut len, 0)?;
    let n = u64::from_le_bytes(len);
    anyhow::ensure!(n < 100 << 20, "{}: header too large", path.display());
    let mut header = vec![0u8; n as usize];
    f.read_exact_at(&mut header, 8)?;
    let mut entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("parsing the header of {}", path.display()))?;
    entries.remove("__metadata__");
    let mut out = Vec::new();
    for (name, v) in entries {
        let canon = canonical(&name, arch);
        let encoder_part = ["embeddings.", "encoder.", "pooler."]
            .iter()
            .any(|p| canon.starts_with(p));
        if !encoder_part || have.contains_key(&canon) {
            continue;
        }
        let e: HeaderEntry = serde_json::from_value(v)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        let (a, b) = e.data_offsets;
        anyhow::ensure!(b >= a, "{}: tensor {name} has bad offsets", path.display());
        let mut data = vec![0u8; (b - a) as usize];
        f.read_exact_at(&mut data, 8 + n + a)
            .with_context(|| format!("reading tensor {name} from {}", path.display()))?;
        out.push((
            canon,
            Owned {
                dtype: e.dtype,
                shape: e.shape,
                data,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(
            canonical("bert.embeddings.LayerNorm.gamma", Architecture::Bert),
            "embeddings.LayerNorm.weight"
        );
        assert_eq!(
            canonical("encoder.layer.0.output.LayerNorm.beta", Architecture::Bert),
            "encoder.layer.0.output.LayerNorm.bias"
        );
        assert_eq!(
            canonical("pooler.dense.weight", Architecture::Bert),
            "pooler.dense.weight"
        );
        assert_eq!(
            canonical(
                "mpnet.encoder.layer.0.attention.attn.q.bias",
                Architecture::Mpnet
            ),
            "encoder.layer.0.attention.attn.q.bias"
        );
    }
}
