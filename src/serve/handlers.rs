//! The route handlers: check a request, tokenize it off the async threads, queue it for the
//! batcher, and shape its rows into the route's reply.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;

use super::backend::{finish_vector, Backend, TokenizeOptions};
use super::body::JsonBody;
use super::errors::{ApiError, ErrorKind, OpenAiError};
use super::queue::{Job, Rows};
use super::routes::App;
use super::types::*;
use crate::tokenize::Encoded;

/// Inputs given as texts or as token ids.
enum Given {
    Texts(Vec<String>, TokenizeOptions),
    Tokens(Vec<Vec<u32>>, bool),
}

impl Given {
    fn len(&self) -> usize {
        match self {
            Given::Texts(t, _) => t.len(),
            Given::Tokens(t, _) => t.len(),
        }
    }
}

/// Checks the count and emptiness of the inputs, takes a permit, tokenizes, queues and waits:
/// the request's rows in its order, and its token count.
async fn run(app: &App, job: Job, given: Given) -> Result<(Rows, usize), ApiError> {
    let ready = app.ready()?;
    let n = given.len();
    if n == 0 {
        return Err(ApiError::invalid("input", "the list of inputs is empty"));
    }
    if n > app.limits.max_client_batch_size {
        return Err(ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "{n} inputs in one request; at most {} are allowed (--max-client-batch-size): \
                 split them over several requests",
                app.limits.max_client_batch_size
            ),
        )
        .with_param("input"));
    }
    if let Given::Texts(texts, _) = &given {
        if let Some(i) = texts.iter().position(|t| t.is_empty()) {
            return Err(ApiError::invalid(
                "input",
                format!("input {i} is an empty string"),
            ));
        }
    }
    let _permit = app.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            ErrorKind::Overloaded,
            format!(
                "{} requests are waiting already (--max-concurrent-requests); retry later",
                app.limits.max_concurrent_requests
            ),
        )
    })?;
    let encoded = encode(&ready.backend, given).await?;
    let tokens = encoded.iter().map(|e| e.ids.len()).sum();
    let rx = ready.queue.push(job, encoded).map_err(|_| {
        ApiError::new(
            ErrorKind::Unavailable,
            "the server is shutting down; retry on another replica",
        )
    })?;
    match rx.await {
        Ok(Ok(rows)) => Ok((rows, tokens)),
        Ok(Err(message)) => Err(ApiError::new(
            ErrorKind::Backend,
            format!("the model failed on this request: {message}"),
        )),
        Err(_) => Err(ApiError::new(
            ErrorKind::Backend,
            "the batch of this request was lost",
        )),
    }
}

/// Tokens of the inputs, tokenized on the blocking pool.
async fn encode(backend: &Arc<Backend>, given: Given) -> Result<Vec<Encoded>, ApiError> {
    let backend = backend.clone();
    let start = Instant::now();
    let encoded = tokio::task::spawn_blocking(move || match given {
        Given::Texts(texts, opts) => backend.tokenize(&texts, &opts),
        Given::Tokens(ids, truncate) => backend.token_inputs(ids, truncate),
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Backend, format!("tokenizing failed: {e}")))??;
    super::metrics::tokenize_time(start.elapsed());
    Ok(encoded)
}

/// A request's `dimensions`, checked against the model's.
fn dimensions(backend: &Backend, asked: Option<usize>) -> Result<Option<usize>, ApiError> {
    match asked {
        Some(n) if n == 0 || n > backend.dimension => Err(ApiError::invalid(
            "dimensions",
            format!(
                "dimensions must be from 1 to the model's {}, got {n}",
                backend.dimension
            ),
        )),
        Some(n) => Ok(Some(n)),
        None => Ok(backend.truncate_dim),
    }
}

fn vectors(rows: Rows) -> Vec<Vec<f32>> {
    match rows {
        Rows::Vectors(v) => v,
        Rows::Probabilities(_) => unreachable!("an embedding job answers vectors"),
    }
}

/// Embeds texts.
#[utoipa::path(
    post,
    path = "/embed",
    request_body = EmbedRequest,
    responses(
        (status = 200, description = "One vector per input, in order", body = EmbedResponse),
        (status = 401, description = "No or a wrong API key", body = ErrorResponse),
        (status = 408, description = "The body did not arrive in time", body = ErrorResponse),
        (status = 413, description = "Too many inputs, an input over the model's limit, or a body over the limit", body = ErrorResponse),
        (status = 422, description = "Malformed JSON, a wrong type, an empty input, a bad field", body = ErrorResponse),
        (status = 429, description = "Too many requests waiting", body = ErrorResponse),
        (status = 500, description = "The batch holding this request failed", body = ErrorResponse),
        (status = 503, description = "The model is loading, or the server is shutting down", body = ErrorResponse),
    )
)]
pub async fn embed(
    State(app): State<Arc<App>>,
    body: Result<JsonBody<EmbedRequest>, ApiError>,
) -> Result<Json<EmbedResponse>, ApiError> {
    let req = body?.0;
    let backend = app.ready()?.backend.clone();
    let dims = dimensions(&backend, req.dimensions)?;
    let normalize = req.normalize.unwrap_or(backend.normalize);
    let opts = TokenizeOptions {
        prompt: backend.prompt(req.prompt_name.as_deref())?,
        truncate: req.truncate.unwrap_or(app.limits.auto_truncate),
        direction: req.truncation_direction,
    };
    let (rows, _) = run(&app, Job::Embed, Given::Texts(req.inputs.0, opts)).await?;
    let out = vectors(rows)
        .into_iter()
        .map(|v| finish_vector(v, dims, normalize))
        .collect();
    Ok(Json(EmbedResponse(out)))
}

/// Embeds texts or token ids, OpenAI's way.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    request_body = OpenAiRequest,
    responses(
        (status = 200, description = "One embedding per input, in order", body = OpenAiResponse),
        (status = 401, description = "No or a wrong API key", body = OpenAiErrorResponse),
        (status = 408, description = "The body did not arrive in time", body = OpenAiErrorResponse),
        (status = 413, description = "Too many inputs, an input over the model's limit, or a body over the limit", body = OpenAiErrorResponse),
        (status = 422, description = "Malformed JSON, a wrong type, an empty input, a bad field", body = OpenAiErrorResponse),
        (status = 429, description = "Too many requests waiting", body = OpenAiErrorResponse),
        (status = 500, description = "The batch holding this request failed", body = OpenAiErrorResponse),
        (status = 503, description = "The model is loading, or the server is shutting down", body = OpenAiErrorResponse),
    )
)]
pub async fn openai_embeddings(
    State(app): State<Arc<App>>,
    body: Result<JsonBody<OpenAiRequest>, ApiError>,
) -> Result<Json<OpenAiResponse>, OpenAiError> {
    let req = body?.0;
    let backend = app.ready()?.backend.clone();
    let dims = dimensions(&backend, req.dimensions)?;
    let truncate = app.limits.auto_truncate;
    let given = match req.input {
        OpenAiInput::Texts(texts) => Given::Texts(
            texts,
            TokenizeOptions {
                prompt: backend.prompt.clone(),
                truncate,
                ..TokenizeOptions::default()
            },
        ),
        OpenAiInput::Tokens(ids) => Given::Tokens(ids, truncate),
    };
    let (rows, tokens) = run(&app, Job::Embed, given).await?;
    let data = vectors(rows)
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let v = finish_vector(v, dims, backend.normalize);
            let embedding = match req.encoding_format {
                EncodingFormat::Float => EmbeddingData::Float(v),
                EncodingFormat::Base64 => EmbeddingData::Base64(base64_f32(&v)),
            };
            OpenAiEmbedding {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    Ok(Json(OpenAiResponse {
        object: "list",
        data,
        model: req.model.unwrap_or_else(|| served_name(&backend)),
        usage: OpenAiUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

/// The little-endian bytes of `v`, base64-encoded.
fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The name the server reports for its model.
fn served_name(backend: &Backend) -> String {
    backend
        .served
        .served_name
        .clone()
        .unwrap_or_else(|| backend.model_ref.id.clone())
}

/// The multitask model's labels with their probabilities (needs --checkpoint).
#[utoipa::path(
    post,
    path = "/predict",
    request_body = PredictRequest,
    responses(
        (status = 200, description = "One prediction per input, in order", body = PredictResponse),
        (status = 401, description = "No or a wrong API key", body = ErrorResponse),
        (status = 404, description = "No multitask model is served (start with --checkpoint)", body = ErrorResponse),
        (status = 408, description = "The body did not arrive in time", body = ErrorResponse),
        (status = 413, description = "Too many inputs, an input over the model's limit, or a body over the limit", body = ErrorResponse),
        (status = 422, description = "Malformed JSON, a wrong type, an empty input", body = ErrorResponse),
        (status = 429, description = "Too many requests waiting", body = ErrorResponse),
        (status = 500, description = "The batch holding this request failed", body = ErrorResponse),
        (status = 503, description = "The model is loading, or the server is shutting down", body = ErrorResponse),
    )
)]
pub async fn predict(
    State(app): State<Arc<App>>,
    body: Result<JsonBody<PredictRequest>, ApiError>,
) -> Result<Json<PredictResponse>, ApiError> {
    let backend = app.ready()?.backend.clone();
    let Some(model) = backend.multitask() else {
        return Err(ApiError::new(
            ErrorKind::NotFound,
            "no multitask model is served: start the server with --checkpoint DIR (a model \
             saved by --task=2) to use /predict",
        ));
    };
    let req = body?.0;
    let opts = TokenizeOptions {
        prompt: None,
        truncate: req.truncate.unwrap_or(app.limits.auto_truncate),
        ..TokenizeOptions::default()
    };
    let (rows, _) = run(&app, Job::Predict, Given::Texts(req.inputs.0, opts)).await?;
    let Rows::Probabilities(probs) = rows else {
        unreachable!("a prediction job answers probabilities")
    };
    let labels = &model.spec.labels;
    let head = |t: usize, p: &[f32]| {
        let best = (0..p.len()).fold(0, |b, j| if p[j] > p[b] { j } else { b });
        HeadPrediction {
            label: labels[t][best].clone(),
            probability: p[best],
            distribution: labels[t]
                .iter()
                .zip(p)
                .map(|(label, &probability)| LabelProbability {
                    label: label.clone(),
                    probability,
                })
                .collect(),
        }
    };
    let out = probs
        .iter()
        .map(|[a, b]| Prediction {
            class: head(0, a),
            sentiment: head(1, b),
        })
        .collect();
    Ok(Json(PredictResponse(out)))
}

/// The tokens of each input, with byte offsets.
#[utoipa::path(
    post,
    path = "/tokenize",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The tokens of each input, in order", body = TokenizeResponse),
        (status = 401, description = "No or a wrong API key", body = ErrorResponse),
        (status = 408, description = "The body did not arrive in time", body = ErrorResponse),
        (status = 413, description = "Too many inputs, or a body over the limit", body = ErrorResponse),
        (status = 422, description = "Malformed JSON, a wrong type, an empty input", body = ErrorResponse),
        (status = 503, description = "The model is loading", body = ErrorResponse),
    )
)]
pub async fn tokenize(
    State(app): State<Arc<App>>,
    body: Result<JsonBody<TokenizeRequest>, ApiError>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let req = body?.0;
    let backend = app.ready()?.backend.clone();
    let texts = req.inputs.0;
    if texts.is_empty() {
        return Err(ApiError::invalid("inputs", "the list of inputs is empty"));
    }
    if texts.len() > app.limits.max_client_batch_size {
        return Err(ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "{} inputs in one request; at most {} are allowed (--max-client-batch-size)",
                texts.len(),
                app.limits.max_client_batch_size
            ),
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::invalid(
            "inputs",
            format!("input {i} is an empty string"),
        ));
    }
    let prompt = backend.prompt(req.prompt_name.as_deref())?;
    let add_special = req.add_special_tokens;
    let tokens = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|t| {
                let text = match &prompt {
                    Some(p) => format!("{p}{t}"),
                    None => t.clone(),
                };
                backend.tokens(&text, add_special)
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Backend, format!("tokenizing failed: {e}")))??;
    Ok(Json(TokenizeResponse(tokens)))
}

/// 200 once the model is loaded, 503 before.
#[utoipa::path(
    get,
    path = "/health",
    responses(
        (status = 200, description = "The model is loaded", body = Health),
        (status = 503, description = "The model is still loading", body = ErrorResponse),
    )
)]
pub async fn health(State(app): State<Arc<App>>) -> Result<Json<Health>, ApiError> {
    app.ready()?;
    Ok(Json(Health { status: "ok" }))
}

/// The served model and the limits in force.
#[utoipa::path(
    get,
    path = "/info",
    responses(
        (status = 200, description = "What is served", body = Info),
        (status = 401, description = "No or a wrong API key", body = ErrorResponse),
        (status = 503, description = "The model is still loading", body = ErrorResponse),
    )
)]
pub async fn info(State(app): State<Arc<App>>) -> Result<Json<Info>, ApiError> {
    let b = &app.ready()?.backend;
    let assets = &b.assets;
    let heads = b.multitask().map(|m| {
        ["class", "sentiment"]
            .iter()
            .zip(&m.spec.labels)
            .map(|(name, labels)| HeadInfo {
                name: name.to_string(),
                labels: labels.clone(),
            })
            .collect()
    });
    Ok(Json(Info {
        model: served_name(b),
        model_id: b.model_ref.id.clone(),
        revision: (!b.model_ref.is_local()).then(|| b.model_ref.revision.clone()),
        architecture: assets.config.arch.name().to_string(),
        dimension: b.truncate_dim.unwrap_or(b.dimension),
        dtype: b.served.dtype.name().to_string(),
        kernel: b.kernel().to_string(),
        pooling: assets.pipeline.pooling.name().to_string(),
        normalize: b.normalize,
        max_input_length: assets.tokenizer.max_len(),
        prompt: b.prompt.clone(),
        prompt_names: assets.pipeline.prompts.keys().cloned().collect(),
        limits: LimitsInfo {
            max_batch_tokens: app.limits.max_batch_tokens,
            max_concurrent_requests: app.limits.max_concurrent_requests,
            max_client_batch_size: app.limits.max_client_batch_size,
            max_body_bytes: app.limits.max_body_bytes,
            auto_truncate: app.limits.auto_truncate,
            batch_size: b.batch_size,
        },
        heads,
        checkpoint: b
            .served
            .checkpoint
            .as_ref()
            .map(|p| p.display().to_string()),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }))
}

/// The metrics in Prometheus' text format.
#[utoipa::path(
    get,
    path = "/metrics",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 401, description = "No or a wrong API key", body = ErrorResponse),
    )
)]
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}
