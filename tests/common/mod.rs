//! Helpers shared by the integration tests: tiny models, the real MiniLM and MPNet, running the
//! binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use fetch_ml::testutil::TinyBert;

pub mod long;

/// A temporary folder holding a tiny random BERT written in Hugging Face layout.
pub fn tiny_model(spec: &TinyBert) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny-bert");
    spec.write(&model).expect("write tiny model");
    (dir, model)
}

/// The all-MiniLM-L6-v2 folder that `scripts/fetch-minilm.sh` fetches. `None` (test skipped,
/// with a message) when it is absent outside CI; a panic when it is absent in CI.
pub fn minilm() -> Option<PathBuf> {
    real_model(
        "all-MiniLM-L6-v2",
        "FETCH_ML_MINILM",
        "scripts/fetch-minilm.sh",
    )
}

/// The all-mpnet-base-v2 folder that `scripts/fetch-mpnet.sh` fetches, as [`minilm`].
pub fn mpnet() -> Option<PathBuf> {
    real_model(
        "all-mpnet-base-v2",
        "FETCH_ML_MPNET",
        "scripts/fetch-mpnet.sh",
    )
}

/// `models/NAME` (or the folder `$ENV` names) when it holds the weights; else `None` (test
/// skipped, with a message), or a panic when `CI` is set.
fn real_model(name: &str, env: &str, script: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name)
    });
    if path.join("model.safetensors").is_file() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but the real model is missing at {}; run {script}",
            path.display()
        );
    }
    eprintln!(
        "SKIPPED: {name} not found at {}; run {script}",
        path.display()
    );
    None
}

/// The built binary, with a clean environment for the hub.
pub fn fetch_ml() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fetch-ml"));
    cmd.env_remove("HF_HUB_OFFLINE")
        .env(
            "HF_HOME",
            std::env::temp_dir().join("fetch-ml-tests-empty-hf-home"),
        )
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run fetch-ml")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "fetch-ml failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Asserts failure with a message containing every one of `needles`; returns stderr.
pub fn fails_with(o: &Output, needles: &[&str]) -> String {
    assert!(
        !o.status.success(),
        "expected failure, got success:\n{}",
        stdout(o)
    );
    let err = stderr(o);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    err
}

/// Runs `--task=1 --format=jsonl` on `model` with `extra` flags; the vectors in order.
pub fn embed_jsonl(model: &Path, sentences: &[String], extra: &[&str]) -> Vec<Vec<f32>> {
    let mut cmd = fetch_ml();
    cmd.args(["--task=1", "--format=jsonl"])
        .args(extra)
        .arg("--model")
        .arg(model);
    for s in sentences {
        cmd.args(["-s", s]);
    }
    let out = ok(&run(&mut cmd));
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::from_value(v["embedding"].clone()).unwrap()
        })
        .collect()
}

/// The largest absolute difference of two equally long vectors.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += *x as f64 * *y as f64;
        na += *x as f64 * *x as f64;
        nb += *y as f64 * *y as f64;
    }
    d / (na.sqrt() * nb.sqrt()).max(1e-300)
}

/// Cosine similarity and max abs difference of two vectors.
pub fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    (dot / (na * nb), max)
}

/// A linearly separable toy data set in the tiny vocabulary: the class follows the topic word
/// (food or tech), the sentiment follows the opinion word (positive or negative).
pub fn toy_rows(n: usize, seed: u64) -> Vec<serde_json::Value> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let topics = [
        ("food", ["pizza", "food", "tasty"]),
        ("tech", ["phone", "app", "battery"]),
    ];
    let opinions = [
        ("negative", ["hate", "terrible", "bad"]),
        ("positive", ["love", "great", "good"]),
    ];
    let fillers = [
        "the", "a", "it", "this", "my", "our", "today", "very", "was", "is",
    ];
    (0..n)
        .map(|i| {
            let (class, tw) = topics[i % 2];
            let (sentiment, ow) = opinions[(i / 2) % 2];
            let mut words: Vec<&str> = (0..rng.random_range(1..5))
                .map(|_| fillers[rng.random_range(0..fillers.len())])
                .collect();
            words.insert(
                rng.random_range(0..=words.len()),
                tw[rng.random_range(0..3)],
            );
            words.insert(
                rng.random_range(0..=words.len()),
                ow[rng.random_range(0..3)],
            );
            serde_json::json!({"text": words.join(" "), "class": class, "sentiment": sentiment})
        })
        .collect()
}

/// Writes rows as JSONL.
pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

/// Builds the multitask model of a training run with heads seeded from the run's seed.
pub fn build_model(
    setup: &fetch_ml::train::session::Setup,
    cfg: &fetch_ml::config::TrainConfig,
    plan: fetch_ml::model::freeze::FreezePlan,
) -> fetch_ml::model::multitask::MultiTaskModel {
    setup
        .assets
        .multitask(
            vec![setup.assets.weights.clone()],
            setup.heads_spec(cfg),
            plan,
            fetch_ml::model::multitask::HeadInit::Seed(cfg.settings.seed),
            &candle_core::Device::Cpu,
        )
        .expect("build the multitask model")
}

/// Every parameter's name and bit pattern, in model order.
pub fn param_bits(model: &fetch_ml::model::multitask::MultiTaskModel) -> Vec<(String, Vec<u32>)> {
    model
        .registry
        .params()
        .into_iter()
        .map(|p| {
            let v: Vec<f32> = p.tensor.flatten_all().unwrap().to_vec1().unwrap();
            (p.name, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// A tiny model in `dir/cat-model` whose word "cat" has an embedding of 3e38 in every channel:
/// the embeddings' LayerNorm overflows on its token, so a sentence holding "cat" gets a NaN
/// vector while every other sentence gets a finite one (the toy data never says "cat").
pub fn cat_poisoned_model(dir: &Path) -> PathBuf {
    use candle_core::{Device, Tensor};
    let model = dir.join("cat-model");
    TinyBert::default().write(&model).unwrap();
    let cat = fetch_ml::testutil::vocab()
        .iter()
        .position(|w| w == "cat")
        .unwrap();
    let path = model.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "embeddings.word_embeddings.weight";
    let h = w[name].dims()[1];
    let mut v: Vec<f32> = w[name].flatten_all().unwrap().to_vec1().unwrap();
    v[cat * h..(cat + 1) * h].iter_mut().for_each(|x| *x = 3e38);
    let t = Tensor::from_vec(v, w[name].dims(), &Device::Cpu).unwrap();
    w.insert(name.into(), t);
    candle_core::safetensors::save(&w, &path).unwrap();
    model
}
