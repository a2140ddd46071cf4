//! Model resolution: a local folder, the Hugging Face hub, or the hub cache in offline mode.

use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

mod fetch;
use fetch::{endpoint, watched, Fetch, LocalFolder, OfflineCache, Online};

/// Where to find a model.
#[derive(Debug, Clone)]
pub struct ModelRef {
    /// A hub id such as `bert-base-uncased`, or a path to a local folder.
    pub id: String,
    /// Hub revision: a branch, tag or commit.
    pub revision: String,
    /// Resolve from the local hub cache only.
    pub offline: bool,
    /// How long a hub request may go without an answer (or a download without a byte).
    pub hub_timeout: Duration,
}

/// The default of [`ModelRef::hub_timeout`].
pub const DEFAULT_HUB_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a model's files cannot be resolved. The messages say what went wrong where; they name
/// no flags, so the CLI adds the advice that does ([`crate::advice::advice`]).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{id}: no such folder")]
    NoSuchFolder { id: String },
    #[error("model {model}: {file} not found in {searched}")]
    MissingFile {
        model: String,
        file: String,
        searched: String,
        place: Place,
    },
    #[error(
        "model {model}: {} only pytorch_model.bin in {searched}; fetch-ml reads \
         model.safetensors. Convert the weights to safetensors first",
        .module.as_ref().map(|m| format!("the Dense module {m} has")).unwrap_or_else(|| "found".into())
    )]
    PytorchOnly {
        model: String,
        searched: String,
        module: Option<String>,
    },
    #[error("model {model}: neither tokenizer.json nor vocab.txt found in {searched}")]
    NoTokenizer {
        model: String,
        searched: String,
        place: Place,
    },
    #[error("cannot reach the Hugging Face hub at {endpoint} for {model} (revision {revision})")]
    Unreachable {
        model: String,
        revision: String,
        endpoint: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("{what}: no answer from {endpoint} in {secs} s")]
    Timeout {
        what: String,
        endpoint: String,
        secs: f64,
    },
    #[error("{what}: the hub request stopped without an answer")]
    Stopped { what: String },
    #[error("downloading {file} of {model} failed")]
    Download {
        model: String,
        file: String,
        #[source]
        source: anyhow::Error,
    },
}

/// Where a model's files were looked for.
#[derive(Debug, Clone)]
pub enum Place {
    /// A local folder.
    Folder,
    /// The local hub cache only (offline), at this path.
    Cache(PathBuf),
    /// The hub itself.
    Hub,
}

impl ModelRef {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            revision: "main".into(),
            offline: false,
            hub_timeout: DEFAULT_HUB_TIMEOUT,
        }
    }

    /// True when `id` names an existing folder.
    pub fn is_local(&self) -> bool {
        Path::new(&self.id).is_dir()
    }
}

/// The tokenizer's files.
#[derive(Debug, Clone)]
pub enum TokenizerFiles {
    /// A `tokenizer.json` from the tokenizers library.
    Json(PathBuf),
    /// A WordPiece `vocab.txt`, with `tokenizer_config.json` when present.
    Vocab {
        vocab: PathBuf,
        tokenizer_config: Option<PathBuf>,
    },
}

/// Every file a model needs, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The model as the user named it.
    pub model: ModelRef,
    /// The folder the files were found in.
    pub folder: PathBuf,
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: TokenizerFiles,
    /// sentence-transformers' `modules.json`, when the model has one.
    pub modules: Option<PathBuf>,
    /// The Pooling module's `config.json` (`1_Pooling/config.json` as a rule).
    pub pooling_config: Option<PathBuf>,
    /// sentence-transformers' `sentence_bert_config.json`.
    pub sentence_bert_config: Option<PathBuf>,
    /// The Dense modules listed in `modules.json`, in order.
    pub dense: Vec<DenseFiles>,
    /// sentence-transformers' `config_sentence_transformers.json` (named prompts).
    pub st_config: Option<PathBuf>,
}

/// The files of one sentence-transformers Dense module (`2_Dense/`).
#[derive(Debug, Clone)]
pub struct DenseFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
}

/// True when `HF_HUB_OFFLINE` asks for offline mode.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Resolves every file of `model` to a local path.
pub fn resolve(model: &ModelRef) -> Result<ModelFiles> {
    if model.is_local() {
        return resolve_with(model, &LocalFolder(PathBuf::from(&model.id)));
    }
    if looks_like_path(&model.id) {
        return Err(HubError::NoSuchFolder {
            id: model.id.clone(),
        }
        .into());
    }
    if model.offline {
        let fetch = OfflineCache {
            cache: Cache::from_env(),
            model: model.clone(),
        };
        return resolve_with(model, &fetch);
    }
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .context("setting up the Hugging Face hub client")?;
    crate::note!(
        "asking {} for the files of {} (revision {})",
        endpoint(),
        model.id,
        model.revision
    );
    let repo = api.repo(Repo::with_revision(
        model.id.clone(),
        RepoType::Model,
        model.revision.clone(),
    ));
    let what = format!("listing the files of {}", model.id);
    let info = watched(model, &what, move |_| {
        repo.info().map_err(anyhow::Error::from)
    })
    .map_err(|source| match source.downcast::<HubError>() {
        Ok(e) => e,
        Err(source) => HubError::Unreachable {
            model: model.id.clone(),
            revision: model.revision.clone(),
            endpoint: endpoint(),
            source,
        },
    })?;
    let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
    resolve_with(
        model,
        &Online {
            api,
            cache: Cache::from_env(),
            files,
            model: model.clone(),
        },
    )
}

/// The file `name` of the module in folder `dir` of the model ("" for the model's own).
fn module_file(dir: &str, name: &str) -> String {
    match dir.trim_end_matches('/') {
        "" => name.to_string(),
        d => format!("{d}/{name}"),
    }
}

fn looks_like_path(id: &str) -> bool {
    id.starts_with('.') || id.starts_with('/') || id.starts_with('~') || id.matches('/').count() > 1
}

fn resolve_with(model: &ModelRef, fetch: &dyn Fetch) -> Result<ModelFiles> {
    let config = required(model, fetch, "config.json")?;
    let weights = weights_file(model, fetch, None)?;
    let tokenizer = tokenizer_files(model, fetch)?;
    let modules = fetch.fetch("modules.json")?;
    let pooling_config = match &modules {
        Some(m) => match crate::st_modules::pooling_module_path(m)? {
            // Listed but absent is an error, as in sentence-transformers: not mean pooling.
            Some(dir) => Some(required(model, fetch, &module_file(&dir, "config.json"))?),
            None => None,
        },
        None => None,
    };
    let sentence_bert_config = fetch.fetch("sentence_bert_config.json")?;
    let mut dense = Vec::new();
    if let Some(m) = &modules {
        for dir in crate::st_modules::dense_module_paths(m)? {
            let config = required(model, fetch, &module_file(&dir, "config.json"))?;
            let weights = weights_file(model, fetch, Some(dir))?;
            dense.push(DenseFiles { config, weights });
        }
    }
    let st_config = fetch.fetch("config_sentence_transformers.json")?;
    let folder = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(ModelFiles {
        model: model.clone(),
        folder,
        config,
        weights,
        tokenizer,
        modules,
        pooling_config,
        sentence_bert_config,
        dense,
        st_config,
    })
}

/// The file `name` of the model, or an error naming it and where it was looked for.
fn required(model: &ModelRef, fetch: &dyn Fetch, name: &str) -> Result<PathBuf> {
    fetch.fetch(name)?.ok_or_else(|| {
        HubError::MissingFile {
            model: model.id.clone(),
            file: name.to_string(),
            searched: fetch.searched(),
            place: fetch.place(),
        }
        .into()
    })
}

/// `model.safetensors` of the model, or of its module folder `dir`; a model that has only
/// `pytorch_model.bin` is an error of its own.
fn weights_file(model: &ModelRef, fetch: &dyn Fetch, dir: Option<String>) -> Result<PathBuf> {
    let path = |file: &str| module_file(dir.as_deref().unwrap_or(""), file);
    match fetch.fetch(&path("model.safetensors"))? {
        Some(p) => Ok(p),
        None if fetch.has(&path("pytorch_model.bin")) => Err(HubError::PytorchOnly {
            model: model.id.clone(),
            searched: fetch.searched(),
            module: dir,
        }
        .into()),
        None => required(model, fetch, &path("model.safetensors")),
    }
}

/// `tokenizer.json`, else `vocab.txt` with its `tokenizer_config.json`.
fn tokenizer_files(model: &ModelRef, fetch: &dyn Fetch) -> Result<TokenizerFiles> {
    if let Some(p) = fetch.fetch("tokenizer.json")? {
        return Ok(TokenizerFiles::Json(p));
    }
    match fetch.fetch("vocab.txt")? {
        Some(vocab) => Ok(TokenizerFiles::Vocab {
            vocab,
            tokenizer_config: fetch.fetch("tokenizer_config.json")?,
        }),
        None => Err(HubError::NoTokenizer {
            model: model.id.clone(),
            searched: fetch.searched(),
            place: fetch.place(),
        }
        .into()),
    }
}
