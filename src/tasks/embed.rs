//! `--task=1`: embed sentences (all of the input, or one shard of it) and write them as text,
//! JSONL, JSON, Parquet or NumPy; long inputs truncated at either end, or split into windows
//! (merged, or one row per window).

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;

use crate::chunk::{CharSlicer, ChunkMode, Chunker};
use crate::columnar::{npy_sidecar, NpySink, ParquetSink, Row, RowWindow};
use crate::config::{EmbedConfig, OutputFormat};
use crate::embed::{Embedded, Embedder, Embedding};
use crate::input::SentenceReader;
use crate::job::{Existing, FileSum, Job, ModelId, OtherJob, Settings};
use crate::loader::ModelAssets;
use crate::model::encoder::InferenceEncoder;
use crate::model::quant::Dtype;
use crate::output::{progress_bar, Output};
use crate::shard::ShardSpec;
use crate::tokenize::name_sentence;

use super::notes;
use super::printer::{Meta, Printer};

/// Sentences read and embedded per step (and per Parquet row group); bounds memory whatever
/// the input size.
const CHUNK: usize = 4096;

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

/// The job of a sharded run, for its output and the check before a skip.
fn job_of(cfg: &EmbedConfig, spec: &ShardSpec, fingerprint: &str) -> Result<Job> {
    Ok(Job {
        shard: spec.shard.to_string(),
        input: crate::job::input_id(&cfg.input)?,
        model: ModelId {
            name: crate::job::model_name(&cfg.model),
            fingerprint: fingerprint.to_string(),
        },
        settings: Settings {
            format: format!("{:?}", cfg.format).to_ascii_lowercase(),
            dtype: cfg.dtype.name().to_string(),
            normalize: cfg.normalize,
            max_seq_length: cfg.max_seq_length,
            truncate_dim: cfg.truncate_dim,
            prompt: cfg.prompt.clone(),
            prompt_name: cfg.prompt_name.clone(),
            truncate_side: (cfg.truncate_side == crate::tokenize::TruncateSide::Left)
                .then(|| "left".to_string()),
            chunking: cfg
                .chunking
                .map(|c| format!("{}/{}/{}", c.tokens, c.overlap, c.mode.name())),
        },
    })
}

/// Whether a sharded run's output is already finished by this same job, so the run is
/// skipped. An output of another job is an error unless `--overwrite` replaces it.
fn finished_already(cfg: &EmbedConfig, job: &Job, files: &[PathBuf]) -> Result<bool> {
    let s = &job.shard;
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let names = names.join(" + ");
    match crate::job::existing(files, cfg.format == OutputFormat::Parquet, job) {
        Ok(Existing::Absent) => Ok(false),
        Ok(Existing::Finished) if !cfg.overwrite => {
            crate::note!(
                "shard {s}: skipped, its output {names} is complete and was made by this same job \
                 (shard, input, model and settings); pass --overwrite to redo it"
            );
            if !job.input.comparable() {
                crate::note!(
                    "note: {} cannot be compared with the input of the run that made it",
                    job.input.name
                );
            }
            Ok(true)
        }
        Ok(Existing::Finished) => {
            crate::note!("shard {s}: {names} is complete; redoing it (--overwrite)");
            Ok(false)
        }
        Ok(Existing::Unfinished(why)) => {
            crate::note!("shard {s}: {why}; redoing it");
            Ok(false)
        }
        Err(e) if cfg.overwrite && e.is::<OtherJob>() => {
            crate::note!("shard {s}: {e}; replacing it (--overwrite)");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

pub fn run(cfg: &EmbedConfig) -> Result<()> {
    let files = output_files(cfg);
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    // A folder or an unwritable place fails now, not after the work.
    for f in &files {
        crate::output::check_target("--output", f, None)?;
    }
    if let Some(spec) = &cfg.shard {
        crate::note!("shard {} (from {})", spec.shard, spec.source);
        if let Some(note) = &spec.note {
            crate::note!("note: {note}");
        }
    }
    let model_files = crate::hub::resolve(&cfg.model)?;
    let fingerprint = crate::job::model_fingerprint(&model_files)?;
    let job = match &cfg.shard {
        Some(spec) => Some(job_of(cfg, spec, &fingerprint)?),
        None => None,
    };
    if let Some(job) = &job {
        if finished_already(cfg, job, &files)? {
            return Ok(());
        }
    }
    let mut assets = ModelAssets::from_files(model_files, cfg.max_seq_length)?;
    assets.tokenizer.set_truncate_side(cfg.truncate_side)?;
    // Checked before the weights load: a prompt too long for the sentence fails at once.
    let prompt = assets.prompt(cfg.prompt.as_deref(), cfg.prompt_name.as_deref())?;
    let device = Device::Cpu;
    // The float32 dense weights are dropped once converted: only one copy stays resident.
    let encoder = assets.inference_encoder(cfg.dtype, &device)?;
    if cfg.dtype != Dtype::F32 {
        crate::note!(
            "encoder in {}: dense layers on the {} kernel",
            cfg.dtype,
            encoder.kernel_name()
        );
    }
    let (embedder, dimension) = embedder(cfg, &assets, &encoder, prompt)?;
    let meta = meta(cfg, &assets, &embedder, dimension, fingerprint, job.clone());
    embed_all(
        cfg,
        &assets,
        &embedder,
        meta,
        job.as_ref(),
        (&files, &names),
    )
}

/// Reads, embeds and writes the input (or the shard's share of it), completes the outputs
/// (and a sharded run's record), and says what was done.
fn embed_all(
    cfg: &EmbedConfig,
    assets: &ModelAssets,
    embedder: &Embedder,
    meta: Meta,
    job: Option<&Job>,
    (files, names): (&[PathBuf], &[String]),
) -> Result<()> {
    let max_seq_length = meta.max_seq_length;
    let shard = cfg.shard.as_ref().map(|s| s.shard);
    let (mut reader, share) = SentenceReader::open_shard(&cfg.input, shard)?;
    if cfg.truncate_side == crate::tokenize::TruncateSide::Left {
        reader.keep_line_ends();
    }
    if let Some(s) = shard {
        crate::note!("shard {s}: {share}");
    }
    let mut sink = Sink::create(cfg, meta)?;
    let mut written = false;
    let streamed = stream(&mut reader, embedder, &mut sink, &mut written);
    let (count, truncated) = match streamed {
        Ok(counts) => counts,
        // A file output is simply never renamed into place; standard output (or a device node
        // or named pipe) already has what was written.
        Err(e) if written && sink.is_streamed() => {
            let to = match &cfg.output {
                Some(p) if p.as_os_str() != "-" => p.display().to_string(),
                _ => "standard output".to_string(),
            };
            return Err(e.context(format!(
                "stopped early: what was written to {to} is incomplete"
            )));
        }
        Err(e) => return Err(e),
    };
    if count == 0 && shard.is_none() {
        bail!(
            "{} has no sentences (blank lines are skipped); give text with --sentence or --input",
            cfg.input.describe()
        );
    }
    // A sharded run's files complete with their record: the old one goes before any file
    // is replaced, the new one comes after them all.
    let record = job.filter(|_| needs_record(cfg, files));
    if record.is_some() {
        crate::job::remove_record(files)?;
        crate::atomic::fault_point("output-commit-1");
    }
    let sums = sink.finish(count, record.is_some())?;
    if let Some(job) = record {
        crate::job::write_record(files, job, count as u64, sums)?;
    }
    if let Some(s) = shard {
        notes::shard_done(s, &reader, names, count, cfg.chunking);
    }
    let cut = notes::Cut {
        clipped_lines: reader.clipped_lines(),
        truncated,
        count,
        max_seq_length,
        model_max: assets.config.max_tokens(),
    };
    notes::cuts(cfg, &cut, embedder.prompt.as_deref());
    Ok(())
}

/// The embedder the flags and the model's pipeline ask for, and the dimension of its
/// vectors.
fn embedder<'a>(
    cfg: &EmbedConfig,
    assets: &'a ModelAssets,
    encoder: &'a InferenceEncoder,
    prompt: Option<String>,
) -> Result<(Embedder<'a>, usize)> {
    let mut embedder = Embedder::new(
        encoder,
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
    embedder.prompt = prompt;
    if let (Some(p), None, None) = (&embedder.prompt, &cfg.prompt, &cfg.prompt_name) {
        crate::note!("note: the model's default prompt {p:?} is prepended to every sentence");
    }
    if let Some(spec) = cfg.chunking {
        embedder.chunker = Some(Chunker::new(
            &assets.tokenizer,
            spec,
            embedder.prompt.clone(),
        )?);
    }
    Ok((embedder, dimension))
}

/// What describes the whole output.
fn meta(
    cfg: &EmbedConfig,
    assets: &ModelAssets,
    embedder: &Embedder,
    dimension: usize,
    model_fingerprint: String,
    job: Option<Job>,
) -> Meta {
    Meta {
        model: crate::job::model_name(&cfg.model),
        revision: (!cfg.model.is_local()).then(|| cfg.model.revision.clone()),
        model_fingerprint,
        job,
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
    }
}

/// Whether a sharded run writes a completion record: formats other than Parquet (which holds
/// its job inside), into regular files (not device nodes or named pipes).
fn needs_record(cfg: &EmbedConfig, files: &[PathBuf]) -> bool {
    cfg.format != OutputFormat::Parquet
        && !files.is_empty()
        && files.iter().all(|f| {
            matches!(
                crate::atomic::classify(f),
                Ok(crate::atomic::Target::Replace(_))
            )
        })
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
    Stream { printer: Box<Printer>, out: Output },
    Parquet(Box<ParquetSink>),
    Npy(Box<NpySink>),
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
                printer: Box::new(Printer::new(format, meta)),
                out: Output::create(cfg.output.as_deref())?,
            },
            None if cfg.format == OutputFormat::Parquet => {
                let meta = serde_json::to_string(&meta)?;
                let windows = cfg.chunking.is_some_and(|c| c.mode == ChunkMode::Rows);
                Sink::Parquet(Box::new(ParquetSink::create(file()?, dim, meta, windows)?))
            }
            None => Sink::Npy(Box::new(NpySink::create(file()?, dim)?)),
        })
    }

    fn is_streamed(&self) -> bool {
        match self {
            Sink::Stream { out, .. } => out.is_streamed(),
            Sink::Parquet(p) => p.is_streamed(),
            Sink::Npy(p) => p.is_streamed(),
        }
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

    /// Ends the output and renames its files into place; with `sum`, returns the sums of the
    /// files as written, for a completion record.
    fn finish(self, count: usize, sum: bool) -> Result<Vec<FileSum>> {
        match self {
            Sink::Stream { printer, mut out } => {
                printer.end(&mut out, count)?;
                let sums = if sum {
                    out.sum()?.into_iter().collect()
                } else {
                    vec![]
                };
                out.finish()?;
                Ok(sums)
            }
            Sink::Parquet(p) => p.finish().map(|_| vec![]),
            Sink::Npy(p) => p.finish(sum),
        }
    }
}
