//! What identifies a sharded run's output, so that a retried shard skips only its own finished
//! work: the shard `I/N`, the input (its file name, a hash of its absolute path, its size and
//! modification time; a hash of the text for `--sentence`), the model (its name and a
//! fingerprint of its files) and the settings that change the vectors.
//!
//! A Parquet file carries its [`Job`] in its `fetch-ml` metadata, and is complete when its
//! footer reads. Other formats get a completion record `FILE.fetch-ml.json`
//! ([`record_path`]) written after their files are in place, holding the job and each file's
//! size and XXH3 hash; an earlier record is removed before any file is replaced, so a record
//! that exists describes the files beside it. [`existing`] says whether an output is absent,
//! finished by this same job, or unfinished; an output finished by another job is an
//! [`OtherJob`] error saying what differs.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::hub::{ModelFiles, TokenizerFiles};
use crate::input::InputSource;

/// The settings that change what a run writes, as given (before the model is read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub format: String,
    pub dtype: String,
    pub normalize: Option<bool>,
    pub max_seq_length: Option<usize>,
    pub truncate_dim: Option<usize>,
    pub prompt: Option<String>,
    pub prompt_name: Option<String>,
}

/// Where the sentences came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputId {
    /// `file`, `pipe` (a named pipe or other special file), `stdin`, `sentences` or `built-in`.
    pub kind: String,
    /// The file's name without its folder, or a description.
    pub name: String,
    /// XXH3-64 of the file's absolute path, or of the sentences' text.
    pub hash: Option<String>,
    pub bytes: Option<u64>,
    /// Modification time, UTC.
    pub modified: Option<String>,
}

/// The model: its name (a hub id, or a local folder's name) and [`model_fingerprint`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelId {
    pub name: String,
    pub fingerprint: String,
}

/// Everything that makes one shard's output what it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// `I/N`.
    pub shard: String,
    pub input: InputId,
    pub model: ModelId,
    pub settings: Settings,
}

/// An existing output that a complete run of another job wrote. Names no flags.
#[derive(Debug, thiserror::Error)]
#[error("{path} was made by another job: {}; nothing was changed", .differences.join("; "))]
pub struct OtherJob {
    pub path: String,
    pub differences: Vec<String>,
}

/// What is at a shard's output paths.
#[derive(Debug, PartialEq)]
pub enum Existing {
    Absent,
    /// Complete, and made by the same job.
    Finished,
    /// Not a finished output (why, for the log): redone.
    Unfinished(String),
}

fn xxh3_64(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// The name a model goes by in outputs: a hub id as given, a local folder by its own name
/// (never its path on this machine).
pub fn model_name(model: &crate::hub::ModelRef) -> String {
    if !model.is_local() {
        return model.id.clone();
    }
    let p = Path::new(&model.id);
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            std::fs::canonicalize(p)
                .ok()
                .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| model.id.clone())
}

/// `xxh3-128:` and the XXH3-128 hash of every file the model's vectors depend on (config,
/// weights, tokenizer, sentence-transformers modules, Dense layers), each with its role.
pub fn model_fingerprint(files: &ModelFiles) -> Result<String> {
    let mut parts: Vec<(&str, &Path)> =
        vec![("config", &files.config), ("weights", &files.weights)];
    match &files.tokenizer {
        TokenizerFiles::Json(p) => parts.push(("tokenizer", p)),
        TokenizerFiles::Vocab {
            vocab,
            tokenizer_config,
        } => {
            parts.push(("vocab", vocab));
            if let Some(c) = tokenizer_config {
                parts.push(("tokenizer_config", c));
            }
        }
    }
    for (role, p) in [
        ("modules", &files.modules),
        ("pooling", &files.pooling_config),
        ("sentence_bert_config", &files.sentence_bert_config),
        ("st_config", &files.st_config),
    ] {
        if let Some(p) = p {
            parts.push((role, p));
        }
    }
    for d in &files.dense {
        parts.push(("dense_config", &d.config));
        parts.push(("dense_weights", &d.weights));
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    for (role, path) in parts {
        h.update(role.as_bytes());
        let mut f =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            h.update(&buf[..n]);
        }
    }
    Ok(format!("xxh3-128:{:032x}", h.digest128()))
}

/// The identity of `source`, as far as it can be known without reading it.
pub fn input_id(source: &InputSource) -> Result<InputId> {
    let text_id = |kind: &str, name: String, text: &[u8]| InputId {
        kind: kind.into(),
        name,
        hash: Some(xxh3_64(text)),
        bytes: Some(text.len() as u64),
        modified: None,
    };
    Ok(match source {
        InputSource::Sentences(v) => {
            text_id("sentences", source.describe(), v.join("\n").as_bytes())
        }
        InputSource::Default => text_id(
            "built-in",
            "data/sentences.txt".into(),
            crate::input::DEFAULT_SENTENCES.as_bytes(),
        ),
        InputSource::Stdin => InputId {
            kind: "stdin".into(),
            name: "standard input".into(),
            hash: None,
            bytes: None,
            modified: None,
        },
        InputSource::File(path) => {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("--input {}: cannot read it", path.display()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            if !meta.is_file() {
                return Ok(InputId {
                    kind: "pipe".into(),
                    name,
                    hash: None,
                    bytes: None,
                    modified: None,
                });
            }
            let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            use std::os::unix::fs::MetadataExt;
            InputId {
                kind: "file".into(),
                name,
                hash: Some(xxh3_64(abs.as_os_str().as_encoded_bytes())),
                bytes: Some(meta.len()),
                modified: Some(utc(meta.mtime(), meta.mtime_nsec())),
            }
        }
    })
}

/// `2025-01-02T03:04:05.123456789Z` for seconds and nanoseconds since the epoch.
fn utc(secs: i64, nanos: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl InputId {
    /// Whether this input can be told apart from another run's (not for pipes and stdin).
    pub fn comparable(&self) -> bool {
        self.hash.is_some()
    }

    fn describe(&self) -> String {
        let mut s = format!("{} ({})", self.name, self.kind);
        if let Some(b) = self.bytes {
            s += &format!(", {b} bytes");
        }
        if let Some(m) = &self.modified {
            s += &format!(", modified {m}");
        }
        s
    }
}

impl Job {
    /// What differs between the job that made an output (`self`) and this run's (`this`).
    pub fn differences(&self, this: &Job) -> Vec<String> {
        let mut out = Vec::new();
        let diff = |out: &mut Vec<String>, what: &str, old: String, new: String| {
            if old != new {
                out.push(format!("{what} {old} (this run: {new})"));
            }
        };
        diff(&mut out, "shard", self.shard.clone(), this.shard.clone());
        if self.input != this.input {
            let (old, new) = (self.input.describe(), this.input.describe());
            if old == new {
                out.push(format!("input {old} at another path or with other text"));
            } else {
                out.push(format!("input {old} (this run: {new})"));
            }
        }
        let (m0, m1) = (&self.model, &this.model);
        diff(&mut out, "model", m0.name.clone(), m1.name.clone());
        let fp = "model fingerprint";
        diff(&mut out, fp, m0.fingerprint.clone(), m1.fingerprint.clone());
        let show = |v: serde_json::Value| match v {
            serde_json::Value::Null => "unset".to_string(),
            v => v.to_string(),
        };
        let (old, new) = (
            serde_json::to_value(&self.settings).unwrap_or_default(),
            serde_json::to_value(&this.settings).unwrap_or_default(),
        );
        if let (Some(o), Some(n)) = (old.as_object(), new.as_object()) {
            for (k, v) in n {
                let was = o.get(k).cloned().unwrap_or_default();
                diff(&mut out, k, show(was), show(v.clone()));
            }
        }
        out
    }
}

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

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(utc(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(utc(1_735_689_599, 0), "2024-12-31T23:59:59.000000000Z");
    }

    fn job() -> Job {
        Job {
            shard: "0/3".into(),
            input: InputId {
                kind: "file".into(),
                name: "a.txt".into(),
                hash: Some("1".into()),
                bytes: Some(10),
                modified: Some("t".into()),
            },
            model: ModelId {
                name: "m".into(),
                fingerprint: "f".into(),
            },
            settings: Settings {
                format: "jsonl".into(),
                dtype: "f32".into(),
                normalize: None,
                max_seq_length: None,
                truncate_dim: None,
                prompt: None,
                prompt_name: None,
            },
        }
    }

    #[test]
    fn differences_name_each_field() {
        let a = job();
        assert!(a.differences(&a).is_empty());
        let mut b = job();
        b.shard = "0/2".into();
        b.input.bytes = Some(11);
        b.settings.normalize = Some(true);
        let d = a.differences(&b);
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(d[0], "shard 0/3 (this run: 0/2)");
        assert!(d[1].starts_with("input a.txt (file), 10 bytes"), "{d:?}");
        assert_eq!(d[2], "normalize unset (this run: true)");
    }

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
