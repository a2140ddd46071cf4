//! The command line as clap sees it, and its conversion into [`crate::config`] structs.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

use crate::config::{Command, EmbedConfig, Format};
use crate::hub::{offline_from_env, ModelRef};
use crate::input::InputSource;

const EXAMPLES: &str = "\
Examples:
  fetch-ml --task=1 --sentence \"Hello world!\"
  fetch-ml --task=1 --model ./all-MiniLM-L6-v2 --input sentences.txt --format jsonl -o out.jsonl
  HF_HUB_OFFLINE=1 fetch-ml --task=1 --model sentence-transformers/all-MiniLM-L6-v2";

/// Sentence embeddings and a multitask model on a BERT encoder written in Rust with candle.
#[derive(Debug, Parser)]
#[command(name = "fetch-ml", version, after_help = EXAMPLES)]
pub struct Cli {
    /// The job to run: 1 = sentence embeddings; 2 = train, evaluate and use the multitask
    /// model; 3 = compare freezing scenarios side by side.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub task: u8,

    /// A Hugging Face model id, or a path to a local model folder (config.json,
    /// model.safetensors, tokenizer.json or vocab.txt).
    #[arg(
        long,
        value_name = "ID_OR_DIR",
        default_value = "bert-base-uncased",
        help_heading = "Model"
    )]
    pub model: String,

    /// Hub revision of --model: a branch, tag or commit.
    #[arg(long, default_value = "main", help_heading = "Model")]
    pub revision: String,

    /// Resolve the model from the local Hugging Face cache only ($HF_HOME/hub, default
    /// ~/.cache/huggingface/hub), never the network. HF_HUB_OFFLINE=1 does the same.
    #[arg(long, help_heading = "Model")]
    pub offline: bool,

    /// Truncate each sentence to this many tokens, [CLS] and [SEP] included.
    /// [default: the model's own limit: max_seq_length of sentence_bert_config.json, else
    /// max_position_embeddings]
    #[arg(long, value_name = "N", help_heading = "Model")]
    pub max_seq_length: Option<usize>,

    /// A sentence to process. Repeat the flag for several.
    #[arg(
        long = "sentence",
        short = 's',
        value_name = "TEXT",
        conflicts_with = "input",
        help_heading = "Input"
    )]
    pub sentences: Vec<String>,

    /// A UTF-8 file with one sentence per line (blank lines are skipped); `-` reads standard
    /// input. [default: the built-in data/sentences.txt]
    #[arg(long, short = 'i', value_name = "FILE", help_heading = "Input")]
    pub input: Option<PathBuf>,

    /// Write results to FILE instead of standard output. The file appears only once complete.
    #[arg(long, short = 'o', value_name = "FILE", help_heading = "Output")]
    pub output: Option<PathBuf>,

    /// Output format. text: a summary per sentence and, for up to 20 sentences, their cosine
    /// similarity matrix. jsonl: one object per sentence (index, text, tokens, truncated,
    /// embedding). json: one document (model, dimension, normalized, pooling,
    /// max_seq_length, embeddings: [{text, tokens, truncated, embedding}], count).
    #[arg(long, value_enum, default_value_t = Format::Text, help_heading = "Output")]
    pub format: Format,

    /// Sentences per forward pass. Batches are formed from sentences of similar length.
    #[arg(long, default_value_t = 32, value_parser = positive, help_heading = "Output")]
    pub batch_size: usize,

    /// L2-normalise the embeddings, whatever the model's folder says.
    #[arg(long, conflicts_with = "no_normalize", help_heading = "Output")]
    pub normalize: bool,

    /// Do not normalise the embeddings, whatever the model's folder says.
    /// [default: normalise only when the model's modules.json lists a Normalize step]
    #[arg(long, help_heading = "Output")]
    pub no_normalize: bool,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a whole number above 0, got '{s}'")),
    }
}

impl Cli {
    /// Validates the flags and builds the task's config.
    pub fn into_command(self) -> Result<Command> {
        let model = ModelRef {
            id: self.model,
            revision: self.revision,
            offline: self.offline || offline_from_env(),
        };
        let input = if !self.sentences.is_empty() {
            InputSource::Sentences(self.sentences)
        } else {
            match self.input {
                Some(p) if p.as_os_str() == "-" => InputSource::Stdin,
                Some(p) => InputSource::File(p),
                None => InputSource::Default,
            }
        };
        let normalize = match (self.normalize, self.no_normalize) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        match self.task {
            1 => Ok(Command::Embed(EmbedConfig {
                model,
                input,
                output: self.output,
                format: self.format,
                batch_size: self.batch_size,
                max_seq_length: self.max_seq_length,
                normalize,
            })),
            n => anyhow::bail!("--task={n} is not implemented yet"),
        }
    }
}
