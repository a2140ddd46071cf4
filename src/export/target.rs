//! Where an export goes: checked before any training, and swapped in without ever deleting a
//! file fetch-ml did not write.
//!
//! An existing folder is replaced only with `--overwrite`, only when it is an earlier export
//! (its `heads.json` has fetch-ml's format), and only when everything in it is one of the
//! files an export writes ([`OWN_FILES`], [`OWN_DIRS`], and a `README.md` that is fetch-ml's
//! model card); anything else is refused, naming what is in the way, as `--save` does. The new
//! folder is exchanged with the old one in one step (`renameat2(RENAME_EXCHANGE)`), and the old
//! one's own files are then removed; where the file system cannot exchange, the old folder is
//! moved aside to `DIR.fetch-ml-old-*` (never deleted unseen) before the new one moves in.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::card::{is_own_card, CARD_FILE};
use super::{HEADS_FILE, HEADS_FORMAT, HEADS_WEIGHTS};
use crate::atomic::{exchange, parent_of, sync_dir, NewDir};

/// The files an export writes at its top level (the tokenizer files when the base model has
/// them; `README.md` only when it is fetch-ml's model card).
const OWN_FILES: [&str; 12] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
    "config_sentence_transformers.json",
    "model.safetensors",
    HEADS_WEIGHTS,
    "modules.json",
    "sentence_bert_config.json",
    HEADS_FILE,
];

/// The folders an export writes, with the files each may hold.
const OWN_DIRS: [(&str, &[&str]); 2] = [("1_Pooling", &["config.json"]), ("2_Normalize", &[])];

/// `dir` with a symlink to a folder followed, so that the link stays and the folder it names
/// is what gets replaced.
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if !matches!(
        dir.components().next_back(),
        Some(std::path::Component::Normal(_))
    ) {
        bail!(
            "--export {}: names no folder of its own (the current folder, a parent or the root); \
             give a folder to create, such as exported-model",
            dir.display()
        );
    }
    let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && dir.is_dir() {
        return std::fs::canonicalize(dir).with_context(|| format!("--export {}", dir.display()));
    }
    Ok(dir.to_path_buf())
}

/// Whether `dir` holds an earlier export (its `heads.json` says so).
fn is_export(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(HEADS_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["format"] == HEADS_FORMAT)
}

/// The entries of an export folder that fetch-ml did not write (at most a few, for a message).
fn foreign(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let read = |d: &Path| -> Result<Vec<(String, std::fs::FileType)>> {
        std::fs::read_dir(d)
            .with_context(|| format!("reading {}", d.display()))?
            .map(|e| {
                let e = e?;
                Ok((e.file_name().to_string_lossy().into_owned(), e.file_type()?))
            })
            .collect()
    };
    for (name, kind) in read(dir)? {
        let own = if name == CARD_FILE {
            kind.is_file() && is_own_card(&dir.join(&name))
        } else if let Some((_, allowed)) = OWN_DIRS.iter().find(|(d, _)| *d == name) {
            if !kind.is_dir() {
                false
            } else {
                for (inner, k) in read(&dir.join(&name))? {
                    if !(k.is_file() && allowed.contains(&inner.as_str())) {
                        out.push(format!("{name}/{inner}"));
                    }
                }
                true
            }
        } else {
            kind.is_file() && OWN_FILES.contains(&name.as_str())
        };
        if !own {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Fails unless `dir` can take an export: absent, an empty folder, or (with `overwrite`) an
/// earlier export holding only fetch-ml's files.
fn check_replaceable(dir: &Path, overwrite: bool) -> Result<()> {
    let what = || format!("--export {}", dir.display());
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(what),
    };
    if !meta.is_dir() {
        bail!("{}: is a file; give a folder name", what());
    }
    let empty = std::fs::read_dir(dir).with_context(what)?.next().is_none();
    if empty {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "{}: the folder exists and is not empty; pass --overwrite to replace an earlier \
             export, or choose another folder",
            what()
        );
    }
    if !is_export(dir) {
        bail!(
            "{}: the folder is not a fetch-ml export (no {HEADS_FILE} of format \
             {HEADS_FORMAT}), so --overwrite leaves it alone; remove it yourself or choose \
             another folder",
            what()
        );
    }
    let theirs = foreign(dir)?;
    if !theirs.is_empty() {
        let shown: Vec<&str> = theirs.iter().take(5).map(String::as_str).collect();
        bail!(
            "{}: the earlier export also holds files fetch-ml did not write ({}{}); replacing it \
             would delete them, so nothing was changed. Move them out of the folder or choose \
             another folder",
            what(),
            shown.join(", "),
            if theirs.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok(())
}

/// Checks, before any training, that `dir` can take an export (see [`check_replaceable`]),
/// creates its parent folder, and checks that a folder can be written there.
pub fn check_target(dir: &Path, overwrite: bool) -> Result<()> {
    let dir = resolve(dir)?;
    check_replaceable(&dir, overwrite)?;
    let parent = parent_of(&dir);
    std::fs::create_dir_all(parent)
        .with_context(|| format!("--export {}: creating {}", dir.display(), parent.display()))?;
    NewDir::create_in(parent).with_context(|| {
        format!(
            "--export {}: cannot write in {}",
            dir.display(),
            parent.display()
        )
    })?;
    Ok(())
}

/// Removes an earlier export's own files and then the folder; what is left (a file that
/// appeared since the check) stays, and the folder is renamed to `leftover` for the user.
fn remove_own(dir: &Path, leftover: &Path) -> Result<()> {
    let rm = |p: PathBuf| match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    };
    for f in OWN_FILES {
        rm(dir.join(f))?;
    }
    if is_own_card(&dir.join(CARD_FILE)) {
        rm(dir.join(CARD_FILE))?;
    }
    for (d, files) in OWN_DIRS {
        for f in files {
            rm(dir.join(d).join(f))?;
        }
        let _ = std::fs::remove_dir(dir.join(d));
    }
    if std::fs::remove_dir(dir).is_err() {
        std::fs::rename(dir, leftover)
            .with_context(|| format!("keeping the earlier export at {}", leftover.display()))?;
        bail!(
            "the earlier export held files fetch-ml did not write by the time it was replaced; \
             they were kept in {}",
            leftover.display()
        );
    }
    Ok(())
}

/// Moves the finished folder `tmp` to `dir`, replacing an earlier export there.
pub fn swap_in(tmp: NewDir, dir: &Path) -> Result<()> {
    let what = || format!("--export {}", dir.display());
    let parent = parent_of(dir).to_path_buf();
    let tag = tmp
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().trim_start_matches('.').to_string())
        .unwrap_or_default();
    let leftover = PathBuf::from(format!("{}.fetch-ml-old-{tag}", dir.display()));
    if !dir.exists() {
        std::fs::rename(tmp.path(), dir)
            .with_context(|| format!("{}: renaming into place", what()))?;
        tmp.into_kept();
        sync_dir(&parent);
        return Ok(());
    }
    // Checked again: the folder may have changed during training.
    check_replaceable(dir, true)?;
    match exchange(tmp.path(), dir) {
        Ok(()) => {
            // `tmp`'s path now holds the earlier export.
            sync_dir(&parent);
            let old = tmp.path().to_path_buf();
            let result = remove_own(&old, &leftover);
            tmp.into_kept();
            result.with_context(what)
        }
        Err(_) => {
            // No exchange on this file system: the earlier export moves aside first.
            std::fs::rename(dir, &leftover)
                .with_context(|| format!("{}: moving the earlier export aside", what()))?;
            if let Err(e) = std::fs::rename(tmp.path(), dir) {
                let _ = std::fs::rename(&leftover, dir);
                return Err(e).with_context(|| format!("{}: renaming into place", what()));
            }
            tmp.into_kept();
            sync_dir(&parent);
            let aside = PathBuf::from(format!("{}.kept", leftover.display()));
            remove_own(&leftover, &aside).with_context(what)
        }
    }
}
