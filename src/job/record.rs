//! Completion records (`FILE.fetch-ml.json`) and the check before a skip: whether a shard's
//! output is absent, finished by the same job, unfinished, or another job's.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{Existing, Job, OtherJob};

/// The completion record of an output whose first file is `main`: `main.fetch-ml.json`.
pub fn record_path(main: &Path) -> PathBuf {
    let mut s = main.as_os_str().to_os_string();
    s.push(".fetch-ml.json");
    PathBuf::from(s)
}

/// `fetch-ml-output`: the `format` of a completion record.
pub const RECORD_FORMAT: &str = "fetch-ml-output";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    format: String,
    version: u32,
    job: Job,
    rows: u64,
    files: Vec<FileSum>,
}

/// A file's name, size and XXH3-64 hash, as a completion record lists it.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    name: String,
    bytes: u64,
    xxh3: String,
}

/// The [`FileSum`] of the file at `path` (a finished temporary file), named as `target`.
pub fn file_sum_as(path: &Path, target: &Path) -> Result<FileSum> {
    Ok(FileSum {
        name: file_name(target),
        ..file_sum(path)?
    })
}

fn file_sum(path: &Path) -> Result<FileSum> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum {
        name: file_name(path),
        bytes,
        xxh3: format!("{:016x}", h.digest()),
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Removes the completion record of `files` before any of them is replaced.
pub fn remove_record(files: &[PathBuf]) -> Result<()> {
    let Some(main) = files.first() else {
        return Ok(());
    };
    let path = record_path(main);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Ok(m) if !m.is_file() => anyhow::bail!(
            "{} exists and is not a regular file; remove it, or choose another output name",
            path.display()
        ),
        _ => {}
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

/// Writes the completion record of `files` for `job`, with `sums`: those of the bytes this run
/// wrote, taken before the files were renamed into place (so a concurrent writer's files are
/// never described as this run's).
pub fn write_record(files: &[PathBuf], job: &Job, rows: u64, sums: Vec<FileSum>) -> Result<()> {
    let Some(main) = files.first() else {
        return Ok(());
    };
    anyhow::ensure!(sums.len() == files.len(), "a sum for every file");
    let record = Record {
        format: RECORD_FORMAT.into(),
        version: 1,
        job: job.clone(),
        rows,
        files: sums,
    };
    let path = record_path(main);
    let mut f = crate::atomic::NewFile::create(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    use std::io::Write;
    writeln!(f, "{}", serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", path.display()))?;
    f.commit()
        .with_context(|| format!("writing {}", path.display()))
}

/// Whether `files` (a shard's output; Parquet when `parquet`) are absent, finished by `job`,
/// or unfinished. A complete output of another job is an [`OtherJob`] error.
pub fn existing(files: &[PathBuf], parquet: bool, job: &Job) -> Result<Existing> {
    if let (false, Some(main)) = (parquet, files.first()) {
        let record = record_path(main);
        if std::fs::symlink_metadata(&record).is_ok_and(|m| !m.is_file()) {
            anyhow::bail!(
                "{} exists and is not a regular file, and the completion record goes there; \
                 remove it, or choose another output name",
                record.display()
            );
        }
    }
    let metas: Vec<Option<std::fs::Metadata>> =
        files.iter().map(|p| std::fs::metadata(p).ok()).collect();
    if metas.iter().all(Option::is_none) {
        return Ok(Existing::Absent);
    }
    // Device nodes and pipes are written in place: never a finished shard to skip.
    if metas.iter().flatten().any(|m| !m.is_file()) {
        return Ok(Existing::Absent);
    }
    if let Some(i) = metas.iter().position(Option::is_none) {
        return Ok(Existing::Unfinished(format!(
            "{} is missing",
            files[i].display()
        )));
    }
    let main = &files[0];
    let made_by = if parquet {
        match parquet_job(main) {
            Ok(j) => j,
            Err(why) => return Ok(Existing::Unfinished(why)),
        }
    } else {
        match record_job(files) {
            Ok(j) => j,
            Err(why) => return Ok(Existing::Unfinished(why)),
        }
    };
    let Some(made_by) = made_by else {
        return Err(OtherJob {
            path: main.display().to_string(),
            differences: vec![
                "it does not say which job made it (an earlier fetch-ml, or another program)"
                    .into(),
            ],
        }
        .into());
    };
    let differences = made_by.differences(job);
    if differences.is_empty() {
        Ok(Existing::Finished)
    } else {
        Err(OtherJob {
            path: main.display().to_string(),
            differences,
        }
        .into())
    }
}

/// The job in a complete Parquet file's metadata (`None` when it names none); `Err` with the
/// reason when the file is not a complete Parquet file.
fn parquet_job(path: &Path) -> std::result::Result<Option<Job>, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r = SerializedFileReader::new(f)
        .map_err(|e| format!("{} is incomplete ({e})", path.display()))?;
    let meta = r
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| {
            kv.iter()
                .find(|e| e.key == crate::columnar::PARQUET_META_KEY)
                .and_then(|e| e.value.clone())
        });
    Ok(meta
        .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
        .and_then(|v| serde_json::from_value(v["job"].clone()).ok()))
}

/// The job of a completion record whose files are all as it says; `Err` with the reason when
/// the record is missing or unreadable or a file changed (an unfinished output).
fn record_job(files: &[PathBuf]) -> std::result::Result<Option<Job>, String> {
    let path = record_path(&files[0]);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        format!(
            "{} is incomplete (it has no completion record {})",
            files[0].display(),
            file_name(&path)
        )
    })?;
    let rec: Record = serde_json::from_str(&text).map_err(|e| {
        format!(
            "its completion record {} is unreadable ({e})",
            path.display()
        )
    })?;
    if rec.format != RECORD_FORMAT {
        return Ok(None);
    }
    if rec.files.len() != files.len() {
        return Err(format!("{} lists other files", path.display()));
    }
    for (want, p) in rec.files.iter().zip(files) {
        let got = file_sum(p).map_err(|e| format!("{e:#}"))?;
        if got != *want {
            return Err(format!(
                "{} is incomplete or changed since it was written ({} bytes, hash {}; its record \
                 says {} bytes, hash {})",
                p.display(),
                got.bytes,
                got.xxh3,
                want.bytes,
                want.xxh3
            ));
        }
    }
    Ok(Some(rec.job))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::tests::job;

    #[test]
    fn records_describe_their_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("out.jsonl");
        let files = vec![f.clone()];
        std::fs::write(&f, "a\nb\n").unwrap();
        assert_eq!(
            existing(&files, false, &job()).unwrap(),
            Existing::Unfinished(format!(
                "{} is incomplete (it has no completion record out.jsonl.fetch-ml.json)",
                f.display()
            ))
        );
        let sums = vec![file_sum(&f).unwrap()];
        write_record(&files, &job(), 2, sums).unwrap();
        assert_eq!(existing(&files, false, &job()).unwrap(), Existing::Finished);
        let mut other = job();
        other.shard = "1/3".into();
        let e = existing(&files, false, &other).unwrap_err();
        assert!(e.to_string().contains("shard 0/3 (this run: 1/3)"), "{e}");
        std::fs::write(&f, "a\nc\n").unwrap();
        assert!(matches!(
            existing(&files, false, &job()).unwrap(),
            Existing::Unfinished(_)
        ));
        remove_record(&files).unwrap();
        assert!(!record_path(&f).exists());
        std::fs::remove_file(&f).unwrap();
        assert_eq!(existing(&files, false, &job()).unwrap(), Existing::Absent);
    }
}
