//! `--task=1`: embed sentences and print them as text, JSONL or JSON.

use std::io::Write;

use anyhow::{bail, Result};
use candle_core::Device;

use crate::config::{EmbedConfig, Format};
use crate::embed::{Embedder, Embedding};
use crate::input::{SentenceReader, MAX_LINE_BYTES};
use crate::loader::ModelAssets;
use crate::model::quant::Dtype;
use crate::output::{progress_bar, Output};
use crate::tokenize::name_sentence;

/// Sentences read and embedded per step; bounds memory whatever the input size.
const CHUNK: usize = 4096;
/// The cosine matrix is printed for at most this many sentences.
const MATRIX_MAX: usize = 20;

/// What describes the whole output.
#[derive(serde::Serialize)]
struct Meta {
    model: String,
    revision: Option<String>,
    dimension: usize,
    normalized: bool,
    pooling: &'static str,
    max_seq_length: usize,
    dtype: &'static str,
    /// The text prepended to every sentence, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<String>,
}

pub fn run(cfg: &EmbedConfig) -> Result<()> {
    let assets = ModelAssets::load(&cfg.model, cfg.max_seq_length)?;
    let device = Device::Cpu;
    // The float32 dense weights are dropped once converted: only one copy stays resident.
    let encoder = assets.inference_encoder(cfg.dtype, &device)?;
    if cfg.dtype != Dtype::F32 {
        eprintln!(
            "encoder in {}: dense layers on the {} kernel",
            cfg.dtype,
            encoder.kernel_name()
        );
    }
    let mut embedder = Embedder::with_fast(
        &encoder,
        &assets.tokenizer,
        assets.pipeline.pooling,
        cfg.normalize.unwrap_or(assets.pipeline.normalize),
        cfg.batch_size,
    );
    embedder.max_batch_tokens = cfg.max_batch_tokens;
    embedder.dense = &assets.pipeline.dense;
    let mut dimension = assets.pipeline.dimension(assets.config.hidden_size);
    if let Some(n) = cfg.truncate_dim {
        if n > dimension {
            bail!("--truncate-dim {n} is larger than the model's {dimension} dimensions");
        }
        embedder.truncate_dim = Some(n);
        dimension = n;
    }
    embedder.prompt = assets
        .pipeline
        .resolve_prompt(cfg.prompt.as_deref(), cfg.prompt_name.as_deref())?;
    if let (Some(p), None, None) = (&embedder.prompt, &cfg.prompt, &cfg.prompt_name) {
        eprintln!("note: the model's default prompt {p:?} is prepended to every sentence");
    }
    let meta = Meta {
        model: cfg.model.id.clone(),
        revision: (!cfg.model.is_local()).then(|| cfg.model.revision.clone()),
        dimension,
        normalized: embedder.normalize,
        pooling: embedder.pooling.name(),
        max_seq_length: assets.tokenizer.max_len(),
        dtype: cfg.dtype.name(),
        prompt: embedder.prompt.clone(),
    };

    let mut reader = SentenceReader::open(&cfg.input)?;
    let mut out = Output::create(cfg.output.as_deref())?;
    let mut printer = Printer::new(cfg.format, meta);
    let mut written = false;
    let streamed = stream(&mut reader, &embedder, &mut printer, &mut out, &mut written);
    let (count, truncated) = match streamed {
        Ok(counts) => counts,
        // A file output is simply never renamed into place; standard output is already out.
        Err(e) if written && out.is_stdout() => {
            return Err(
                e.context("stopped early: what was written to standard output is incomplete")
            )
        }
        Err(e) => return Err(e),
    };
    if count == 0 {
        bail!(
            "{} has no sentences (blank lines are skipped); give text with --sentence or --input",
            cfg.input.describe()
        );
    }
    printer.end(&mut out, count)?;
    out.finish()?;
    if reader.clipped_lines() > 0 {
        eprintln!(
            "note: {} line(s) were longer than {} MiB; only their first {} MiB was read",
            reader.clipped_lines(),
            MAX_LINE_BYTES >> 20,
            MAX_LINE_BYTES >> 20
        );
    }
    if truncated > 0 {
        eprintln!(
            "note: {truncated} of {count} sentence(s) were longer than {} tokens and were \
             truncated; --max-seq-length sets the limit (at most {})",
            printer.meta.max_seq_length,
            assets.config.max_tokens()
        );
    }
    Ok(())
}

/// Embeds and prints every sentence of `reader`; returns the count and how many were
/// truncated. `written` turns true once anything went to `out`.
fn stream(
    reader: &mut SentenceReader,
    embedder: &Embedder,
    printer: &mut Printer,
    out: &mut Output,
    written: &mut bool,
) -> Result<(usize, usize)> {
    let (_, total) = reader.progress();
    let bar = progress_bar(total, "embedding");
    let (mut count, mut truncated) = (0usize, 0usize);
    loop {
        let chunk = reader.next_chunk(CHUNK)?;
        if chunk.is_empty() {
            break;
        }
        let embeddings = embedder
            .embed(&chunk)
            .map_err(|e| name_sentence(e, |i| reader.locate(i)))?;
        if count == 0 {
            *written = true;
            printer.begin(out)?;
        }
        for (i, (text, e)) in chunk.iter().zip(embeddings).enumerate() {
            let mut e = e;
            e.truncated |= reader.clipped(i);
            printer.item(out, count, text, &e)?;
            count += 1;
            truncated += e.truncated as usize;
        }
        bar.set_position(reader.progress().0);
    }
    bar.finish_and_clear();
    if count == 0 {
        *written = true;
        printer.begin(out)?;
    }
    Ok((count, truncated))
}

/// One sentence in the JSON formats; f32 values print in their shortest exact form.
#[derive(serde::Serialize)]
struct Record<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    text: &'a str,
    tokens: usize,
    truncated: bool,
    embedding: &'a [f32],
}

/// Streams one output format.
struct Printer {
    format: Format,
    meta: Meta,
    /// The first sentences, kept for the similarity matrix of the text format.
    head: Vec<(String, Vec<f32>)>,
}

impl Printer {
    fn new(format: Format, meta: Meta) -> Self {
        Self {
            format,
            meta,
            head: Vec::new(),
        }
    }

    fn begin(&self, out: &mut dyn Write) -> Result<()> {
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

    fn item(&mut self, out: &mut dyn Write, index: usize, text: &str, e: &Embedding) -> Result<()> {
        match self.format {
            Format::Text => {
                let norm = e.vector.iter().map(|v| v * v).sum::<f32>().sqrt();
                let first: Vec<String> = e
                    .vector
                    .iter()
                    .take(8)
                    .map(|v| format!("{v:+.4}"))
                    .collect();
                writeln!(out, "[{}] {}", index + 1, clip(text, 100))?;
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
                    text,
                    tokens: e.tokens,
                    truncated: e.truncated,
                    embedding: &e.vector,
                };
                writeln!(out, "{}", serde_json::to_string(&obj)?)?;
            }
            Format::Json => {
                let obj = Record {
                    index: None,
                    text,
                    tokens: e.tokens,
                    truncated: e.truncated,
                    embedding: &e.vector,
                };
                let sep = if index == 0 { "" } else { "," };
                write!(out, "{sep}{}", serde_json::to_string(&obj)?)?;
            }
        }
        Ok(())
    }

    fn end(&self, out: &mut dyn Write, count: usize) -> Result<()> {
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
