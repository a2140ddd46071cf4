//! Every limit and bad request gets its status and a JSON error (TEI's shape, or OpenAI's on
//! /v1/) while other clients' requests in flight succeed; a failing batch answers 500 to its
//! own request only; the API key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common::minilm;
use crate::harness::{
    agent, assert_same, floats, raw, send, sentences, task1, tiny, tiny_id, tiny_words, Server,
    ENGLISH,
};

/// Clients that keep sending good requests and check every answer until stopped.
struct Background {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<usize>>,
}

impl Background {
    fn start(server: &Server, texts: Vec<String>, want: Vec<Vec<f32>>, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (texts, want) = (Arc::new(texts), Arc::new(want));
        let threads = (0..clients)
            .map(|c| {
                let (texts, want, stop) = (texts.clone(), want.clone(), stop.clone());
                let url = server.base.clone();
                std::thread::spawn(move || {
                    let agent = agent();
                    let mut rng = rand::rngs::StdRng::seed_from_u64(100 + c as u64);
                    let mut ok = 0;
                    while !stop.load(Ordering::SeqCst) || ok == 0 {
                        let idx: Vec<usize> = (0..rng.random_range(1..=4))
                            .map(|_| rng.random_range(0..texts.len()))
                            .collect();
                        let batch: Vec<&String> = idx.iter().map(|&i| &texts[i]).collect();
                        let body = json!({ "inputs": batch }).to_string();
                        let r = send(&agent, "POST", &format!("{url}/embed"), Some(&body))
                            .unwrap_or_else(|e| panic!("background client {c}: {e}"));
                        assert_eq!(r.status, 200, "background client {c}: {}", r.body);
                        let v = r.json();
                        for (k, &i) in idx.iter().enumerate() {
                            assert_same(
                                "f32",
                                &floats(&v[k]),
                                &want[i],
                                &format!("background {c}"),
                            );
                        }
                        ok += 1;
                    }
                    ok
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops the clients; each must have had only correct answers.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("a background client failed"))
            .sum()
    }
}

/// Each limit and bad request, on both error shapes, while four clients keep embedding.
#[test]
fn limits_and_bad_requests_leave_other_clients_alone() {
    let (_d, model) = tiny();
    let words = tiny_words();
    let texts = sentences(24, 7, &words)
        .into_iter()
        .map(|s| s.split(' ').take(40).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>();
    let want = task1(&model, &[], &texts);
    let fault = tiny_id("battery").to_string();
    let server = Server::spawn(
        &[
            "--model",
            model.to_str().unwrap(),
            "--max-client-batch-size",
            "8",
            "--max-body-bytes",
            "20000",
            "--header-timeout",
            "2",
            "--body-timeout",
            "2",
        ],
        |c| {
            c.env("FETCH_ML_SERVE_FAULT_TOKEN", &fault);
        },
    );
    server.wait_ready();
    let background = Background::start(&server, texts.clone(), want, 4);

    // Too many inputs.
    let nine: Vec<&str> = vec!["hello"; 9];
    let m = server
        .post_json("/embed", &json!({"inputs": nine}))
        .tei_error(413);
    assert!(m.contains("--max-client-batch-size"), "{m}");
    server
        .post_json("/v1/embeddings", &json!({"input": nine}))
        .openai_error(413);
    server
        .post_json("/tokenize", &json!({"inputs": nine}))
        .tei_error(413);
    // An input over the model's 64 tokens; with truncate it is cut.
    let long = "good ".repeat(100);
    let m = server
        .post_json("/embed", &json!({"inputs": ["hi", long]}))
        .tei_error(413);
    assert!(m.contains("input 1") && m.contains("64 tokens"), "{m}");
    assert_eq!(
        server
            .post_json("/embed", &json!({"inputs": [&long], "truncate": true}))
            .status,
        200
    );
    server
        .post_json("/v1/embeddings", &json!({"input": long}))
        .openai_error(413);
    server
        .post_json("/v1/embeddings", &json!({"input": vec![7; 65]}))
        .openai_error(413);
    // A body over --max-body-bytes, declared or chunked.
    let big = json!({"inputs": ["good ".repeat(5000)]}).to_string();
    let m = server.post("/embed", &big).tei_error(413);
    assert!(m.contains("--max-body-bytes"), "{m}");
    server
        .post("/v1/embeddings", &big.replace("inputs", "input"))
        .openai_error(413);
    let chunk = format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len());
    let head = b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let answer = raw(
        &server.addr,
        &[head, chunk.as_bytes()],
        Duration::ZERO,
        Duration::from_secs(30),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"error_type\":\"payload_too_large\""),
        "{answer}"
    );
    // Malformed JSON, wrong types, empty inputs, bad fields: 422.
    for body in [
        "{\"inputs\": [",
        "not json",
        "",
        "[1, 2]",
        "{}",
        "{\"inputs\": 5}",
        "{\"inputs\": [\"a\", 3]}",
        "{\"inputs\": []}",
        "{\"inputs\": \"\"}",
        "{\"inputs\": [\"a\", \"\"]}",
        "{\"inputs\": \"a\", \"normalize\": \"yes\"}",
        "{\"inputs\": \"a\", \"dimensions\": 0}",
        "{\"inputs\": \"a\", \"dimensions\": 33}",
        "{\"inputs\": \"a\", \"dimensions\": -1}",
        "{\"inputs\": \"a\", \"prompt_name\": \"query\"}",
        "{\"inputs\": \"a\", \"truncation_direction\": \"Up\"}",
    ] {
        let r = server.post("/embed", body);
        assert_eq!(r.status, 422, "/embed {body:?}: {}", r.body);
        r.tei_error(422);
    }
    for body in [
        "{\"input\": [",
        "{\"input\": []}",
        "{\"input\": \"\"}",
        "{\"input\": [[]]}",
        "{\"input\": [1, \"a\"]}",
        "{\"input\": [[1, 2], 3]}",
        "{\"input\": [-1]}",
        "{\"input\": [1.5]}",
        "{\"input\": [999999]}",
        "{\"input\": {\"text\": \"a\"}}",
        "{\"input\": \"a\", \"encoding_format\": \"hex\"}",
        "{\"input\": \"a\", \"dimensions\": 0}",
        "{\"inputs\": \"a\"}",
    ] {
        let r = server.post("/v1/embeddings", body);
        assert_eq!(r.status, 422, "/v1/embeddings {body:?}: {}", r.body);
        r.openai_error(422);
    }
    for body in [
        "{\"inputs\": []}",
        "{\"inputs\": [\"\"]}",
        "{\"inputs\": 1}",
    ] {
        server.post("/tokenize", body).tei_error(422);
    }
    // No checkpoint, no such route, no such method.
    let m = server
        .post_json("/predict", &json!({"inputs": "hi"}))
        .tei_error(404);
    assert!(m.contains("--checkpoint"), "{m}");
    server.get("/nowhere").tei_error(404);
    server.get("/v1/nowhere").openai_error(404);
    server.get("/embed").tei_error(405);
    // A failing batch: 500 to its own request only, even among others sent at once.
    let m = server
        .post_json("/embed", &json!({"inputs": ["my battery"]}))
        .tei_error(500);
    assert!(m.contains("fails on purpose"), "{m}");
    let barrier = Arc::new(Barrier::new(8));
    let mixed: Vec<_> = (0..8)
        .map(|i| {
            let (url, barrier) = (server.base.clone(), barrier.clone());
            let text = if i == 3 {
                "the battery is bad".to_string()
            } else {
                format!("the game {i}")
            };
            std::thread::spawn(move || {
                barrier.wait();
                let body = json!({"inputs": [text]}).to_string();
                send(&agent(), "POST", &format!("{url}/embed"), Some(&body))
                    .unwrap()
                    .status
            })
        })
        .collect();
    let statuses: Vec<u16> = mixed.into_iter().map(|h| h.join().unwrap()).collect();
    let expected: Vec<u16> = (0..8).map(|i| if i == 3 { 500 } else { 200 }).collect();
    assert_eq!(statuses, expected);
    // A client trickling its headers is dropped after --header-timeout...
    let answer = raw(
        &server.addr,
        &[b"POST /embed HTTP/1.1\r\nHost: x\r\n"],
        Duration::ZERO,
        Duration::from_secs(30),
    );
    assert!(!answer.contains("200 OK"), "{answer}");
    // ...and one trickling its body gets 408 after --body-timeout.
    let answer = raw(
        &server.addr,
        &[
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"inputs\"",
            b": \"hello",
        ],
        Duration::from_millis(500),
        Duration::from_secs(30),
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");

    let answered = background.finish();
    assert!(
        answered >= 4,
        "the background clients got {answered} answers"
    );
    assert_eq!(server.get("/health").status, 200);
    assert!(server.log().contains("fails on purpose"));
}

/// More than --max-concurrent-requests at once: the rest get 429 at once, in the route's
/// shape, and those accepted get their right vectors.
#[test]
fn overload_answers_429_and_the_accepted_succeed() {
    let Some(model) = minilm() else { return };
    let texts: Vec<String> = sentences(200, 21, ENGLISH)
        .into_iter()
        .filter(|s| s.len() > 300)
        .take(32)
        .collect();
    assert_eq!(texts.len(), 32);
    let want = Arc::new(task1(&model, &[], &texts));
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--max-concurrent-requests",
        "2",
    ]);
    let clients = 12;
    let barrier = Arc::new(Barrier::new(clients));
    let texts = Arc::new(texts);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (url, barrier, texts, want) = (
                server.base.clone(),
                barrier.clone(),
                texts.clone(),
                want.clone(),
            );
            std::thread::spawn(move || {
                let openai = c % 2 == 1;
                let (path, body) = if openai {
                    ("/v1/embeddings", json!({"input": *texts}))
                } else {
                    ("/embed", json!({"inputs": *texts}))
                };
                barrier.wait();
                let r = send(
                    &agent(),
                    "POST",
                    &format!("{url}{path}"),
                    Some(&body.to_string()),
                )
                .unwrap();
                match (r.status, openai) {
                    (200, false) => {
                        for (i, w) in want.iter().enumerate() {
                            assert_same("f32", &floats(&r.json()[i]), w, "accepted /embed");
                        }
                    }
                    (200, true) => {
                        for (i, w) in want.iter().enumerate() {
                            assert_same(
                                "f32",
                                &floats(&r.json()["data"][i]["embedding"]),
                                w,
                                "accepted",
                            );
                        }
                    }
                    (429, false) => assert!(r.tei_error(429).contains("--max-concurrent-requests")),
                    (429, true) => {
                        assert!(r.openai_error(429).contains("--max-concurrent-requests"))
                    }
                    (s, _) => panic!("status {s}: {}", r.body),
                }
                r.status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert!(refused > 0, "no request was refused: {statuses:?}");
    assert!(refused < clients, "every request was refused: {statuses:?}");
    // Permits come back: a request after the burst succeeds.
    assert_eq!(
        server
            .post_json("/embed", &json!({"inputs": "hello"}))
            .status,
        200
    );
}

/// With an API key (from the environment), every route but /health needs it; logs are JSON
/// and never show the key.
#[test]
fn api_key_guards_every_route_but_health() {
    let (_d, model) = tiny();
    let key = "s3cret-key-for-tests";
    let server = Server::spawn(
        &["--model", model.to_str().unwrap(), "--log-format", "json"],
        |c| {
            c.env("FETCH_ML_API_KEY", key);
        },
    );
    server.wait_ready();
    assert_eq!(server.get("/health").status, 200);
    for path in ["/info", "/metrics", "/openapi.json"] {
        assert!(server.get(path).tei_error(401).contains("Authorization"));
    }
    server
        .post_json("/embed", &json!({"inputs": "hi"}))
        .tei_error(401);
    server
        .post_json("/v1/embeddings", &json!({"input": "hi"}))
        .openai_error(401);
    let call = |auth: &str, path: &str, body: serde_json::Value| {
        agent()
            .post(&server.url(path))
            .set("Authorization", auth)
            .send_string(&body.to_string())
            .map(|r| r.status())
            .unwrap_or_else(|e| match e {
                ureq::Error::Status(s, _) => s,
                e => panic!("{e}"),
            })
    };
    assert_eq!(
        call(
            "Bearer wrong-key-for-tests!",
            "/embed",
            json!({"inputs": "hi"})
        ),
        401
    );
    assert_eq!(
        call(&format!("Bearer {key}x"), "/embed", json!({"inputs": "hi"})),
        401
    );
    assert_eq!(call(key, "/embed", json!({"inputs": "hi"})), 401);
    assert_eq!(
        call(&format!("Bearer {key}"), "/embed", json!({"inputs": "hi"})),
        200
    );
    assert_eq!(
        call(
            &format!("Bearer {key}"),
            "/v1/embeddings",
            json!({"input": "hi"})
        ),
        200
    );
    let mut server = server;
    assert!(server.stop().success());
    let log = server.log();
    assert!(!log.contains(key), "the key was logged:\n{log}");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
}
