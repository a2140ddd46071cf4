//! The server's own flags (`--task=serve`), flattened into the command line, and their
//! conversion into a [`ServeConfig`]. The model flags it shares with `--task=1` stay in `cli`.

use std::time::Duration;

use anyhow::{bail, Result};

use super::config::{defaults, ApiKey, Limits, LogFormat, ServeConfig, ServedModel};

/// The help heading of the server's flags; like every heading of the command line, it names
/// the tasks that take its flags (`cli`'s check reads it).
pub const HEADING: &str = "Server (--task=serve)";

/// Flags of `--task=serve`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = HEADING)]
pub struct ServeArgs {
    /// Address to listen on. 0.0.0.0 listens on every interface (in a container).
    #[arg(long, value_name = "ADDR", default_value = defaults::HOST)]
    pub host: String,

    /// Port to listen on; 0 picks a free one. The address is printed on standard output
    /// once listening ("listening on http://HOST:PORT").
    #[arg(long, default_value_t = defaults::PORT)]
    pub port: u16,

    /// Requests accepted and not yet answered, at most; a request beyond them gets 429 at
    /// once, so a load balancer can send it elsewhere.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_CONCURRENT_REQUESTS, value_parser = positive)]
    pub max_concurrent_requests: usize,

    /// Inputs in one request, at most; more get 413.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_CLIENT_BATCH_SIZE, value_parser = positive)]
    pub max_client_batch_size: usize,

    /// Bytes of one request body, at most; a larger body gets 413.
    #[arg(long, value_name = "BYTES", default_value_t = defaults::MAX_BODY_BYTES, value_parser = positive)]
    pub max_body_bytes: usize,

    /// Truncate inputs longer than the model's limit instead of answering 413, when a request
    /// does not say (`truncate` of /embed; the OpenAI route has no such field).
    #[arg(long)]
    pub auto_truncate: bool,

    /// Require `Authorization: Bearer KEY` on every route but /health (compared in constant
    /// time); others get 401. FETCH_ML_API_KEY does the same, without showing the key in
    /// the process list.
    #[arg(
        long,
        value_name = "KEY",
        env = "FETCH_ML_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open (keep a load balancer's idle timeout below it).
    #[arg(long, value_name = "SECS", default_value_t = defaults::HEADER_TIMEOUT_SECS, value_parser = secs)]
    pub header_timeout: f64,

    /// Seconds a client has to send a request's whole body once its headers are in; a slower
    /// one gets 408.
    #[arg(long, value_name = "SECS", default_value_t = defaults::BODY_TIMEOUT_SECS, value_parser = secs)]
    pub body_timeout: f64,

    /// Log lines as readable text or as one JSON object per line (for log collectors).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The model name that /info and the OpenAI route report. [default: --model as given,
    /// or the checkpoint's base model]
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
}

impl ServeArgs {
    /// The server's settings; `served` carries the model flags shared with `--task=1` and
    /// `max_batch_tokens` the `--max-batch-tokens` flag.
    pub fn into_config(
        self,
        mut served: ServedModel,
        max_batch_tokens: Option<usize>,
    ) -> Result<ServeConfig> {
        let api_key = match self.api_key {
            Some(k) if k.trim().is_empty() => {
                bail!("--api-key (or FETCH_ML_API_KEY) is empty; give a key or leave it unset")
            }
            k => k.map(ApiKey),
        };
        served.served_name = self.served_model_name;
        Ok(ServeConfig {
            served,
            host: self.host,
            port: self.port,
            limits: Limits {
                max_batch_tokens: max_batch_tokens.unwrap_or(defaults::MAX_BATCH_TOKENS),
                max_concurrent_requests: self.max_concurrent_requests,
                max_client_batch_size: self.max_client_batch_size,
                max_body_bytes: self.max_body_bytes,
                auto_truncate: self.auto_truncate,
            },
            api_key,
            header_timeout: Duration::from_secs_f64(self.header_timeout),
            body_timeout: Duration::from_secs_f64(self.body_timeout),
            log_format: self.log_format,
        })
    }
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a whole number above 0, got '{s}'")),
    }
}

fn secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "expected seconds above 0 (at most a day), got '{s}'"
        )),
    }
}
