//! Validated settings for each task. Built from the command line by `cli`; nothing past this
//! point sees clap.

use std::path::PathBuf;

use crate::hub::ModelRef;
use crate::input::InputSource;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Readable summaries and tables.
    Text,
    /// One JSON object per line.
    Jsonl,
    /// One JSON document.
    Json,
}

/// Settings of `--task=1`, sentence embeddings.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// The model to load.
    pub model: ModelRef,
    /// The sentences to embed.
    pub input: InputSource,
    /// Write here instead of standard output.
    pub output: Option<PathBuf>,
    pub format: Format,
    /// Sentences per forward pass.
    pub batch_size: usize,
    /// Truncate inputs to this many tokens; `None` for the model's own limit.
    pub max_seq_length: Option<usize>,
    /// Override the model's normalisation; `None` follows the model's folder.
    pub normalize: Option<bool>,
}

/// What the tool was asked to do.
#[derive(Debug, Clone)]
pub enum Command {
    Embed(EmbedConfig),
}
