//! Where a model's files come from: a local folder, the hub cache (offline), or the hub
//! itself, each behind [`Fetch`]; downloads run under a watchdog that gives up after the
//! hub timeout without progress, with a progress bar.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hf_hub::api::sync::Api;
use hf_hub::{Cache, Repo, RepoType};

use super::{HubError, ModelRef, Place};

/// Gets a file of the model by name: `Ok(None)` when the model does not have it.
pub(super) trait Fetch {
    fn fetch(&self, name: &str) -> Result<Option<PathBuf>>;
    /// Whether the model has the file, without downloading it.
    fn has(&self, name: &str) -> bool;
    /// Explains, for an error message, where a missing file was looked for.
    fn searched(&self) -> String;
    /// The kind of place searched, for the advice on a missing file.
    fn place(&self) -> Place;
}

pub(super) struct LocalFolder(pub PathBuf);

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
pub(super) struct OfflineCache {
    pub cache: Cache,
    pub model: ModelRef,
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
pub(super) struct Online {
    pub api: Api,
    /// The cache the API writes to (`ApiBuilder::from_env` uses the same).
    pub cache: Cache,
    pub files: Vec<String>,
    pub model: ModelRef,
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
        crate::note!(
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
pub(super) fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

/// The last sign of life of a request: milliseconds since the watchdog's start.
#[derive(Clone)]
pub(super) struct Activity {
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
pub(super) fn watched<T: Send + 'static>(
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
