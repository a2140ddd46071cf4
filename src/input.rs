//! Sentences to work on: from flags, a file, stdin, or the built-in `data/sentences.txt`.
//!
//! Files are read once, in chunks, so a large input streams with flat memory. Blank lines are
//! skipped; a line that is not UTF-8 is an error naming it.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::shard::{self, Shard};

mod line;
use line::{read_line_bounded, read_line_tail};

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

/// Lines with more bytes of text than this (their ending aside) are cut to their first
/// `MAX_LINE_BYTES` (at a character boundary; to their last, for sentences whose left end is
/// cut: [`SentenceReader::keep_line_ends`]), so one huge line cannot take unbounded memory;
/// the rest of the line is still read and checked for UTF-8, but not kept. No tokenizer
/// keeps 512 tokens' worth of text beyond this, so a cut line loses nothing the model would
/// have seen unless it is almost all whitespace; its `truncated` flag is set either way.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A chunk of sentences stops growing once its texts hold this many bytes: 8 lines cut at
/// [`MAX_LINE_BYTES`], or 4,096 sentences of 2 KiB.
pub const CHUNK_BYTES: usize = 8 << 20;

/// Reads sentences in chunks from an [`InputSource`]. Every source is read exactly once, so
/// named pipes and process substitutions (`--input <(...)`) work; UTF-8 is checked as lines
/// stream past, and a bad line is an error naming it.
pub struct SentenceReader {
    lines: Option<Box<dyn BufRead>>,
    given: std::vec::IntoIter<String>,
    name: String,
    line_no: usize,
    bytes_read: u64,
    total_bytes: Option<u64>,
    /// Line number (1-based) of each sentence of the last chunk; for `--sentence`, its position.
    chunk_lines: Vec<usize>,
    /// Whether each sentence of the last chunk was cut at [`MAX_LINE_BYTES`].
    chunk_clipped: Vec<bool>,
    /// Lines cut so far.
    clipped_lines: usize,
    /// Split by line number: only the lines this shard owns are returned.
    owner: Option<Shard>,
    /// Lines before the first one read (a byte-range shard starts past them).
    first_line: usize,
    /// Whether a line cut at [`MAX_LINE_BYTES`] keeps its end rather than its start.
    keep_ends: bool,
}

impl SentenceReader {
    /// Opens the source.
    pub fn open(source: &InputSource) -> Result<Self> {
        Ok(Self::open_shard(source, None)?.0)
    }

    /// Opens the share of `source` that `shard` covers (all of it for `None`), and describes
    /// that share for the log. A regular file is read only over the shard's byte range (see
    /// [`crate::shard`]); any other source is read whole and split by line number.
    pub fn open_shard(source: &InputSource, shard: Option<Shard>) -> Result<(Self, String)> {
        let mut owner = shard;
        let mut first_line = 0usize;
        let mut share = String::new();
        let (lines, given, total): (Option<Box<dyn BufRead>>, Vec<String>, Option<u64>) =
            match source {
                InputSource::Sentences(v) => (None, v.clone(), Some(v.len() as u64)),
                InputSource::File(path) => {
                    let mut f = open_file(path)?;
                    // Only a regular file has a size worth showing progress against.
                    let len = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
                    match (shard, len) {
                        (Some(s), Some(len)) => {
                            let r = shard::byte_range(&f, len, s).with_context(|| {
                                format!("--input {}: reading the shard boundaries", path.display())
                            })?;
                            f.seek(SeekFrom::Start(r.start))
                                .with_context(|| format!("--input {}", path.display()))?;
                            owner = None;
                            first_line = r.first_line as usize;
                            share = format!(
                                "bytes {}..{} of {len} of {}, from line {} ({} newline(s) \
                                 counted before it)",
                                r.start,
                                r.end,
                                path.display(),
                                r.first_line + 1,
                                r.first_line
                            );
                            let part = f.take(r.end - r.start);
                            (
                                Some(Box::new(BufReader::with_capacity(1 << 16, part))),
                                vec![],
                                Some(r.end - r.start),
                            )
                        }
                        _ => (
                            Some(Box::new(BufReader::with_capacity(1 << 16, f))),
                            vec![],
                            len,
                        ),
                    }
                }
                InputSource::Stdin => (
                    Some(Box::new(BufReader::with_capacity(
                        1 << 16,
                        std::io::stdin(),
                    ))),
                    vec![],
                    None,
                ),
                InputSource::Default => (
                    Some(Box::new(Cursor::new(DEFAULT_SENTENCES.as_bytes()))),
                    vec![],
                    Some(DEFAULT_SENTENCES.len() as u64),
                ),
            };
        if let Some(s) = owner {
            share = read_whole(source, s);
        }
        let reader = Self {
            lines,
            given: given.into_iter(),
            name: source.describe(),
            line_no: first_line,
            bytes_read: 0,
            total_bytes: total,
            chunk_lines: Vec::new(),
            chunk_clipped: Vec::new(),
            clipped_lines: 0,
            owner,
            first_line,
            keep_ends: false,
        };
        Ok((reader, share))
    }

    /// Lines cut at [`MAX_LINE_BYTES`] keep their last bytes from here on (for sentences
    /// whose left end is cut), not their first.
    pub fn keep_line_ends(&mut self) {
        self.keep_ends = true;
    }

    /// The 1-based numbers of the first and last line read so far (`first > last` when none).
    pub fn lines_read(&self) -> (usize, usize) {
        (self.first_line + 1, self.line_no)
    }

    /// A short name of the source, for messages.
    pub fn name(&self) -> &str {
        &self.name
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

    /// The line number (1-based) of sentence `i` of the last chunk.
    pub fn line_of(&self, i: usize) -> usize {
        self.chunk_lines.get(i).copied().unwrap_or(0)
    }

    /// Names sentence `i` of the last chunk for a message: its file and line, or its flag.
    pub fn locate(&self, i: usize) -> String {
        match self.lines {
            Some(_) => format!("{}, line {}", self.name, self.line_of(i)),
            None => format!("--sentence number {}", self.line_of(i)),
        }
    }

    /// Whether sentence `i` of the last chunk was cut at [`MAX_LINE_BYTES`].
    pub fn clipped(&self, i: usize) -> bool {
        self.chunk_clipped.get(i).copied().unwrap_or(false)
    }

    /// Lines cut at [`MAX_LINE_BYTES`] so far.
    pub fn clipped_lines(&self) -> usize {
        self.clipped_lines
    }

    /// Up to `max` more sentences, and no more once they hold `CHUNK_BYTES` bytes of text
    /// (so a chunk's memory is bounded whatever the line lengths); empty at the end.
    pub fn next_chunk(&mut self, max: usize) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        self.chunk_lines.clear();
        self.chunk_clipped.clear();
        let owns = |owner: Option<Shard>, line_no: usize| {
            owner.is_none_or(|s| s.owns_line(line_no as u64 - 1))
        };
        let Some(reader) = self.lines.as_mut() else {
            while out.len() < max && bytes < CHUNK_BYTES {
                let Some(s) = self.given.next() else { break };
                self.line_no += 1;
                if owns(self.owner, self.line_no) {
                    bytes += s.len();
                    out.push(s);
                    self.chunk_lines.push(self.line_no);
                    self.chunk_clipped.push(false);
                }
            }
            return Ok(out);
        };
        let mut buf = Vec::new();
        let read = match self.keep_ends {
            true => read_line_tail,
            false => read_line_bounded,
        };
        while out.len() < max && bytes < CHUNK_BYTES {
            buf.clear();
            let line = read(reader.as_mut(), MAX_LINE_BYTES, &mut buf)
                .with_context(|| format!("reading {}", self.name))?;
            if line.bytes == 0 {
                break;
            }
            self.line_no += 1;
            self.bytes_read += line.bytes;
            if !owns(self.owner, self.line_no) {
                continue;
            }
            if let Some(col) = line.bad_utf8_at {
                bail!(
                    "{}, line {}: not valid UTF-8 (bad byte at column {col}); save the file as UTF-8",
                    self.name,
                    self.line_no
                );
            }
            let text = line_text(&buf, &self.name, self.line_no)?;
            if !text.trim().is_empty() {
                bytes += text.len();
                out.push(text.to_string());
                self.chunk_lines.push(self.line_no);
                self.chunk_clipped.push(line.clipped);
                self.clipped_lines += line.clipped as usize;
            }
        }
        Ok(out)
    }
}

/// Describes the share of a source that is not a regular file: read whole, split by line.
fn read_whole(source: &InputSource, s: Shard) -> String {
    format!(
        "{} is not a regular file, so it is read whole: lines L (0-based) with L mod {} = {}",
        source.describe(),
        s.count,
        s.index
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_holds_a_bounded_number_of_bytes() {
        let big = "x".repeat(MAX_LINE_BYTES);
        let source = InputSource::Sentences(vec![big; 20]);
        let mut r = SentenceReader::open(&source).unwrap();
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let c = r.next_chunk(4096).unwrap();
            (!c.is_empty()).then_some(c.len())
        })
        .collect();
        assert_eq!(sizes, [8, 8, 4]);
        let source = InputSource::Sentences(vec!["short".to_string(); 5000]);
        let mut r = SentenceReader::open(&source).unwrap();
        assert_eq!(r.next_chunk(4096).unwrap().len(), 4096);
    }
}
