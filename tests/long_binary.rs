//! The long-context architectures (ModernBERT, NomicBERT, JinaBERT) in the binary: task 1
//! gives the library's f32 vectors, and bf16 and int8 close to them, on the fixtures of
//! `tests/fixtures/arch/`; a sentence-transformers folder on ModernBERT (`st-modernbert`)
//! matches sentence-transformers' `encode` with nomic's prompts and `truncate_dim`.

mod common;

use candle_core::Device;
use common::long::{assets, fixture, reference, ARCHS, TOL};
use common::{cosine, embed_jsonl, fetch_ml, max_diff, ok, run};
use fetch_ml::model::fast::{PackedEncoder, Workspace};
use fetch_ml::model::pooling::Pooling;
use fetch_ml::model::quant::Dtype;
use fetch_ml::tokenize::Encoded;

fn assert_vectors(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| max_diff(g, w))
        .fold(0.0, f32::max);
    eprintln!("{what}: max abs diff {worst:.2e}");
    assert!(worst <= TOL, "{what}: max abs diff {worst}");
}

/// The binary embeds each architecture as the library does in f32, and in bf16 and int8 on
/// the fast path (saying which kernel), close to f32.
#[test]
fn binary_embeds_in_every_dtype() {
    for name in ARCHS {
        let r = reference(name);
        let a = assets(&fixture(name));
        let enc = a.tokenizer.encode(&r.sentences).unwrap();
        let items: Vec<&Encoded> = enc.iter().collect();
        let want = a
            .inference_encoder(Dtype::F32, &Device::Cpu)
            .unwrap()
            .pooled_packed(&items, Pooling::Mean, &mut Workspace::default())
            .unwrap();
        assert_vectors(name, &embed_jsonl(&fixture(name), &r.sentences, &[]), &want);
        for dtype in ["bf16", "int8"] {
            let mut cmd = fetch_ml();
            cmd.args(["--task=1", "--format=jsonl", "--dtype", dtype, "--model"])
                .arg(fixture(name));
            for s in &r.sentences {
                cmd.args(["-s", s]);
            }
            let o = run(&mut cmd);
            let out = ok(&o);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains(dtype) && err.contains("kernel"),
                "{name}: {err}"
            );
            let got: Vec<Vec<f32>> = out
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    serde_json::from_value(v["embedding"].clone()).unwrap()
                })
                .collect();
            assert_eq!(got.len(), want.len(), "{name} {dtype}");
            let min = got
                .iter()
                .zip(&want)
                .map(|(g, w)| cosine(g, w))
                .fold(1f64, f64::min);
            eprintln!("{name} --dtype {dtype}: worst cosine vs f32 {min:.6}");
            assert!(min >= 0.99, "{name} {dtype}: worst cosine {min}");
        }
    }
}

#[derive(serde::Deserialize)]
struct StReference {
    sentences: Vec<String>,
    plain: Vec<Vec<f32>>,
    search_query: Vec<Vec<f32>>,
    search_document: Vec<Vec<f32>>,
    truncate_8: Vec<Vec<f32>>,
}

/// A sentence-transformers folder on ModernBERT with nomic's prompts: fetch-ml gives
/// sentence-transformers' own vectors plain, with each named prompt, and truncated to 8
/// dimensions (normalised again).
#[test]
fn sentence_transformers_modernbert_prompts_and_truncate_dim() {
    let path = fixture("st-modernbert");
    let r: StReference =
        serde_json::from_str(&std::fs::read_to_string(path.join("reference.json")).unwrap())
            .unwrap();
    let a = assets(&path);
    assert!(a.pipeline.normalize);
    assert_eq!(a.pipeline.prompts["search_query"], "search_query: ");
    let s = &r.sentences;
    assert_vectors("st-modernbert plain", &embed_jsonl(&path, s, &[]), &r.plain);
    assert_vectors(
        "st-modernbert --prompt-name search_query",
        &embed_jsonl(&path, s, &["--prompt-name", "search_query"]),
        &r.search_query,
    );
    assert_vectors(
        "st-modernbert --prompt search_document: ",
        &embed_jsonl(&path, s, &["--prompt", "search_document: "]),
        &r.search_document,
    );
    let truncated = embed_jsonl(&path, s, &["--truncate-dim", "8"]);
    assert!(truncated.iter().all(|v| v.len() == 8));
    assert_vectors("st-modernbert --truncate-dim 8", &truncated, &r.truncate_8);
}
