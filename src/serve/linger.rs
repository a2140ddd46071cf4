//! Early answers keep their connection: a request answered before its body was read (413 for a
//! declared size, 401, 404, 405) gets its answer at once, and the rest of its body is read and
//! dropped in the background, for at most [`LINGER_TIME`] (or `--body-timeout` if shorter) and
//! up to a bound. Without this the server closes a connection with unread bytes, the kernel
//! resets it, and a client still writing its body gets "broken pipe" instead of the answer
//! (nginx's lingering close does the same job). A client that declared more than the bound, or
//! asked `Expect: 100-continue` and was answered before the server read anything, gets
//! `Connection: close`; what it still sends is read for the same time, so that the answer is
//! not lost to a reset either.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, EXPECT};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use super::routes::App;

/// The longest a body is read after its early answer: a shut-down server waits for these
/// connections, and Kubernetes allows 30 s for the whole shutdown.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// The most bytes read and dropped after an early answer: four times `--max-body-bytes`, and at
/// least 16 MiB. A client declaring more gets the answer and `Connection: close`.
pub fn linger_bytes(max_body_bytes: usize) -> usize {
    max_body_bytes.saturating_mul(4).max(16 << 20)
}

/// The middleware: hands the handler a body it can read as usual; after the answer, whatever
/// the handler left is read and dropped by a task of its own (not after a 408).
pub async fn linger(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    // hyper honours Expect (and sends "100 Continue" when the body is first read) from HTTP/1.1.
    let expects = req.version() >= Version::HTTP_11
        && headers
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let cap = linger_bytes(app.body.max_bytes);
    let over_cap = declared(headers).is_some_and(|n| n > cap as u64);
    let (parts, body) = req.into_parts();
    let slot = Arc::new(Mutex::new(Slot {
        body: Some(body),
        polled: false,
        ended: false,
    }));
    let req = Request::from_parts(parts, Body::new(Shared(slot.clone())));
    let mut response = next.run(req).await;
    let (rest, polled, ended) = {
        let mut slot = slot.lock().expect("body slot");
        (slot.body.take(), slot.polled, slot.ended)
    };
    let Some(rest) = rest else {
        return response;
    };
    if ended || http_body::Body::is_end_stream(&rest) {
        return response;
    }
    // A client too slow for the body timeout (408): no more waiting for it.
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        return response;
    }
    // One that would send more than the bound, or one still waiting for "100 Continue" (which
    // hyper no longer sends once the answer has started): the connection ends after the answer.
    if over_cap || (expects && !polled) {
        let close = HeaderValue::from_static("close");
        response.headers_mut().insert(CONNECTION, close);
    }
    tokio::spawn(drain(rest, cap, app.body.timeout.min(LINGER_TIME)));
    response
}

/// The body length a request declares.
pub(super) fn declared(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads and drops `body` until its end, `cap` bytes, an error or `limit`, whichever is first.
async fn drain(mut body: Body, cap: usize, limit: Duration) {
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

/// The request's body, kept where the middleware can take back what the handler leaves.
struct Slot {
    body: Option<Body>,
    /// Whether the handler asked for any of it (which made hyper send "100 Continue").
    polled: bool,
    /// Whether the handler read it to its end.
    ended: bool,
}

/// The body the handler reads: what it does not read stays in the slot when it drops this.
struct Shared(Arc<Mutex<Slot>>);

impl http_body::Body for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut slot = self.0.lock().expect("body slot");
        slot.polled = true;
        let frame = match slot.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        };
        if let Poll::Ready(None) = frame {
            slot.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.0.lock().expect("body slot");
        slot.body
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.0.lock().expect("body slot");
        slot.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}
