//! A request answered before its body is read (too large by its declared length, no API key,
//! no such route) gets its answer before the client has sent the body, and, once the client
//! sends it, the connection carries the next request: the server reads and drops the rest of
//! the body rather than resetting a connection with unread bytes (a client then sees "broken
//! pipe" instead of the 413, as one CI run did). A client waiting for "100 Continue", or one
//! declaring more than the server will read, gets the answer and a closed connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;

use crate::harness::{tiny, Server};

const KEY: &str = "early-answer-key";

/// One response from `s`: its head and its body (by Content-Length), within 20 s.
fn response(s: &mut TcpStream, what: &str) -> String {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text[..end + 4 + length].to_string();
            }
        }
        match s.read(&mut buf) {
            Ok(0) => panic!("{what}: the connection closed after {text:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{what}: no answer within 20 s ({e}); read so far: {text:?}"),
        }
    }
}

/// Whether the server closes `s` within 20 s (reading and dropping anything it sends).
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn status(answer: &str) -> &str {
    answer.get(9..12).unwrap_or("")
}

#[test]
fn an_early_answer_comes_at_once_and_keeps_the_connection() {
    let (_d, model) = tiny();
    // The default --body-timeout (60 s): an answer that waited for the body would come after
    // the 20 s each read here allows.
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
    let auth = format!("Authorization: Bearer {KEY}\r\n");
    let good = json!({"inputs": "hello"}).to_string();
    let next = format!(
        "POST /embed HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n{good}",
        good.len()
    );
    for (path, auth, len, want) in [
        ("/embed", auth.as_str(), 300_000, "413"),
        ("/embed", "", 200_000, "401"),
        ("/nowhere", auth.as_str(), 200_000, "404"),
    ] {
        let mut s = TcpStream::connect(&server.addr).unwrap();
        let head =
            format!("POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len}\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let what = format!("{want} case, before the body");
        let answer = response(&mut s, &what);
        assert_eq!(status(&answer), want, "{answer}");
        // The body, in pieces, then the next request on the same connection.
        let body = format!("{{\"inputs\": \"{}\"}}", "a".repeat(len - 14));
        for piece in body.as_bytes().chunks(len / 4 + 1) {
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(piece).unwrap();
        }
        s.write_all(next.as_bytes()).unwrap();
        let answer = response(&mut s, &format!("the request after a {want}"));
        assert_eq!(status(&answer), "200", "after a {want}: {answer}");
    }

    // Expect: 100-continue, refused at once: no "100 Continue", the answer, then the close.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let head = "POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\
                Expect: 100-continue\r\n\r\n";
    s.write_all(head.as_bytes()).unwrap();
    let answer = response(&mut s, "401 to Expect: 100-continue");
    assert_eq!(status(&answer), "401", "{answer}");
    assert!(closed(&mut s), "the connection stayed open after {answer}");

    // More than the server reads after an early answer (16 MiB here): the answer, the close.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let head =
        format!("POST /embed HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100000000\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let answer = response(&mut s, "413 of 100 MB");
    assert_eq!(status(&answer), "413", "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(closed(&mut s), "the connection stayed open after {answer}");
    assert_eq!(server.get("/health").status, 200);
}
