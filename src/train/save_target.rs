//! Where a checkpoint is saved: checked before training, locked against a second run, and
//! swapped in so that a kill at any moment leaves a checkpoint that the next run finds.
//!
//! A save writes the new checkpoint into `.NAME.tmp-*` beside the target (its `checkpoint.json`
//! last, every file synced), moves the old folder aside to `.NAME.old-PID`, renames the new one
//! in, and removes the old one. A kill between the two renames leaves no `NAME`, but both
//! folders complete: the next save or load ([`recover`]) renames the newest complete one back
//! into place and says so. Folders are replaced only when they hold a fetch-ml checkpoint and
//! nothing else, so a save never deletes what fetch-ml did not write.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The `format` of a fetch-ml checkpoint's `checkpoint.json`.
pub const FORMAT: &str = "fetch-ml-multitask";
/// The weights of a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The metadata of a checkpoint folder, written last: a folder with it is complete.
pub const META_FILE: &str = "checkpoint.json";
/// The training metrics of a checkpoint folder.
pub const METRICS_FILE: &str = "metrics.json";

/// The files a checkpoint folder holds; nothing else is ever deleted.
const OWN_FILES: [&str; 3] = [WEIGHTS_FILE, META_FILE, METRICS_FILE];

/// Environment variable for fault injection in tests: `checkpoint-swap` aborts the process
/// between the two renames of a save.
pub const FAULT_ENV: &str = "FETCH_ML_FAULT";

/// A checked and locked save target, held from before training until the save.
pub struct SaveTarget {
    dir: PathBuf,
    parent: PathBuf,
    name: String,
    /// Holds the advisory lock (`.NAME.lock`) while this value lives.
    _lock: Lock,
}

impl SaveTarget {
    /// Checks that `dir` can take a checkpoint (a new folder, an empty one, or a fetch-ml
    /// checkpoint holding only its own files), locks it against concurrent saves, and restores
    /// a checkpoint that an interrupted save left aside.
    pub fn prepare(dir: &Path) -> Result<Self> {
        let (parent, name) = split(dir)?;
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let lock = lock(&parent, &name, false)?.with_context(|| {
            format!(
                "another fetch-ml run is saving to {} right now; wait for it to finish or \
                     choose another folder",
                dir.display()
            )
        })?;
        let target = Self {
            dir: dir.to_path_buf(),
            parent,
            name,
            _lock: lock,
        };
        target.recover()?;
        check_replaceable(dir)?;
        Ok(target)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a checkpoint with `write` (into an empty folder it is given) and swaps it into
    /// place. `write` must create [`META_FILE`] last.
    pub fn save(&self, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        // Checked again: the folder may have changed during training.
        check_replaceable(&self.dir)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.tmp-", self.name))
            .tempdir_in(&self.parent)
            .with_context(|| format!("creating a temporary folder in {}", self.parent.display()))?;
        write(tmp.path())?;
        finish_files(tmp.path())?;
        let old = self
            .parent
            .join(format!(".{}.old-{}", self.name, std::process::id()));
        let had_old = self.dir.exists();
        if had_old {
            std::fs::rename(&self.dir, &old)
                .with_context(|| format!("moving the old {} aside", self.dir.display()))?;
        }
        if std::env::var(FAULT_ENV).as_deref() == Ok("checkpoint-swap") {
            std::process::abort();
        }
        if let Err(e) = std::fs::rename(tmp.path(), &self.dir) {
            if had_old {
                let _ = std::fs::rename(&old, &self.dir);
            }
            return Err(e)
                .with_context(|| format!("moving the checkpoint into {}", self.dir.display()));
        }
        let _ = tmp.keep();
        sync_dir(&self.parent);
        if had_old {
            remove_own_folder(&old)?;
        }
        Ok(())
    }

    /// See [`recover`]; the lock is already held.
    fn recover(&self) -> Result<()> {
        recover_locked(&self.dir, &self.parent, &self.name)
    }
}

/// When `dir` is missing but a save that was interrupted left a complete checkpoint beside it,
/// renames that one into place (with a note on stderr); removes leftovers of interrupted saves.
pub fn recover(dir: &Path) -> Result<()> {
    // A path such as `.` names no folder a save could have swapped: nothing to recover.
    let Ok((parent, name)) = split(dir) else {
        return Ok(());
    };
    if !parent.is_dir() {
        return Ok(());
    }
    let has_leftovers = leftovers(&parent, &name)
        .map(|v| !v.is_empty())
        .unwrap_or(false);
    if !has_leftovers {
        return Ok(());
    }
    // Waits for a save in progress; it may be the one that left these folders.
    let Some(_lock) = lock(&parent, &name, true)? else {
        return Ok(());
    };
    recover_locked(dir, &parent, &name)
}

fn recover_locked(dir: &Path, parent: &Path, name: &str) -> Result<()> {
    let mut found = leftovers(parent, name)?;
    // Newest first: a temporary folder that is complete is the newer checkpoint.
    found.sort_by_key(|(p, is_tmp)| {
        let t = std::fs::metadata(p.join(META_FILE))
            .and_then(|m| m.modified())
            .ok();
        (std::cmp::Reverse(t), !*is_tmp)
    });
    if !dir.exists() {
        if let Some((p, _)) = found.iter().find(|(p, _)| is_complete(p)) {
            std::fs::rename(p, dir)
                .with_context(|| format!("restoring {} from {}", dir.display(), p.display()))?;
            crate::note!(
                "note: {} was missing after an interrupted save; restored it from {}",
                dir.display(),
                p.display()
            );
        }
    }
    for (p, _) in found {
        if p.exists() {
            remove_own_folder(&p)?;
        }
    }
    Ok(())
}

/// Folders left by interrupted saves to `parent/name`: `(path, is_temporary)`.
fn leftovers(parent: &Path, name: &str) -> Result<Vec<(PathBuf, bool)>> {
    let tmp = format!(".{name}.tmp-");
    let old = format!(".{name}.old-");
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(parent).with_context(|| format!("reading {}", parent.display()))?
    {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let is_tmp = file_name.starts_with(&tmp);
        if (is_tmp || file_name.starts_with(&old)) && entry.path().is_dir() {
            out.push((entry.path(), is_tmp));
        }
    }
    Ok(out)
}

/// A folder with every checkpoint file and a `checkpoint.json` of fetch-ml's format.
fn is_complete(dir: &Path) -> bool {
    OWN_FILES.iter().all(|f| dir.join(f).is_file()) && own_meta(dir).unwrap_or(false)
}

/// Whether `dir/checkpoint.json` is fetch-ml's own (`Ok(false)` when it is another tool's).
fn own_meta(dir: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(dir.join(META_FILE))?;
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => return Ok(false),
    };
    Ok(v.get("format").and_then(|f| f.as_str()) == Some(FORMAT))
}

/// Fails unless `dir` is absent, an empty folder, or a fetch-ml checkpoint of our files only.
fn check_replaceable(dir: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", dir.display())),
    };
    if !meta.is_dir() {
        bail!(
            "{} exists and is not a folder; give the path of a folder to create",
            dir.display()
        );
    }
    let entries: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    if entries.is_empty() {
        return Ok(());
    }
    if !dir.join(META_FILE).is_file() {
        bail!(
            "{} exists and is not a fetch-ml checkpoint (it has no {META_FILE}); nothing was \
             changed there. Choose another folder",
            dir.display()
        );
    }
    if !own_meta(dir).with_context(|| format!("reading {}", dir.join(META_FILE).display()))? {
        bail!(
            "{} holds a {META_FILE} that is not fetch-ml's (no \"format\": \"{FORMAT}\"); \
             fetch-ml replaces only its own checkpoints and changed nothing there. Choose another \
             folder",
            dir.display()
        );
    }
    let foreign: Vec<&String> = entries
        .iter()
        .filter(|e| !OWN_FILES.contains(&e.as_str()))
        .collect();
    if !foreign.is_empty() {
        let names: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "{} is a fetch-ml checkpoint but also holds files fetch-ml did not write ({}{}); \
             replacing it would delete them. Move them out or choose another folder",
            dir.display(),
            names.join(", "),
            if foreign.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok(())
}

/// Removes a folder of ours: only our own files, then the folder (which fails if anything
/// else is in it).
fn remove_own_folder(dir: &Path) -> Result<()> {
    for f in OWN_FILES {
        match std::fs::remove_file(dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.join(f).display())),
        }
    }
    std::fs::remove_dir(dir).with_context(|| {
        format!(
            "removing {} (it holds files fetch-ml did not write; remove them by hand)",
            dir.display()
        )
    })
}

/// The folder that holds `dir` and `dir`'s own name; refuses `.`, `..` and `/`.
fn split(dir: &Path) -> Result<(PathBuf, String)> {
    use std::path::Component;
    let last = dir.components().next_back();
    let name = match last {
        Some(Component::Normal(n)) => n.to_string_lossy().into_owned(),
        _ => bail!(
            "{} names no folder of its own (it is the current folder, a parent or the root); \
             give a folder to create, such as checkpoints/mine",
            dir.display()
        ),
    };
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// An advisory lock on `parent/.NAME.lock`, removed when dropped.
struct Lock {
    file: File,
    path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held: a process waiting on this file sees, once it gets the
        // lock, that the path is gone or another file, and takes the lock again.
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
    }
}

/// Takes the lock `parent/.NAME.lock`: `Ok(None)` when another process holds it and `wait`
/// is false.
fn lock(parent: &Path, name: &str, wait: bool) -> Result<Option<Lock>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = parent.join(format!(".{name}.lock"));
    let not_regular = || {
        anyhow::anyhow!(
            "{} is not a regular file; remove it (fetch-ml keeps its save lock there)",
            path.display()
        )
    };
    if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
        return Err(not_regular());
    }
    loop {
        // Not through a symlink, and without waiting on a named pipe put there.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .with_context(|| format!("creating the lock file {}", path.display()))?;
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Err(not_regular());
        }
        let locked = crate::sys::lock_exclusive(&file, wait)
            .with_context(|| format!("locking {}", path.display()))?;
        if !locked {
            return Ok(None);
        }
        // The holder before us may have removed the file: then lock the new one.
        let same = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            return Ok(Some(Lock { file, path }));
        }
    }
}

/// Gives the written files and their folder the permissions of files the user creates
/// (0666 and 0777 less the umask; see [`crate::atomic::user_permissions`]) and syncs them.
fn finish_files(dir: &Path) -> Result<()> {
    crate::atomic::user_permissions(dir)
        .with_context(|| format!("setting the permissions of {}", dir.display()))?;
    for f in OWN_FILES {
        let p = dir.join(f);
        File::open(&p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    crate::atomic::sync_dir(dir)
}
