//! The server's validated settings ([`ServeConfig`]) and their defaults, in one place.

use std::path::PathBuf;
use std::time::Duration;

use crate::hub::ModelRef;
use crate::model::quant::Dtype;

/// The defaults of the server's flags (`--help` repeats them). They follow
/// text-embeddings-inference's where it has the same setting.
pub mod defaults {
    /// Where the server listens: this machine only, unless `--host` says otherwise.
    pub const HOST: &str = "127.0.0.1";
    pub const PORT: u16 = 8080;
    /// Tokens one batching step takes from the queue (TEI's default).
    pub const MAX_BATCH_TOKENS: usize = 16_384;
    /// Requests accepted and not yet answered, at most; more get 429 (TEI's default).
    pub const MAX_CONCURRENT_REQUESTS: usize = 512;
    /// Inputs in one request, at most; more get 413 (TEI's default).
    pub const MAX_CLIENT_BATCH_SIZE: usize = 32;
    /// Bytes of one request body, at most; more get 413 (TEI's 2 MB).
    pub const MAX_BODY_BYTES: usize = 2_000_000;
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open (nginx's keepalive_timeout, above the 60 s idle timeout of the
    /// common cloud load balancers, so they close first).
    pub const HEADER_TIMEOUT_SECS: f64 = 75.0;
    /// Seconds a client has to send a request's whole body once its headers are in.
    pub const BODY_TIMEOUT_SECS: f64 = 60.0;
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

/// The model the server loads at start, and how.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// The model's folder or hub id; `None` with a checkpoint means the checkpoint's base model.
    pub model: ModelRef,
    /// True when `--model` was given (with a checkpoint, it overrides the base model).
    pub model_given: bool,
    /// A multitask model saved by `--task=2`, for `/predict`.
    pub checkpoint: Option<PathBuf>,
    pub dtype: Dtype,
    /// Truncate inputs to this many tokens; `None` for the model's own limit.
    pub max_seq_length: Option<usize>,
    /// Override the model's normalisation; `None` follows the model's folder.
    pub normalize: Option<bool>,
    /// Text prepended to every input unless a request names a prompt.
    pub prompt: Option<String>,
    /// A named prompt of the model's `config_sentence_transformers.json`.
    pub prompt_name: Option<String>,
    /// Default Matryoshka truncation of the vectors (requests may ask for another).
    pub truncate_dim: Option<usize>,
    /// Sentences per forward pass inside one batching step.
    pub batch_size: usize,
    /// The name `/info` and the OpenAI route give; `None` for the model's id.
    pub served_name: Option<String>,
}

/// What one request may ask and how many may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_batch_tokens: usize,
    pub max_concurrent_requests: usize,
    pub max_client_batch_size: usize,
    pub max_body_bytes: usize,
    /// Truncate inputs longer than the model's limit instead of answering 413, when a request
    /// does not say (the OpenAI route has no `truncate` field).
    pub auto_truncate: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_tokens: defaults::MAX_BATCH_TOKENS,
            max_concurrent_requests: defaults::MAX_CONCURRENT_REQUESTS,
            max_client_batch_size: defaults::MAX_CLIENT_BATCH_SIZE,
            max_body_bytes: defaults::MAX_BODY_BYTES,
            auto_truncate: false,
        }
    }
}

/// Settings of `--task=serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub served: ServedModel,
    pub host: String,
    /// 0 picks a free port (printed at start).
    pub port: u16,
    pub limits: Limits,
    /// Every route but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<ApiKey>,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub log_format: LogFormat,
}

/// The API key; its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}
