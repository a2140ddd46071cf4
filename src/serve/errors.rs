//! One error type for every route ([`ApiError`]): its status, its JSON body in
//! text-embeddings-inference's shape, and [`OpenAiError`], the same in OpenAI's shape.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::{ErrorResponse, OpenAiErrorBody, OpenAiErrorResponse};

/// What went wrong, which fixes the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 422: malformed JSON, a wrong type, an empty input, an unknown prompt, ...
    Validation,
    /// 413: too many inputs, an input over the model's limit, a body over the limit.
    TooLarge,
    /// 429: --max-concurrent-requests are waiting already.
    Overloaded,
    /// 401: no or a wrong API key.
    Unauthorized,
    /// 404: no such route, or /predict without a checkpoint.
    NotFound,
    /// 405: the route exists with another method.
    MethodNotAllowed,
    /// 408: the body did not arrive in time.
    Timeout,
    /// 500: the batch holding the request failed.
    Backend,
    /// 503: the model is still loading, or the server is shutting down.
    Unavailable,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::Validation => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Timeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Backend => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error_type` of the TEI shape.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Validation => "validation",
            ErrorKind::TooLarge => "payload_too_large",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Backend => "backend",
            ErrorKind::Unavailable => "unhealthy",
        }
    }

    /// OpenAI's `type` and `code` for this kind.
    fn openai(self) -> (&'static str, &'static str) {
        match self {
            ErrorKind::Validation => ("invalid_request_error", "invalid_request"),
            ErrorKind::TooLarge => ("invalid_request_error", "payload_too_large"),
            ErrorKind::Overloaded => ("rate_limit_error", "rate_limit_exceeded"),
            ErrorKind::Unauthorized => ("invalid_request_error", "invalid_api_key"),
            ErrorKind::NotFound => ("invalid_request_error", "not_found"),
            ErrorKind::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
            ErrorKind::Timeout => ("invalid_request_error", "timeout"),
            ErrorKind::Backend => ("server_error", "server_error"),
            ErrorKind::Unavailable => ("server_error", "unavailable"),
        }
    }
}

/// An error answered to one request: a status, a message saying what to do, and the request
/// field at fault when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// A 422 about request field `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, message).with_param(param)
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            error: self.message,
            error_type: self.kind.name().to_string(),
        };
        (self.kind.status(), Json(body)).into_response()
    }
}

/// An [`ApiError`] answered in OpenAI's `{"error": {message, type, param, code}}` shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let (kind, code) = e.kind.openai();
        let body = OpenAiErrorResponse {
            error: OpenAiErrorBody {
                message: e.message,
                kind: kind.to_string(),
                param: e.param.map(str::to_string),
                code: Some(code.to_string()),
            },
        };
        (e.kind.status(), Json(body)).into_response()
    }
}

/// True for paths answered in OpenAI's error shape.
pub fn is_openai_path(path: &str) -> bool {
    path.starts_with("/v1/")
}

/// `e` in the error shape of the route at `path`.
pub fn respond(path: &str, e: ApiError) -> Response {
    if is_openai_path(path) {
        OpenAiError(e).into_response()
    } else {
        e.into_response()
    }
}
