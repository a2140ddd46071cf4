//! A request whose vector is not a finite number gets a 500 naming its input, and only that
//! request; a prompt that leaves no room for the input stops the server from starting.

use std::time::Duration;

use serde_json::json;

use crate::common::cat_poisoned_model;
use crate::harness::{assert_same, floats, task1, tiny, tiny_id, Server};
use crate::predict::tiny_checkpoint;

#[test]
fn a_non_finite_vector_fails_only_its_own_request() {
    let dir = tempfile::tempdir().unwrap();
    let model = cat_poisoned_model(dir.path());
    let ckpt = tiny_checkpoint(dir.path(), &model);
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
    ]);
    for path in ["/embed", "/predict"] {
        // Sent together, so that the batcher may put them in one batch.
        let (bad, good) = std::thread::scope(|s| {
            let bad = s.spawn(|| {
                server.post_json(path, &json!({"inputs": ["i love pizza", "the cat sat"]}))
            });
            let good = s.spawn(|| server.post_json(path, &json!({"inputs": ["i love pizza"]})));
            (bad.join().unwrap(), good.join().unwrap())
        });
        let m = bad.tei_error(500);
        assert!(
            m.contains("input 1") && m.contains("not finite"),
            "{path}: {m}"
        );
        assert_eq!(good.status, 200, "{path}: {}", good.body);
        assert!(!good.body.contains("null"), "{path}: {}", good.body);
    }
    let m = server
        .post_json("/v1/embeddings", &json!({"input": ["the cat sat"]}))
        .openai_error(500);
    assert!(m.contains("input 0") && m.contains("not finite"), "{m}");
    // The server goes on answering.
    assert_eq!(
        server
            .post_json("/embed", &json!({"inputs": ["hello world"]}))
            .status,
        200
    );
}

/// A panic inside the model answers 500 to its own request; every later request still gets
/// its vectors (a panic once left the embedder's lock poisoned,
/// and every later request got a 500).
#[test]
fn a_panic_in_the_model_fails_only_its_own_request() {
    let (_d, model) = tiny();
    let fault = format!("panic:{}", tiny_id("battery"));
    let server = Server::spawn(&["--model", model.to_str().unwrap()], |c| {
        c.env("FETCH_ML_SERVE_FAULT_TOKEN", &fault);
    });
    server.wait_ready();
    let texts = ["the game is good", "hello world", "my phone"];
    let want = task1(&model, &[], &texts.map(String::from));
    for round in 0..3 {
        let m = server
            .post_json("/embed", &json!({"inputs": ["my battery"]}))
            .tei_error(500);
        assert!(m.contains("fails on purpose"), "round {round}: {m}");
        let r = server.post_json("/embed", &json!({ "inputs": texts }));
        assert_eq!(r.status, 200, "round {round}, after a panic: {}", r.body);
        for (i, w) in want.iter().enumerate() {
            assert_same(
                "f32",
                &floats(&r.json()[i]),
                w,
                &format!("round {round}, input {i}"),
            );
        }
    }
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn a_prompt_that_leaves_no_room_stops_the_server_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    fetch_ml::testutil::TinyBert::default()
        .write(&model)
        .unwrap();
    let long = "hello world ".repeat(10_000);
    // Spawned, not run: a server that starts anyway is stopped by the harness.
    let mut server = Server::spawn(
        &["--model", model.to_str().unwrap(), "--prompt", &long],
        |_| {},
    );
    let status = server
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the server started with the long prompt:\n{}", server.log()));
    assert!(!status.success());
    let log = server.log();
    assert!(
        log.contains("prompt") && log.contains("tokens") && log.contains("64"),
        "{log}"
    );
}
