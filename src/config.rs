//! Validated settings for each task. Built from the command line by `cli`; nothing past this
//! point sees clap.

use std::path::PathBuf;

use crate::chunk::ChunkSpec;
use crate::hub::ModelRef;
use crate::input::InputSource;
use crate::model::freeze::Scenario;
use crate::model::quant::Dtype;
use crate::shard::ShardSpec;
use crate::tokenize::TruncateSide;
pub use crate::train::session::TrainConfig;

/// The defaults of the settings below, in one place (`--help` repeats them).
pub mod defaults {
    /// The model when `--model` is not given.
    pub const MODEL: &str = "bert-base-uncased";
    /// Width of each head's hidden layer.
    pub const HEAD_HIDDEN: usize = 256;
    /// Dropout between each head's two layers.
    pub const HEAD_DROPOUT: f64 = 0.1;
    /// Where `--task=2` saves its checkpoint.
    pub const SAVE_DIR: &str = "checkpoints/multitask";
    /// `--task=3`'s budget: epochs and training rows per scenario.
    pub const SCENARIO_EPOCHS: usize = 2;
    pub const SCENARIO_MAX_EXAMPLES: usize = 256;
    // Training settings (epochs, learning rates, ...) default in `TrainSettings::default()`.
}

/// Every `--format` value. `--task=1` takes all of them; `--task=2` and `--task=3` take the
/// first three ([`Format`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Readable summaries and tables.
    Text,
    /// One JSON object per line.
    Jsonl,
    /// One JSON document.
    Json,
    /// Apache Parquet: columns index, text, tokens, truncated, embedding.
    Parquet,
    /// A NumPy .npy float32 matrix, with a JSONL sidecar `PATH.meta.jsonl` for the rest.
    Npy,
}

impl OutputFormat {
    /// The format of tasks 2 and 3, or `None` for the columnar ones.
    pub fn text_format(self) -> Option<Format> {
        match self {
            OutputFormat::Text => Some(Format::Text),
            OutputFormat::Jsonl => Some(Format::Jsonl),
            OutputFormat::Json => Some(Format::Json),
            OutputFormat::Parquet | OutputFormat::Npy => None,
        }
    }

    /// True for the formats that are written to a file only.
    pub fn is_columnar(self) -> bool {
        self.text_format().is_none()
    }
}

/// How results of `--task=2` and `--task=3` are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Write here instead of standard output; for a shard, already the shard's own path.
    pub output: Option<PathBuf>,
    pub format: OutputFormat,
    /// Embed only this shard of the input; `None` for all of it.
    pub shard: Option<ShardSpec>,
    /// Redo a shard whose output already exists instead of skipping it.
    pub overwrite: bool,
    /// Sentences per forward pass.
    pub batch_size: usize,
    /// Tokens per forward pass, at most.
    pub max_batch_tokens: Option<usize>,
    /// Truncate inputs to this many tokens; `None` for the model's own limit.
    pub max_seq_length: Option<usize>,
    /// Override the model's normalisation; `None` follows the model's folder.
    pub normalize: Option<bool>,
    /// Arithmetic of the encoder's dense layers.
    pub dtype: Dtype,
    /// Text prepended to every sentence; `None` for `prompt_name` or the model's default.
    pub prompt: Option<String>,
    /// A prompt of the model's `config_sentence_transformers.json`, by name.
    pub prompt_name: Option<String>,
    /// Keep only the first N dimensions, then normalise if the model normalises.
    pub truncate_dim: Option<usize>,
    /// Which end of a long input is cut.
    pub truncate_side: TruncateSide,
    /// Split long inputs into windows instead of cutting them; `None` cuts.
    pub chunking: Option<ChunkSpec>,
}

/// What the tool was asked to do.
#[derive(Debug, Clone)]
pub enum Command {
    Embed(EmbedConfig),
    Multitask(MultitaskConfig),
    Scenarios(ScenariosConfig),
    Serve(crate::serve::config::ServeConfig),
}

/// Settings of `--task=2`, the multitask model.
#[derive(Debug, Clone)]
pub struct MultitaskConfig {
    pub train: TrainConfig,
    /// Where the trained model is saved.
    pub save: PathBuf,
    /// Predict with this saved model instead of training.
    pub checkpoint: Option<PathBuf>,
    /// Also write the trained model here as a sentence-transformers folder plus the heads.
    pub export: Option<PathBuf>,
    /// Replace an earlier export in `export`.
    pub overwrite: bool,
    /// Sentences to predict after training.
    pub input: InputSource,
    pub output: Option<PathBuf>,
    pub format: Format,
}

/// Settings of `--task=3`, the freezing scenarios side by side.
#[derive(Debug, Clone)]
pub struct ScenariosConfig {
    pub train: TrainConfig,
    pub scenarios: Vec<Scenario>,
    /// N of the `layers` scenario.
    pub layers_n: Option<usize>,
    pub plot: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub format: Format,
}
