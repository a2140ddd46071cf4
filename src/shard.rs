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
//! When `--shard` is not given, the index comes from the environment of the common engines,
//! and the count must be pinned (`--shards N` or `FETCH_ML_SHARDS`): Kubernetes Indexed Jobs
//! (`JOB_COMPLETION_INDEX`) and Slurm job arrays (`SLURM_ARRAY_TASK_ID`, taken as the shard
//! index itself). An array's own task count is never used as the shard count: a re-submitted
//! index (`sbatch --array=1`) or an array with a step or gaps would split the input
//! differently from the first submission, silently.

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
    /// Something the log should say about it (a Slurm array that covers only some shards).
    pub note: Option<String>,
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

/// Checks that a sharded `--output` name gives each shard its own file: a name with `{n}`
/// must also have `{i}` or `{shard}` (a name with none of them gets `-{shard}` added).
pub fn check_template(template: &Path) -> Result<()> {
    let s = template.to_string_lossy();
    if s.contains("{n}") && !s.contains("{i}") && !s.contains("{shard}") {
        bail!(
            "{}: {{n}} is the same for every shard, so the shards would share one file; put {{i}} \
             or {{shard}} in the name too, or leave all three out to get -{{shard}} before the \
             extension",
            template.display()
        );
    }
    Ok(())
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
        (None, Some(v)) => match number("FETCH_ML_SHARDS", &v)? {
            0 => bail!("FETCH_ML_SHARDS=0: the number of shards must be 1 or more"),
            n => Some((n, "FETCH_ML_SHARDS")),
        },
        (None, None) => None,
    };
    let k8s = var("JOB_COMPLETION_INDEX");
    let slurm = var("SLURM_ARRAY_TASK_ID");
    let (name, value, engine) = match (k8s, slurm) {
        (Some(_), Some(_)) => bail!(
            "both JOB_COMPLETION_INDEX (Kubernetes) and SLURM_ARRAY_TASK_ID (Slurm) are set, so \
             the shard is ambiguous; pass --shard I/N"
        ),
        (Some(i), None) => ("JOB_COMPLETION_INDEX", i, "Kubernetes Indexed Job"),
        (None, Some(id)) => ("SLURM_ARRAY_TASK_ID", id, "Slurm job array"),
        (None, None) => {
            return match count {
                Some((n, src)) => bail!(
                    "{src} gives {n} shards but not which one this run is: pass --shard I/N, or \
                     run under a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) or a Slurm job \
                     array (SLURM_ARRAY_TASK_ID)"
                ),
                None => Ok(None),
            }
        }
    };
    let index = number(name, &value)?;
    let Some((n, n_source)) = count else {
        bail!(
            "{name}={index} is set (a {engine}) but the number of shards is not: pin it with \
             FETCH_ML_SHARDS=N or --shards N (the size of the whole job, {}), or pass --shard \
             I/N. The count is never guessed from the engine, since a re-submitted part of the \
             job would then split the input differently",
            if name == "JOB_COMPLETION_INDEX" {
                "the Job's completions"
            } else {
                "the full array, --array=0-(N-1)"
            }
        );
    };
    if index >= n {
        bail!(
            "{name}={index} is not below the number of shards {n} ({n_source}); the index is the \
             shard's own, so the {} must run 0 to {}",
            if name == "JOB_COMPLETION_INDEX" {
                "Job's completions"
            } else {
                "array's task ids"
            },
            n - 1
        );
    }
    let note = (name == "SLURM_ARRAY_TASK_ID")
        .then(|| slurm_note(n, var))
        .transpose()?
        .flatten();
    Ok(Some(ShardSpec {
        shard: Shard { index, count: n },
        source: format!("{engine} ({name}={index}, {n_source}={n})"),
        note,
    }))
}

fn number(name: &str, v: &str) -> Result<usize> {
    v.trim().parse::<usize>().map_err(|_| {
        anyhow::anyhow!(
            "{name}={v:?} is not a whole number of 0 or more; it is set by the batch engine (or \
             by you), or pass --shard I/N"
        )
    })
}

/// What a Slurm array's shape says about its coverage of `n` shards, when it runs only some.
fn slurm_note(n: usize, var: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>> {
    let get = |k: &str| -> Result<Option<usize>> { var(k).map(|v| number(k, &v)).transpose() };
    let (min, max) = (get("SLURM_ARRAY_TASK_MIN")?, get("SLURM_ARRAY_TASK_MAX")?);
    let step = get("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1);
    let tasks = get("SLURM_ARRAY_TASK_COUNT")?;
    let (Some(min), Some(max), Some(tasks)) = (min, max, tasks) else {
        return Ok(None);
    };
    if tasks >= n && step <= 1 && min == 0 {
        return Ok(None);
    }
    Ok(Some(format!(
        "this array has {tasks} task(s) (ids {min}-{max}, step {step}) for {n} shards: it runs \
         only the shards whose index is one of its ids; the others need tasks of their own \
         (sbatch --array=0-{})",
        n - 1
    )))
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
        assert!(check_template(Path::new("out/{i}_of_{n}.jsonl")).is_ok());
        assert!(check_template(Path::new("out/{shard}.jsonl")).is_ok());
        assert!(check_template(Path::new("out/emb.jsonl")).is_ok());
        assert!(check_template(Path::new("out/emb-{n}.jsonl")).is_err());
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
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        // `sbatch --array=1`: the count is not guessed from the array.
        let e = from_env(None, &env(&slurm)).unwrap_err();
        assert!(e.to_string().contains("FETCH_ML_SHARDS"), "{e}");
        let s = from_env(Some(3), &env(&slurm)).unwrap().unwrap();
        assert_eq!(s.shard, Shard { index: 1, count: 3 });
        assert!(s.source.contains("SLURM_ARRAY_TASK_ID=1"), "{}", s.source);
        assert!(s.note.as_deref().unwrap().contains("1 task(s)"), "{s:?}");
        let e = from_env(Some(1), &env(&slurm)).unwrap_err();
        assert!(e.to_string().contains("not below"), "{e}");
        // A whole array needs no note.
        let whole = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        let s = from_env(Some(4), &env(&whole)).unwrap().unwrap();
        assert_eq!((s.shard.index, s.note), (2, None));
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
