//! Inputs longer than the model's limit: `--truncate-side left` keeps the last tokens;
//! `--chunk-tokens N [--chunk-overlap K]` splits an input into windows (exactly N tokens is
//! one window, N + 1 two), each window's character span points at its characters
//! (multi-byte text included), `--chunks mean` is the token-weighted mean of the windows'
//! vectors (normalised again when the model normalises), and `--chunks rows` carries the
//! window's number and span in every output format.

mod common;

use std::path::Path;

use common::long::{fixture, LONG};
use common::{fetch_ml, ok, run};
use fetch_ml::chunk::{ChunkMode, ChunkSpec, Chunker};
use fetch_ml::hub::TokenizerFiles;
use fetch_ml::tokenize::{TextTokenizer, TruncateSide};

/// The WordPiece tokenizer of the tiny fixtures (`[CLS] ... [SEP]`), cut at `max_len`.
fn tokenizer(max_len: usize) -> TextTokenizer {
    let files = TokenizerFiles::Json(fixture("nomic_bert").join("tokenizer.json"));
    TextTokenizer::load(&files, max_len, false, 0).unwrap()
}

fn spec(tokens: usize, overlap: usize) -> ChunkSpec {
    ChunkSpec {
        tokens,
        overlap,
        mode: ChunkMode::Rows,
    }
}

/// Words that are one token each in the tiny vocabulary (accents are stripped by the
/// normaliser; a word it does not know is one `[UNK]`; a CJK character is a word), with
/// multi-byte characters, so that character and byte positions differ.
const WORDS: [&str; 9] = [
    "héllo",
    "wörld",
    "日",
    "the",
    "λόγος",
    "quíck",
    "本",
    "dög",
    "brown",
];

#[test]
fn exactly_n_tokens_is_one_window_and_n_plus_one_two() {
    let tok = tokenizer(512);
    let text = "the quick brown fox jumps over the lazy dog";
    let n = tok.encode(&[text]).unwrap()[0].ids.len();
    for (tokens, windows) in [(n, 1), (n - 1, 2), (n + 5, 1)] {
        let c = Chunker::new(&tok, spec(tokens, 0), None).unwrap();
        let w = c.split(text, 0).unwrap();
        assert_eq!(w.len(), windows, "{tokens}-token windows of {n} tokens");
        assert!(w.iter().all(|w| w.encoded.ids.len() <= tokens));
    }
    // N + 1 tokens with windows of N: the second window holds the last text token.
    let c = Chunker::new(&tok, spec(n - 1, 0), None).unwrap();
    let w = c.split(text, 0).unwrap();
    let whole = &tok.encode(&[text]).unwrap()[0].ids;
    assert_eq!(w[0].encoded.ids.len(), n - 1);
    assert_eq!(w[1].encoded.ids, [whole[0], whole[n - 2], whole[n - 1]]);
}

#[test]
fn windows_overlap_by_k_and_cover_every_token() {
    let tok = tokenizer(512);
    let text = "the quick brown fox jumps over the lazy dog and a man is playing a guitar";
    let whole = tok.encode(&[text]).unwrap()[0].ids.clone();
    let body = &whole[1..whole.len() - 1];
    let c = Chunker::new(&tok, spec(7, 2), None).unwrap();
    let windows = c.split(text, 0).unwrap();
    // 5 text tokens per window, 3 new ones each after the first.
    assert_eq!(windows.len(), (body.len() - 2).div_ceil(3));
    let mut rebuilt: Vec<u32> = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        assert_eq!(w.number, i);
        let ids = &w.encoded.ids;
        assert_eq!(
            (ids[0], ids[ids.len() - 1]),
            (whole[0], whole[whole.len() - 1])
        );
        let inner = &ids[1..ids.len() - 1];
        if i > 0 {
            assert_eq!(
                &rebuilt[rebuilt.len() - 2..],
                &inner[..2],
                "window {i} overlap"
            );
            rebuilt.extend(&inner[2..]);
        } else {
            rebuilt.extend(inner);
        }
    }
    assert_eq!(rebuilt, body);
}

#[test]
fn spans_point_at_the_right_characters() {
    let tok = tokenizer(512);
    let text = WORDS.join(" ");
    // One token per word: the precondition of the spans below.
    let whole = tok.encode(&[text.as_str()]).unwrap()[0].ids.clone();
    assert_eq!(whole.len(), WORDS.len() + 2, "one token per word");
    // Character range of each word, counted by hand.
    let mut ranges = Vec::new();
    let mut at = 0;
    for w in WORDS {
        let n = w.chars().count();
        ranges.push(at..at + n);
        at += n + 1;
    }
    assert_ne!(text.len(), text.chars().count(), "multi-byte text");
    for prompt in [None, Some("query: ".to_string())] {
        let prompt_tokens = prompt
            .as_ref()
            .map_or(0, |p| tok.encode(&[p.as_str()]).unwrap()[0].ids.len() - 2);
        let fixed = 2 + prompt_tokens;
        let c = Chunker::new(&tok, spec(fixed + 3, 1), prompt.clone()).unwrap();
        let windows = c.split(&text, 0).unwrap();
        // Words 0-2, 2-4, 4-6, 6-8.
        assert_eq!(windows.len(), 4, "{prompt:?}");
        for (i, w) in windows.iter().enumerate() {
            let (a, b) = (2 * i, (2 * i + 2).min(WORDS.len() - 1));
            assert_eq!(
                w.chars,
                ranges[a].start..ranges[b].end,
                "{prompt:?} window {i}"
            );
            let shown: String = text
                .chars()
                .skip(w.chars.start)
                .take(w.chars.len())
                .collect();
            assert_eq!(shown, WORDS[a..=b].join(" "));
            assert_eq!(w.encoded.ids.len(), fixed + b - a + 1);
        }
    }
}

#[test]
fn left_truncation_keeps_the_last_tokens() {
    // Short enough to tokenize whole, and long enough (> 16 x max_len and 4,096 bytes) to be
    // tokenized from a tail of the text.
    let words = [
        "the quick brown fox",
        "jumps over",
        "the lazy dög",
        "héllo wörld",
    ];
    for repeat in [8, 400] {
        let text: String = (0..repeat)
            .map(|i| words[i % words.len()])
            .collect::<Vec<_>>()
            .join(" ");
        let whole = tokenizer(100_000).encode(&[text.as_str()]).unwrap()[0].clone();
        let mut tok = tokenizer(16);
        let right = tok.encode(&[text.as_str()]).unwrap()[0].clone();
        tok.set_truncate_side(TruncateSide::Left).unwrap();
        let left = tok.encode(&[text.as_str()]).unwrap()[0].clone();
        let n = whole.ids.len();
        assert!(left.truncated && right.truncated, "{repeat}");
        assert_eq!(left.ids.len(), 16);
        assert_eq!(left.ids[0], whole.ids[0], "[CLS] stays");
        assert_eq!(
            &left.ids[1..],
            &whole.ids[n - 15..],
            "the last tokens ({repeat})"
        );
        assert_eq!(
            &right.ids[..15],
            &whole.ids[..15],
            "the first tokens ({repeat})"
        );
    }
}

fn jsonl(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn vector(v: &serde_json::Value) -> Vec<f32> {
    serde_json::from_value(v["embedding"].clone()).unwrap()
}

/// With `--chunks mean` the vector is the token-weighted mean of the `--chunks rows`
/// vectors, normalised again when the model normalises (st-modernbert) and not otherwise
/// (nomic_bert).
#[test]
fn mean_of_windows_is_the_token_weighted_mean() {
    // Windows of one token less than the input: two windows.
    let n = tokenizer(512).encode(&[LONG]).unwrap()[0].ids.len();
    let chunk = format!("--chunk-tokens={}", n - 1);
    for (model, normalized) in [("st-modernbert", true), ("nomic_bert", false)] {
        let embed = |extra: &[&str]| {
            jsonl(&ok(&run(fetch_ml()
                .args(["--task=1", "--format=jsonl", &chunk, "-s", LONG])
                .args(extra)
                .arg("--model")
                .arg(fixture(model)))))
        };
        let rows = embed(&["--chunks=rows"]);
        assert_eq!(rows.len(), 2, "{model}: two windows");
        let mean = embed(&[]);
        assert_eq!(mean.len(), 1);
        let weights: Vec<f32> = rows
            .iter()
            .map(|r| r["tokens"].as_u64().unwrap() as f32)
            .collect();
        let (v1, v2) = (vector(&rows[0]), vector(&rows[1]));
        let total = weights[0] + weights[1];
        let mut want: Vec<f32> = v1
            .iter()
            .zip(&v2)
            .map(|(a, b)| (a * weights[0] + b * weights[1]) / total)
            .collect();
        if normalized {
            let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
            want.iter_mut().for_each(|x| *x /= norm);
        }
        let got = vector(&mean[0]);
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!("{model}: mean of two windows vs by hand, max abs diff {d:.2e}");
        assert!(d < 1e-6, "{model}: {d}");
        assert_eq!(mean[0]["tokens"].as_u64().unwrap() as f32, total);
        assert!(mean[0].get("window").is_none());
        // The windows are not the whole input's vector: chunking changed something.
        let whole = jsonl(&ok(&run(fetch_ml()
            .args(["--task=1", "--format=jsonl", "-s", LONG, "--model"])
            .arg(fixture(model)))));
        assert_ne!(vector(&whole[0]), got);
    }
}

/// `--chunks rows` in every format: the input's index, the window's number and span, and
/// the window's own text.
#[test]
fn rows_carry_their_window_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, format!("short one\n\n{LONG}\n")).unwrap();
    let base = |cmd: &mut std::process::Command| {
        cmd.args([
            "--task=1",
            "--chunk-tokens=12",
            "--chunk-overlap=3",
            "--chunks=rows",
        ])
        .arg("--input")
        .arg(&input)
        .arg("--model")
        .arg(fixture("nomic_bert"));
    };
    let mut cmd = fetch_ml();
    base(&mut cmd);
    let rows = jsonl(&ok(&run(cmd.arg("--format=jsonl"))));
    assert!(rows.len() > 3, "{rows:?}");
    assert_eq!(
        (rows[0]["index"].as_u64(), rows[0]["window"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(rows[0]["text"], "short one");
    let chars: Vec<char> = LONG.chars().collect();
    for (k, r) in rows[1..].iter().enumerate() {
        assert_eq!(
            r["index"].as_u64(),
            Some(2),
            "line 2 (a blank line is counted)"
        );
        assert_eq!(r["window"].as_u64(), Some(k as u64));
        let (a, b) = (
            r["char_start"].as_u64().unwrap(),
            r["char_end"].as_u64().unwrap(),
        );
        let want: String = chars[a as usize..b as usize].iter().collect();
        assert_eq!(r["text"].as_str().unwrap(), want);
    }

    let mut cmd = fetch_ml();
    base(&mut cmd);
    let doc: serde_json::Value = serde_json::from_str(&ok(&run(cmd.arg("--format=json")))).unwrap();
    assert_eq!(doc["chunks"], "rows");
    assert_eq!(doc["chunk_tokens"], 12);
    let json_rows = doc["embeddings"].as_array().unwrap();
    assert_eq!(json_rows.len(), rows.len());
    for (a, b) in json_rows.iter().zip(&rows) {
        for key in [
            "index",
            "window",
            "char_start",
            "char_end",
            "text",
            "embedding",
        ] {
            assert_eq!(a[key], b[key], "json {key}");
        }
    }

    let mut cmd = fetch_ml();
    base(&mut cmd);
    let text = ok(&run(cmd.arg("--format=text")));
    assert!(text.contains("window 1 of input 2, characters"), "{text}");

    let npy = dir.path().join("emb.npy");
    let mut cmd = fetch_ml();
    base(&mut cmd);
    ok(&run(cmd.args(["--format=npy", "-o"]).arg(&npy)));
    let side = std::fs::read_to_string(dir.path().join("emb.npy.meta.jsonl")).unwrap();
    let side = jsonl(&side);
    assert_eq!(side.len(), rows.len());
    for (a, b) in side.iter().zip(&rows) {
        for key in [
            "index",
            "window",
            "char_start",
            "char_end",
            "text",
            "tokens",
        ] {
            assert_eq!(a[key], b[key], "npy sidecar {key}");
        }
    }

    let pq = dir.path().join("emb.parquet");
    let mut cmd = fetch_ml();
    base(&mut cmd);
    ok(&run(cmd.args(["--format=parquet", "-o"]).arg(&pq)));
    let got = parquet_windows(&pq);
    assert_eq!(got.len(), rows.len());
    for (g, r) in got.iter().zip(&rows) {
        let want = (
            r["index"].as_i64().unwrap(),
            r["window"].as_i64().unwrap() as i32,
            r["char_start"].as_i64().unwrap(),
            r["char_end"].as_i64().unwrap(),
            r["text"].as_str().unwrap().to_string(),
        );
        assert_eq!(g, &want);
    }
}

/// (index, window, char_start, char_end, text) of each row of a Parquet file of windows.
fn parquet_windows(path: &Path) -> Vec<(i64, i32, i64, i64, String)> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap();
    let names: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "index",
            "window",
            "char_start",
            "char_end",
            "text",
            "tokens",
            "truncated",
            "embedding"
        ]
    );
    let mut out = Vec::new();
    for batch in builder.build().unwrap() {
        let b = batch.unwrap();
        for i in 0..b.num_rows() {
            out.push((
                b.column(0).as_primitive::<Int64Type>().value(i),
                b.column(1).as_primitive::<Int32Type>().value(i),
                b.column(2).as_primitive::<Int64Type>().value(i),
                b.column(3).as_primitive::<Int64Type>().value(i),
                b.column(4).as_string::<i32>().value(i).to_string(),
            ));
        }
    }
    out
}

/// `--truncate-side left` in the binary: the vector is the tail's, not the head's.
#[test]
fn binary_truncates_either_side() {
    let model = fixture("nomic_bert");
    let embed = |side: &str| {
        jsonl(&ok(&run(fetch_ml()
            .args([
                "--task=1",
                "--format=jsonl",
                "--max-seq-length=10",
                "-s",
                LONG,
            ])
            .arg(format!("--truncate-side={side}"))
            .arg("--model")
            .arg(&model))))
    };
    let (right, left) = (embed("right"), embed("left"));
    assert_eq!(right[0]["truncated"], true);
    assert_eq!(left[0]["truncated"], true);
    assert_ne!(vector(&right[0]), vector(&left[0]));
    // The last 8 text tokens of LONG are those of its tail: "over the lazy dog." and more.
    let tail = jsonl(&ok(&run(fetch_ml()
        .args(["--task=1", "--format=jsonl", "--max-seq-length=10", "-s"])
        .arg(tail_with_tokens(LONG, 8))
        .arg("--model")
        .arg(&model))));
    assert_eq!(tail[0]["truncated"], false);
    assert_eq!(vector(&left[0]), vector(&tail[0]));
}

/// The shortest tail of `text` (at a word start) that has `n` text tokens.
fn tail_with_tokens(text: &str, n: usize) -> String {
    let tok = tokenizer(1000);
    let starts: Vec<usize> = text
        .char_indices()
        .filter(|&(i, c)| i == 0 || (c != ' ' && text[..i].ends_with(' ')))
        .map(|(i, _)| i)
        .collect();
    for &s in starts.iter().rev() {
        let t = &text[s..];
        if tok.encode(&[t]).unwrap()[0].ids.len() - 2 == n {
            return t.to_string();
        }
    }
    panic!("no tail of {n} tokens")
}
