//! Reading a request's JSON body within the limits: at most `--max-body-bytes` (else 413),
//! all of it within `--body-timeout` (else 408), and valid JSON of the route's type (else
//! 422). Any content type is read as JSON.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Request};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use super::errors::{ApiError, ErrorKind};
use super::routes::App;

/// What a body may be.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// A request body parsed as `T`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<App>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, ApiError> {
        let limits = app.body;
        let too_large = || {
            ApiError::new(
                ErrorKind::TooLarge,
                format!(
                    "the request body is larger than {} bytes (--max-body-bytes); send fewer or \
                     shorter inputs per request",
                    limits.max_bytes
                ),
            )
        };
        if super::linger::declared(req.headers()).is_some_and(|n| n > limits.max_bytes as u64) {
            return Err(too_large());
        }
        let body = Limited::new(req.into_body(), limits.max_bytes);
        let bytes = match tokio::time::timeout(limits.timeout, body.collect()).await {
            Err(_) => {
                return Err(ApiError::new(
                    ErrorKind::Timeout,
                    format!(
                        "the request body did not arrive within {} s (--body-timeout)",
                        limits.timeout.as_secs_f64()
                    ),
                ))
            }
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
            Ok(Err(e)) => {
                return Err(ApiError::new(
                    ErrorKind::Validation,
                    format!("could not read the request body: {e}"),
                ))
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::new(
                ErrorKind::Validation,
                format!("the request body is not valid JSON for this route: {e}"),
            )
        })
    }
}
