//! The command line as clap sees it, and its conversion into [`crate::config`] structs.

use std::path::PathBuf;

use clap::Parser;

use crate::chunk::ChunkMode;
use crate::config::{defaults, OutputFormat};
use crate::model::freeze::{FreezePart, Scenario};
use crate::model::quant::Dtype;
use crate::serve::args::ServeArgs;
use crate::shard::Shard;
use crate::tokenize::TruncateSide;
use crate::train::metrics::Metric;

mod convert;
mod values;
use values::{
    dtype, fraction, freeze_part, loss_weights, metric, non_negative, positive, positive_secs,
    scenario, task,
};

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
    #[arg(long, value_name = "ID_OR_DIR", help_heading = heading::MODEL)]
    pub model: Option<String>,

    /// Hub revision of --model: a branch, tag or commit.
    #[arg(long, default_value = "main", help_heading = heading::MODEL)]
    pub revision: String,

    /// Resolve the model from the local Hugging Face cache only ($HF_HOME/hub, default
    /// ~/.cache/huggingface/hub), never the network. HF_HUB_OFFLINE=1 does the same.
    #[arg(long, help_heading = heading::MODEL)]
    pub offline: bool,

    /// Seconds a Hugging Face hub request may go without an answer (or a download without a
    /// byte) before fetch-ml gives up and suggests --offline or a local folder.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = positive_secs, help_heading = heading::MODEL)]
    pub hub_timeout: f64,

    /// Truncate each sentence to this many tokens, `[CLS]` and `[SEP]` included.
    /// [default: the model's own limit: max_seq_length of sentence_bert_config.json, else
    /// max_position_embeddings (less the first position id: pad_token_id + 1 for RoBERTa and
    /// XLM-RoBERTa, 2 for MPNet; 514 positions hold 512 tokens)]
    #[arg(long, value_name = "N", help_heading = heading::MODEL)]
    pub max_seq_length: Option<usize>,

    /// Threads for matrix products and the inference kernels. [default: the number of cores]
    /// At most 4 per core are used; where a process limit allows fewer, fewer are used (a
    /// note on stderr says so). Inference runs up to 4 batches at once (no more than 16,384
    /// tokens together), each with its own buffers.
    #[arg(long, value_name = "N", value_parser = positive, help_heading = heading::MODEL)]
    pub threads: Option<usize>,

    /// A sentence to process. Repeat the flag for several.
    #[arg(
        long = "sentence",
        short = 's',
        value_name = "TEXT",
        conflicts_with = "input",
        help_heading = heading::INPUT
    )]
    pub sentences: Vec<String>,

    /// A UTF-8 file with one sentence per line (blank lines are skipped); `-` reads standard
    /// input. [default: the built-in data/sentences.txt]
    #[arg(long, short = 'i', value_name = "FILE", help_heading = heading::INPUT)]
    pub input: Option<PathBuf>,

    #[arg(long, short = 'o', value_name = "FILE", help_heading = heading::OUTPUT, help = OUTPUT_HELP)]
    pub output: Option<PathBuf>,

    /// Print nothing on stderr but errors: no notes, warnings, progress bars or reports.
    /// Standard output and --output files are the same either way. (--task=serve: the notes
    /// of loading; the server's log lines stay.)
    #[arg(long, short = 'q', help_heading = heading::RUN)]
    pub quiet: bool,

    /// Output format. text: a summary per sentence and, for up to 20 sentences, their cosine
    /// similarity matrix. jsonl: one object per sentence (index = the sentence's 0-based line
    /// number in the input, text, tokens, truncated, embedding). json: one document (model,
    /// dimension, normalized, pooling, max_seq_length, embeddings: [{text, tokens, truncated,
    /// embedding}], count). parquet (--task=1, needs --output): columns index (int64), text,
    /// tokens (int32), truncated, embedding (fixed-size list of float32), a row group per
    /// 4096 sentences or 8 MiB of text. npy (--task=1, needs --output): a float32 matrix, one row per
    /// sentence, and a JSONL sidecar FILE.meta.jsonl with index, text, tokens, truncated of
    /// each row.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, help_heading = heading::OUTPUT)]
    pub format: OutputFormat,

    /// Embed only shard I of N (0-based, I < N) of the input. A file is cut into N byte
    /// ranges at line starts and this run reads only its own; other inputs are read whole and
    /// line L goes to shard L mod N. Output rows keep their global line number as index.
    /// [default: index I from JOB_COMPLETION_INDEX (Kubernetes Indexed Job) or
    /// SLURM_ARRAY_TASK_ID (Slurm job array), with N pinned by --shards or FETCH_ML_SHARDS;
    /// else no sharding. --shard 0/1 turns the environment off]
    #[arg(long, value_name = "I/N", value_parser = Shard::parse, help_heading = heading::CORPUS)]
    pub shard: Option<Shard>,

    /// The number of shards N when the shard index comes from the environment
    /// (JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID, the shard index itself). Required there:
    /// the count is never guessed from the engine, since a re-submitted part of a job would
    /// then split the input differently. FETCH_ML_SHARDS=N does the same.
    #[arg(long, value_name = "N", value_parser = positive, conflicts_with = "shard", help_heading = heading::CORPUS)]
    pub shards: Option<usize>,

    /// Redo work whose output already exists: a shard's output that is complete and was made by
    /// the same job (otherwise skipped, so that retried shards are cheap) or by another job
    /// (otherwise an error saying what differs), or an earlier --export folder.
    #[arg(long, help_heading = heading::EXISTING)]
    pub overwrite: bool,

    /// Sentences per forward pass; in training, examples per optimizer step. Inference
    /// batches group sentences of similar length.
    #[arg(long, default_value_t = 32, value_parser = positive, help_heading = heading::RUN)]
    pub batch_size: usize,

    /// Arithmetic of the encoder where it does not train (--task=1, a frozen encoder's
    /// vectors in --task=2/3, predictions with --checkpoint): f32, bf16 (bf16 products, f32
    /// sums) or int8 (int8 weights per output channel, int8 activations per token row, i32
    /// sums). Softmax, LayerNorm and pooling stay f32; a sentence's vector never depends on
    /// its batch. The kernel is chosen for this CPU and named on stderr. For speed, int8 pays
    /// off with VNNI or AMX and bf16 with AMX; with AVX2 alone f32 is as fast as int8 and
    /// faster than bf16 (both still use less memory). [default: f32]
    #[arg(long, value_name = "f32|bf16|int8", value_parser = dtype, help_heading = heading::MODEL)]
    pub dtype: Option<Dtype>,

    /// Also cap each inference batch at N tokens (padding-free: the sum of its sentences'
    /// lengths); a longer sentence gets a batch of its own. [default: no token cap]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = heading::RUN)]
    pub max_batch_tokens: Option<usize>,

    /// L2-normalise the embeddings, whatever the model's folder says.
    #[arg(long, conflicts_with = "no_normalize", help_heading = heading::EMBEDDINGS)]
    pub normalize: bool,

    /// Text prepended to every sentence before tokenization, as sentence-transformers'
    /// `prompt` (e5 models want "query: " or "passage: "). Its tokens count toward the max
    /// length and are pooled with the sentence's.
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "prompt_name",
        help_heading = heading::EMBEDDINGS
    )]
    pub prompt: Option<String>,

    /// A named prompt of the model's config_sentence_transformers.json (such as query or
    /// passage), prepended to every sentence. [default: the model's default_prompt_name, if
    /// it names one; else no prompt]
    #[arg(long, value_name = "NAME", help_heading = heading::EMBEDDINGS)]
    pub prompt_name: Option<String>,

    /// Keep only the first N dimensions of each vector (Matryoshka models), after the Dense
    /// layers and before normalisation: a model that normalises gives unit vectors of N
    /// dimensions (text-embeddings-inference's `dimensions`). N larger than the model's
    /// dimension is an error. [default: all dimensions]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = heading::EMBEDDINGS)]
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
        help_heading = heading::LONG_INPUTS
    )]
    pub truncate_side: Option<TruncateSide>,

    /// Instead of cutting an input longer than N tokens, split it into windows of N tokens
    /// (special tokens and prompt included: every window carries the prompt), embed each, and
    /// write one vector per input, the token-weighted mean of its windows' vectors (normalised
    /// again when the model normalises), or with --chunks rows one row per window. An input
    /// of N tokens or fewer is one window. N is at most the max length (--max-seq-length).
    #[arg(long, value_name = "N", value_parser = positive, help_heading = heading::LONG_INPUTS)]
    pub chunk_tokens: Option<usize>,

    /// Tokens each window shares with the one before it. [default: 0]
    #[arg(
        long,
        value_name = "K",
        requires = "chunk_tokens",
        help_heading = heading::LONG_INPUTS
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
        help_heading = heading::LONG_INPUTS
    )]
    pub chunks: Option<ChunkMode>,

    /// Do not normalise the embeddings, whatever the model's folder says.
    /// [default: normalise only when the model's modules.json lists a Normalize step]
    #[arg(long, help_heading = heading::EMBEDDINGS)]
    pub no_normalize: bool,

    /// Labelled training data: .jsonl ({"text", "class", "sentiment"} per line) or .csv with a
    /// text,class,sentiment header. A row may lack one label. [default: the built-in
    /// data/multitask/train.jsonl]
    #[arg(
        long,
        value_name = "FILE",
        help_heading = heading::TRAINING
    )]
    pub train_file: Option<PathBuf>,

    /// Labelled evaluation data, same formats. Its labels must occur in the training data.
    /// [default: the built-in data/multitask/eval.jsonl when --train-file is not given;
    /// otherwise none]
    #[arg(
        long,
        value_name = "FILE",
        help_heading = heading::TRAINING
    )]
    pub eval_file: Option<PathBuf>,

    /// Passes over the training data. [default: 3 for --task=2, 2 for --task=3]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = heading::TRAINING)]
    pub epochs: Option<usize>,

    /// Peak learning rate of the encoder (AdamW). [default: 2e-5]
    #[arg(long, value_name = "RATE", value_parser = non_negative, help_heading = heading::TRAINING)]
    pub lr: Option<f64>,

    /// Peak learning rate of the two heads (AdamW). [default: 1e-3]
    #[arg(long, value_name = "RATE", value_parser = non_negative, help_heading = heading::TRAINING)]
    pub head_lr: Option<f64>,

    /// Fraction of the steps over which the learning rates warm up linearly from 0; they then
    /// decay linearly to 0. [default: 0.1]
    #[arg(long, value_name = "FRACTION", value_parser = fraction, help_heading = heading::TRAINING)]
    pub warmup: Option<f64>,

    /// AdamW's decoupled weight decay. [default: 0.01]
    #[arg(long, value_name = "W", value_parser = non_negative, help_heading = heading::TRAINING)]
    pub weight_decay: Option<f64>,

    /// Weights A,B of the combined loss A * CE(class) + B * CE(sentiment). [default: 1,1]
    #[arg(long, value_name = "A,B", value_parser = loss_weights, help_heading = heading::TRAINING)]
    pub loss_weights: Option<[f64; 2]>,

    /// Seed of head initialisation, dropout and shuffling: the same seed on the same data gives
    /// the same losses and weights. [default: 42]
    #[arg(long, value_name = "N", help_heading = heading::TRAINING)]
    pub seed: Option<u64>,

    /// Width of each head's hidden layer. [default: 256]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = heading::TRAINING)]
    pub head_hidden: Option<usize>,

    /// Dropout between each head's two layers, in training. [default: 0.1]
    #[arg(long, value_name = "P", value_parser = fraction, help_heading = heading::TRAINING)]
    pub head_dropout: Option<f64>,

    /// Parts that do not train: none, all, encoder (alias backbone), class-head (alias
    /// head-a), sentiment-head (alias head-b). Repeat or separate with commas, e.g.
    /// --freeze encoder,class-head. Frozen parts run without dropout or gradients. [default:
    /// none]
    #[arg(long, value_name = "PART", value_delimiter = ',', value_parser = freeze_part, help_heading = heading::MULTITASK)]
    pub freeze: Vec<FreezePart>,

    /// Freeze the embeddings and the first N encoder layers; the later layers train. With
    /// --task=3 it sets N of the "layers" scenario [default there: half the layers].
    #[arg(long, value_name = "N", help_heading = heading::TRAINING)]
    pub freeze_layers: Option<usize>,

    /// Train on at most the first N rows of the training data. [default: all for --task=2,
    /// 256 for --task=3]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = heading::TRAINING)]
    pub max_train_examples: Option<usize>,

    /// Batch examples in a random order only, instead of grouping examples of similar length
    /// into each batch (fewer padding tokens, the same examples per epoch). [default: grouped]
    #[arg(long, help_heading = heading::TRAINING)]
    pub no_length_grouping: bool,

    /// Micro-batches of --batch-size per optimizer step: the step sees N x --batch-size rows,
    /// as one batch of that size would (up to float rounding), in the memory of one
    /// --batch-size. [default: 1]
    #[arg(long, value_name = "N", value_parser = positive, help_heading = heading::TRAINING)]
    pub grad_accum: Option<usize>,

    /// Also evaluate every N optimizer steps, with a line on stderr (needs an evaluation
    /// set). [default: at the end of each epoch only]
    #[arg(long, value_name = "STEPS", value_parser = positive, help_heading = heading::TRAINING)]
    pub eval_every: Option<usize>,

    /// Keep the weights of the best evaluation by METRIC instead of the last ones:
    /// class.accuracy, class.macro_f1, sentiment.accuracy, sentiment.macro_f1, mean.accuracy
    /// or mean.macro_f1 (needs an evaluation set). [default: the last weights]
    #[arg(long, value_name = "METRIC", value_parser = metric, help_heading = heading::TRAINING)]
    pub keep_best: Option<Metric>,

    /// Stop when --keep-best's metric has not improved for PATIENCE evaluations in a row.
    /// [default: train every epoch]
    #[arg(long, value_name = "PATIENCE", value_parser = positive, requires = "keep_best", help_heading = heading::TRAINING)]
    pub early_stop: Option<usize>,

    /// Weight each head's loss by inverse label frequency (n / (labels x count), as
    /// scikit-learn's "balanced"): `auto`, or `none`. [default: none]
    #[arg(long, value_name = "auto|none", value_parser = ["auto", "none"], help_heading = heading::TRAINING)]
    pub class_weights: Option<String>,

    /// Keep the sentence vectors of a frozen encoder in DIR, keyed by model, revision, max
    /// length and text, so repeated runs skip the encoder. [default: no cache]
    #[arg(
        long,
        value_name = "DIR",
        help_heading = heading::TRAINING
    )]
    pub embedding_cache: Option<PathBuf>,

    /// Save the trained model here (written whole, then renamed into place).
    /// [default: checkpoints/multitask]
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "checkpoint",
        help_heading = heading::MULTITASK
    )]
    pub save: Option<PathBuf>,

    /// Skip training: predict (and evaluate, with --eval-file) with a saved model. With
    /// --task=serve: serve its predictions (/predict) and its encoder's embeddings.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "train_file",
        help_heading = heading::CHECKPOINT
    )]
    pub checkpoint: Option<PathBuf>,

    /// Also write the trained model (or the --checkpoint's) to DIR as a sentence-transformers
    /// folder: the encoder (config.json, tokenizer files, model.safetensors, modules.json,
    /// 1_Pooling, sentence_bert_config.json) plus heads.safetensors and heads.json. Written
    /// whole, then renamed into place; an existing DIR is replaced only with --overwrite.
    #[arg(long, value_name = "DIR", help_heading = heading::MULTITASK)]
    pub export: Option<PathBuf>,

    /// Scenarios to compare, comma-separated: none, encoder, class-head, sentiment-head,
    /// layers, all. [default: all six]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = scenario, help_heading = heading::SCENARIOS)]
    pub scenarios: Vec<Scenario>,

    /// Draw eval accuracy per head per scenario as a PNG chart.
    #[arg(long, value_name = "FILE.png", help_heading = heading::SCENARIOS)]
    pub plot: Option<PathBuf>,

    #[command(flatten)]
    pub serve: ServeArgs,

    /// The flags given on the command line, with their help headings (filled by
    /// [`Cli::parse_args`]).
    #[arg(skip)]
    given: Option<Vec<(String, Option<String>)>>,
}

/// `--task=serve`, as the number the rest of this module compares.
const SERVE: u8 = 0;

/// A task's name as `--task` takes it: 1, 2, 3 or serve.
fn task_name(task: u8) -> String {
    if task == SERVE {
        "serve".to_string()
    } else {
        task.to_string()
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

/// The help headings of the flags (and `crate::serve::args::HEADING` of the server's). A
/// heading names the tasks its flags apply to, as `(--task=N, ...)`; a heading that names
/// none applies to every task. This is the one place that says which task takes which flag:
/// [`Cli::into_command`] reads it off the headings of the flags given, and `--help` shows it.
mod heading {
    pub const MODEL: &str = "Model";
    pub const INPUT: &str = "Input (--task=1, --task=2)";
    pub const OUTPUT: &str = "Output (--task=1, --task=2, --task=3)";
    pub const RUN: &str = "Batches and messages";
    pub const EXISTING: &str = "Existing output (--task=1, --task=2)";
    pub const EMBEDDINGS: &str = "Embeddings (--task=1, --task=serve)";
    pub const CORPUS: &str = "Corpus (--task=1)";
    pub const LONG_INPUTS: &str = "Long inputs (--task=1)";
    pub const TRAINING: &str = "Training (--task=2, --task=3)";
    pub const MULTITASK: &str = "Multitask model (--task=2)";
    pub const CHECKPOINT: &str = "Saved multitask model (--task=2, --task=serve)";
    pub const SCENARIOS: &str = "Scenarios (--task=3)";

    /// The tasks a heading names, as `--task` takes them ("1", "serve"); none: every task.
    pub fn tasks(heading: &str) -> Vec<&str> {
        heading
            .split("--task=")
            .skip(1)
            .map(|t| {
                t.split(|c: char| !c.is_ascii_alphanumeric())
                    .next()
                    .unwrap_or("")
            })
            .collect()
    }

    /// Whether a flag under `heading` applies to `task` (its name, as `--task` takes it): the
    /// heading names it, or names no task at all.
    pub fn applies(heading: Option<&str>, task: &str) -> bool {
        let named = heading.map(tasks).unwrap_or_default();
        named.is_empty() || named.contains(&task)
    }
}
