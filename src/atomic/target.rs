//! What a path to write to is: a file to replace by rename, a special file to write in
//! place, a folder, or one of this process's descriptors; and the system folders where
//! fetch-ml never creates a file.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::parent_of;

/// What a path to write to is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Absent, or a regular file: write beside it and rename onto this path (a symlink to a
    /// regular file is followed, so the link stays and the file it names is replaced).
    Replace(PathBuf),
    /// Exists and is neither a regular file nor a folder (a device node, a named pipe, a
    /// socket): written in place, never replaced.
    InPlace,
    /// A folder.
    Folder,
    /// One of this process's open descriptors named as a file (`/dev/stdout`, `/dev/stderr`,
    /// `/dev/fd/N`, `/proc/self/fd/N`, as a shell's `>(...)` gives): written through a
    /// duplicate of it, so an append (`>> log`) stays an append.
    Descriptor(i32),
}

/// The descriptor a path names, when it is one of this process's open descriptors.
fn descriptor(path: &Path) -> Option<i32> {
    let s = path.to_str()?;
    let n = match s {
        "/dev/stdout" => 1,
        "/dev/stderr" => 2,
        _ => s
            .strip_prefix("/dev/fd/")
            .or_else(|| s.strip_prefix("/proc/self/fd/"))?
            .parse()
            .ok()?,
    };
    crate::sys::descriptor_open(n).then_some(n)
}

/// A duplicate of descriptor `fd` as a file: it shares the open file (its offset, its
/// append mode).
pub fn open_descriptor(fd: i32) -> io::Result<File> {
    crate::sys::duplicate(fd)
}

/// Refuses to create or replace a regular file directly in `/dev` or anywhere in `/proc`: a
/// typo such as `/dev/nul`, run as root, would otherwise leave a file among the devices.
fn check_not_system(target: &Path) -> io::Result<()> {
    let parent = std::fs::canonicalize(parent_of(target)).unwrap_or_default();
    if parent == Path::new("/dev") || parent.starts_with("/proc") {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a device that exists, and fetch-ml does not create files in {}; \
                 name an existing device or a file elsewhere",
                target.display(),
                parent.display()
            ),
        ));
    }
    Ok(())
}

/// Says what `path` is, following symlinks. A regular file to create or replace directly in
/// `/dev` or in `/proc` is an error.
pub fn classify(path: &Path) -> io::Result<Target> {
    if let Some(fd) = descriptor(path) {
        return Ok(Target::Descriptor(fd));
    }
    let t = classify_path(path)?;
    if let Target::Replace(p) = &t {
        check_not_system(p)?;
    }
    Ok(t)
}

fn classify_path(path: &Path) -> io::Result<Target> {
    let link = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Target::Replace(path.into())),
        Err(e) => return Err(e),
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        // A dangling symlink: the link itself is replaced.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Target::Replace(path.into())),
        Err(e) => return Err(e),
    };
    Ok(if meta.is_dir() {
        Target::Folder
    } else if !meta.is_file() {
        Target::InPlace
    } else if link.file_type().is_symlink() {
        Target::Replace(std::fs::canonicalize(path)?)
    } else {
        Target::Replace(path.into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_and_system_folders() {
        // Read-only checks: nothing is created under /dev or /proc.
        assert_eq!(
            classify(Path::new("/proc/self/fd/2")).unwrap(),
            Target::Descriptor(2)
        );
        assert_eq!(
            classify(Path::new("/dev/stderr")).unwrap(),
            Target::Descriptor(2)
        );
        assert!(classify(Path::new("/dev/fd/987654")).is_err());
        let e = classify(Path::new("/dev/fetch-ml-no-such-device")).unwrap_err();
        assert!(
            e.to_string().contains("does not create files in /dev"),
            "{e}"
        );
        assert!(classify(Path::new("/proc/self/fetch-ml-no-such-file")).is_err());
    }

    #[test]
    fn targets() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        assert_eq!(classify(&f).unwrap(), Target::Replace(f.clone()));
        std::fs::write(&f, "").unwrap();
        assert_eq!(classify(&f).unwrap(), Target::Replace(f.clone()));
        assert_eq!(classify(d.path()).unwrap(), Target::Folder);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(
            classify(&link).unwrap(),
            Target::Replace(std::fs::canonicalize(&f).unwrap())
        );
        let fifo = d.path().join("fifo");
        crate::sys::make_fifo(&fifo).unwrap();
        assert_eq!(classify(&fifo).unwrap(), Target::InPlace);
    }
}
