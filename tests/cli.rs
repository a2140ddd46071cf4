//! The binary as a user runs it: inputs, formats, output files, the hub cache, and errors.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{fails_with, fetch_ml, ok, run, stderr, tiny_model};
use fetch_ml::testutil::{write_hub_cache, TinyBert};

fn jsonl(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn default_input_is_the_built_in_sentences() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let out = ok(&run(fetch_ml().args(["--task=1", "--model"]).arg(&model)));
    let expected = fetch_ml::input::DEFAULT_SENTENCES
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    assert!(expected >= 5);
    assert!(out.contains(&format!("[{expected}] ")), "{out}");
    assert!(out.contains("cosine similarity"), "{out}");
    assert!(out.contains("32 dimensions"), "{out}");
}

#[test]
fn default_input_works_from_any_folder() {
    let (d, model) = tiny_model(&TinyBert::default());
    let out = ok(&run(fetch_ml()
        .current_dir(d.path())
        .args(["--task=1", "--format=jsonl", "--model"])
        .arg(&model)));
    assert_eq!(jsonl(&out)[0]["text"], "Hello world!");
}

#[test]
fn jsonl_has_one_object_per_sentence_in_input_order() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let sentences = [
        "a long sentence about the team that won the game today",
        "hi",
        "",
        "the cat",
    ];
    let mut cmd = fetch_ml();
    cmd.args([
        "--task=1",
        "--format",
        "jsonl",
        "--batch-size",
        "2",
        "--model",
    ])
    .arg(&model);
    for s in sentences {
        cmd.arg("--sentence").arg(s);
    }
    let rows = jsonl(&ok(&run(&mut cmd)));
    assert_eq!(rows.len(), 4);
    for (i, (row, s)) in rows.iter().zip(sentences).enumerate() {
        assert_eq!(row["index"], i);
        assert_eq!(row["text"], s);
        assert_eq!(row["embedding"].as_array().unwrap().len(), 32);
    }
    assert_eq!(rows[2]["tokens"], 2, "the empty string is [CLS] [SEP]");
}

#[test]
fn json_document_describes_the_model() {
    let (_d, model) = tiny_model(&TinyBert {
        sentence_transformers: Some(("mean", true, 32)),
        ..TinyBert::default()
    });
    let out = ok(&run(fetch_ml()
        .args([
            "--task=1",
            "--format",
            "json",
            "-s",
            "hello world",
            "-s",
            "the cat",
            "--model",
        ])
        .arg(&model)));
    let doc: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["dimension"], 32);
    assert_eq!(doc["normalized"], true);
    assert_eq!(doc["max_seq_length"], 32);
    assert_eq!(doc["count"], 2);
    let embs = doc["embeddings"].as_array().unwrap();
    assert_eq!(embs[1]["text"], "the cat");
    let v: Vec<f64> = embs[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
}

#[test]
fn normalize_flags_override_the_model() {
    let (_d, model) = tiny_model(&TinyBert {
        sentence_transformers: Some(("mean", true, 32)),
        ..TinyBert::default()
    });
    let norm_of = |flag: Option<&str>| -> f64 {
        let mut cmd = fetch_ml();
        cmd.args(["--task=1", "--format=jsonl", "-s", "hello world", "--model"])
            .arg(&model);
        if let Some(f) = flag {
            cmd.arg(f);
        }
        let row = &jsonl(&ok(&run(&mut cmd)))[0];
        row["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap().powi(2))
            .sum::<f64>()
            .sqrt()
    };
    assert!((norm_of(None) - 1.0).abs() < 1e-5);
    assert!((norm_of(Some("--no-normalize")) - 1.0).abs() > 1e-2);
    let (_d2, plain) = tiny_model(&TinyBert::default());
    let row = &jsonl(&ok(&run(fetch_ml()
        .args([
            "--task=1",
            "--format=jsonl",
            "-s",
            "hello world",
            "--normalize",
            "--model",
        ])
        .arg(&plain))))[0];
    let n: f64 = row["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((n - 1.0).abs() < 1e-5);
}

#[test]
fn input_file_skips_blank_lines_and_handles_crlf() {
    let (d, model) = tiny_model(&TinyBert::default());
    let file = d.path().join("in.txt");
    std::fs::write(
        &file,
        "hello world\r\n\r\n   \nthe cat sat\n\nlast line without newline",
    )
    .unwrap();
    let rows = jsonl(&ok(&run(fetch_ml()
        .args(["--task=1", "--format=jsonl", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&file))));
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        ["hello world", "the cat sat", "last line without newline"]
    );
}

#[test]
fn stdin_input() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let mut child = fetch_ml()
        .args(["--task=1", "--format=jsonl", "--input", "-", "--model"])
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\nthree\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(jsonl(&ok(&out)).len(), 3);
}

#[test]
fn invalid_utf8_names_the_line_and_writes_nothing() {
    let (d, model) = tiny_model(&TinyBert::default());
    let file = d.path().join("bad.txt");
    std::fs::write(&file, b"fine\nalso fine\nbroken \xff here\n").unwrap();
    let out_path = d.path().join("out.jsonl");
    std::fs::write(&out_path, "previous results\n").unwrap();
    let o = run(fetch_ml()
        .args(["--task=1", "--format=jsonl", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&file)
        .arg("--output")
        .arg(&out_path));
    fails_with(&o, &["bad.txt", "line 3", "UTF-8"]);
    assert_eq!(
        std::fs::read_to_string(&out_path).unwrap(),
        "previous results\n"
    );
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        3,
        "no temporary file left behind: {leftovers:?}"
    );
}

#[test]
fn output_file_is_written_whole() {
    let (d, model) = tiny_model(&TinyBert::default());
    let out_path = d.path().join("emb.json");
    let o = run(fetch_ml()
        .args(["--task=1", "--format=json", "-s", "hello", "--model"])
        .arg(&model)
        .arg("-o")
        .arg(&out_path));
    assert!(
        ok(&o).is_empty(),
        "nothing on stdout when --output is given"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    assert_eq!(doc["count"], 1);
}

#[test]
fn empty_input_file_is_an_error() {
    let (d, model) = tiny_model(&TinyBert::default());
    let file = d.path().join("empty.txt");
    std::fs::write(&file, "\n\n  \n").unwrap();
    let o = run(fetch_ml()
        .args(["--task=1", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&file));
    fails_with(&o, &["empty.txt", "no sentences"]);
}

#[test]
fn missing_input_file_is_an_error() {
    let (d, model) = tiny_model(&TinyBert::default());
    let o = run(fetch_ml()
        .args(["--task=1", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(d.path().join("nope.txt")));
    fails_with(&o, &["--input", "nope.txt"]);
}

#[test]
fn truncation_is_reported_on_stderr() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let long = "the cat sat on the mat ".repeat(10);
    let o = run(fetch_ml()
        .args([
            "--task=1",
            "--format=jsonl",
            "--max-seq-length",
            "8",
            "-s",
            "hi",
            "-s",
        ])
        .arg(&long)
        .arg("--model")
        .arg(&model));
    let rows = jsonl(&ok(&o));
    assert_eq!(rows[1]["tokens"], 8);
    assert_eq!(rows[1]["truncated"], true);
    assert!(
        stderr(&o).contains("1 of 2 sentence(s) were longer than 8 tokens"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn offline_mode_resolves_from_a_hub_cache() {
    let (d, model) = tiny_model(&TinyBert::default());
    let hf_home = d.path().join("hf-home");
    write_hub_cache(
        &hf_home,
        "acme/tiny-bert",
        "0123456789abcdef0123456789abcdef01234567",
        &model,
    )
    .unwrap();
    for offline in [["--offline"].as_slice(), [].as_slice()] {
        let mut cmd = fetch_ml();
        cmd.env("HF_HOME", &hf_home)
            .args([
                "--task=1",
                "--format=jsonl",
                "-s",
                "hello world",
                "--model",
                "acme/tiny-bert",
            ])
            .args(offline);
        if offline.is_empty() {
            cmd.env("HF_HUB_OFFLINE", "1");
        }
        let rows = jsonl(&ok(&run(&mut cmd)));
        assert_eq!(rows[0]["embedding"].as_array().unwrap().len(), 32);
    }
    // A model that is not in the cache: the error names the file, the folder and the fix.
    let o = run(fetch_ml().env("HF_HOME", &hf_home).args([
        "--task=1",
        "--offline",
        "--model",
        "acme/other-model",
    ]));
    fails_with(
        &o,
        &[
            "config.json",
            "models--acme--other-model",
            "--model /path/to/folder",
        ],
    );
}

#[test]
fn offline_cache_missing_weights_names_the_file() {
    let (d, model) = tiny_model(&TinyBert::default());
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let hf_home = d.path().join("hf-home");
    write_hub_cache(&hf_home, "acme/tiny-bert", "abc", &model).unwrap();
    let o = run(fetch_ml().env("HF_HOME", &hf_home).args([
        "--task=1",
        "--offline",
        "--model",
        "acme/tiny-bert",
    ]));
    fails_with(
        &o,
        &["model.safetensors", "snapshots/abc", "without --offline"],
    );
}

#[test]
fn unreachable_hub_suggests_offline_and_folders() {
    let o = run(fetch_ml().args(["--task=1", "--model", "acme/not-cached"]));
    fails_with(
        &o,
        &["acme/not-cached", "--offline", "--model /path/to/folder"],
    );
}

#[test]
fn missing_model_folder_is_an_error() {
    let o = run(fetch_ml().args(["--task=1", "--model", "./no/such/folder"]));
    fails_with(&o, &["./no/such/folder", "no such folder"]);
}

#[test]
fn corrupt_weights_via_cli() {
    let (_d, model) = tiny_model(&TinyBert::default());
    std::fs::write(
        model.join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    let o = run(fetch_ml()
        .args(["--task=1", "-s", "x", "--model"])
        .arg(&model));
    fails_with(&o, &["model.safetensors"]);
}

#[test]
fn clap_rejects_bad_flags() {
    let cases: &[&[&str]] = &[
        &["--task=4"],
        &["--task=one"],
        &[],
        &["--task=1", "--model"],
        &["--task=1", "--sentence", "a", "--input", "f.txt"],
        &["--task=1", "--normalize", "--no-normalize"],
        &["--task=1", "--batch-size", "0"],
        &["--task=1", "--format", "xml"],
        &["--task=1", "--no-such-flag"],
    ];
    for args in cases {
        let o = run(fetch_ml().args(*args));
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?} should be a usage error: {}",
            stderr(&o)
        );
        assert!(stderr(&o).contains("error:"), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn help_documents_every_flag() {
    let out = ok(&run(fetch_ml().arg("--help")));
    for flag in [
        "--task",
        "--model",
        "--revision",
        "--offline",
        "--max-seq-length",
        "--sentence",
        "--input",
        "--output",
        "--format",
        "--batch-size",
        "--normalize",
        "--no-normalize",
        "--threads",
        "--max-batch-tokens",
        "--train-file",
        "--eval-file",
        "--epochs",
        "--lr",
        "--head-lr",
        "--loss-weights",
        "--seed",
        "--freeze",
        "--freeze-layers",
        "--save",
        "--checkpoint",
        "--scenarios",
        "--plot",
        "--embedding-cache",
        "--max-train-examples",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn flags_of_other_tasks_are_rejected() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--task=1", "--epochs", "3"],
            "--epochs does not apply to --task=1",
        ),
        (
            &["--task=1", "--freeze", "encoder"],
            "--freeze does not apply to --task=1",
        ),
        (
            &["--task=2", "--normalize"],
            "--normalize does not apply to --task=2",
        ),
        (
            &["--task=2", "--plot", "x.png"],
            "--plot does not apply to --task=2",
        ),
        (
            &["--task=3", "--save", "dir"],
            "--save does not apply to --task=3",
        ),
        (
            &["--task=3", "--sentence", "hi"],
            "--sentence does not apply to --task=3",
        ),
    ];
    for (args, msg) in cases {
        let o = run(fetch_ml().args(*args));
        fails_with(&o, &[msg]);
    }
}

#[test]
fn bad_training_flag_values_are_usage_errors() {
    let cases: &[&[&str]] = &[
        &["--task=2", "--freeze", "decoder"],
        &["--task=2", "--freeze", "encoder,bogus"],
        &["--task=2", "--loss-weights", "1"],
        &["--task=2", "--loss-weights", "0,0"],
        &["--task=2", "--lr", "-1"],
        &["--task=2", "--warmup", "1.5"],
        &["--task=2", "--epochs", "0"],
        &["--task=3", "--scenarios", "none,sideways"],
        &["--task=2", "--checkpoint", "a", "--save", "b"],
    ];
    for args in cases {
        let o = run(fetch_ml().args(*args));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let o = run(fetch_ml().args(["--task=2", "--freeze", "decoder"]));
    assert!(
        stderr(&o).contains("sentiment-head"),
        "lists the valid names: {}",
        stderr(&o)
    );
}

#[test]
fn freeze_layers_out_of_range_gives_the_count() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let o = run(fetch_ml()
        .args(["--task=2", "--freeze-layers", "4", "--model"])
        .arg(&model));
    fails_with(
        &o,
        &[
            "4 frozen layers",
            "only 3 encoder layers",
            "to fix: pass --freeze-layers between 0 and 3",
        ],
    );
}

#[test]
fn token_budget_batches_give_the_same_vectors() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let run_with = |extra: &[&str]| {
        let mut cmd = fetch_ml();
        cmd.args(["--task=1", "--format=jsonl", "--model"])
            .arg(&model)
            .args(extra);
        for s in [
            "a long sentence about the team that won the game today",
            "hi",
            "the cat sat",
            "we love our phone",
        ] {
            cmd.arg("-s").arg(s);
        }
        jsonl(&ok(&run(&mut cmd)))
    };
    let plain = run_with(&[]);
    let budget = run_with(&["--max-batch-tokens", "8", "--batch-size", "3"]);
    for (a, b) in plain.iter().zip(&budget) {
        assert_eq!(a["text"], b["text"]);
        let (x, y) = (
            a["embedding"].as_array().unwrap(),
            b["embedding"].as_array().unwrap(),
        );
        for (u, v) in x.iter().zip(y) {
            assert!((u.as_f64().unwrap() - v.as_f64().unwrap()).abs() < 1e-5);
        }
    }
}

/// `-q/--quiet` silences every note on stderr (here the truncation count and the kernel
/// line) and leaves stdout byte for byte as it was; an error is still printed, with its
/// advice.
#[test]
fn quiet_silences_notes_but_not_output_or_errors() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let embed = |quiet: bool| {
        let mut cmd = fetch_ml();
        cmd.args(["--task=1", "--format=jsonl", "--max-seq-length", "4"])
            .args([
                "--dtype",
                "int8",
                "-s",
                "a sentence longer than four tokens",
            ])
            .arg("--model")
            .arg(&model);
        if quiet {
            cmd.arg("-q");
        }
        run(&mut cmd)
    };
    let (loud, quiet) = (embed(false), embed(true));
    let notes = stderr(&loud);
    assert!(
        notes.contains("truncated") && notes.contains("int8"),
        "{notes}"
    );
    assert_eq!(ok(&quiet), ok(&loud), "stdout changes with --quiet");
    assert_eq!(stderr(&quiet), "", "--quiet printed notes");
    let o = run(fetch_ml().args([
        "--task=1",
        "--quiet",
        "--offline",
        "--model",
        "no-such/model",
    ]));
    fails_with(&o, &["error:", "to fix:"]);
}
