//! Model resolution: a local folder, the Hugging Face hub, or the hub cache in offline mode.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};

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

/// Gets a file of the model by name: `Ok(None)` when the model does not have it.
trait Fetch {
    fn fetch(&self, name: &str) -> Result<Option<PathBuf>>;
    /// Whether the model has the file, without downloading it.
    fn has(&self, name: &str) -> bool;
    /// Explains, for an error message, where a missing file was looked for.
    fn searched(&self) -> String;
    /// The kind of place searched, for the advice on a missing file.
    fn place(&self) -> Place;
}

struct LocalFolder(PathBuf);

impl Fetch for LocalFolder {
    fn fetch(&self, name: &str) -> Result<Option<PathBuf>> {
        let p = self.0.join(name);
        Ok(p.is_file().then_some(p))
    }
    fn has(&self, name: &str) -> bool {
        self.0.join(name).is_file()
    }
    fn searched(&self) -> String {
        format!("folder {}", self.0.display())
    }
    fn place(&self) -> Place {
        Place::Folder
    }
}

/// The hub cache only (`--offline` or `HF_HUB_OFFLINE=1`).
struct OfflineCache {
    cache: Cache,
    model: ModelRef,
}

impl OfflineCache {
    fn repo_folder(&self) -> PathBuf {
        let repo = Repo::with_revision(
            self.model.id.clone(),
            RepoType::Model,
            self.model.revision.clone(),
        );
        self.cache.path().join(repo.folder_name())
    }
}

impl Fetch for OfflineCache {
    fn has(&self, name: &str) -> bool {
        matches!(self.fetch(name), Ok(Some(_)))
    }
    fn fetch(&self, name: &str) -> Result<Option<PathBuf>> {
        let repo = Repo::with_revision(
            self.model.id.clone(),
            RepoType::Model,
            self.model.revision.clone(),
        );
        if let Some(p) = self.cache.repo(repo).get(name) {
            return Ok(Some(p));
        }
        // A revision given as a commit hash has a snapshot folder but no ref file.
        let snapshot = self
            .repo_folder()
            .join("snapshots")
            .join(&self.model.revision)
            .join(name);
        Ok(snapshot.is_file().then_some(snapshot))
    }
    fn searched(&self) -> String {
        let folder = self.repo_folder();
        let refs = folder.join("refs").join(&self.model.revision);
        match std::fs::read_to_string(&refs) {
            Ok(commit) => format!(
                "hub cache folder {}",
                folder.join("snapshots").join(commit.trim()).display()
            ),
            Err(_) => format!(
                "hub cache folder {} (no revision '{}' there: {} is missing)",
                folder.display(),
                self.model.revision,
                refs.display()
            ),
        }
    }
    fn place(&self) -> Place {
        Place::Cache(self.cache.path().clone())
    }
}

/// The hub, through hf-hub: cached files are reused, others are downloaded with a progress bar.
/// hf-hub sets no timeouts, so every request runs under a watchdog ([`watched`]).
struct Online {
    api: Api,
    /// The cache the API writes to (`ApiBuilder::from_env` uses the same).
    cache: Cache,
    files: Vec<String>,
    model: ModelRef,
}

impl Online {
    fn repo(&self) -> Repo {
        Repo::with_revision(
            self.model.id.clone(),
            RepoType::Model,
            self.model.revision.clone(),
        )
    }
}

impl Fetch for Online {
    fn has(&self, name: &str) -> bool {
        self.files.iter().any(|f| f == name)
    }
    fn fetch(&self, name: &str) -> Result<Option<PathBuf>> {
        if !self.has(name) {
            return Ok(None);
        }
        if let Some(p) = self.cache.repo(self.repo()).get(name) {
            return Ok(Some(p));
        }
        eprintln!(
            "downloading {name} of {} from {}",
            self.model.id,
            endpoint()
        );
        let repo = self.api.repo(self.repo());
        let file = name.to_string();
        let what = format!("downloading {name} of {}", self.model.id);
        let path = watched(&self.model, &what, move |activity| {
            repo.download_with_progress(&file, WatchedBar::new(activity))
                .map_err(anyhow::Error::from)
        })
        .map_err(|source| HubError::Download {
            model: self.model.id.clone(),
            file: name.to_string(),
            source,
        })?;
        Ok(Some(path))
    }
    fn searched(&self) -> String {
        format!(
            "hub repository {} at revision {}",
            self.model.id, self.model.revision
        )
    }
    fn place(&self) -> Place {
        Place::Hub
    }
}

/// The hub's address: `HF_ENDPOINT`, or huggingface.co.
fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

/// The last sign of life of a request: milliseconds since the watchdog's start.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(now_ms(self.start), Ordering::Relaxed);
    }
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Runs the hub request `f` on a thread of its own and gives up when it shows no sign of life
/// (an answer, or downloaded bytes through the [`Activity`] it is given) for the model's
/// `hub_timeout`: a firewall that swallows packets or a stuck proxy otherwise hangs forever.
/// The abandoned thread ends with the process.
fn watched<T: Send + 'static>(
    model: &ModelRef,
    what: &str,
    f: impl FnOnce(Activity) -> Result<T> + Send + 'static,
) -> Result<T> {
    let start = Instant::now();
    let activity = Activity {
        start,
        last_ms: Arc::new(AtomicU64::new(0)),
    };
    let (tx, rx) = mpsc::channel();
    let act = activity.clone();
    std::thread::Builder::new()
        .name("hub".into())
        .spawn(move || {
            let _ = tx.send(f(act));
        })
        .context("starting the hub request")?;
    let limit = model.hub_timeout;
    loop {
        let last = activity.last_ms.load(Ordering::Relaxed);
        let idle = Duration::from_millis(now_ms(start).saturating_sub(last));
        if idle >= limit {
            return Err(HubError::Timeout {
                what: what.to_string(),
                endpoint: endpoint(),
                secs: limit.as_secs_f64(),
            }
            .into());
        }
        match rx.recv_timeout(limit - idle) {
            Ok(result) => return result,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(HubError::Stopped {
                    what: what.to_string(),
                }
                .into())
            }
        }
    }
}

/// A download progress bar that also reports activity to the watchdog.
struct WatchedBar {
    activity: Activity,
    bar: Option<indicatif::ProgressBar>,
}

impl WatchedBar {
    fn new(activity: Activity) -> Self {
        Self {
            activity,
            bar: None,
        }
    }
}

impl hf_hub::api::Progress for WatchedBar {
    fn init(&mut self, size: usize, filename: &str) {
        self.activity.touch();
        let bar = crate::output::progress_bar(Some(size as u64), filename);
        self.bar = Some(bar);
    }
    fn update(&mut self, size: usize) {
        self.activity.touch();
        if let Some(b) = &self.bar {
            b.inc(size as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
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
    eprintln!(
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
    let required = |name: &str| -> Result<PathBuf> {
        fetch.fetch(name)?.ok_or_else(|| {
            HubError::MissingFile {
                model: model.id.clone(),
                file: name.to_string(),
                searched: fetch.searched(),
                place: fetch.place(),
            }
            .into()
        })
    };
    let config = required("config.json")?;
    let weights = match fetch.fetch("model.safetensors")? {
        Some(p) => p,
        None if fetch.has("pytorch_model.bin") => {
            return Err(HubError::PytorchOnly {
                model: model.id.clone(),
                searched: fetch.searched(),
                module: None,
            }
            .into())
        }
        None => required("model.safetensors")?,
    };
    let tokenizer = match fetch.fetch("tokenizer.json")? {
        Some(p) => TokenizerFiles::Json(p),
        None => match fetch.fetch("vocab.txt")? {
            Some(vocab) => TokenizerFiles::Vocab {
                vocab,
                tokenizer_config: fetch.fetch("tokenizer_config.json")?,
            },
            None => {
                return Err(HubError::NoTokenizer {
                    model: model.id.clone(),
                    searched: fetch.searched(),
                    place: fetch.place(),
                }
                .into())
            }
        },
    };
    let modules = fetch.fetch("modules.json")?;
    let pooling_config = match &modules {
        Some(m) => match crate::st_modules::pooling_module_path(m)? {
            // Listed but absent is an error, as in sentence-transformers: not mean pooling.
            Some(dir) => Some(required(&module_file(&dir, "config.json"))?),
            None => None,
        },
        None => None,
    };
    let sentence_bert_config = fetch.fetch("sentence_bert_config.json")?;
    let mut dense = Vec::new();
    if let Some(m) = &modules {
        for dir in crate::st_modules::dense_module_paths(m)? {
            let config = required(&module_file(&dir, "config.json"))?;
            let weights = match fetch.fetch(&module_file(&dir, "model.safetensors"))? {
                Some(p) => p,
                None if fetch.has(&module_file(&dir, "pytorch_model.bin")) => {
                    return Err(HubError::PytorchOnly {
                        model: model.id.clone(),
                        searched: fetch.searched(),
                        module: Some(dir),
                    }
                    .into())
                }
                None => required(&module_file(&dir, "model.safetensors"))?,
            };
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
