//! What the long-context paths refuse or say, from the binary: chunk sizes checked once at
//! start (with the prompt counted as in front of text), notes that name what was cut, the
//! jina-embeddings-v2-base-code layout refused by name, and training rows whose attention
//! cannot fit in memory refused by line.

mod common;

use candle_core::{DType, Device, Tensor};
use common::long::{fixture, LONG};
use common::{fails_with, fetch_ml, ok, run, toy_rows, write_jsonl};

/// The start-up check counts the prompt as the windows do, in front of text: alone, the
/// byte-level tokenizer makes "query: "'s trailing space a token of its own (6 tokens), but
/// in front of "the" it joins the word (5). With 2 special tokens, windows of 10 and an
/// overlap of 2 leave 3 tokens for text, which is room; counting 6 would refuse them.
#[test]
fn a_prompt_counts_as_it_tokenizes_in_front_of_text() {
    let o = run(fetch_ml()
        .args([
            "--task=1",
            "--format=jsonl",
            "--chunks=rows",
            "--prompt",
            "query: ",
        ])
        .args(["--chunk-tokens=10", "--chunk-overlap=2", "-s"])
        .arg("the quick brown fox jumps over the lazy dog and the quick brown fox")
        .arg("--model")
        .arg(fixture("roberta")));
    let rows = ok(&o);
    assert!(rows.lines().count() > 1, "one window: {rows}");
    // One token less, and there is no room: refused at start, with the numbers.
    let o = run(fetch_ml()
        .args(["--task=1", "-s", "the", "--prompt", "query: "])
        .args(["--chunk-tokens=9", "--chunk-overlap=2", "--model"])
        .arg(fixture("roberta")));
    fails_with(
        &o,
        &[
            "leave 2 for text after 7 special and prompt tokens",
            "2 tokens of overlap",
        ],
    );
}

/// Bad window sizes and flag mixes are errors that name the fix.
#[test]
fn bad_chunk_settings_are_named() {
    let model = fixture("nomic_bert");
    let o = run(fetch_ml()
        .args(["--task=1", "-s", "hi", "--chunk-tokens=5000", "--model"])
        .arg(&model));
    fails_with(
        &o,
        &[
            "5000 tokens",
            "2048",
            "to fix: pass --chunk-tokens 2048 or less",
        ],
    );
    let o = run(fetch_ml()
        .args([
            "--task=1",
            "-s",
            LONG,
            "--chunk-tokens=6",
            "--chunk-overlap=4",
            "--model",
        ])
        .arg(&model));
    fails_with(&o, &["4 tokens of overlap", "--chunk-overlap"]);
    // Sizes with no room are refused before any input, a short one included (they used to
    // pass until the first input longer than a window). This tokenizer spells "a" in 1 token
    // and "one two three " in 11: with 2 special tokens, windows of 6 and of 16 leave 3
    // tokens for text, not more than the overlap of 4.
    for (tokens, prompt, fixed) in [
        ("--chunk-tokens=6", "a", 3),
        ("--chunk-tokens=16", "one two three ", 13),
    ] {
        let o = run(fetch_ml()
            .args([
                "--task=1",
                "-s",
                "hi",
                tokens,
                "--chunk-overlap=4",
                "--prompt",
                prompt,
            ])
            .arg("--model")
            .arg(&model));
        let numbers = format!("leave 3 for text after {fixed} special and prompt tokens");
        fails_with(&o, &[&numbers, "to fix: pass a smaller --chunk-overlap"]);
    }
    let o = run(fetch_ml().args(["--task=1", "-s", "hi", "--chunk-overlap=2"]));
    fails_with(&o, &["--chunk-tokens"]);
    let o = run(fetch_ml().args([
        "--task=1",
        "-s",
        "hi",
        "--chunk-tokens=8",
        "--truncate-side=left",
    ]));
    fails_with(&o, &["--truncate-side", "--chunk-tokens"]);
    let o = run(fetch_ml().args(["--task=2", "-s", "hi", "--chunk-tokens=8"]));
    fails_with(&o, &["--chunk-tokens does not apply to --task=2"]);
}

/// The notes say what was cut and what sets the limit: with windows nothing is cut at the max
/// length, so a line past the reader's 1 MiB is noted as such and no note points at
/// `--max-seq-length`, and from the left it keeps the line's last MiB; with
/// `--truncate-side left` and a prompt, the cut inputs lost the
/// prompt and a note says so (the right side keeps it).
#[test]
fn notes_name_what_was_cut() {
    let model = fixture("nomic_bert");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("long.txt");
    let line = "the quick brown fox ".repeat((1 << 20) / 20 + 100);
    std::fs::write(&input, format!("{line}\nshort\n")).unwrap();
    let o = run(fetch_ml()
        .args(["--task=1", "--format=jsonl", "--chunk-tokens=2048", "-i"])
        .arg(&input)
        .arg("--model")
        .arg(&model));
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("only their first 1 MiB was read"), "{err}");
    assert!(!err.contains("--max-seq-length"), "{err}");
    // Cut from the left, the line keeps its last MiB: the text written ends as the line does.
    let end = "the line ends here";
    std::fs::write(&input, format!("{line}{end}\nshort\n")).unwrap();
    let o = run(fetch_ml()
        .args(["--task=1", "--format=jsonl", "--truncate-side=left", "-i"])
        .arg(&input)
        .arg("--model")
        .arg(&model));
    let rows: Vec<serde_json::Value> = ok(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text = rows[0]["text"].as_str().unwrap();
    assert!(text.ends_with(end), "{}", &text[text.len() - 40..]);
    assert_eq!(text.len(), 1 << 20, "the last MiB of text");
    assert_eq!(rows[1]["text"], "short");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("only their last 1 MiB was kept (--truncate-side left)"),
        "{err}"
    );
    let cut = |side: &str| {
        let o = run(fetch_ml()
            .args([
                "--task=1",
                "--format=jsonl",
                "--max-seq-length=20",
                "-s",
                LONG,
            ])
            .args(["--prompt", "query: ", "--model"])
            .arg(&model)
            .arg(format!("--truncate-side={side}")));
        ok(&o);
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let (left, right) = (cut("left"), cut("right"));
    assert!(
        left.contains("and with it the prompt \"query: \""),
        "{left}"
    );
    assert!(!right.contains("with it the prompt"), "{right}");
    assert!(
        right.contains("1 of 1 sentence(s) were longer than 20 tokens"),
        "{right}"
    );
}

/// A JinaBERT folder laid out as jina-embeddings-v2-base-code (`mlp.up_gated_layer`, same
/// config keys) is refused by that name, not as a missing tensor.
#[test]
fn jina_code_layout_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("jina_bert");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let weights = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let extra = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("encoder.layer.0.mlp.up_gated_layer.weight".into(), extra);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let o = run(fetch_ml()
        .args(["--task=1", "-s", "hello", "--model"])
        .arg(dir.path()));
    fails_with(&o, &["jina-embeddings-v2-base-code", "mlp.up_gated_layer"]);
}

/// A training row whose attention (kept for the backward pass) cannot fit in the memory
/// available is refused before training, naming its line and the length that fits; with the
/// encoder frozen nothing is kept, and the same run trains.
#[test]
fn a_row_too_long_to_train_is_refused_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = toy_rows(16, 7);
    rows[2]["text"] = "the quick brown fox jumps over the lazy dog "
        .repeat(40)
        .into();
    let train = dir.path().join("train.jsonl");
    write_jsonl(&train, &rows);
    let task2 = |extra: &[&str]| {
        run(fetch_ml()
            .env("FETCH_ML_MEMORY_AVAILABLE", "4000000")
            .args(["--task=2", "--threads=2", "--epochs=1", "--format=json"])
            .arg("--train-file")
            .arg(&train)
            .arg("--model")
            .arg(fixture("nomic_bert"))
            .arg("--save")
            .arg(dir.path().join("ck"))
            .args(extra))
    };
    let err = fails_with(
        &task2(&[]),
        &[
            "train.jsonl, line 3 has",
            "memory available",
            "to fix: pass --max-seq-length",
        ],
    );
    assert!(!err.contains("line 1 "), "{err}");
    ok(&task2(&["--freeze", "encoder"]));
}

/// Task 3 checks every scenario before the first trains (a frozen encoder first, then one
/// that trains it: refused before "[1/2]"), and its advice names no task-2 flag; an override
/// of the memory that is not a number is an error, not a check switched off.
#[test]
fn every_scenario_is_checked_first_and_a_bad_override_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = toy_rows(16, 7);
    rows[2]["text"] = "the quick brown fox jumps over the lazy dog "
        .repeat(40)
        .into();
    let (train, eval) = (
        dir.path().join("train.jsonl"),
        dir.path().join("eval.jsonl"),
    );
    write_jsonl(&train, &rows);
    write_jsonl(&eval, &toy_rows(8, 8));
    let o = run(fetch_ml()
        .env("FETCH_ML_MEMORY_AVAILABLE", "4000000")
        .args([
            "--task=3",
            "--threads=2",
            "--epochs=1",
            "--scenarios=encoder,none",
        ])
        .arg("--train-file")
        .arg(&train)
        .arg("--eval-file")
        .arg(&eval)
        .arg("--model")
        .arg(fixture("nomic_bert")));
    let err = fails_with(
        &o,
        &["train.jsonl, line 3 has", "to fix: pass --max-seq-length"],
    );
    assert!(!err.contains("[1/2]"), "a scenario trained first:\n{err}");
    assert!(!err.contains("--freeze"), "{err}");
    let o = run(fetch_ml()
        .env("FETCH_ML_MEMORY_AVAILABLE", "4MB")
        .args([
            "--task=2",
            "--threads=2",
            "--epochs=1",
            "--max-train-examples=8",
        ])
        .arg("--save")
        .arg(dir.path().join("ck"))
        .arg("--model")
        .arg(fixture("nomic_bert")));
    fails_with(
        &o,
        &["FETCH_ML_MEMORY_AVAILABLE=\"4MB\" is not a number of bytes"],
    );
}
