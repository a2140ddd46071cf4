//! The one writer of files and folders that appear by rename: written under a temporary name
//! beside the target, locked while written, renamed into place only when complete, with the
//! permissions of a file the user creates (0666, folders 0777, less the umask).
//!
//! Temporary names start with [`TEMP_PREFIX`]. A temporary file holds an advisory lock
//! (`flock`) on itself from creation to its rename; a temporary folder `NAME.d` is paired with
//! a lock file `NAME` created (and locked) before it and removed after it. [`remove_stale`]
//! deletes only temporaries whose lock it can take: their writer is gone, whatever host,
//! container or PID namespace it ran in (process ids are not compared: they mean nothing
//! across those). Locks are `flock`, which Linux also maps onto NFS byte-range locks.
//!
//! A target that exists and is not a regular file (a device node, a named pipe) is never
//! replaced: [`classify`] says so, and the callers write into such targets in place.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

mod stale;
mod target;

pub use stale::remove_stale;
use stale::{forget_own, own};
pub use target::{classify, open_descriptor, Target};

/// Names of temporary files and folders start with this.
pub const TEMP_PREFIX: &str = ".fetch-ml-tmp-";

/// Environment variable for fault injection in tests: `FETCH_ML_FAULT=NAME` aborts the process
/// at the [`fault_point`] called `NAME`.
pub const FAULT_ENV: &str = "FETCH_ML_FAULT";

/// Aborts the process when [`FAULT_ENV`] names this point (tests of kills at awkward moments).
pub fn fault_point(name: &str) {
    if std::env::var(FAULT_ENV).as_deref() == Ok(name) {
        std::process::abort();
    }
}

/// The folder holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The process's umask, read from `/proc/self/status` (no race with threads creating files),
/// else by setting it and setting it back.
pub fn umask() -> u32 {
    if let Ok(s) = std::fs::read_to_string("/proc/self/status") {
        let found = s
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
        if let Some(m) = found {
            return m;
        }
    }
    crate::sys::umask()
}

/// Gives `path` the permissions of a file (0666) or folder (0777) the user creates, less the
/// umask; within a folder, to everything in it too.
pub fn user_permissions(path: &Path) -> io::Result<()> {
    let mask = umask();
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(path)? {
            user_permissions(&e?.path())?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777 & !mask))
    } else if meta.is_file() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !mask))
    } else {
        Ok(())
    }
}

/// Takes an exclusive lock without waiting: `Ok(false)` when another holds it.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    crate::sys::lock_exclusive(file, false)
}

/// Whether `file` is still the one at `path` (not deleted or replaced meanwhile).
pub(crate) fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// Creates a new, locked temporary file in `dir`, with mode 0666 less the umask.
fn locked_temp(dir: &Path, suffix: &str) -> io::Result<(File, PathBuf)> {
    loop {
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(suffix)
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)?;
        let (file, path) = tmp.keep().map_err(|e| e.error)?;
        own(&path);
        // A cleaner may have taken and deleted the file between its creation and our lock:
        // then it is gone from `path` and we start again under a new name.
        if try_lock(&file)? && still_at(&file, &path) {
            return Ok((file, path));
        }
        forget_own(&path);
    }
}

/// Swaps the names of `a` and `b` in one step (`renameat2` with `RENAME_EXCHANGE`); an error
/// when the file system cannot (then nothing changed).
pub fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    crate::sys::rename_exchange(a, b)
}

/// Syncs the folder `dir`, so a rename in it survives a crash (best effort).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A file being written under a locked temporary name; [`NewFile::commit`] renames it onto its
/// target. Dropped uncommitted, the temporary file is removed.
pub struct NewFile {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
    _guard: crate::interrupt::Registered,
}

impl NewFile {
    /// Starts a file that will replace `target` (absent or a regular file; see [`classify`]),
    /// after removing stale temporaries in its folder.
    pub fn create(target: &Path) -> io::Result<Self> {
        Self::create_with_suffix(target, "")
    }

    /// As [`NewFile::create`], with a temporary name ending in `suffix` (for writers that pick
    /// a format by extension).
    pub fn create_with_suffix(target: &Path, suffix: &str) -> io::Result<Self> {
        if !matches!(classify(target)?, Target::Replace(_)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a regular file; it is never replaced",
                    target.display()
                ),
            ));
        }
        let dir = parent_of(target);
        remove_stale(dir);
        let (file, tmp) = locked_temp(dir, suffix)?;
        let guard = crate::interrupt::remove_on_signal(&tmp);
        Ok(Self {
            file,
            tmp,
            target: target.to_path_buf(),
            committed: false,
            _guard: guard,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary file's path, for writers that take a path (it stays locked).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Syncs the file and renames it onto the target.
    pub fn commit(mut self) -> io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        forget_own(&self.tmp);
        sync_dir(parent_of(&self.target));
        Ok(())
    }
}

impl Write for NewFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
            forget_own(&self.tmp);
        }
    }
}

/// A folder being written under a locked temporary name beside its target. Dropped without
/// [`NewDir::into_kept`], it is removed.
pub struct NewDir {
    lock: Option<(File, PathBuf)>,
    dir: PathBuf,
}

impl NewDir {
    /// Creates `.fetch-ml-tmp-XXXXXX.d` in `parent`, after its lock file, removing stale
    /// temporaries first.
    pub fn create_in(parent: &Path) -> io::Result<Self> {
        remove_stale(parent);
        let (file, lock) = locked_temp(parent, "")?;
        let mut name = lock.as_os_str().to_os_string();
        name.push(".d");
        let dir = PathBuf::from(name);
        if let Err(e) = std::fs::create_dir(&dir) {
            let _ = std::fs::remove_file(&lock);
            forget_own(&lock);
            return Err(e);
        }
        Ok(Self {
            lock: Some((file, lock)),
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Gives everything in the folder the user's permissions and syncs its files, ready to be
    /// renamed into place.
    pub fn finish(&self) -> io::Result<()> {
        user_permissions(&self.dir)?;
        sync_tree(&self.dir);
        Ok(())
    }

    /// Releases the lock once the folder has been renamed away (or is to be kept as it is).
    pub fn into_kept(mut self) {
        if let Some((file, lock)) = self.lock.take() {
            let _ = std::fs::remove_file(&lock);
            forget_own(&lock);
            drop(file);
        }
    }
}

impl Drop for NewDir {
    fn drop(&mut self) {
        if let Some((file, lock)) = self.lock.take() {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_file(&lock);
            forget_own(&lock);
            drop(file);
        }
    }
}

fn sync_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                sync_tree(&p);
            } else if let Ok(f) = File::open(&p) {
                let _ = f.sync_all();
            }
        }
    }
    sync_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_is_locked_until_committed_and_stale_ones_go() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out.txt");
        let mut f = NewFile::create(&target).unwrap();
        f.write_all(b"hello").unwrap();
        // Another open file description cannot take the lock while we hold it.
        let other = std::fs::OpenOptions::new()
            .write(true)
            .open(f.temp_path())
            .unwrap();
        assert!(!try_lock(&other).unwrap());
        remove_stale(d.path());
        assert!(f.temp_path().exists());
        let tmp = f.temp_path().to_path_buf();
        f.commit().unwrap();
        assert!(!tmp.exists());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "hello");
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o666 & !umask()
        );
        // An unlocked temporary and an orphan temporary folder are stale.
        std::fs::write(d.path().join(".fetch-ml-tmp-xxxxxx"), "").unwrap();
        std::fs::create_dir(d.path().join(".fetch-ml-tmp-xxxxxx.d")).unwrap();
        std::fs::create_dir(d.path().join(".fetch-ml-tmp-yyyyyy.d")).unwrap();
        remove_stale(d.path());
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only out.txt is left");
    }

    #[test]
    fn a_new_folder_is_removed_unless_kept() {
        let d = tempfile::tempdir().unwrap();
        let nd = NewDir::create_in(d.path()).unwrap();
        std::fs::write(nd.path().join("a"), "x").unwrap();
        remove_stale(d.path());
        assert!(nd.path().join("a").exists(), "a live folder stays");
        drop(nd);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let nd = NewDir::create_in(d.path()).unwrap();
        nd.finish().unwrap();
        std::fs::rename(nd.path(), d.path().join("kept")).unwrap();
        nd.into_kept();
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["kept"]);
    }
}
