//! A request whose vector is not a finite number gets a 500 naming its input, and only that
//! request; a prompt that leaves no room for the input stops the server from starting.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::common::{fails_with, fetch_ml, run};
use crate::harness::Server;
use crate::predict::tiny_checkpoint;

/// A tiny model whose word "cat" overflows the embeddings' LayerNorm: a sentence holding it
/// has a NaN vector, every other sentence a finite one.
fn cat_poisoned_model(dir: &Path) -> PathBuf {
    let model = dir.join("cat-model");
    fetch_ml::testutil::TinyBert::default().write(&model).unwrap();
    let cat = fetch_ml::testutil::vocab()
        .iter()
        .position(|w| w == "cat")
        .unwrap();
    let path = model.join("model.safetensors");
    let mut w: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "embeddings.word_embeddings.weight";
    let h = w[name].dims()[1];
    let mut v: Vec<f32> = w[name].flatten_all().unwrap().to_vec1().unwrap();
    v[cat * h..(cat + 1) * h].iter_mut().for_each(|x| *x = 3e38);
    let t = Tensor::from_vec(v, w[name].dims(), &Device::Cpu).unwrap();
    w.insert(name.into(), t);
    candle_core::safetensors::save(&w, &path).unwrap();
    model
}

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
        assert!(m.contains("input 1") && m.contains("not finite"), "{path}: {m}");
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

#[test]
fn a_prompt_that_leaves_no_room_stops_the_server_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    fetch_ml::testutil::TinyBert::default().write(&model).unwrap();
    let long = "hello world ".repeat(10_000);
    let o = run(fetch_ml()
        .args(["--task=serve", "--port", "0", "--model"])
        .arg(&model)
        .arg("--prompt")
        .arg(&long));
    fails_with(&o, &["prompt", "tokens", "64"]);
}
