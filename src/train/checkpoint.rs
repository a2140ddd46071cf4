//! Checkpoints: a folder with `model.safetensors` (the heads and every encoder tensor that
//! trained) and `checkpoint.json` (how the model was made, and its metrics). Written to a
//! temporary folder and renamed into place; checked against the base model when loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::loader::ModelAssets;
use crate::model::freeze::FreezePlan;
use crate::model::multitask::{HeadInit, HeadsSpec, MultiTaskModel};
use crate::model::names::is_head;
use crate::model::weights::{WeightFile, FINGERPRINT_PREFIX};
use crate::train::save_target::{self, SaveTarget};
pub use crate::train::save_target::{FORMAT, META_FILE, METRICS_FILE, WEIGHTS_FILE};

const VERSION: u32 = 1;

/// Why a checkpoint cannot be used. The messages name no flags; the CLI adds them.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{dir}: cannot read {META_FILE}; is this a fetch-ml checkpoint folder?")]
    NotACheckpoint {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: format {format} version {version} is not one this fetch-ml reads ({FORMAT} version {VERSION})")]
    Version {
        path: String,
        format: String,
        version: u32,
    },
    #[error(
        "{path}: the label lists (heads.labels) are not the ones the weights were trained with \
         ({saved}); restore the file, or train again"
    )]
    LabelsEdited { path: String, saved: String },
    #[error(
        "the checkpoint in {dir} was trained on {} (hidden size {}, {} layers, vocabulary {}), but \
         the model given is {} (hidden size {}, {} layers, vocabulary {})",
        want.id, want.hidden_size, want.num_layers, want.vocab_size,
        got.id, got.hidden_size, got.num_layers, got.vocab_size
    )]
    BaseShape {
        dir: String,
        want: Box<BaseModel>,
        got: Box<BaseModel>,
    },
    #[error(
        "the checkpoint in {dir} was trained on {} (weights fingerprint {}), but {} has other \
         weights (fingerprint {})",
        want.id, want.fingerprint, got.id, got.fingerprint
    )]
    BaseWeights {
        dir: String,
        want: Box<BaseModel>,
        got: Box<BaseModel>,
    },
    #[error("{path}: tensor {name} is listed as trained in {META_FILE} but missing from the file")]
    MissingTensor { path: String, name: String },
    #[error(
        "{path} is missing: the checkpoint folder has its {META_FILE} but not its weights; copy \
         the whole folder that was saved, or train again"
    )]
    MissingWeights { path: String },
}
/// A u8 tensor in `model.safetensors` holding the heads' label lists as JSON, so that an edit
/// of the lists in `checkpoint.json` (which would silently relabel predictions) is caught.
pub const LABELS_TENSOR: &str = "heads.labels_json";

/// The base model a checkpoint was trained from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    /// Hub id or folder path, as given.
    pub id: String,
    pub revision: String,
    /// Fingerprint of its `model.safetensors`; see [`WeightFile::fingerprint`].
    pub fingerprint: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    pub max_seq_length: usize,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub version: u32,
    pub base_model: BaseModel,
    pub heads: HeadsSpec,
    pub freeze: FreezePlan,
    /// Encoder tensors stored in `model.safetensors` because they trained.
    pub trained_encoder_tensors: Vec<String>,
    /// The training arguments, as a free-form object.
    pub training: serde_json::Value,
    /// The final report (evaluation metrics and more), as a free-form object.
    pub metrics: serde_json::Value,
}

impl CheckpointMeta {
    pub fn new(
        base_model: BaseModel,
        model: &MultiTaskModel,
        training: serde_json::Value,
        metrics: serde_json::Value,
    ) -> Self {
        Self {
            format: FORMAT.into(),
            version: VERSION,
            base_model,
            heads: model.spec.clone(),
            freeze: model.plan,
            trained_encoder_tensors: saved_params(model)
                .into_iter()
                .filter(|(n, _)| !is_head(n))
                .map(|(n, _)| n)
                .collect(),
            training,
            metrics,
        }
    }
}

/// What a checkpoint stores: every head tensor, and every trainable encoder tensor.
fn saved_params(model: &MultiTaskModel) -> Vec<(String, Tensor)> {
    model
        .registry
        .params()
        .into_iter()
        .filter(|p| is_head(&p.name) || p.trainable())
        .map(|p| (p.name, p.tensor))
        .collect()
}

/// Describes the base model of `assets` for a checkpoint.
pub fn base_model(assets: &ModelAssets) -> Result<BaseModel> {
    // A local folder is stored as an absolute path, so the checkpoint loads from any folder.
    let id = if assets.files.model.is_local() {
        std::fs::canonicalize(&assets.files.model.id)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| assets.files.model.id.clone())
    } else {
        assets.files.model.id.clone()
    };
    Ok(BaseModel {
        id,
        revision: assets.files.model.revision.clone(),
        fingerprint: assets
            .weights
            .fingerprint()
            .with_context(|| format!("reading {}", assets.weights.path().display()))?,
        hidden_size: assets.config.hidden_size,
        num_layers: assets.config.num_hidden_layers,
        vocab_size: assets.config.vocab_size,
        max_seq_length: assets.tokenizer.max_len(),
    })
}

/// Saves `model` through `target`: a complete folder appears at the target, or (on failure)
/// the old one stays; see [`super::save_target`] for what a kill at any moment leaves.
pub fn save(target: &SaveTarget, model: &MultiTaskModel, meta: &CheckpointMeta) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = saved_params(model).into_iter().collect();
    let labels = serde_json::to_vec(&meta.heads.labels)?;
    let n = labels.len();
    tensors.insert(
        LABELS_TENSOR.into(),
        Tensor::from_vec(labels, n, &Device::Cpu)?,
    );
    target.save(|tmp| {
        candle_core::safetensors::save(&tensors, tmp.join(WEIGHTS_FILE))
            .context("writing model.safetensors")?;
        std::fs::write(
            tmp.join(METRICS_FILE),
            serde_json::to_string_pretty(&meta.metrics)?,
        )
        .context("writing metrics.json")?;
        // Last: a folder with checkpoint.json is a complete one.
        std::fs::write(tmp.join(META_FILE), serde_json::to_string_pretty(meta)?)
            .context("writing checkpoint.json")?;
        Ok(())
    })
}

/// A checkpoint read from disk.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
    pub weights: Arc<WeightFile>,
}

impl Checkpoint {
    pub fn load(dir: &Path) -> Result<Self> {
        save_target::recover(dir)?;
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(|source| {
            CheckpointError::NotACheckpoint {
                dir: dir.display().to_string(),
                source,
            }
        })?;
        let meta: CheckpointMeta = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", meta_path.display()))?;
        if meta.format != FORMAT || meta.version != VERSION {
            return Err(CheckpointError::Version {
                path: meta_path.display().to_string(),
                format: meta.format,
                version: meta.version,
            }
            .into());
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() {
            return Err(CheckpointError::MissingWeights {
                path: weights_path.display().to_string(),
            }
            .into());
        }
        let weights = Arc::new(WeightFile::open(&weights_path)?);
        // Checkpoints before the label tensor have none; theirs cannot be checked.
        if let Some(saved) = weights.raw_bytes(LABELS_TENSOR)? {
            let listed = serde_json::to_vec(&meta.heads.labels)?;
            if saved != listed {
                return Err(CheckpointError::LabelsEdited {
                    path: meta_path.display().to_string(),
                    saved: String::from_utf8_lossy(&saved).into_owned(),
                }
                .into());
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            weights,
        })
    }

    /// Fails unless `assets` is the base model the checkpoint was trained from.
    pub fn check_base(&self, assets: &ModelAssets) -> Result<()> {
        let want = &self.meta.base_model;
        let got = base_model(assets)?;
        let dims = |b: &BaseModel| (b.hidden_size, b.num_layers, b.vocab_size);
        if dims(want) != dims(&got) {
            return Err(CheckpointError::BaseShape {
                dir: self.dir.display().to_string(),
                want: Box::new(want.clone()),
                got: Box::new(got),
            }
            .into());
        }
        let got_fingerprint = if want.fingerprint.starts_with(FINGERPRINT_PREFIX) {
            got.fingerprint.clone()
        } else {
            crate::note!(
                "note: the checkpoint in {} comes from an older fetch-ml whose base-model \
                 fingerprint covers only the first 2 MiB of the weights; save it again for a full check",
                self.dir.display()
            );
            assets.weights.legacy_fingerprint()?
        };
        if want.fingerprint != got_fingerprint {
            return Err(CheckpointError::BaseWeights {
                dir: self.dir.display().to_string(),
                want: Box::new(want.clone()),
                got: Box::new(got),
            }
            .into());
        }
        Ok(())
    }

    /// Rebuilds the trained model for inference: base weights overlaid with the checkpoint's.
    pub fn model(&self, assets: &ModelAssets, device: &Device) -> Result<MultiTaskModel> {
        self.check_base(assets)?;
        let stored: std::collections::HashSet<String> = self.weights.names().into_iter().collect();
        for name in &self.meta.trained_encoder_tensors {
            if !stored.contains(name) {
                return Err(CheckpointError::MissingTensor {
                    path: self.weights.path().display().to_string(),
                    name: name.clone(),
                }
                .into());
            }
        }
        let num_layers = assets.config.num_hidden_layers;
        let inference =
            FreezePlan::new(&[crate::model::freeze::FreezePart::All], None, num_layers)?;
        assets
            .multitask(
                vec![self.weights.clone(), assets.weights.clone()],
                self.meta.heads.clone(),
                inference,
                HeadInit::Checkpoint(self.weights.clone()),
                device,
            )
            .with_context(|| format!("loading the checkpoint in {}", self.dir.display()))
    }
}
