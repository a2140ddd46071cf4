//! The command line as clap sees it, and its conversion into [`crate::config`] structs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Parser;

use crate::chunk::{ChunkMode, ChunkSpec};
use crate::config::{
    defaults, Command, EmbedConfig, MultitaskConfig, OutputFormat, ScenariosConfig, TrainConfig,
};
use crate::data::DataSource;
use crate::hub::{offline_from_env, ModelRef};
use crate::input::InputSource;
use crate::model::freeze::{FreezePart, Scenario};
use crate::model::quant::Dtype;
use crate::serve::args::ServeArgs;
use crate::serve::config::{ServeConfig, ServedModel};
use crate::shard::{Shard, ShardSpec};
use crate::tokenize::TruncateSide;
use crate::train::metrics::Metric;
use crate::train::trainer::TrainSettings;

/// The model used when `--model` is not given.
pub const DEFAULT_MODEL: &str = defaults::MODEL;

const EXAMPLES: &str = "\
Examples:
  fetch-ml --task=1 --sentence \"Hello world!\"
  fetch-ml --task=1 --model ./all-MiniLM-L6-v2 --input sentences.txt --format jsonl -o out.jsonl
  fetch-ml --task=1 --input corpus.txt --shard 2/8 --format parquet -o out/emb-{shard}.parquet
  fetch-ml --task=1 --model ./nomic-embed-text-v1.5 --prompt-name search_document --input docs.txt --chunk-tokens 2048 --chunk-overlap 128
  HF_HUB_OFFLINE=1 fetch-ml --task=1 --model sentence-transformers/all-MiniLM-L6-v2
  fetch-ml --task=2 --freeze encoder --epochs 10 --save checkpoints/heads
  fetch-ml --task=2 --checkpoint checkpoints/heads --input new.txt --format jsonl
  fetch-ml --task=2 --checkpoint checkpoints/heads --export exported-model
  fetch-ml --task=3 --plot scenarios.png
  fetch-ml --task=serve --model ./all-MiniLM-L6-v2 --dtype int8 --port 8080";

/// Sentence embeddings and a multitask model on a BERT encoder written in Rust with candle.
#[derive(Debug, Parser)]
#[command(name = "fetch-ml", version, after_help = EXAMPLES)]
pub struct Cli {
    /// The job to run: 1 = sentence embeddings; 2 = train, evaluate and use the multitask
    /// model; 3 = compare freezing scenarios side by side; serve = an HTTP server of the
    /// embeddings (and, with --checkpoint, the multitask model's predictions).
    #[arg(long, value_name = "1|2|3|serve", value_parser = task)]
    pub task: u8,

    /// A Hugging Face model id, or a path to a local model folder (config.json,
    /// model.safetensors, tokenizer.json or vocab.txt).
    /// [default: bert-base-uncased; with --checkpoint, the checkpoint's base model]
    #[arg(long, value_name = "ID_OR_DIR", help_heading = "Model")]
    pub model: Option<String>,

    /// Hub revision of --model: a branch, tag or commit.
    #[arg(long, default_value = "main", help_heading = "Model")]
    pub revision: String,

    /// Resolve the model from the local Hugging Face cache only ($HF_HOME/hub, default
    /// ~/.cache/huggingface/hub), never the network. HF_HUB_OFFLINE=1 does the same.
    #[arg(long, help_heading = "Model")]
    pub offline: bool,

    /// Seconds a Hugging Face hub request may go without an answer (or a download without a
    /// byte) before fetch-ml gives up and suggests --offline or a local folder.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = positive_secs, help_heading = "Model")]
    pub hub_timeout: f64,

    /// Truncate each sentence to this many tokens, `[CLS]` and `[SEP]` included.
    /// [default: the model's own limit: max_seq_length of sentence_bert_config.json, else
    /// max_position_embeddings (less the first position id: pad_token_id + 1 for RoBERTa and
    /// XLM-RoBERTa, 2 for MPNet; 514 positions hold 512 tokens)]
    #[arg(long, value_name = "N", help_heading = "Model")]
    pub max_seq_length: Option<usize>,

    /// Threads for matrix products and the inference kernels. [default: the number of cores]
    /// At most 4 per core are used; where a process limit allows fewer, fewer are used (a
    /// note on stderr says so). Inference runs up to 4 batches at once (no more than 16,384
    /// tokens together), each with its own buffers.
    #[arg(long, value_name = "N", value_parser = positive, help_heading = "Model")]
    pub threads: Option<usize>,

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

    #[arg(long, short = 'o', value_name = "FILE", help_heading = "Output", help = OUTPUT_HELP)]
    pub output: Option<PathBuf>,

    /// Output format. text: a summary per sentence and, for up to 20 sentences, their cosine
    /// similarity matrix. jsonl: one object per sentence (index = the sentence's 0-based line
    /// number in the input, text, tokens, truncated, embedding). json: one document (model,
    /// dimension, normalized, pooling, max_seq_length, embeddings: [{text, tokens, truncated,
    /// embedding}], count). parquet (--task=1, needs --output): columns index (int64), text,
    /// tokens (int32), truncated, embedding (fixed-size list of float32), a row group per
    /// 4096 sentences or 8 MiB of text. npy (--task=1, needs --output): a float32 matrix, one row per
    /// sentence, and a JSONL sidecar FILE.meta.jsonl with index, text, tokens, truncated of
    /// each row.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, help_heading = "Output")]
    pub format: OutputFormat,

    /// Embed only shard I of N (0-based, I < N) of the input. A file is cut into N byte
    /// ranges at line starts and this run reads only its own; other inputs are read whole and
    /// line L goes to shard L mod N. Output rows keep their global line number as index.
    /// [default: index I from JOB_COMPLETION_INDEX (Kubernetes Indexed Job) or
    /// SLURM_ARRAY_TASK_ID (Slurm job array), with N pinned by --shards or FETCH_ML_SHARDS;
    /// else no sharding. --shard 0/1 turns the environment off]
    #[arg(long, value_name = "I/N", value_parser = Shard::parse, help_heading = "Corpus (--task=1)")]
    pub shard: Option<Shard>,

    /// The number of shards N when the shard index comes from the environment
    /// (JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID, the shard index itself). Required there:
    /// the count is never guessed from the engine, since a re-submitted part of a job would
    /// then split the input differently. FETCH_ML_SHARDS=N does the same.
    #[arg(long, value_name = "N", value_parser = positive, conflicts_with = "shard", help_heading = "Corpus (--task=1)")]
    pub shards: Option<usize>,

    /// Redo work whose output already exists: a shard's output that is complete and was made by
    /// the same job (otherwise skipped, so that retried shards are cheap) or by another job
    /// (otherwise an error saying what differs), or an earlier --export folder.
    #[arg(long, help_heading = "Corpus (--task=1)")]
    pub overwrite: bool,

    /// Sentences per forward pass; in training, examples per optimizer step. Inference
    /// batches group sentences of similar length.
    #[arg(long, default_value_t = 32, value_parser = positive, help_heading = "Output")]
    pub batch_size: usize,

    /// Arithmetic of the encoder where it does not train (--task=1, a frozen encoder's
    /// vectors in --task=2/3, predictions with --checkpoint): f32, bf16 (bf16 products, f32
    /// sums) or int8 (int8 weights per output channel, int8 activations per token row, i32
    /// sums). Softmax, LayerNorm and pooling stay f32; a sentence's vector never depends on
    /// its batch. The kernel is chosen for this CPU and named on stderr. For speed, int8 pays
    /// off with VNNI or AMX and bf16 with AMX; with AVX2 alone f32 is as fast as int8 and
    /// faster than bf16 (both still use less memory). [default: f32]
    #[arg(long, value_name = "f32|bf16|int8", value_parser = dtype, help_heading = "Model")]
    pub dtype: Option<Dtype>,

    /// Also cap each inference batch at N tokens (padding-free: the sum of its sentences'
    /// lengths); a longer sentence gets a batch of its own. [default: no token cap]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = "Output")]
    pub max_batch_tokens: Option<usize>,

    /// L2-normalise the embeddings, whatever the model's folder says.
    #[arg(long, conflicts_with = "no_normalize", help_heading = "Output")]
    pub normalize: bool,

    /// Text prepended to every sentence before tokenization, as sentence-transformers'
    /// `prompt` (e5 models want "query: " or "passage: "). Its tokens count toward the max
    /// length and are pooled with the sentence's.
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "prompt_name",
        help_heading = "Output"
    )]
    pub prompt: Option<String>,

    /// A named prompt of the model's config_sentence_transformers.json (such as query or
    /// passage), prepended to every sentence. [default: the model's default_prompt_name, if
    /// it names one; else no prompt]
    #[arg(long, value_name = "NAME", help_heading = "Output")]
    pub prompt_name: Option<String>,

    /// Keep only the first N dimensions of each vector (Matryoshka models), after the Dense
    /// layers and before normalisation: a model that normalises gives unit vectors of N
    /// dimensions (text-embeddings-inference's `dimensions`). N larger than the model's
    /// dimension is an error. [default: all dimensions]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = "Output")]
    pub truncate_dim: Option<usize>,

    /// Which end of an input longer than the max length is cut: right keeps its first
    /// tokens, left its last ones (text-embeddings-inference's truncation_direction). The
    /// special tokens stay; a prompt is part of the input's start, as in
    /// text-embeddings-inference. [default: right]
    #[arg(
        long,
        value_enum,
        value_name = "right|left",
        conflicts_with = "chunk_tokens",
        help_heading = "Long inputs (--task=1)"
    )]
    pub truncate_side: Option<TruncateSide>,

    /// Instead of cutting an input longer than N tokens, split it into windows of N tokens
    /// (special tokens and prompt included: every window carries the prompt), embed each, and
    /// write one vector per input, the token-weighted mean of its windows' vectors (normalised
    /// again when the model normalises), or with --chunks rows one row per window. An input
    /// of N tokens or fewer is one window. N is at most the max length (--max-seq-length).
    #[arg(long, value_name = "N", value_parser = positive, help_heading = "Long inputs (--task=1)")]
    pub chunk_tokens: Option<usize>,

    /// Tokens each window shares with the one before it. [default: 0]
    #[arg(
        long,
        value_name = "K",
        requires = "chunk_tokens",
        help_heading = "Long inputs (--task=1)"
    )]
    pub chunk_overlap: Option<usize>,

    /// mean: one vector per input. rows: one output row per window, carrying the input's
    /// index, the window's number (window, from 0) and its characters in the input
    /// (char_start, char_end; text is the window's text), in every format. [default: mean]
    #[arg(
        long,
        value_enum,
        value_name = "mean|rows",
        requires = "chunk_tokens",
        help_heading = "Long inputs (--task=1)"
    )]
    pub chunks: Option<ChunkMode>,

    /// Do not normalise the embeddings, whatever the model's folder says.
    /// [default: normalise only when the model's modules.json lists a Normalize step]
    #[arg(long, help_heading = "Output")]
    pub no_normalize: bool,

    /// Labelled training data: .jsonl ({"text", "class", "sentiment"} per line) or .csv with a
    /// text,class,sentiment header. A row may lack one label. [default: the built-in
    /// data/multitask/train.jsonl]
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Training (--task=2, --task=3)"
    )]
    pub train_file: Option<PathBuf>,

    /// Labelled evaluation data, same formats. Its labels must occur in the training data.
    /// [default: the built-in data/multitask/eval.jsonl when --train-file is not given;
    /// otherwise none]
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Training (--task=2, --task=3)"
    )]
    pub eval_file: Option<PathBuf>,

    /// Passes over the training data. [default: 3 for --task=2, 2 for --task=3]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = "Training (--task=2, --task=3)")]
    pub epochs: Option<usize>,

    /// Peak learning rate of the encoder (AdamW). [default: 2e-5]
    #[arg(long, value_name = "RATE", value_parser = non_negative, help_heading = "Training (--task=2, --task=3)")]
    pub lr: Option<f64>,

    /// Peak learning rate of the two heads (AdamW). [default: 1e-3]
    #[arg(long, value_name = "RATE", value_parser = non_negative, help_heading = "Training (--task=2, --task=3)")]
    pub head_lr: Option<f64>,

    /// Fraction of the steps over which the learning rates warm up linearly from 0; they then
    /// decay linearly to 0. [default: 0.1]
    #[arg(long, value_name = "FRACTION", value_parser = fraction, help_heading = "Training (--task=2, --task=3)")]
    pub warmup: Option<f64>,

    /// AdamW's decoupled weight decay. [default: 0.01]
    #[arg(long, value_name = "W", value_parser = non_negative, help_heading = "Training (--task=2, --task=3)")]
    pub weight_decay: Option<f64>,

    /// Weights A,B of the combined loss A * CE(class) + B * CE(sentiment). [default: 1,1]
    #[arg(long, value_name = "A,B", value_parser = loss_weights, help_heading = "Training (--task=2, --task=3)")]
    pub loss_weights: Option<[f64; 2]>,

    /// Seed of head initialisation, dropout and shuffling: the same seed on the same data gives
    /// the same losses and weights. [default: 42]
    #[arg(long, value_name = "N", help_heading = "Training (--task=2, --task=3)")]
    pub seed: Option<u64>,

    /// Width of each head's hidden layer. [default: 256]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = "Training (--task=2, --task=3)")]
    pub head_hidden: Option<usize>,

    /// Dropout between each head's two layers, in training. [default: 0.1]
    #[arg(long, value_name = "P", value_parser = fraction, help_heading = "Training (--task=2, --task=3)")]
    pub head_dropout: Option<f64>,

    /// Parts that do not train: none, all, encoder (alias backbone), class-head (alias
    /// head-a), sentiment-head (alias head-b). Repeat or separate with commas, e.g.
    /// --freeze encoder,class-head. Frozen parts run without dropout or gradients. [default:
    /// none]
    #[arg(long, value_name = "PART", value_delimiter = ',', value_parser = freeze_part, help_heading = "Training (--task=2, --task=3)")]
    pub freeze: Vec<FreezePart>,

    /// Freeze the embeddings and the first N encoder layers; the later layers train. With
    /// --task=3 it sets N of the "layers" scenario [default there: half the layers].
    #[arg(long, value_name = "N", help_heading = "Training (--task=2, --task=3)")]
    pub freeze_layers: Option<usize>,

    /// Train on at most the first N rows of the training data. [default: all for --task=2,
    /// 256 for --task=3]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = "Training (--task=2, --task=3)")]
    pub max_train_examples: Option<usize>,

    /// Batch examples in a random order only, instead of grouping examples of similar length
    /// into each batch (fewer padding tokens, the same examples per epoch). [default: grouped]
    #[arg(long, help_heading = "Training (--task=2, --task=3)")]
    pub no_length_grouping: bool,

    /// Micro-batches of --batch-size per optimizer step: the step sees N x --batch-size rows,
    /// as one batch of that size would (up to float rounding), in the memory of one
    /// --batch-size. [default: 1]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = "Training (--task=2, --task=3)")]
    pub grad_accum: Option<usize>,

    /// Also evaluate every N optimizer steps, with a line on stderr (needs an evaluation
    /// set). [default: at the end of each epoch only]
    #[arg(long, value_name = "STEPS", value_parser = positive, help_heading = "Training (--task=2, --task=3)")]
    pub eval_every: Option<usize>,

    /// Keep the weights of the best evaluation by METRIC instead of the last ones:
    /// class.accuracy, class.macro_f1, sentiment.accuracy, sentiment.macro_f1, mean.accuracy
    /// or mean.macro_f1 (needs an evaluation set). [default: the last weights]
    #[arg(long, value_name = "METRIC", value_parser = metric, help_heading = "Training (--task=2, --task=3)")]
    pub keep_best: Option<Metric>,

    /// Stop when --keep-best's metric has not improved for PATIENCE evaluations in a row.
    /// [default: train every epoch]
    #[arg(long, value_name = "PATIENCE", value_parser = positive, requires = "keep_best", help_heading = "Training (--task=2, --task=3)")]
    pub early_stop: Option<usize>,

    /// Weight each head's loss by inverse label frequency (n / (labels x count), as
    /// scikit-learn's "balanced"): `auto`, or `none`. [default: none]
    #[arg(long, value_name = "auto|none", value_parser = ["auto", "none"], help_heading = "Training (--task=2, --task=3)")]
    pub class_weights: Option<String>,

    /// Keep the sentence vectors of a frozen encoder in DIR, keyed by model, revision, max
    /// length and text, so repeated runs skip the encoder. [default: no cache]
    #[arg(
        long,
        value_name = "DIR",
        help_heading = "Training (--task=2, --task=3)"
    )]
    pub embedding_cache: Option<PathBuf>,

    /// Save the trained model here (written whole, then renamed into place).
    /// [default: checkpoints/multitask]
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "checkpoint",
        help_heading = "Multitask model (--task=2)"
    )]
    pub save: Option<PathBuf>,

    /// Skip training: predict (and evaluate, with --eval-file) with a saved model.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "train_file",
        help_heading = "Multitask model (--task=2)"
    )]
    pub checkpoint: Option<PathBuf>,

    /// Also write the trained model (or the --checkpoint's) to DIR as a sentence-transformers
    /// folder: the encoder (config.json, tokenizer files, model.safetensors, modules.json,
    /// 1_Pooling, sentence_bert_config.json) plus heads.safetensors and heads.json. Written
    /// whole, then renamed into place; an existing DIR is replaced only with --overwrite.
    #[arg(long, value_name = "DIR", help_heading = "Multitask model (--task=2)")]
    pub export: Option<PathBuf>,

    /// Scenarios to compare, comma-separated: none, encoder, class-head, sentiment-head,
    /// layers, all. [default: all six]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = scenario, help_heading = "Scenarios (--task=3)")]
    pub scenarios: Vec<Scenario>,

    /// Draw eval accuracy per head per scenario as a PNG chart.
    #[arg(long, value_name = "FILE.png", help_heading = "Scenarios (--task=3)")]
    pub plot: Option<PathBuf>,

    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `--task=serve`, as the number the rest of this module compares.
const SERVE: u8 = 0;

fn task(s: &str) -> Result<u8, String> {
    match s {
        "1" | "2" | "3" => Ok(s.parse().expect("a digit")),
        "serve" => Ok(SERVE),
        _ => Err(format!("expected 1, 2, 3 or serve, got '{s}'")),
    }
}

/// `--output`'s help. clap turns a literal `{n}` in help text into a line break, so the `{n}`
/// placeholder carries an empty terminal escape (`ESC [0m`, a style reset) after its brace:
/// clap leaves it alone, and the escape is stripped (or invisible) on output.
const OUTPUT_HELP: &str = concat!(
    "Write results to FILE instead of standard output. The file appears only once complete; ",
    "a device node or named pipe is written in place. In a sharded run, {shard} in FILE ",
    "becomes the shard's tag (00002-of-00008), {i} its index and {",
    "\x1b[0m",
    "n} the count (a name with {",
    "\x1b[0m",
    "n} needs {i} or {shard} too); without them the tag goes before the extension ",
    "(emb.parquet -> emb-00002-of-00008.parquet)."
);

fn dtype(s: &str) -> Result<Dtype, String> {
    s.parse::<Dtype>().map_err(|e| e.to_string())
}

fn metric(s: &str) -> Result<Metric, String> {
    Metric::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        format!("expected one of {}, got '{s}'", names.join(", "))
    })
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("expected a number of 0 or more, got '{s}'")),
    }
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..1.0).contains(&x) => Ok(x),
        _ => Err(format!(
            "expected a number from 0 up to (not including) 1, got '{s}'"
        )),
    }
}

fn loss_weights(s: &str) -> Result<[f64; 2], String> {
    let parts: Vec<&str> = s.split(',').collect();
    let parsed: Vec<f64> = parts
        .iter()
        .filter_map(|p| non_negative(p.trim()).ok())
        .collect();
    match parsed.as_slice() {
        [a, b] if parts.len() == 2 && a + b > 0.0 => Ok([*a, *b]),
        _ => Err(format!(
            "expected two non-negative weights A,B, not both 0 (e.g. 1,0.5), got '{s}'"
        )),
    }
}

fn freeze_part(s: &str) -> Result<FreezePart, String> {
    FreezePart::parse(s).map_err(|e| e.to_string())
}

fn scenario(s: &str) -> Result<Scenario, String> {
    Scenario::parse(s).map_err(|e| e.to_string())
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 1e9 => Ok(v),
        _ => Err(format!("{s} is not a positive number of seconds")),
    }
}

/// The name of a `--format` value as typed.
fn format_name(f: OutputFormat) -> String {
    use clap::ValueEnum;
    f.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a whole number above 0, got '{s}'")),
    }
}

impl Cli {
    /// Flags given that `task` does not use, by name.
    fn unused_flags(&self, task: u8) -> Vec<&'static str> {
        let train = [
            ("--train-file", self.train_file.is_some()),
            ("--eval-file", self.eval_file.is_some()),
            ("--epochs", self.epochs.is_some()),
            ("--lr", self.lr.is_some()),
            ("--head-lr", self.head_lr.is_some()),
            ("--warmup", self.warmup.is_some()),
            ("--weight-decay", self.weight_decay.is_some()),
            ("--loss-weights", self.loss_weights.is_some()),
            ("--seed", self.seed.is_some()),
            ("--head-hidden", self.head_hidden.is_some()),
            ("--head-dropout", self.head_dropout.is_some()),
            ("--freeze-layers", self.freeze_layers.is_some()),
            ("--max-train-examples", self.max_train_examples.is_some()),
            ("--embedding-cache", self.embedding_cache.is_some()),
            ("--no-length-grouping", self.no_length_grouping),
            ("--grad-accum", self.grad_accum.is_some()),
            ("--eval-every", self.eval_every.is_some()),
            ("--keep-best", self.keep_best.is_some()),
            ("--early-stop", self.early_stop.is_some()),
            ("--class-weights", self.class_weights.is_some()),
        ];
        let embed_only = [
            ("--normalize", self.normalize),
            ("--no-normalize", self.no_normalize),
            ("--prompt", self.prompt.is_some()),
            ("--prompt-name", self.prompt_name.is_some()),
            ("--truncate-dim", self.truncate_dim.is_some()),
            ("--truncate-side", self.truncate_side.is_some()),
            ("--chunk-tokens", self.chunk_tokens.is_some()),
            ("--chunk-overlap", self.chunk_overlap.is_some()),
            ("--chunks", self.chunks.is_some()),
        ];
        let task2 = [
            ("--save", self.save.is_some()),
            ("--checkpoint", self.checkpoint.is_some()),
            ("--freeze", !self.freeze.is_empty()),
            ("--export", self.export.is_some()),
        ];
        let shards = [
            ("--shard", self.shard.is_some()),
            ("--shards", self.shards.is_some()),
        ];
        let overwrite = [("--overwrite", self.overwrite)];
        let task3 = [
            ("--scenarios", !self.scenarios.is_empty()),
            ("--plot", self.plot.is_some()),
        ];
        let input = [
            ("--sentence", !self.sentences.is_empty()),
            ("--input", self.input.is_some()),
        ];
        let output = [("--output", self.output.is_some())];
        let unused: Vec<(&'static str, bool)> = match task {
            SERVE => train
                .iter()
                .chain(&task2[..1])
                .chain(&task2[2..])
                .chain(&task3)
                .chain(&input)
                .chain(&shards)
                .chain(&overwrite)
                .chain(&output)
                .copied()
                .collect(),
            1 => train.iter().chain(&task2).chain(&task3).copied().collect(),
            2 => embed_only
                .iter()
                .chain(&task3)
                .chain(&shards)
                .copied()
                .collect(),
            _ => embed_only
                .iter()
                .chain(&task2)
                .chain(&input)
                .chain(&shards)
                .chain(&overwrite)
                .copied()
                .collect(),
        };
        unused
            .into_iter()
            .filter(|(_, given)| *given)
            .map(|(n, _)| n)
            .collect()
    }

    /// Validates the flags and builds the task's config.
    pub fn into_command(mut self) -> Result<Command> {
        let task = self.task;
        if let Some(flag) = self.unused_flags(task).first() {
            let task = if task == SERVE {
                "serve".to_string()
            } else {
                task.to_string()
            };
            bail!("{flag} does not apply to --task={task}; see --help for the flags of each task");
        }
        if let Some(flag) = self.serve.given().first().filter(|_| task != SERVE) {
            bail!("{flag} applies to --task=serve only");
        }
        let (model, model_given) = self.model_ref();
        if task == SERVE {
            return self.serve_config(model, model_given).map(Command::Serve);
        }
        let input = self.input_source();
        if task == 1 {
            return Ok(Command::Embed(self.embed_config(model, input)?));
        }
        let Some(format) = self.format.text_format() else {
            bail!(
                "--format {} applies to --task=1 only; use text, json or jsonl",
                format_name(self.format)
            );
        };
        let train = self.train_config(model, model_given);
        if task == 2 {
            return Ok(Command::Multitask(MultitaskConfig {
                train,
                save: self
                    .save
                    .unwrap_or_else(|| PathBuf::from(defaults::SAVE_DIR)),
                checkpoint: self.checkpoint,
                export: self.export,
                overwrite: self.overwrite,
                input,
                output: self.output,
                format,
            }));
        }
        let mut scenarios = self.scenarios;
        if scenarios.is_empty() {
            scenarios = Scenario::ALL.to_vec();
        }
        scenarios.dedup();
        Ok(Command::Scenarios(ScenariosConfig {
            layers_n: train.freeze_layers,
            train,
            scenarios,
            plot: self.plot,
            output: self.output,
            format,
        }))
    }

    /// `--task=serve`'s settings.
    fn serve_config(self, model: ModelRef, model_given: bool) -> Result<ServeConfig> {
        let served = ServedModel {
            model,
            model_given,
            checkpoint: self.checkpoint,
            dtype: self.dtype.unwrap_or_default(),
            max_seq_length: self.max_seq_length,
            normalize: match (self.normalize, self.no_normalize) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            prompt: self.prompt,
            prompt_name: self.prompt_name,
            truncate_dim: self.truncate_dim,
            batch_size: self.batch_size,
            served_name: None,
        };
        self.serve.into_config(served, self.max_batch_tokens)
    }

    /// The model to load, and whether `--model` was given.
    fn model_ref(&mut self) -> (ModelRef, bool) {
        let given = self.model.is_some();
        let model = ModelRef {
            id: self
                .model
                .take()
                .unwrap_or_else(|| DEFAULT_MODEL.to_string()),
            revision: std::mem::take(&mut self.revision),
            offline: self.offline || offline_from_env(),
            hub_timeout: std::time::Duration::from_secs_f64(self.hub_timeout),
        };
        (model, given)
    }

    /// Where the sentences come from.
    fn input_source(&mut self) -> InputSource {
        if !self.sentences.is_empty() {
            return InputSource::Sentences(std::mem::take(&mut self.sentences));
        }
        match self.input.take() {
            Some(p) if p.as_os_str() == "-" => InputSource::Stdin,
            Some(p) => InputSource::File(p),
            None => InputSource::Default,
        }
    }

    /// `--task=1`'s settings.
    fn embed_config(self, model: ModelRef, input: InputSource) -> Result<EmbedConfig> {
        let to_stdout = self.output.as_deref().is_none_or(|p| p == Path::new("-"));
        if self.format.is_columnar() && to_stdout {
            bail!(
                "--format {0} writes a file: give --output FILE (e.g. -o embeddings.{0})",
                format_name(self.format)
            );
        }
        let normalize = match (self.normalize, self.no_normalize) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let shard = match self.shard {
            Some(shard) => Some(ShardSpec {
                shard,
                source: format!("--shard {shard}"),
                note: None,
            }),
            None => crate::shard::from_env(self.shards, &|k| std::env::var(k).ok())?,
        };
        let output = match (&shard, self.output) {
            (Some(s), Some(p)) if p != Path::new("-") => {
                crate::shard::check_template(&p).map_err(|e| anyhow::anyhow!("--output {e}"))?;
                Some(s.shard.output_path(&p))
            }
            (None, Some(p)) if crate::shard::has_placeholder(&p) => bail!(
                "--output {}: {{shard}}, {{i}} and {{n}} are filled in for a sharded run \
                 only; pass --shard I/N, or remove them from the name",
                p.display()
            ),
            (_, p) => p,
        };
        Ok(EmbedConfig {
            model,
            input,
            output,
            format: self.format,
            shard,
            overwrite: self.overwrite,
            batch_size: self.batch_size,
            max_batch_tokens: self.max_batch_tokens,
            dtype: self.dtype.unwrap_or_default(),
            max_seq_length: self.max_seq_length,
            normalize,
            prompt: self.prompt,
            prompt_name: self.prompt_name,
            truncate_dim: self.truncate_dim,
            truncate_side: self.truncate_side.unwrap_or_default(),
            chunking: self.chunk_tokens.map(|tokens| ChunkSpec {
                tokens,
                overlap: self.chunk_overlap.unwrap_or(0),
                mode: self.chunks.unwrap_or_default(),
            }),
        })
    }

    /// The training settings of `--task=2` and `--task=3`.
    fn train_config(&mut self, model: ModelRef, model_given: bool) -> TrainConfig {
        let defaults = TrainSettings::default();
        let (default_epochs, default_max_examples) = if self.task == 2 {
            (defaults.epochs, None)
        } else {
            (
                defaults::SCENARIO_EPOCHS,
                Some(defaults::SCENARIO_MAX_EXAMPLES),
            )
        };
        let predicting = self.checkpoint.is_some();
        let own_train_file = self.train_file.is_some();
        TrainConfig {
            model,
            model_given,
            max_seq_length: self.max_seq_length,
            train_file: self
                .train_file
                .take()
                .map_or_else(DataSource::default_train, DataSource::File),
            // The shipped evaluation set goes with the shipped training set only.
            eval_file: match (self.eval_file.take(), predicting || own_train_file) {
                (Some(f), _) => Some(DataSource::File(f)),
                (None, false) => Some(DataSource::default_eval()),
                (None, true) => None,
            },
            settings: TrainSettings {
                epochs: self.epochs.unwrap_or(default_epochs),
                batch_size: self.batch_size,
                lr: self.lr.unwrap_or(defaults.lr),
                head_lr: self.head_lr.unwrap_or(defaults.head_lr),
                warmup: self.warmup.unwrap_or(defaults.warmup),
                weight_decay: self.weight_decay.unwrap_or(defaults.weight_decay),
                loss_weights: self.loss_weights.unwrap_or(defaults.loss_weights),
                seed: self.seed.unwrap_or(defaults.seed),
                group_by_length: !self.no_length_grouping,
                grad_accum: self.grad_accum.unwrap_or(defaults.grad_accum),
                eval_every: self.eval_every,
                keep_best: self.keep_best,
                early_stop: self.early_stop,
                class_weights: self.class_weights.as_deref() == Some("auto"),
                ..defaults
            },
            head_hidden: self.head_hidden.unwrap_or(defaults::HEAD_HIDDEN),
            head_dropout: self.head_dropout.unwrap_or(defaults::HEAD_DROPOUT),
            freeze: std::mem::take(&mut self.freeze),
            freeze_layers: self.freeze_layers,
            max_train_examples: self.max_train_examples.or(default_max_examples),
            embedding_cache: self.embedding_cache.take(),
            dtype: self.dtype.unwrap_or_default(),
        }
    }
}
