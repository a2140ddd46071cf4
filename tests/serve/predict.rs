//! `/predict` gives what `--task=2 --checkpoint DIR --format jsonl` gives.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::common::{fetch_ml, ok, run, toy_rows, write_jsonl};
use crate::harness::{agent, send, sentences, tiny, tiny_words, Server};

/// Trains a tiny multitask checkpoint in `dir` (through the binary); returns its folder.
pub fn tiny_checkpoint(dir: &Path, model: &Path) -> PathBuf {
    let train = dir.join("train.jsonl");
    write_jsonl(&train, &toy_rows(48, 3));
    let save = dir.join("ckpt");
    ok(&run(fetch_ml()
        .args([
            "--task=2",
            "--epochs",
            "2",
            "--format",
            "jsonl",
            "-s",
            "i love pizza",
            "--model",
        ])
        .arg(model)
        .arg("--train-file")
        .arg(&train)
        .arg("--save")
        .arg(&save)));
    save
}

/// The predictions of `--task=2 --checkpoint DIR --format jsonl` for `texts`.
fn task2(dir: &Path, ckpt: &Path, texts: &[String]) -> Vec<Value> {
    let input = dir.join("predict.txt");
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    let out = ok(&run(fetch_ml()
        .args(["--task=2", "--format", "jsonl", "--checkpoint"])
        .arg(ckpt)
        .arg("--input")
        .arg(&input)));
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check(got: &Value, want: &Value, tolerance: f64, what: &str) {
    for head in ["class", "sentiment"] {
        let (g, w) = (&got[head], &want[head]);
        assert_eq!(g["label"], w["label"], "{what} {head}: {got} vs {want}");
        let (gp, wp) = (
            g["probability"].as_f64().unwrap(),
            w["probability"].as_f64().unwrap(),
        );
        assert!(
            (gp - wp).abs() <= tolerance,
            "{what} {head}: probability {gp} vs {wp}"
        );
        let dist = g["distribution"].as_array().unwrap();
        let sum: f64 = dist
            .iter()
            .map(|d| d["probability"].as_f64().unwrap())
            .sum();
        assert!(
            (sum - 1.0).abs() < 1e-5,
            "{what} {head}: distribution sums to {sum}"
        );
        let best = dist.iter().find(|d| d["label"] == g["label"]).unwrap();
        assert_eq!(best["probability"], g["probability"]);
        assert!(dist
            .iter()
            .all(|d| d["probability"].as_f64().unwrap() <= gp));
    }
}

#[test]
fn predict_equals_task_2_with_the_checkpoint() {
    let (d, model) = tiny();
    let ckpt = tiny_checkpoint(d.path(), &model);
    let words = tiny_words();
    let texts: Vec<String> = sentences(30, 4, &words)
        .into_iter()
        .map(|s| s.split(' ').take(30).collect::<Vec<_>>().join(" "))
        .collect();
    let want = task2(d.path(), &ckpt, &texts);
    assert_eq!(want.len(), texts.len());
    let server = Server::start(&["--checkpoint", ckpt.to_str().unwrap()]);
    let info = server.get("/info").json();
    assert_eq!(info["heads"][0]["name"], "class");
    assert_eq!(info["heads"][0]["labels"], json!(["food", "tech"]));
    assert_eq!(info["heads"][1]["labels"], json!(["negative", "positive"]));
    // All at once: the same batches as task 2, so the same numbers.
    let r = server.post_json("/predict", &json!({ "inputs": texts }));
    assert_eq!(r.status, 200, "{}", r.body);
    let got = r.json();
    for (i, w) in want.iter().enumerate() {
        check(&got[i], w, 0.0, &format!("sentence {i}"));
    }
    // One request per sentence, all at once: batched with each other, within float rounding.
    let handles: Vec<_> = texts
        .iter()
        .cloned()
        .map(|t| {
            let url = server.url("/predict");
            std::thread::spawn(move || {
                send(
                    &agent(),
                    "POST",
                    &url,
                    Some(&json!({ "inputs": t }).to_string()),
                )
                .unwrap()
            })
        })
        .collect();
    for (i, (h, w)) in handles.into_iter().zip(&want).enumerate() {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        check(&r.json()[0], w, 1e-5, &format!("sentence {i} alone"));
    }
    // Bad requests as on the other routes.
    server
        .post_json("/predict", &json!({ "inputs": [] }))
        .tei_error(422);
    server
        .post_json("/predict", &json!({ "inputs": "good ".repeat(100) }))
        .tei_error(413);
}
