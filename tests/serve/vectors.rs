//! The server's vectors equal `--task=1 --format jsonl`'s, bit for bit in every dtype;
//! from `/embed`, from `/v1/embeddings` as floats and as base64, from
//! token ids, and truncated to `dimensions`.

use serde_json::json;

use crate::common::minilm;
use crate::harness::{assert_same, base64_floats, floats, sentences, task1, Server, ENGLISH};

/// For each dtype: /embed, /v1/embeddings (float and base64) and token-id inputs against
/// task 1 on the same sentences.
#[test]
fn vectors_equal_task_1_for_each_dtype() {
    let Some(model) = minilm() else { return };
    let texts = sentences(20, 3, ENGLISH);
    let model_arg = model.to_str().unwrap();
    for dtype in ["f32", "bf16", "int8"] {
        let want = task1(&model, &["--dtype", dtype], &texts);
        let mut server = Server::start(&["--model", model_arg, "--dtype", dtype]);
        let info = server.get("/info").json();
        assert_eq!(info["dtype"], dtype);
        // /embed: all at once, and in requests of a few, in another order.
        let got = server.post_json("/embed", &json!({ "inputs": texts }));
        assert_eq!(got.status, 200, "{}", got.body);
        let got = got.json();
        for (i, w) in want.iter().enumerate() {
            assert_same(
                dtype,
                &floats(&got[i]),
                w,
                &format!("{dtype} /embed sentence {i}"),
            );
        }
        for chunk in (0..texts.len()).rev().collect::<Vec<_>>().chunks(3) {
            let part: Vec<&String> = chunk.iter().map(|&i| &texts[i]).collect();
            let got = server
                .post_json("/embed", &json!({ "inputs": part }))
                .json();
            for (k, &i) in chunk.iter().enumerate() {
                assert_same(
                    dtype,
                    &floats(&got[k]),
                    &want[i],
                    &format!("{dtype} /embed part, sentence {i}"),
                );
            }
        }
        // OpenAI route, floats and base64.
        for format in ["float", "base64"] {
            let r = server.post_json(
                "/v1/embeddings",
                &json!({ "input": texts, "model": "my-name", "encoding_format": format }),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            let v = r.json();
            assert_eq!(v["object"], "list");
            assert_eq!(v["model"], "my-name");
            let data = v["data"].as_array().unwrap();
            assert_eq!(data.len(), texts.len());
            for (i, d) in data.iter().enumerate() {
                assert_eq!(d["object"], "embedding");
                assert_eq!(d["index"], i);
                let got = match format {
                    "float" => floats(&d["embedding"]),
                    _ => base64_floats(d["embedding"].as_str().unwrap()),
                };
                assert_same(
                    dtype,
                    &got,
                    &want[i],
                    &format!("{dtype} /v1/embeddings {format} {i}"),
                );
            }
            assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > texts.len() as u64);
        }
        // Token ids, as /tokenize gives them, embed as the texts do.
        let tokens = server
            .post_json("/tokenize", &json!({ "inputs": &texts[..4] }))
            .json();
        let ids: Vec<Vec<u64>> = tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                t.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["id"].as_u64().unwrap())
                    .collect()
            })
            .collect();
        let r = server.post_json(
            "/v1/embeddings",
            &json!({ "input": ids, "encoding_format": "float" }),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        for (i, d) in r.json()["data"].as_array().unwrap().iter().enumerate() {
            assert_same(
                dtype,
                &floats(&d["embedding"]),
                &want[i],
                &format!("{dtype} token ids {i}"),
            );
        }
        let one = server.post_json(
            "/v1/embeddings",
            &json!({ "input": ids[1], "encoding_format": "float" }),
        );
        assert_same(
            dtype,
            &floats(&one.json()["data"][0]["embedding"]),
            &want[1],
            "one list of ids",
        );
        assert!(server.stop().success());
    }
}

/// `dimensions` equals `--truncate-dim`; `normalize: false` equals `--no-normalize`; the
/// prompt of a request equals `--prompt`.
#[test]
fn request_options_equal_the_task_1_flags() {
    let Some(model) = minilm() else { return };
    let texts = sentences(6, 5, ENGLISH);
    let mut server = Server::start(&["--model", model.to_str().unwrap(), "--dtype", "int8"]);
    let cases: [(serde_json::Value, Vec<&str>); 3] = [
        (json!({"dimensions": 64}), vec!["--truncate-dim", "64"]),
        (json!({"normalize": false}), vec!["--no-normalize"]),
        (
            json!({"dimensions": 100, "normalize": false}),
            vec!["--truncate-dim", "100", "--no-normalize"],
        ),
    ];
    for (extra, flags) in cases {
        let mut body = json!({ "inputs": texts });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let mut args = vec!["--dtype", "int8"];
        args.extend(&flags);
        let want = task1(&model, &args, &texts);
        let got = server.post_json("/embed", &body).json();
        for (i, w) in want.iter().enumerate() {
            assert_same(
                "int8",
                &floats(&got[i]),
                w,
                &format!("{extra} sentence {i}"),
            );
        }
    }
    // OpenAI's dimensions: truncated and renormalised, as --truncate-dim on a normalising model.
    let want = task1(&model, &["--dtype", "int8", "--truncate-dim", "32"], &texts);
    let r = server.post_json(
        "/v1/embeddings",
        &json!({"input": texts, "dimensions": 32, "encoding_format": "float"}),
    );
    for (i, d) in r.json()["data"].as_array().unwrap().iter().enumerate() {
        assert_same(
            "int8",
            &floats(&d["embedding"]),
            &want[i],
            "OpenAI dimensions",
        );
    }
    // A long input: 413, or cut at the end (keeping its cats) or at the start (its dogs).
    let long = vec![format!("{}{}", "cat ".repeat(300), "dog ".repeat(300))];
    let r = server.post_json("/embed", &json!({"inputs": long}));
    assert!(r.tei_error(413).contains("256 tokens"), "{}", r.body);
    let kept = vec!["cat ".repeat(254), "dog ".repeat(254)];
    let want = task1(&model, &["--dtype", "int8"], &kept);
    let right = server.post_json("/embed", &json!({"inputs": long, "truncate": true}));
    assert_same(
        "int8",
        &floats(&right.json()[0]),
        &want[0],
        "truncated at the end",
    );
    let left = server.post_json(
        "/embed",
        &json!({"inputs": long, "truncate": true, "truncation_direction": "Left"}),
    );
    assert_same(
        "int8",
        &floats(&left.json()[0]),
        &want[1],
        "truncated at the start",
    );
    assert!(server.stop().success());
}
