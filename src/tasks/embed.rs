//! `--task=1`: embed sentences (all of the input, or one shard of it) and write them as text,
//! JSONL, JSON, Parquet or NumPy; long inputs truncated at either end, or split into windows
//! (merged, or one row per window).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;

use crate::chunk::{CharSlicer, ChunkMode, Chunker};
use crate::columnar::{npy_sidecar, NpySink, ParquetSink, Row, RowWindow};
use crate::config::{EmbedConfig, Format, OutputFormat};
use crate::embed::{Embedded, Embedder, Embedding};
use crate::input::{SentenceReader, MAX_LINE_BYTES};
use crate::loader::ModelAssets;
use crate::model::quant::Dtype;
use crate::output::{progress_bar, Output};
use crate::tokenize::name_sentence;

/// Sentences read and embedded per step (and per Parquet row group); bounds memory whatever
/// the input size.
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
    /// `I/N` in a sharded run.
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<String>,
    /// `left` when long inputs keep their last tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    truncate_side: Option<&'static str>,
    /// Long inputs split into windows of this many tokens (`--chunk-tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_overlap: Option<usize>,
    /// `mean` (one vector per input) or `rows` (one row per window).
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<&'static str>,
}

/// The files a run writes: none for standard output; the matrix and its sidecar for npy.
fn output_files(cfg: &EmbedConfig) -> Vec<PathBuf> {
    match &cfg.output {
        Some(p) if p.as_os_str() != "-" => match cfg.format {
            OutputFormat::Npy => vec![p.clone(), npy_sidecar(p)],
            _ => vec![p.clone()],
        },
        _ => vec![],
    }
}

pub fn run(cfg: &EmbedConfig) -> Result<()> {
    let files = output_files(cfg);
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    if let Some(spec) = &cfg.shard {
        eprintln!("shard {} (from {})", spec.shard, spec.source);
        if crate::shard::outputs_exist(&files) {
            if !cfg.overwrite {
                eprintln!(
                    "shard {}: skipped, its output {} already exists (outputs appear only once \
                     complete); pass --overwrite to redo it",
                    spec.shard,
                    names.join(" + ")
                );
                return Ok(());
            }
            eprintln!(
                "shard {}: {} exists; redoing it (--overwrite)",
                spec.shard,
                names.join(" + ")
            );
        }
    }
    let mut assets = ModelAssets::load(&cfg.model, cfg.max_seq_length)?;
    assets.tokenizer.set_truncate_side(cfg.truncate_side)?;
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
    let mut embedder = Embedder::new(
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
    if let Some(spec) = cfg.chunking {
        embedder.chunker = Some(Chunker::new(
            &assets.tokenizer,
            spec,
            embedder.prompt.clone(),
        )?);
    }
    let meta = Meta {
        model: cfg.model.id.clone(),
        revision: (!cfg.model.is_local()).then(|| cfg.model.revision.clone()),
        dimension,
        normalized: embedder.normalize,
        pooling: embedder.pooling.name(),
        max_seq_length: assets.tokenizer.max_len(),
        dtype: cfg.dtype.name(),
        shard: cfg.shard.as_ref().map(|s| s.shard.to_string()),
        prompt: embedder.prompt.clone(),
        truncate_side: (cfg.truncate_side == crate::tokenize::TruncateSide::Left).then_some("left"),
        chunk_tokens: cfg.chunking.map(|c| c.tokens),
        chunk_overlap: cfg.chunking.map(|c| c.overlap),
        chunks: cfg.chunking.map(|c| c.mode.name()),
    };
    let max_seq_length = meta.max_seq_length;

    let shard = cfg.shard.as_ref().map(|s| s.shard);
    let (mut reader, share) = SentenceReader::open_shard(&cfg.input, shard)?;
    if let Some(s) = shard {
        eprintln!("shard {s}: {share}");
    }
    let mut sink = Sink::create(cfg, meta)?;
    let mut written = false;
    let streamed = stream(&mut reader, &embedder, &mut sink, &mut written);
    let (count, truncated) = match streamed {
        Ok(counts) => counts,
        // A file output is simply never renamed into place; standard output is already out.
        Err(e) if written && sink.is_stdout() => {
            return Err(
                e.context("stopped early: what was written to standard output is incomplete")
            )
        }
        Err(e) => return Err(e),
    };
    if count == 0 && shard.is_none() {
        bail!(
            "{} has no sentences (blank lines are skipped); give text with --sentence or --input",
            cfg.input.describe()
        );
    }
    sink.finish(count)?;
    if let Some(s) = shard {
        let (first, last) = reader.lines_read();
        let lines = if first > last {
            "no lines".to_string()
        } else {
            format!("lines {first}-{last}")
        };
        let to = if names.is_empty() {
            "standard output".to_string()
        } else {
            names.join(" + ")
        };
        eprintln!(
            "shard {s}: {lines} of {}: {count} sentence(s) written to {to}",
            reader.name()
        );
    }
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
            "note: {truncated} of {count} sentence(s) were longer than {max_seq_length} tokens and \
             were truncated; --max-seq-length sets the limit (at most {})",
            assets.config.max_tokens()
        );
    }
    Ok(())
}

/// Embeds and writes every sentence of `reader`; returns the count and how many were
/// truncated. `written` turns true once anything went to the output.
fn stream(
    reader: &mut SentenceReader,
    embedder: &Embedder,
    sink: &mut Sink,
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
            .embed_inputs(&chunk)
            .map_err(|e| name_sentence(e, |i| reader.locate(i)))?;
        if count == 0 {
            *written = true;
            sink.begin()?;
        }
        for (i, (text, e)) in chunk.iter().zip(embeddings).enumerate() {
            // The sentence's 0-based line number (its position, for --sentence).
            let index = reader.line_of(i) as u64 - 1;
            let clipped = reader.clipped(i);
            match e {
                Embedded::One(mut e) => {
                    e.truncated |= clipped;
                    sink.item(count, index, text, &e, None)?;
                    count += 1;
                    truncated += e.truncated as usize;
                }
                Embedded::Windows(rows) => {
                    let chars = CharSlicer::new(text);
                    for mut r in rows {
                        r.embedding.truncated |= clipped;
                        let window = RowWindow {
                            window: r.number as u32,
                            char_start: r.chars.start as u64,
                            char_end: r.chars.end as u64,
                        };
                        let part = chars.slice(r.chars.clone());
                        sink.item(count, index, part, &r.embedding, Some(window))?;
                        count += 1;
                    }
                    truncated += clipped as usize;
                }
            }
        }
        sink.end_chunk()?;
        bar.set_position(reader.progress().0);
    }
    bar.finish_and_clear();
    if count == 0 {
        *written = true;
        sink.begin()?;
    }
    Ok((count, truncated))
}

/// Where the rows go: a text format through [`Printer`], or a columnar file.
enum Sink {
    Stream { printer: Printer, out: Output },
    Parquet(Box<ParquetSink>),
    Npy(NpySink),
}

impl Sink {
    fn create(cfg: &EmbedConfig, meta: Meta) -> Result<Self> {
        let dim = meta.dimension;
        let file = || {
            cfg.output
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--format parquet and npy need --output FILE"))
        };
        Ok(match cfg.format.text_format() {
            Some(format) => Sink::Stream {
                printer: Printer::new(format, meta),
                out: Output::create(cfg.output.as_deref())?,
            },
            None if cfg.format == OutputFormat::Parquet => {
                let meta = serde_json::to_string(&meta)?;
                let windows = cfg.chunking.is_some_and(|c| c.mode == ChunkMode::Rows);
                Sink::Parquet(Box::new(ParquetSink::create(file()?, dim, meta, windows)?))
            }
            None => Sink::Npy(NpySink::create(file()?, dim)?),
        })
    }

    fn is_stdout(&self) -> bool {
        matches!(self, Sink::Stream { out, .. } if out.is_stdout())
    }

    fn begin(&mut self) -> Result<()> {
        match self {
            Sink::Stream { printer, out } => printer.begin(out),
            _ => Ok(()),
        }
    }

    /// Row number `n` of this run, from line `index` (0-based) of the input; `window` when
    /// the row is one window of it.
    fn item(
        &mut self,
        n: usize,
        index: u64,
        text: &str,
        e: &Embedding,
        window: Option<RowWindow>,
    ) -> Result<()> {
        let row = || Row {
            index,
            text,
            tokens: e.tokens,
            truncated: e.truncated,
            embedding: &e.vector,
            window,
        };
        match self {
            Sink::Stream { printer, out } => printer.item(out, n, index, text, e, window),
            Sink::Parquet(p) => p.row(&row()),
            Sink::Npy(p) => p.row(&row()),
        }
    }

    fn end_chunk(&mut self) -> Result<()> {
        match self {
            Sink::Parquet(p) => p.end_chunk(),
            _ => Ok(()),
        }
    }

    fn finish(self, count: usize) -> Result<()> {
        match self {
            Sink::Stream { printer, mut out } => {
                printer.end(&mut out, count)?;
                out.finish()
            }
            Sink::Parquet(p) => p.finish(),
            Sink::Npy(p) => p.finish(),
        }
    }
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

    /// Row number `n` of the run, from line `index` (0-based) of the input.
    fn item(
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
