//! The server's Prometheus metrics (through the `metrics` crate): requests by route and
//! status, queue depth, batch sizes in requests and tokens, and time spent queued,
//! tokenizing, in inference and per request, as histograms.

use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "fetch_ml_request_count";
pub const REQUEST_SECONDS: &str = "fetch_ml_request_duration_seconds";
pub const QUEUE_SIZE: &str = "fetch_ml_queue_size";
pub const BATCH_REQUESTS: &str = "fetch_ml_batch_requests";
pub const BATCH_TOKENS: &str = "fetch_ml_batch_tokens";
pub const QUEUE_SECONDS: &str = "fetch_ml_queue_duration_seconds";
pub const TOKENIZE_SECONDS: &str = "fetch_ml_tokenization_duration_seconds";
pub const INFERENCE_SECONDS: &str = "fetch_ml_inference_duration_seconds";

/// Installs the process's recorder and returns the handle that renders it.
pub fn install() -> Result<PrometheusHandle> {
    let seconds: Vec<f64> = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .to_vec();
    let requests: Vec<f64> = (0..10).map(|i| f64::from(1u32 << i)).collect();
    let tokens: Vec<f64> = (4..16).map(|i| f64::from(1u32 << i)).collect();
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(BATCH_REQUESTS.into()), &requests)?
        .set_buckets_for_metric(Matcher::Full(BATCH_TOKENS.into()), &tokens)?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    Ok(handle)
}

fn describe() {
    metrics::describe_counter!(REQUESTS, "Requests answered, by route and status");
    metrics::describe_histogram!(REQUEST_SECONDS, "Time to answer a request, by route");
    metrics::describe_gauge!(QUEUE_SIZE, "Requests waiting for the model");
    metrics::describe_histogram!(BATCH_REQUESTS, "Requests per batch");
    metrics::describe_histogram!(BATCH_TOKENS, "Tokens per batch");
    metrics::describe_histogram!(QUEUE_SECONDS, "Time a request waited in the queue");
    metrics::describe_histogram!(TOKENIZE_SECONDS, "Time to tokenize a request");
    metrics::describe_histogram!(INFERENCE_SECONDS, "Time a batch spent in the model");
}

/// One answered request.
pub fn request(route: &str, status: u16, took: Duration) {
    counter!(REQUESTS, "route" => route.to_string(), "status" => status.to_string()).increment(1);
    histogram!(REQUEST_SECONDS, "route" => route.to_string()).record(took.as_secs_f64());
}

pub fn queue_size(n: usize) {
    gauge!(QUEUE_SIZE).set(n as f64);
}

/// A batch of `requests` requests holding `tokens` tokens.
pub fn batch(requests: usize, tokens: usize) {
    if requests > 0 {
        histogram!(BATCH_REQUESTS).record(requests as f64);
        histogram!(BATCH_TOKENS).record(tokens as f64);
    }
}

pub fn queue_time(d: Duration) {
    histogram!(QUEUE_SECONDS).record(d.as_secs_f64());
}

pub fn tokenize_time(d: Duration) {
    histogram!(TOKENIZE_SECONDS).record(d.as_secs_f64());
}

pub fn inference_time(d: Duration) {
    histogram!(INFERENCE_SECONDS).record(d.as_secs_f64());
}
