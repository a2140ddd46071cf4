//! Dynamic batching: many clients at once each get their own vectors in their own order, and
//! the batches held more than one request.

use std::sync::{Arc, Barrier};

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common::minilm;
use crate::harness::{agent, assert_same, floats, send, sentences, task1, Server, ENGLISH};

/// The value of the Prometheus sample `name` (labels included, as printed), or 0.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// 64 clients at once, each sending its own 1 to 8 sentences per request, three requests
/// each, over both embedding routes.
#[test]
fn sixty_four_clients_get_their_own_vectors_in_their_order() {
    let Some(model) = minilm() else { return };
    let texts = Arc::new(sentences(192, 11, ENGLISH));
    let want = Arc::new(task1(&model, &["--dtype", "int8"], &texts));
    let server = Server::start(&["--model", model.to_str().unwrap(), "--dtype", "int8"]);
    let clients = 64;
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (texts, want, barrier) = (texts.clone(), want.clone(), barrier.clone());
            let url = server.base.clone();
            std::thread::spawn(move || {
                let agent = agent();
                let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
                let mut sent = [0usize; 2];
                barrier.wait();
                for r in 0..3 {
                    // This client's own sentences: 3 of the 192 each, in a random order.
                    let n = rng.random_range(1..=8);
                    let idx: Vec<usize> = (0..n).map(|_| 3 * c + rng.random_range(0..3)).collect();
                    let batch: Vec<&String> = idx.iter().map(|&i| &texts[i]).collect();
                    let openai = (c + r) % 2 == 1;
                    let (path, body) = if openai {
                        ("/v1/embeddings", json!({"input": batch}))
                    } else {
                        ("/embed", json!({"inputs": batch}))
                    };
                    let reply = send(
                        &agent,
                        "POST",
                        &format!("{url}{path}"),
                        Some(&body.to_string()),
                    )
                    .unwrap_or_else(|e| panic!("client {c}: {e}"));
                    assert_eq!(reply.status, 200, "client {c}: {}", reply.body);
                    let v = reply.json();
                    for (k, &i) in idx.iter().enumerate() {
                        let got = if openai {
                            assert_eq!(v["data"][k]["index"], k);
                            // The default encoding without encoding_format is float.
                            floats(&v["data"][k]["embedding"])
                        } else {
                            floats(&v[k])
                        };
                        assert_same(
                            "int8",
                            &got,
                            &want[i],
                            &format!("client {c} request {r} row {k}"),
                        );
                    }
                    sent[openai as usize] += 1;
                }
                sent
            })
        })
        .collect();
    let mut sent = [0usize; 2];
    for h in handles {
        let s = h.join().expect("a client failed");
        sent[0] += s[0];
        sent[1] += s[1];
    }
    let m = server.get("/metrics").body;
    let batches = metric(&m, "fetch_ml_batch_requests_count");
    let single = metric(&m, "fetch_ml_batch_requests_bucket{le=\"1\"}");
    assert!(batches > 0.0, "no batch recorded:\n{m}");
    assert!(
        batches > single,
        "every one of {batches} batches held a single request: no dynamic batching\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "fetch_ml_request_count{route=\"/embed\",status=\"200\"}"
        ) as usize,
        sent[0],
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "fetch_ml_request_count{route=\"/v1/embeddings\",status=\"200\"}"
        ) as usize,
        sent[1]
    );
    for name in [
        "fetch_ml_queue_duration_seconds_count",
        "fetch_ml_tokenization_duration_seconds_count",
        "fetch_ml_inference_duration_seconds_count",
        "fetch_ml_batch_tokens_count",
    ] {
        assert!(metric(&m, name) > 0.0, "{name} missing:\n{m}");
    }
    assert!(m.contains("fetch_ml_queue_size"), "{m}");
}

/// 32 clients at once, one sentence per request (the case batching exists for), f32: each
/// gets its own vector (task 1's bits, whatever batch and forward pass it ran in),
/// and the 96 requests were served in fewer batches than requests.
#[test]
fn thirty_two_single_sentence_clients_share_batches_and_get_their_own_vectors() {
    let Some(model) = minilm() else { return };
    let texts = Arc::new(sentences(96, 23, ENGLISH));
    let want = Arc::new(task1(&model, &["--dtype", "f32"], &texts));
    let server = Server::start(&["--model", model.to_str().unwrap(), "--dtype", "f32"]);
    let clients = 32;
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (texts, want, barrier) = (texts.clone(), want.clone(), barrier.clone());
            let url = format!("{}/embed", server.base);
            std::thread::spawn(move || {
                let agent = agent();
                barrier.wait();
                for r in 0..3 {
                    let i = 3 * c + r;
                    let body = json!({ "inputs": texts[i] }).to_string();
                    let reply = send(&agent, "POST", &url, Some(&body))
                        .unwrap_or_else(|e| panic!("client {c}: {e}"));
                    assert_eq!(reply.status, 200, "client {c}: {}", reply.body);
                    let v = reply.json();
                    assert_eq!(v.as_array().map(Vec::len), Some(1), "client {c}: {v}");
                    let what = format!("client {c} request {r}");
                    assert_same("f32", &floats(&v[0]), &want[i], &what);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a client failed");
    }
    let m = server.get("/metrics").body;
    let requests = metric(&m, "fetch_ml_batch_requests_sum");
    let batches = metric(&m, "fetch_ml_batch_requests_count");
    assert_eq!(requests, 96.0, "{m}");
    assert!(
        batches < requests,
        "{batches} batches for {requests} requests: none held more than one\n{m}"
    );
}
