//! Early answers keep their connection: a request answered before its body was read (413 for a
//! declared size, 401, 404, 405, 429, 503) has the rest of its body read and dropped, within
//! `--body-timeout` and up to a bound, before the answer goes out. Without this the server
//! closes a connection with unread bytes, the kernel resets it, and a client still writing its
//! body gets "broken pipe" instead of the answer (nginx's lingering close does the same job).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use super::routes::App;

/// The most bytes read and dropped after an early answer: four times `--max-body-bytes`, and at
/// least 16 MiB. A client sending more gets the answer, then a closed connection.
pub fn linger_bytes(max_body_bytes: usize) -> usize {
    max_body_bytes.saturating_mul(4).max(16 << 20)
}

/// The middleware: hands the handler a body it can read as usual, and after the answer reads
/// whatever the handler left (except after a 408, whose client is too slow to wait for).
pub async fn linger(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let slot = Arc::new(Mutex::new(Some(body)));
    let req = Request::from_parts(parts, Body::new(Shared(slot.clone())));
    let response = next.run(req).await;
    let rest = slot.lock().expect("body slot").take();
    if let Some(rest) = rest {
        if response.status() != StatusCode::REQUEST_TIMEOUT {
            let limits = app.body;
            drain(rest, linger_bytes(limits.max_bytes), limits.timeout).await;
        }
    }
    response
}

/// Reads and drops `body` until its end, `cap` bytes, an error or `limit`, whichever is first.
async fn drain(mut body: Body, cap: usize, limit: Duration) {
    use http_body::Body as _;
    if body.is_end_stream() {
        return;
    }
    let mut seen = 0usize;
    let read = async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > cap {
                break;
            }
        }
    };
    if tokio::time::timeout(limit, read).await.is_err() {
        tracing::debug!("an unread request body did not end within the body timeout");
    }
}

/// The request's body, read through a slot the middleware keeps: what the handler does not
/// read stays in the slot when the handler drops this.
struct Shared(Arc<Mutex<Option<Body>>>);

impl http_body::Body for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut slot = self.0.lock().expect("body slot");
        match slot.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.0.lock().expect("body slot");
        slot.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.0.lock().expect("body slot");
        slot.as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}
