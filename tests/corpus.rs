//! Corpus scale, through the binary: shards (from the flag and from the Kubernetes and Slurm
//! environments), skipped complete shards, Parquet and NumPy output checked bit for bit
//! against JSONL, and a fine-tuned model exported as a sentence-transformers folder.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int32Type, Int64Type};
use common::{fails_with, fetch_ml, minilm, ok, run, stderr, tiny_model};
use fetch_ml::testutil::TinyBert;

/// One output row: index, text, tokens, truncated, and the embedding's bit patterns.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    index: u64,
    text: String,
    tokens: i64,
    truncated: bool,
    bits: Vec<u32>,
}

/// An f32 written by fetch-ml in its shortest round-trip form, read back exactly: JSON
/// numbers print back as the same decimal, which parses to the same f32.
fn f32_of(v: &serde_json::Value) -> f32 {
    v.to_string().parse::<f32>().expect("a float")
}

fn rows_of_jsonl(text: &str) -> Vec<Row> {
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            Row {
                index: v["index"].as_u64().expect("index"),
                text: v["text"].as_str().expect("text").to_string(),
                tokens: v["tokens"].as_i64().expect("tokens"),
                truncated: v["truncated"].as_bool().expect("truncated"),
                bits: v["embedding"]
                    .as_array()
                    .expect("embedding")
                    .iter()
                    .map(|x| f32_of(x).to_bits())
                    .collect(),
            }
        })
        .collect()
}

fn rows_of_parquet(path: &Path) -> (Vec<Row>, usize, Option<String>) {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = std::fs::File::open(path).expect("open the parquet file");
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("a parquet file");
    let groups = builder.metadata().num_row_groups();
    let meta = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == "fetch-ml"))
        .and_then(|e| e.value.clone());
    let schema = builder.schema().clone();
    let types: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| format!("{}:{}", f.name(), f.data_type()))
        .collect();
    assert_eq!(
        types[..4],
        [
            "index:Int64",
            "text:Utf8",
            "tokens:Int32",
            "truncated:Boolean"
        ]
    );
    assert!(
        types[4].starts_with("embedding:FixedSizeList") && types[4].contains("Float32"),
        "{types:?}"
    );
    let mut rows = Vec::new();
    for batch in builder.build().expect("a reader") {
        let b = batch.expect("a record batch");
        let index = b.column(0).as_primitive::<Int64Type>();
        let text = b.column(1).as_string::<i32>();
        let tokens = b.column(2).as_primitive::<Int32Type>();
        let truncated = b.column(3).as_boolean();
        let emb = b.column(4).as_fixed_size_list();
        for i in 0..b.num_rows() {
            let v = emb.value(i);
            rows.push(Row {
                index: index.value(i) as u64,
                text: text.value(i).to_string(),
                tokens: tokens.value(i) as i64,
                truncated: truncated.value(i),
                bits: v
                    .as_primitive::<Float32Type>()
                    .values()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            });
        }
    }
    (rows, groups, meta)
}

/// Parses a .npy v1.0 float32 C-order matrix: its shape and values' bits.
fn read_npy(path: &Path) -> (usize, usize, Vec<u32>) {
    let bytes = std::fs::read(path).expect("read the npy file");
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "magic and version 1.0");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0, "data aligned to 64 bytes");
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).expect("an ASCII header");
    assert!(header.ends_with('\n'), "{header:?}");
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("a shape");
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("a dimension"))
        .collect();
    assert_eq!(dims.len(), 2, "{header}");
    let data = &bytes[10 + hlen..];
    assert_eq!(
        data.len(),
        dims[0] * dims[1] * 4,
        "data size matches the shape"
    );
    let bits = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (dims[0], dims[1], bits)
}

/// The lines of the shard test's input, as written: blank lines, CRLF, one line far longer
/// than the others, and a last line without a newline.
fn corpus_text() -> String {
    let eval = include_str!("../data/multitask/eval.jsonl");
    let texts: Vec<String> = eval
        .lines()
        .take(40)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut s = String::new();
    for (i, t) in texts.iter().enumerate() {
        s += t;
        s += if i % 7 == 3 { "\r\n" } else { "\n" };
        if i % 9 == 4 {
            s += "\n   \n";
        }
        if i == 17 {
            s += &"a very long line about nothing in particular, ".repeat(12);
            s += "\n";
        }
    }
    s += "the last line has no newline";
    s
}

/// 0-based line numbers and texts of the non-blank lines of `text`.
fn expected_lines(text: &str) -> Vec<(u64, String)> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i as u64, l.strip_suffix('\r').unwrap_or(l).to_string()))
        .filter(|(_, l)| !l.trim().is_empty())
        .collect()
}

fn embed_cmd(model: &Path, input: &Path) -> Command {
    let mut cmd = fetch_ml();
    cmd.args(["--task=1", "--threads=1", "--model"])
        .arg(model)
        .arg("--input")
        .arg(input);
    cmd
}

#[test]
fn three_shards_cover_a_file_once_with_the_vectors_of_one_run() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("corpus.txt");
    let text = corpus_text();
    std::fs::write(&input, &text).unwrap();

    let whole = rows_of_jsonl(&ok(&run(embed_cmd(&model, &input).arg("--format=jsonl"))));
    let want = expected_lines(&text);
    let got: Vec<(u64, String)> = whole.iter().map(|r| (r.index, r.text.clone())).collect();
    assert_eq!(
        got, want,
        "index is the 0-based line number of the sentence"
    );

    // As the engines would run them: the same binary, a different index for each.
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let template = out.join("emb.jsonl");
    let shard = |i: usize| -> Command {
        let mut cmd = embed_cmd(&model, &input);
        cmd.arg("--format=jsonl").arg("-o").arg(&template);
        match i {
            0 => {
                cmd.arg("--shard=0/3");
            }
            1 => {
                cmd.env("JOB_COMPLETION_INDEX", "1")
                    .env("FETCH_ML_SHARDS", "3");
            }
            _ => {
                cmd.env("SLURM_ARRAY_TASK_ID", "2")
                    .env("SLURM_ARRAY_TASK_MIN", "0")
                    .env("SLURM_ARRAY_TASK_MAX", "2")
                    .env("SLURM_ARRAY_TASK_COUNT", "3")
                    .env("FETCH_ML_SHARDS", "3");
            }
        }
        cmd
    };
    let sources = [
        "--shard 0/3",
        "JOB_COMPLETION_INDEX=1, FETCH_ML_SHARDS=3",
        "SLURM_ARRAY_TASK_ID=2, FETCH_ML_SHARDS=3",
    ];
    let mut union: Vec<Row> = Vec::new();
    let mut next_byte = 0u64;
    for (i, source) in sources.iter().enumerate() {
        let o = run(&mut shard(i));
        ok(&o);
        let err = stderr(&o);
        assert!(err.contains(&format!("shard {i}/3 (from")), "{err}");
        assert!(err.contains(source), "{err}");
        // "bytes A..B of LEN": the ranges follow each other from 0 to the end of the file.
        let range = err
            .split("bytes ")
            .nth(1)
            .expect("the shard names its bytes");
        let (a, rest) = range.split_once("..").unwrap();
        let b = rest.split_whitespace().next().unwrap();
        assert_eq!(a.parse::<u64>().unwrap(), next_byte, "{err}");
        next_byte = b.parse().unwrap();
        let path = out.join(format!("emb-0000{i}-of-00003.jsonl"));
        let rows = rows_of_jsonl(&std::fs::read_to_string(&path).unwrap());
        assert!(!rows.is_empty(), "shard {i} has rows");
        union.extend(rows);
    }
    assert_eq!(next_byte, text.len() as u64);
    union.sort_by_key(|r| r.index);
    assert_eq!(union.len(), whole.len(), "every line exactly once");
    for (a, b) in union.iter().zip(&whole) {
        assert_eq!(a, b, "shard rows are bit-identical to the single run's");
    }

    // A retried shard whose output is complete is skipped, and left as it was.
    let done = out.join("emb-00001-of-00003.jsonl");
    let before = std::fs::read(&done).unwrap();
    let mtime = std::fs::metadata(&done).unwrap().modified().unwrap();
    let o = run(&mut shard(1));
    ok(&o);
    assert!(stderr(&o).contains("skipped"), "{}", stderr(&o));
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&done).unwrap().modified().unwrap(), mtime);
    let o = run(shard(1).arg("--overwrite"));
    ok(&o);
    assert!(stderr(&o).contains("redoing"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&done).unwrap(), before);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Three outputs and their completion records; no temporary files.
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn a_shard_reads_only_its_own_byte_range() {
    // Bad UTF-8 in the last third: the other shards never decode those bytes, so they succeed;
    // the shard that owns the line names it by its global line number.
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("in.txt");
    // 30 lines of 23 bytes: the thirds fall exactly on lines 10 and 20.
    let mut bytes = Vec::new();
    for i in 0..29 {
        bytes.extend_from_slice(format!("the cat sat on line {i:02}\n").as_bytes());
    }
    bytes.extend_from_slice(b"broken \xff here, line 29\n");
    assert_eq!(bytes.len(), 30 * 23);
    std::fs::write(&input, &bytes).unwrap();
    for i in 0..2 {
        let o = run(embed_cmd(&model, &input)
            .args(["--format=jsonl", "--shard"])
            .arg(format!("{i}/3")));
        let rows = rows_of_jsonl(&ok(&o));
        assert_eq!(rows.len(), 10, "shard {i}");
        assert_eq!(rows[0].index, 10 * i as u64);
        assert_eq!(rows[0].text, format!("the cat sat on line {:02}", 10 * i));
    }
    let o = run(embed_cmd(&model, &input).args(["--format=jsonl", "--shard=2/3"]));
    fails_with(&o, &["in.txt", "line 30", "UTF-8"]);
}

#[test]
fn standard_input_is_split_by_line_number() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let mut child = fetch_ml()
        .args([
            "--task=1",
            "--format=jsonl",
            "--input=-",
            "--shard=1/2",
            "--model",
        ])
        .arg(&model)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"zero\none\n\nthree\nfour\nfive")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let rows = rows_of_jsonl(&ok(&o));
    let got: Vec<(u64, &str)> = rows.iter().map(|r| (r.index, r.text.as_str())).collect();
    assert_eq!(got, [(1, "one"), (3, "three"), (5, "five")]);
    assert!(stderr(&o).contains("L mod 2 = 1"), "{}", stderr(&o));

    // --sentence: its position is its line number.
    let rows = rows_of_jsonl(&ok(&run(fetch_ml()
        .args([
            "--task=1",
            "--format=jsonl",
            "--shard=0/2",
            "-s",
            "a",
            "-s",
            "b",
            "-s",
            "c",
            "--model",
        ])
        .arg(&model))));
    let got: Vec<(u64, &str)> = rows.iter().map(|r| (r.index, r.text.as_str())).collect();
    assert_eq!(got, [(0, "a"), (2, "c")]);
}

#[test]
fn an_empty_shard_writes_an_empty_output() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("one.txt");
    std::fs::write(&input, "just one line\n").unwrap();
    let out = d.path().join("emb-{i}.npy");
    for i in 0..3 {
        ok(&run(embed_cmd(&model, &input)
            .args(["--format=npy", "--shard"])
            .arg(format!("{i}/3"))
            .arg("-o")
            .arg(&out)));
    }
    let (rows0, dim, _) = read_npy(&d.path().join("emb-0.npy"));
    assert_eq!((rows0, dim), (1, 32));
    for i in 1..3 {
        let (rows, dim, _) = read_npy(&d.path().join(format!("emb-{i}.npy")));
        assert_eq!((rows, dim), (0, 32));
        let side =
            std::fs::read_to_string(d.path().join(format!("emb-{i}.npy.meta.jsonl"))).unwrap();
        assert!(side.is_empty());
    }
}

fn minilm_corpus(dir: &Path) -> PathBuf {
    let input = dir.join("corpus.txt");
    std::fs::write(&input, corpus_text()).unwrap();
    input
}

#[test]
fn parquet_holds_the_jsonl_values_bit_for_bit() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = minilm_corpus(dir.path());
    let jsonl = rows_of_jsonl(&ok(&run(embed_cmd(&model, &input).arg("--format=jsonl"))));
    let path = dir.path().join("emb.parquet");
    let o = run(embed_cmd(&model, &input)
        .arg("--format=parquet")
        .arg("-o")
        .arg(&path));
    assert!(ok(&o).is_empty(), "nothing on stdout");
    let (rows, groups, meta) = rows_of_parquet(&path);
    assert_eq!(groups, 1);
    assert_eq!(rows, jsonl);
    assert_eq!(rows[0].bits.len(), 384);
    let meta: serde_json::Value = serde_json::from_str(&meta.expect("fetch-ml metadata")).unwrap();
    assert_eq!(meta["dimension"], 384);
    assert_eq!(meta["normalized"], true);
}

#[test]
fn parquet_writes_a_row_group_per_chunk() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("many.txt");
    let text: String = (0..5000).map(|i| format!("the cat {i}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let path = d.path().join("emb.parquet");
    ok(&run(embed_cmd(&model, &input)
        .arg("--format=parquet")
        .arg("-o")
        .arg(&path)));
    let (rows, groups, _) = rows_of_parquet(&path);
    assert_eq!(groups, 2, "4096 sentences per row group");
    assert_eq!(rows.len(), 5000);
    assert!(rows.iter().enumerate().all(|(i, r)| r.index == i as u64));
}

#[test]
fn npy_holds_the_jsonl_values_bit_for_bit() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = minilm_corpus(dir.path());
    let jsonl = rows_of_jsonl(&ok(&run(embed_cmd(&model, &input).arg("--format=jsonl"))));
    let path = dir.path().join("emb.npy");
    ok(&run(embed_cmd(&model, &input)
        .arg("--format=npy")
        .arg("-o")
        .arg(&path)));
    let (n, dim, bits) = read_npy(&path);
    assert_eq!((n, dim), (jsonl.len(), 384));
    let side = std::fs::read_to_string(dir.path().join("emb.npy.meta.jsonl")).unwrap();
    let side: Vec<serde_json::Value> = side
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(side.len(), n);
    for (k, (row, meta)) in jsonl.iter().zip(&side).enumerate() {
        assert_eq!(&bits[k * dim..(k + 1) * dim], &row.bits[..], "row {k}");
        assert_eq!(meta["index"], row.index);
        assert_eq!(meta["text"], row.text.as_str());
        assert_eq!(meta["tokens"], row.tokens);
        assert_eq!(meta["truncated"], row.truncated);
    }
}

#[test]
fn corpus_flag_errors_name_the_flag_or_variable() {
    let (d, model) = tiny_model(&TinyBert::default());
    let base = || {
        let mut c = fetch_ml();
        c.args(["--task=1", "-s", "hi", "--model"]).arg(&model);
        c
    };
    fails_with(
        &run(base().arg("--format=parquet")),
        &["--format parquet", "--output"],
    );
    fails_with(
        &run(base().args(["--format=npy", "-o", "-"])),
        &["--format npy", "--output"],
    );
    let o = run(fetch_ml().args(["--task=2", "--format=parquet", "-o", "x.parquet"]));
    fails_with(&o, &["--format parquet applies to --task=1 only"]);
    let o = run(base()
        .arg("--format=jsonl")
        .arg("-o")
        .arg(d.path().join("e-{shard}.jsonl")));
    fails_with(&o, &["{shard}", "--shard I/N"]);
    fails_with(
        &run(base().env("JOB_COMPLETION_INDEX", "2")),
        &["JOB_COMPLETION_INDEX=2", "--shards", "FETCH_ML_SHARDS"],
    );
    fails_with(
        &run(base()
            .env("JOB_COMPLETION_INDEX", "3")
            .args(["--shards", "3"])),
        &["JOB_COMPLETION_INDEX=3", "not below", "3"],
    );
    fails_with(
        &run(base()
            .env("FETCH_ML_SHARDS", "x")
            .env("JOB_COMPLETION_INDEX", "0")),
        &["FETCH_ML_SHARDS=\"x\""],
    );
    fails_with(
        &run(base()
            .env("SLURM_ARRAY_TASK_ID", "4")
            .env("SLURM_ARRAY_TASK_MIN", "0")
            .env("SLURM_ARRAY_TASK_COUNT", "3")),
        &["SLURM_ARRAY_TASK_ID=4", "FETCH_ML_SHARDS", "--shards"],
    );
    fails_with(
        &run(base()
            .env("SLURM_ARRAY_TASK_ID", "4")
            .env("FETCH_ML_SHARDS", "3")),
        &["SLURM_ARRAY_TASK_ID=4", "not below", "0 to 2"],
    );
    let o = run(base().args(["--shard", "3/3"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("I/N"), "{}", stderr(&o));
    // --shard 0/1 overrides an engine's environment: the whole input.
    let out = ok(&run(base()
        .args(["--shard=0/1", "--format=jsonl"])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_MIN", "0")
        .env("SLURM_ARRAY_TASK_COUNT", "3")));
    assert_eq!(rows_of_jsonl(&out).len(), 1);
    fails_with(
        &run(fetch_ml().args(["--task=3", "--shard=0/2"])),
        &["--shard does not apply to --task=3"],
    );
}

/// Every tensor of a safetensors file: name -> (dtype, shape, bytes).
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

#[test]
fn an_exported_model_embeds_like_the_trained_encoder() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (ck, exp) = (dir.path().join("ck"), dir.path().join("export"));
    let o = run(fetch_ml()
        .args([
            "--task=2",
            "--threads=2",
            "--epochs=1",
            "--max-train-examples=48",
            "--batch-size=16",
            "--lr=1e-4",
            "--model",
        ])
        .arg(&model)
        .arg("--save")
        .arg(&ck)
        .arg("--export")
        .arg(&exp)
        .args(["--format=jsonl", "-s", "hi"]));
    ok(&o);
    assert!(
        stderr(&o).contains("exported the model to"),
        "{}",
        stderr(&o)
    );
    for f in [
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "model.safetensors",
        "modules.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
        "heads.safetensors",
        "heads.json",
    ] {
        assert!(exp.join(f).is_file(), "{f} missing from the export");
    }
    let modules = std::fs::read_to_string(exp.join("modules.json")).unwrap();
    assert!(
        modules.contains("sentence_transformers.models.Normalize"),
        "MiniLM normalises: {modules}"
    );

    // Every encoder tensor of the base is there, under the base's names, trained or not.
    let base = tensors(&model.join("model.safetensors"));
    let exported = tensors(&exp.join("model.safetensors"));
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        exported.keys().collect::<Vec<_>>()
    );
    let changed = base.iter().filter(|(n, t)| exported[*n].2 != t.2).count();
    assert!(
        changed > 50,
        "the encoder trained: {changed} tensors changed"
    );
    assert_eq!(
        exported["pooler.dense.weight"], base["pooler.dense.weight"],
        "untrained tensors copied"
    );

    // The heads are the checkpoint's, bit for bit, and heads.json describes them.
    let heads = tensors(&exp.join("heads.safetensors"));
    let ckpt = tensors(&ck.join("model.safetensors"));
    assert_eq!(heads.len(), 8);
    for (n, t) in &heads {
        assert_eq!(&ckpt[n], t, "{n}");
    }
    let hj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("heads.json")).unwrap()).unwrap();
    assert_eq!(hj["format"], "fetch-ml-heads");
    assert_eq!(hj["heads"][0]["activation"], "relu");
    assert_eq!(hj["heads"][1]["labels"].as_array().unwrap().len(), 3);

    // --task=1 on the export gives the trained encoder's vectors, bit for bit.
    let sentences = [
        "The landlord didn't raise the rent this year.",
        "Three firmware updates later, the earbuds still can't connect.",
        "hello",
    ];
    let mut cmd = fetch_ml();
    cmd.args(["--task=1", "--format=jsonl", "--model"])
        .arg(&exp);
    for s in sentences {
        cmd.arg("-s").arg(s);
    }
    let from_export = rows_of_jsonl(&ok(&run(&mut cmd)));
    let trained = trained_vectors(&model, &ck, &sentences);
    assert_eq!(from_export.len(), trained.len());
    for (row, want) in from_export.iter().zip(&trained) {
        let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        assert_eq!(row.bits, want, "{}", row.text);
    }
    let mut base_cmd = fetch_ml();
    base_cmd
        .args(["--task=1", "--format=jsonl", "--model"])
        .arg(&model)
        .args(["-s", sentences[0]]);
    let base_rows = rows_of_jsonl(&ok(&run(&mut base_cmd)));
    assert_ne!(
        base_rows[0].bits, from_export[0].bits,
        "the export is not the base model"
    );

    // Exporting the saved checkpoint gives the same weights; a second export needs --overwrite,
    // which replaces only an earlier export.
    let again = || {
        let mut c = fetch_ml();
        c.args(["--task=2", "-s", "hi", "--checkpoint"])
            .arg(&ck)
            .arg("--export")
            .arg(&exp);
        c
    };
    fails_with(
        &run(&mut again()),
        &["--export", "not empty", "--overwrite"],
    );
    let before = std::fs::read(exp.join("model.safetensors")).unwrap();
    ok(&run(again().arg("--overwrite")));
    assert_eq!(
        std::fs::read(exp.join("model.safetensors")).unwrap(),
        before
    );
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--overwrite", "--checkpoint"])
        .arg(&ck)
        .arg("--export")
        .arg(&foreign));
    fails_with(&o, &["not a fetch-ml export"]);
    assert!(foreign.join("notes.txt").is_file());
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary folders left: {leftovers:?}"
    );
}

/// The trained encoder's sentence vectors, through the library: the checkpoint's model,
/// mean pooling, normalised as MiniLM's pipeline does.
fn trained_vectors(base: &Path, ck: &Path, sentences: &[&str]) -> Vec<Vec<f32>> {
    use fetch_ml::hub::ModelRef;
    use fetch_ml::loader::ModelAssets;
    let ckpt = fetch_ml::train::checkpoint::Checkpoint::load(ck).unwrap();
    let model_ref = ModelRef {
        id: base.display().to_string(),
        revision: "main".into(),
        offline: true,
        hub_timeout: std::time::Duration::from_secs(5),
    };
    let assets = ModelAssets::load(&model_ref, None).unwrap();
    let model = ckpt.model(&assets, &candle_core::Device::Cpu).unwrap();
    let embedder = fetch_ml::embed::Embedder::new(
        &model.encoder,
        &assets.tokenizer,
        fetch_ml::model::pooling::Pooling::Mean,
        true,
        32,
    );
    embedder
        .embed(sentences)
        .unwrap()
        .into_iter()
        .map(|e| e.vector)
        .collect()
}

/// The texts of `n` numbered lines, with a blank line every 10th.
fn numbered_corpus(path: &Path, n: usize) -> Vec<(u64, String)> {
    let text: String = (0..n)
        .map(|i| {
            if i % 10 == 9 {
                "\n".to_string()
            } else {
                format!("sentence number {i}\n")
            }
        })
        .collect();
    std::fs::write(path, &text).unwrap();
    expected_lines(&text)
}

#[test]
fn the_slurm_script_runs_one_shard_per_array_task() {
    let (d, model) = tiny_model(&TinyBert::default());
    let in_dir = d.path().join("corpus");
    std::fs::create_dir(&in_dir).unwrap();
    let want = numbered_corpus(&in_dir.join("sentences.txt"), 50);
    let out_dir = d.path().join("embeddings");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/slurm-array.sh");
    let mut union = Vec::new();
    // `SHARDS=3 sbatch --array=0-2`: array task id I runs shard I of 3.
    for id in 0..3 {
        let o = run(Command::new("bash")
            .arg(&script)
            .current_dir(d.path())
            .env("FETCH_ML_BIN", env!("CARGO_BIN_EXE_fetch-ml"))
            .env("MODEL_DIR", model.parent().unwrap())
            .env("MODEL", model.file_name().unwrap())
            .env("FORMAT", "jsonl")
            .env("SHARDS", "3")
            .env("SLURM_ARRAY_TASK_ID", id.to_string())
            .env("SLURM_ARRAY_TASK_MIN", "0")
            .env("SLURM_ARRAY_TASK_MAX", "2")
            .env("SLURM_ARRAY_TASK_COUNT", "3")
            .env("SLURM_CPUS_PER_TASK", "1")
            .env("HF_HUB_OFFLINE", "1"));
        ok(&o);
        assert!(
            stderr(&o).contains(&format!("--shard {id}/3")),
            "{}",
            stderr(&o)
        );
        let path = out_dir.join(format!("emb-0000{id}-of-00003.jsonl"));
        union.extend(rows_of_jsonl(&std::fs::read_to_string(path).unwrap()));
    }
    union.sort_by_key(|r| r.index);
    let got: Vec<(u64, String)> = union.into_iter().map(|r| (r.index, r.text)).collect();
    assert_eq!(got, want);
}

#[test]
fn the_kubernetes_manifest_runs_one_shard_per_index() {
    let manifest = include_str!("../deploy/k8s-indexed-job.yaml");
    let value_after = |key: &str| -> String {
        let line = manifest
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("{key} in the manifest"));
        line.split_once(':')
            .unwrap()
            .1
            .split('#')
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    let completions: usize = value_after("completions:").parse().unwrap();
    let shards_line = manifest
        .lines()
        .skip_while(|l| !l.contains("name: FETCH_ML_SHARDS"))
        .nth(1)
        .unwrap();
    let shards = shards_line
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .trim_matches('"');
    assert_eq!(
        shards,
        completions.to_string(),
        "FETCH_ML_SHARDS equals completions"
    );
    let args: Vec<String> = manifest
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- --"))
        .map(|l| l.trim_start().trim_start_matches("- ").to_string())
        .collect();
    assert!(args.len() >= 5, "{args:?}");

    // The pod's volumes as local folders; the tiny model in place of MiniLM.
    let (d, model) = tiny_model(&TinyBert::default());
    let (in_dir, out_dir) = (d.path().join("in"), d.path().join("out"));
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::create_dir_all(&in_dir).unwrap();
    let want = numbered_corpus(&in_dir.join("sentences.txt"), 80);
    let local: Vec<String> = args
        .iter()
        .map(|a| match a.split_once('=') {
            Some(("--model", _)) => format!("--model={}", model.display()),
            _ => a
                .replace("/data/in", &in_dir.display().to_string())
                .replace("/data/out", &out_dir.display().to_string()),
        })
        .collect();
    let mut union = Vec::new();
    for index in 0..completions {
        let o = run(fetch_ml()
            .args(&local)
            .env("JOB_COMPLETION_INDEX", index.to_string())
            .env("FETCH_ML_SHARDS", shards));
        ok(&o);
        assert!(
            stderr(&o).contains("Kubernetes Indexed Job"),
            "{}",
            stderr(&o)
        );
        let path = out_dir.join(format!("emb-{index:05}-of-{completions:05}.parquet"));
        union.extend(rows_of_parquet(&path).0);
    }
    union.sort_by_key(|r| r.index);
    let got: Vec<(u64, String)> = union.into_iter().map(|r| (r.index, r.text)).collect();
    assert_eq!(got, want);
}

#[test]
fn help_documents_the_corpus_flags() {
    let out = ok(&run(fetch_ml().arg("--help")));
    for needle in [
        "--shard <I/N>",
        "--shards <N>",
        "--overwrite",
        "--export <DIR>",
        "parquet",
        "npy",
        "JOB_COMPLETION_INDEX",
        "SLURM_ARRAY_TASK_ID",
        "FETCH_ML_SHARDS",
        "{shard}",
        "{i} its index and {n} the count",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}");
    }
}
