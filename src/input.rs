//! Sentences to work on: from flags, a file, stdin, or the built-in `data/sentences.txt`.
//!
//! Files are read in chunks, so a large input streams with flat memory. Blank lines are
//! skipped; a line that is not UTF-8 is an error naming it.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The sentences shipped with the tool, used when no input is given.
pub const DEFAULT_SENTENCES: &str = include_str!("../data/sentences.txt");

/// Where sentences come from.
#[derive(Debug, Clone, PartialEq)]
pub enum InputSource {
    /// Given on the command line, used as is (an empty string is a sentence too).
    Sentences(Vec<String>),
    /// One sentence per line.
    File(PathBuf),
    /// One sentence per line on standard input.
    Stdin,
    /// The built-in `data/sentences.txt`.
    Default,
}

impl InputSource {
    /// A short name for messages.
    pub fn describe(&self) -> String {
        match self {
            InputSource::Sentences(v) => format!("{} sentence(s) from --sentence", v.len()),
            InputSource::File(p) => p.display().to_string(),
            InputSource::Stdin => "standard input".into(),
            InputSource::Default => "the built-in data/sentences.txt".into(),
        }
    }
}

/// Reads sentences in chunks from an [`InputSource`].
pub struct SentenceReader {
    lines: Option<Box<dyn BufRead>>,
    given: std::vec::IntoIter<String>,
    name: String,
    line_no: usize,
    bytes_read: u64,
    total_bytes: Option<u64>,
}

impl SentenceReader {
    /// Opens the source. A file is checked for valid UTF-8 first, so a bad line is reported
    /// before any output is produced.
    pub fn open(source: &InputSource) -> Result<Self> {
        let (lines, given, total): (Option<Box<dyn BufRead>>, Vec<String>, Option<u64>) =
            match source {
                InputSource::Sentences(v) => (None, v.clone(), Some(v.len() as u64)),
                InputSource::File(path) => {
                    check_utf8(path)?;
                    let f = open_file(path)?;
                    let len = f.metadata().map(|m| m.len()).ok();
                    (
                        Some(Box::new(BufReader::with_capacity(1 << 16, f))),
                        vec![],
                        len,
                    )
                }
                InputSource::Stdin => (
                    Some(Box::new(BufReader::new(std::io::stdin()))),
                    vec![],
                    None,
                ),
                InputSource::Default => (
                    Some(Box::new(Cursor::new(DEFAULT_SENTENCES.as_bytes()))),
                    vec![],
                    Some(DEFAULT_SENTENCES.len() as u64),
                ),
            };
        Ok(Self {
            lines,
            given: given.into_iter(),
            name: source.describe(),
            line_no: 0,
            bytes_read: 0,
            total_bytes: total,
        })
    }

    /// Progress so far and the total, in bytes for files and in sentences for `--sentence`.
    pub fn progress(&self) -> (u64, Option<u64>) {
        match self.lines {
            Some(_) => (self.bytes_read, self.total_bytes),
            None => (
                self.total_bytes.unwrap_or(0) - self.given.len() as u64,
                self.total_bytes,
            ),
        }
    }

    /// Up to `max` more sentences; empty at the end.
    pub fn next_chunk(&mut self, max: usize) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let Some(reader) = self.lines.as_mut() else {
            out.extend(self.given.by_ref().take(max));
            return Ok(out);
        };
        let mut buf = Vec::new();
        while out.len() < max {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("reading {}", self.name))?;
            if n == 0 {
                break;
            }
            self.line_no += 1;
            self.bytes_read += n as u64;
            let line = line_text(&buf, &self.name, self.line_no)?;
            if !line.trim().is_empty() {
                out.push(line.to_string());
            }
        }
        Ok(out)
    }
}

fn open_file(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("--input {}: cannot open the file", path.display()))
}

/// The text of one raw line, without its line ending.
fn line_text<'a>(raw: &'a [u8], name: &str, line_no: usize) -> Result<&'a str> {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    match std::str::from_utf8(raw) {
        Ok(s) => Ok(s),
        Err(e) => bail!(
            "{name}, line {line_no}: not valid UTF-8 (bad byte at column {}); save the file as UTF-8",
            e.valid_up_to() + 1
        ),
    }
}

/// Reads the whole file once to find a line that is not UTF-8.
fn check_utf8(path: &Path) -> Result<()> {
    let mut reader = BufReader::with_capacity(1 << 16, open_file(path)?);
    let name = path.display().to_string();
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader
            .by_ref()
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {name}"))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        line_text(&buf, &name, line_no)?;
    }
}

/// All sentences of a source at once (for small inputs such as predictions).
pub fn read_all(source: &InputSource) -> Result<Vec<String>> {
    let mut reader = SentenceReader::open(source)?;
    let mut all = Vec::new();
    loop {
        let chunk = reader.next_chunk(4096)?;
        if chunk.is_empty() {
            return Ok(all);
        }
        all.extend(chunk);
    }
}
