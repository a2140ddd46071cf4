//! Sharded runs: which share of the input one run embeds, where its output goes, and whether
//! that output is already complete.
//!
//! A shard is `I/N` (0-based `I < N`). Every shard computes its share on its own, from the
//! input alone, so N runs started by a batch engine (a Kubernetes Indexed Job, a Slurm job
//! array, a Ray or Spark task per shard) cover the input exactly once between them:
//!
//! - A regular file is cut into N contiguous byte ranges of equal size, each boundary moved
//!   forward to the next line start. Shard I reads only its own range, plus at most one line
//!   past each end to find the boundaries; the global line number of its first line comes from
//!   counting newline bytes before its range (a `memchr` scan, no UTF-8 work).
//! - Anything else (standard input, a named pipe, `--sentence`, the built-in sentences) is read
//!   whole and split by line number: line L (0-based) belongs to shard `L mod N`.
//!
//! When `--shard` is not given, the index and count come from the environment of the common
//! engines: Kubernetes Indexed Jobs (`JOB_COMPLETION_INDEX`, with the count from `--shards` or
//! `FETCH_ML_SHARDS`) and Slurm job arrays (`SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of
//! `SLURM_ARRAY_TASK_COUNT`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// One shard of N: this run embeds only its share of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based.
    pub index: usize,
    /// The number of shards, 1 or more.
    pub count: usize,
}

/// Where a run's shard came from, for the log line that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub shard: Shard,
    /// E.g. `--shard 1/3`, or `Kubernetes Indexed Job (JOB_COMPLETION_INDEX=1, FETCH_ML_SHARDS=3)`.
    pub source: String,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Parses `I/N` as given to `--shard`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("expected I/N with 0 <= I < N, e.g. 0/4 for the first of 4 shards, got '{s}'")
        };
        let (i, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// Whether 0-based line `line` belongs to this shard when the input is split by line number.
    pub fn owns_line(&self, line: u64) -> bool {
        line % self.count as u64 == self.index as u64
    }

    /// `00001-of-00003`: the index and count zero-padded to 5 digits, so names sort in order.
    pub fn tag(&self) -> String {
        format!("{:05}-of-{:05}", self.index, self.count)
    }

    /// The output path of this shard for `--output template`. `{shard}` becomes
    /// [`Shard::tag`], `{i}` the index and `{n}` the count; a template with none of them gets
    /// `-{shard}` before its extension (`emb.parquet` -> `emb-00001-of-00003.parquet`).
    pub fn output_path(&self, template: &Path) -> PathBuf {
        let s = template.to_string_lossy();
        if has_placeholder(template) {
            return PathBuf::from(
                s.replace("{shard}", &self.tag())
                    .replace("{i}", &self.index.to_string())
                    .replace("{n}", &self.count.to_string()),
            );
        }
        let name = template
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let new_name = match name.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{}.{ext}", self.tag()),
            _ => format!("{name}-{}", self.tag()),
        };
        template.with_file_name(new_name)
    }
}

/// Whether an `--output` path has a shard placeholder (`{shard}`, `{i}` or `{n}`).
pub fn has_placeholder(path: &Path) -> bool {
    let s = path.to_string_lossy();
    ["{shard}", "{i}", "{n}"].iter().any(|p| s.contains(p))
}

/// The shard to run when `--shard` is not given: from a Kubernetes Indexed Job or a Slurm
/// job array, or none. `shards` is `--shards`; `FETCH_ML_SHARDS` stands in for it. `var`
/// reads an environment variable. Bad or inconsistent values are errors naming the variable.
pub fn from_env(
    shards: Option<usize>,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ShardSpec>> {
    let count: Option<(usize, &str)> = match (shards, var("FETCH_ML_SHARDS")) {
        (Some(n), _) => Some((n, "--shards")),
        (None, Some(v)) => match env_number("FETCH_ML_SHARDS", &v)? {
            0 => bail!("FETCH_ML_SHARDS=0: the number of shards must be 1 or more"),
            n => Some((n, "FETCH_ML_SHARDS")),
        },
        (None, None) => None,
    };
    match (var("JOB_COMPLETION_INDEX"), var("SLURM_ARRAY_TASK_ID")) {
        (Some(_), Some(_)) => bail!(
            "both JOB_COMPLETION_INDEX (Kubernetes) and SLURM_ARRAY_TASK_ID (Slurm) are set, so \
             the shard is ambiguous; pass --shard I/N"
        ),
        (Some(i), None) => kubernetes_shard(&i, count).map(Some),
        (None, Some(id)) => slurm_shard(&id, count, var).map(Some),
        (None, None) => match count {
            Some((n, src)) => bail!(
                "{src} gives {n} shards but not which one this run is: pass --shard I/N, or run \
                 under a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) or a Slurm job array"
            ),
            None => Ok(None),
        },
    }
}

/// The value `v` of the environment variable `name` as a count or index.
fn env_number(name: &str, v: &str) -> Result<usize> {
    v.trim().parse::<usize>().map_err(|_| {
        anyhow::anyhow!(
            "{name}={v:?} is not a whole number of 0 or more; it is set by the batch \
             engine (or by you), or pass --shard I/N"
        )
    })
}

/// A Kubernetes Indexed Job's shard: `JOB_COMPLETION_INDEX` of `count` (which it does not
/// carry).
fn kubernetes_shard(index: &str, count: Option<(usize, &str)>) -> Result<ShardSpec> {
    let index = env_number("JOB_COMPLETION_INDEX", index)?;
    let Some((n, n_source)) = count else {
        bail!(
            "JOB_COMPLETION_INDEX={index} is set (a Kubernetes Indexed Job) but the number \
             of shards is not: pass --shards N or set FETCH_ML_SHARDS=N (the Job's \
             completions), or pass --shard 0/1 to embed the whole input"
        );
    };
    if index >= n {
        bail!(
            "JOB_COMPLETION_INDEX={index} is not below the number of shards {n} \
             ({n_source}); the Job's completions and the shard count must agree"
        );
    }
    Ok(ShardSpec {
        shard: Shard { index, count: n },
        source: format!("Kubernetes Indexed Job (JOB_COMPLETION_INDEX={index}, {n_source}={n})"),
    })
}

/// A Slurm job array's shard: `SLURM_ARRAY_TASK_ID` less `SLURM_ARRAY_TASK_MIN`, of `count`
/// or else `SLURM_ARRAY_TASK_COUNT`.
fn slurm_shard(
    id: &str,
    count: Option<(usize, &str)>,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<ShardSpec> {
    let id = env_number("SLURM_ARRAY_TASK_ID", id)?;
    let min = match var("SLURM_ARRAY_TASK_MIN") {
        Some(v) => env_number("SLURM_ARRAY_TASK_MIN", &v)?,
        None => bail!(
            "SLURM_ARRAY_TASK_ID={id} is set but SLURM_ARRAY_TASK_MIN is not; run under \
             a Slurm job array (sbatch --array=0-N), or pass --shard I/N"
        ),
    };
    let (n, n_source) = match (count, var("SLURM_ARRAY_TASK_COUNT")) {
        (Some((n, src)), _) => (n, src.to_string()),
        (None, Some(v)) => (
            env_number("SLURM_ARRAY_TASK_COUNT", &v)?,
            "SLURM_ARRAY_TASK_COUNT".to_string(),
        ),
        (None, None) => bail!(
            "SLURM_ARRAY_TASK_ID={id} is set but SLURM_ARRAY_TASK_COUNT is not; pass \
             --shards N, or --shard I/N"
        ),
    };
    if id < min || id - min >= n || n == 0 {
        bail!(
            "SLURM_ARRAY_TASK_ID={id} minus SLURM_ARRAY_TASK_MIN={min} is not below the \
             number of shards {n} ({n_source}); use a contiguous array without a step \
             (sbatch --array=0-{}), or pass --shard I/N",
            n.saturating_sub(1)
        );
    }
    let index = id - min;
    Ok(ShardSpec {
        shard: Shard { index, count: n },
        source: format!(
            "Slurm job array (SLURM_ARRAY_TASK_ID={id} - SLURM_ARRAY_TASK_MIN={min}, \
             {n_source}={n})"
        ),
    })
}

/// The byte range `[start, end)` of a regular file that shard `shard` reads, and the number of
/// lines before `start` (the 0-based global line number of its first line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
    pub first_line: u64,
}

/// Splits a file of `len` bytes for `shard`: equal byte ranges, each boundary moved forward to
/// the next line start (the byte after a `\n`, or the end of the file). Reads at most one line
/// past each nominal boundary, and counts the newlines before `start`.
pub fn byte_range(file: &File, len: u64, shard: Shard) -> std::io::Result<ByteRange> {
    let nominal = |k: usize| -> u64 { (len as u128 * k as u128 / shard.count as u128) as u64 };
    let start = snap_to_line_start(file, nominal(shard.index), len)?;
    let end = snap_to_line_start(file, nominal(shard.index + 1), len)?;
    let first_line = count_newlines(file, start)?;
    Ok(ByteRange {
        start,
        end: end.max(start),
        first_line,
    })
}

const SCAN: usize = 1 << 16;

/// The first line start at or after `pos`.
fn snap_to_line_start(file: &File, pos: u64, len: u64) -> std::io::Result<u64> {
    if pos == 0 || pos >= len {
        return Ok(pos.min(len));
    }
    let mut prev = [0u8; 1];
    file.read_exact_at(&mut prev, pos - 1)?;
    if prev[0] == b'\n' {
        return Ok(pos);
    }
    let mut buf = vec![0u8; SCAN];
    let mut at = pos;
    while at < len {
        let n = ((len - at) as usize).min(SCAN);
        file.read_exact_at(&mut buf[..n], at)?;
        if let Some(i) = memchr::memchr(b'\n', &buf[..n]) {
            return Ok(at + i as u64 + 1);
        }
        at += n as u64;
    }
    Ok(len)
}

/// Newline bytes in `[0, end)`.
fn count_newlines(file: &File, end: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut lines) = (0u64, 0u64);
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        at += n as u64;
    }
    Ok(lines)
}

/// Whether every one of `paths` exists: outputs appear only by rename once complete, so an
/// existing output is a complete one.
pub fn outputs_exist(paths: &[PathBuf]) -> bool {
    !paths.is_empty() && paths.iter().all(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn parse_accepts_i_of_n_only() {
        assert_eq!(Shard::parse("2/3"), Ok(Shard { index: 2, count: 3 }));
        assert_eq!(Shard::parse("0/1"), Ok(Shard { index: 0, count: 1 }));
        for bad in ["3/3", "0/0", "1", "-1/3", "a/b", "1/3/4", ""] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn output_paths() {
        let s = Shard { index: 1, count: 3 };
        let p = |t: &str| s.output_path(Path::new(t)).display().to_string();
        assert_eq!(p("out/emb.parquet"), "out/emb-00001-of-00003.parquet");
        assert_eq!(p("out/emb"), "out/emb-00001-of-00003");
        assert_eq!(p("out/.hidden"), "out/.hidden-00001-of-00003");
        assert_eq!(p("out/part-{shard}.npy"), "out/part-00001-of-00003.npy");
        assert_eq!(p("out/{i}_of_{n}.jsonl"), "out/1_of_3.jsonl");
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| m.get(k).cloned()
    }

    #[test]
    fn environment_of_the_engines() {
        assert_eq!(from_env(None, &env(&[])).unwrap(), None);
        let k = from_env(Some(4), &env(&[("JOB_COMPLETION_INDEX", "3")]))
            .unwrap()
            .unwrap();
        assert_eq!(k.shard, Shard { index: 3, count: 4 });
        assert!(k.source.contains("JOB_COMPLETION_INDEX=3"));
        let e = from_env(None, &env(&[("JOB_COMPLETION_INDEX", "3")])).unwrap_err();
        assert!(e.to_string().contains("--shards"), "{e}");
        let e = from_env(Some(3), &env(&[("JOB_COMPLETION_INDEX", "3")])).unwrap_err();
        assert!(e.to_string().contains("JOB_COMPLETION_INDEX=3"), "{e}");
        let e = from_env(Some(3), &env(&[("JOB_COMPLETION_INDEX", "x")])).unwrap_err();
        assert!(e.to_string().contains("JOB_COMPLETION_INDEX=\"x\""), "{e}");
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        let s = from_env(None, &env(&slurm)).unwrap().unwrap();
        assert_eq!(s.shard, Shard { index: 2, count: 3 });
        assert!(s.source.contains("SLURM_ARRAY_TASK_ID=7"), "{}", s.source);
        let e = from_env(Some(2), &env(&slurm)).unwrap_err();
        assert!(e.to_string().contains("contiguous"), "{e}");
        let e = from_env(None, &env(&slurm[..2])).unwrap_err();
        assert!(e.to_string().contains("SLURM_ARRAY_TASK_COUNT"), "{e}");
        let e = from_env(Some(2), &env(&[])).unwrap_err();
        assert!(e.to_string().contains("--shards gives 2 shards"), "{e}");
        let k = from_env(
            None,
            &env(&[("JOB_COMPLETION_INDEX", "0"), ("FETCH_ML_SHARDS", "2")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(k.shard, Shard { index: 0, count: 2 });
        assert!(k.source.contains("FETCH_ML_SHARDS=2"), "{}", k.source);
    }

    #[test]
    fn byte_ranges_cover_the_file_once_at_line_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        let text = b"a\n\nbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\ncc\nd\n\neee";
        std::fs::write(&path, text).unwrap();
        let f = File::open(&path).unwrap();
        let len = text.len() as u64;
        for n in 1..=12 {
            let mut at = 0;
            for i in 0..n {
                let r = byte_range(&f, len, Shard { index: i, count: n }).unwrap();
                assert_eq!(r.start, at, "shard {i}/{n} starts where the last ended");
                assert!(r.start == 0 || text[r.start as usize - 1] == b'\n');
                let before = text[..r.start as usize].iter().filter(|&&b| b == b'\n');
                assert_eq!(r.first_line, before.count() as u64);
                at = r.end;
            }
            assert_eq!(at, len);
        }
    }
}
