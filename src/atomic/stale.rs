//! Temporaries whose writer is gone: found by name, judged by their lock.
//!
//! A temporary file is removed only when an exclusive `flock` on it can be taken, that is when
//! no process anywhere holds it. Process ids are never compared: they mean nothing across
//! hosts, containers and PID namespaces, and PID 1 is alive in every container. Where `flock`
//! is emulated with POSIX byte-range locks (NFS), a process does not conflict with its own
//! locks, so this process's own live temporaries are also kept in a table and skipped.

use std::collections::HashSet;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{still_at, try_lock, TEMP_PREFIX};

/// This process's live temporary files (and temporary folders' lock files).
static OWN: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn with_own<T>(f: impl FnOnce(&mut HashSet<PathBuf>) -> T) -> T {
    let mut guard = OWN.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(HashSet::new))
}

/// Records `path` as one of this process's live temporaries.
pub(super) fn own(path: &Path) {
    with_own(|s| s.insert(path.to_path_buf()));
}

/// Forgets `path` once it is renamed away or removed.
pub(super) fn forget_own(path: &Path) {
    with_own(|s| s.remove(path));
}

fn is_own(path: &Path) -> bool {
    with_own(|s| s.contains(path))
}

/// Whether `tail` is the random part of a temporary name: 6 letters or digits, then nothing
/// or `.png`.
fn is_random_tail(tail: &str) -> bool {
    let r = tail.strip_suffix(".png").unwrap_or(tail);
    r.len() == 6 && r.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Whether `name` is one of our temporary files: the current scheme (`.fetch-ml-tmp-XXXXXX`,
/// `.png` for charts), or the names earlier versions gave (`.fetch-ml-PID-XXXXXX`,
/// `.fetch-ml-plot-XXXXXX.png`).
fn is_temp_file_name(name: &str) -> bool {
    if let Some(tail) = name.strip_prefix(TEMP_PREFIX) {
        return is_random_tail(tail);
    }
    let Some(rest) = name.strip_prefix(".fetch-ml-") else {
        return false;
    };
    let Some((head, tail)) = rest.split_once('-') else {
        return false;
    };
    let pid = !head.is_empty() && head.bytes().all(|b| b.is_ascii_digit());
    (head == "plot" || pid) && is_random_tail(tail)
}

/// Removes the temporary files and folders in `dir` whose writer is gone: those whose lock
/// can be taken (and, for a folder, those whose lock file is gone). Live writers' files,
/// anything that is not ours, and whatever cannot be opened are left alone.
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(kind) = e.file_type() else { continue };
        let path = e.path();
        if kind.is_file() && is_temp_file_name(&name) && !is_own(&path) {
            remove_if_unlocked(&path);
        } else if kind.is_dir() && is_temp_dir_name(&name) {
            let lock = dir.join(&name[..name.len() - 2]);
            if std::fs::symlink_metadata(&lock).is_err() {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// Deletes a temporary file (and the folder it locks, if any) when its lock can be taken.
fn remove_if_unlocked(path: &Path) {
    // Opened for writing: NFS grants an exclusive lock only on a file open for writing.
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return;
    };
    if !matches!(try_lock(&file), Ok(true)) || !still_at(&file, path) {
        return;
    }
    let mut dir = path.as_os_str().to_os_string();
    dir.push(".d");
    let dir = PathBuf::from(dir);
    if dir.is_dir() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_file(path);
}

/// Whether `name` is a temporary folder's: `.fetch-ml-tmp-XXXXXX.d`.
fn is_temp_dir_name(name: &str) -> bool {
    name.strip_prefix(TEMP_PREFIX)
        .and_then(|t| t.strip_suffix(".d"))
        .is_some_and(|t| t.len() == 6 && t.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names() {
        assert!(is_temp_file_name(".fetch-ml-tmp-abc123"));
        assert!(is_temp_file_name(".fetch-ml-4242-abc123"));
        assert!(is_temp_file_name(".fetch-ml-plot-abc123.png"));
        assert!(!is_temp_file_name(".fetch-ml-2024-notes.txt"));
        assert!(!is_temp_file_name(".fetch-ml-tmp-precious-data"));
        assert!(is_temp_dir_name(".fetch-ml-tmp-abc123.d"));
        assert!(!is_temp_dir_name(".fetch-ml-tmp-my-own.d"));
        assert!(!is_temp_file_name(".fetch-ml-tmp-abc123.d"));
        assert!(!is_temp_file_name(".fetch-ml-notes"));
        assert!(!is_temp_file_name("fetch-ml-12-x"));
    }
}
