//! A request answered before its body is read (too large by its declared length, no API key,
//! no such route) gets its answer while the client is still writing the body, and the
//! connection stays open for the next request: the server reads and drops the rest of the
//! body rather than resetting a connection with unread bytes (a client then sees "broken
//! pipe" instead of the 413, as one CI run did).

use std::time::Duration;

use serde_json::json;

use crate::harness::{raw, tiny, Server};

const KEY: &str = "early-answer-key";

/// Sends `head` (which declares a body of `len` bytes), then the body in four pieces with
/// pauses, then a good request on the same connection; returns all that came back.
fn early_then_good(server: &Server, head: &str, len: usize) -> String {
    let body = format!("{{\"inputs\": \"{}\"}}", "a".repeat(len - 14));
    assert_eq!(body.len(), len);
    let head = head.replace("LEN", &len.to_string());
    let good = json!({"inputs": "hello"}).to_string();
    let next = format!(
        "POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{good}",
        good.len()
    );
    let q = len / 4;
    let pieces = [
        head.as_bytes(),
        &body.as_bytes()[..q],
        &body.as_bytes()[q..2 * q],
        &body.as_bytes()[2 * q..3 * q],
        &body.as_bytes()[3 * q..],
        next.as_bytes(),
    ];
    raw(
        &server.addr,
        &pieces,
        Duration::from_millis(150),
        Duration::from_secs(30),
    )
}

#[test]
fn an_early_answer_reaches_a_client_still_writing_and_keeps_the_connection() {
    let (_d, model) = tiny();
    let server = Server::spawn(
        &[
            "--model",
            model.to_str().unwrap(),
            "--max-body-bytes",
            "20000",
        ],
        |c| {
            c.env("FETCH_ML_API_KEY", KEY);
        },
    );
    server.wait_ready();
    let cases = [
        (
            "POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer KEY\r\n\
             Content-Length: LEN\r\n\r\n",
            300_000,
            "413",
        ),
        (
            "POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: LEN\r\n\r\n",
            200_000,
            "401",
        ),
        (
            "POST /nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer KEY\r\n\
             Content-Length: LEN\r\n\r\n",
            200_000,
            "404",
        ),
    ];
    for (head, len, status) in cases {
        let head = head.replace("KEY", KEY);
        let answer = early_then_good(&server, &head, len);
        let first = answer.find("HTTP/1.1 ").map(|i| &answer[i + 9..i + 12]);
        assert_eq!(first, Some(status), "{status} case: {answer}");
        let statuses: Vec<&str> = answer
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &answer[i + 9..i + 12])
            .collect();
        assert_eq!(
            statuses,
            [status, "200"],
            "the connection did not carry the next request after a {status}: {answer}"
        );
    }
    assert_eq!(server.get("/health").status, 200);
}
