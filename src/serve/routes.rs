//! The router: every route, the shared state ([`App`]), the API key check, the request
//! metrics, JSON answers for unknown routes and methods, and the OpenAPI description built
//! from the handlers' and types' annotations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use utoipa::OpenApi;

use super::backend::Backend;
use super::body::BodyLimits;
use super::config::{ApiKey, Limits};
use super::errors::{respond, ApiError, ErrorKind};
use super::handlers;
use super::linger::linger;
use super::queue::Queue;
use super::types;

/// The model and its queue, once loaded.
pub struct Ready {
    pub backend: Arc<Backend>,
    pub queue: Queue,
}

/// What every handler shares.
pub struct App {
    /// Set once the model is loaded; until then the model routes answer 503.
    pub ready: OnceLock<Ready>,
    /// One per request accepted and not yet answered (`--max-concurrent-requests`).
    pub permits: Arc<Semaphore>,
    pub limits: Limits,
    pub body: BodyLimits,
    pub api_key: Option<ApiKey>,
    pub metrics: PrometheusHandle,
    /// Requests to the model routes answered (any status), for the shutdown log line.
    pub answered: AtomicU64,
}

impl App {
    /// The loaded model, or 503 while it loads.
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unavailable,
                "the model is still loading; retry when GET /health answers 200",
            )
        })
    }
}

/// The OpenAPI description of every route.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fetch-ml",
        description = "Sentence embeddings (OpenAI and text-embeddings-inference shapes), the \
            multitask model's predictions, tokenization, health, info and metrics. With \
            --api-key, every route but /health needs `Authorization: Bearer KEY`."
    ),
    paths(
        handlers::openai_embeddings,
        handlers::embed,
        handlers::predict,
        handlers::tokenize,
        handlers::health,
        handlers::info,
        handlers::metrics,
        openapi_json
    ),
    components(schemas(types::ErrorResponse, types::OpenAiErrorResponse))
)]
pub struct ApiDoc;

/// `GET /openapi.json`: this description.
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "The OpenAPI 3.1 description of the server", content_type = "application/json"))
)]
async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// Every route, with the API key check, the request metrics and the lingering read of
/// bodies answered early.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/embeddings", post(handlers::openai_embeddings))
        .route("/embed", post(handlers::embed))
        .route("/predict", post(handlers::predict))
        .route("/tokenize", post(handlers::tokenize))
        .route("/health", get(handlers::health))
        .route("/info", get(handlers::info))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), check_key))
        .layer(middleware::from_fn_with_state(app.clone(), record))
        .layer(middleware::from_fn_with_state(app.clone(), linger))
        .with_state(app)
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    respond(
        &path,
        ApiError::new(
            ErrorKind::NotFound,
            format!("no route {path}; see GET /openapi.json for the routes"),
        ),
    )
}

async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path().to_string();
    respond(
        &path,
        ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!(
                "{path} does not take {}; see GET /openapi.json",
                req.method()
            ),
        ),
    )
}

/// With `--api-key`, every route but `/health` needs `Authorization: Bearer KEY`; the keys
/// are compared in constant time.
async fn check_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(key) = &app.api_key else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(key.0.as_bytes())));
    if ok {
        return next.run(req).await;
    }
    let message = if given.is_none() {
        "this server needs an API key: send the header `Authorization: Bearer KEY`"
    } else {
        "the API key is wrong"
    };
    respond(
        req.uri().path(),
        ApiError::new(ErrorKind::Unauthorized, message),
    )
}

/// Counts each request by route and status, and times it.
async fn record(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unknown", |p| p.as_str())
        .to_string();
    let model_route = req.method() == Method::POST && route != "unknown";
    let response = next.run(req).await;
    let status = response.status();
    super::metrics::request(&route, status.as_u16(), start.elapsed());
    if model_route {
        app.answered.fetch_add(1, Ordering::SeqCst);
    }
    if status == axum::http::StatusCode::INTERNAL_SERVER_ERROR {
        tracing::warn!(route, status = status.as_u16(), "request failed");
    }
    response
}
