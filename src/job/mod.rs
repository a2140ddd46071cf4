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
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::hub::{ModelFiles, TokenizerFiles};
use crate::input::InputSource;

mod record;

pub use record::{existing, file_sum_as, record_path, remove_record, write_record, FileSum};

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
    /// `left` when long inputs keep their last tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_side: Option<String>,
    /// Long inputs split into windows: `TOKENS/OVERLAP/MODE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunking: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(utc(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(utc(1_735_689_599, 0), "2024-12-31T23:59:59.000000000Z");
    }

    pub(super) fn job() -> Job {
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
                truncate_side: None,
                chunking: None,
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
}
