//! The text formats of `--task=1` (text, JSONL, JSON), streamed one sentence at a time, and
//! [`Meta`], the description of a whole output (also the Parquet file's metadata).

use std::io::Write;

use anyhow::Result;

use crate::columnar::RowWindow;
use crate::config::Format;
use crate::embed::Embedding;
use crate::job::Job;

/// The cosine matrix is printed for at most this many sentences.
const MATRIX_MAX: usize = 20;

/// What describes the whole output.
#[derive(serde::Serialize)]
pub struct Meta {
    /// A hub id, or a local folder's name (not its path on this machine).
    pub model: String,
    pub revision: Option<String>,
    /// A hash of the model's files; see [`crate::job::model_fingerprint`].
    pub model_fingerprint: String,
    pub dimension: usize,
    pub normalized: bool,
    pub pooling: &'static str,
    pub max_seq_length: usize,
    pub dtype: &'static str,
    /// The text prepended to every sentence, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// `I/N` in a sharded run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// What made a sharded run's output, compared before a retry skips it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// `left` when long inputs keep their last tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncate_side: Option<&'static str>,
    /// Long inputs split into windows of this many tokens (`--chunk-tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_overlap: Option<usize>,
    /// `mean` (one vector per input) or `rows` (one row per window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<&'static str>,
}

/// One sentence in the JSON formats; f32 values print in their shortest exact form.
#[derive(serde::Serialize)]
struct Record<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u64>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    window: Option<RowWindow>,
    text: &'a str,
    tokens: usize,
    truncated: bool,
    embedding: &'a [f32],
}

/// Streams one output format.
pub struct Printer {
    format: Format,
    meta: Meta,
    /// The first sentences, kept for the similarity matrix of the text format.
    head: Vec<(String, Vec<f32>)>,
}

impl Printer {
    pub fn new(format: Format, meta: Meta) -> Self {
        Self {
            format,
            meta,
            head: Vec::new(),
        }
    }

    pub fn begin(&self, out: &mut dyn Write) -> Result<()> {
        let m = &self.meta;
        match self.format {
            Format::Text => writeln!(
                out,
                "model {}: {} dimensions, {} pooling, {}, max {} tokens",
                m.model,
                m.dimension,
                m.pooling,
                if m.normalized {
                    "L2-normalized"
                } else {
                    "not normalized"
                },
                m.max_seq_length
            )?,
            Format::Jsonl => {}
            Format::Json => {
                let header = serde_json::to_string(m)?;
                // Re-open the object to stream the embeddings array into it.
                write!(out, "{},\"embeddings\":[", header.trim_end_matches('}'))?;
            }
        }
        Ok(())
    }

    /// Row number `n` of the run, from line `index` (0-based) of the input.
    pub fn item(
        &mut self,
        out: &mut dyn Write,
        n: usize,
        index: u64,
        text: &str,
        e: &Embedding,
        window: Option<RowWindow>,
    ) -> Result<()> {
        match self.format {
            Format::Text => {
                let norm = e.vector.iter().map(|v| v * v).sum::<f32>().sqrt();
                let first: Vec<String> = e
                    .vector
                    .iter()
                    .take(8)
                    .map(|v| format!("{v:+.4}"))
                    .collect();
                match window {
                    Some(w) => writeln!(
                        out,
                        "[{}] window {} of input {}, characters {}-{}: {}",
                        n + 1,
                        w.window,
                        index,
                        w.char_start,
                        w.char_end,
                        clip(text, 100)
                    )?,
                    None => writeln!(out, "[{}] {}", n + 1, clip(text, 100))?,
                }
                writeln!(
                    out,
                    "    {} tokens{}  norm {norm:.4}  [{}, ...]",
                    e.tokens,
                    if e.truncated { " (truncated)" } else { "" },
                    first.join(", ")
                )?;
                if self.head.len() <= MATRIX_MAX {
                    self.head.push((text.to_string(), e.vector.clone()));
                }
            }
            Format::Jsonl => {
                let obj = Record {
                    index: Some(index),
                    window,
                    text,
                    tokens: e.tokens,
                    truncated: e.truncated,
                    embedding: &e.vector,
                };
                writeln!(out, "{}", serde_json::to_string(&obj)?)?;
            }
            Format::Json => {
                let obj = Record {
                    index: window.map(|_| index),
                    window,
                    text,
                    tokens: e.tokens,
                    truncated: e.truncated,
                    embedding: &e.vector,
                };
                let sep = if n == 0 { "" } else { "," };
                write!(out, "{sep}{}", serde_json::to_string(&obj)?)?;
            }
        }
        Ok(())
    }

    pub fn end(&self, out: &mut dyn Write, count: usize) -> Result<()> {
        match self.format {
            Format::Text if count <= MATRIX_MAX && count > 1 => {
                writeln!(out, "\ncosine similarity")?;
                write!(out, "{:>6}", "")?;
                for j in 0..count {
                    write!(out, "{:>7}", format!("[{}]", j + 1))?;
                }
                writeln!(out)?;
                for (i, (_, a)) in self.head.iter().enumerate() {
                    write!(out, "{:>6}", format!("[{}]", i + 1))?;
                    for (_, b) in &self.head {
                        write!(out, "{:>7.3}", cosine(a, b))?;
                    }
                    writeln!(out)?;
                }
            }
            Format::Text | Format::Jsonl => {}
            Format::Json => writeln!(out, "],\"count\":{count}}}")?,
        }
        Ok(())
    }
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// `text` cut to `max` characters, with an ellipsis when cut.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        text.chars().take(max - 1).collect::<String>() + "…"
    }
}
