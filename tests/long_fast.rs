//! The long-context architectures (ModernBERT, NomicBERT, JinaBERT) on the fast path
//! ([`LongEncoder`]) in f32, bf16 and int8, on the tiny random models of
//! `tests/fixtures/arch/<name>/` (`scripts/make-long-fixtures.py`):
//! - f32 against the candle blocks in inference mode ([`Encoder::forward_packed`], itself
//!   checked against transformers and candle-transformers in `tests/long_arch.rs`) within
//!   1e-5, on one packed batch of sequences of 1 to 1,100 tokens (longer than ModernBERT's
//!   window and than 1,024) and on the sentences;
//! - bf16 and int8, on every kernel this CPU has, within the bounds the BERT family's
//!   quantized paths meet (`tests/quant.rs`): every token's hidden state at cosine > 0.99 of
//!   f32, the mean-pooled vectors at cosine >= 0.99 (int8) and >= 0.999 (bf16); and a
//!   sequence's vector bit-identical alone and in the packed batch;
//! - `MultiTaskModel::with_dtype` runs a frozen long-context encoder in bf16 and int8.

mod common;

use common::long::fixture;
use common::{cosine, max_diff};

use std::collections::HashMap;

use candle_core::Device;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::encoder::Encoder;
use fetch_ml::model::fast::{LongEncoder, PackedEncoder, Workspace};
use fetch_ml::model::pooling::Pooling;
use fetch_ml::model::quant::{Bf16Kernel, Dtype, Int8Kernel};
use fetch_ml::tokenize::Encoded;

const ARCHS: [&str; 3] = ["modernbert", "nomic_bert", "jina_bert"];

/// f32 fast path against the candle path (max abs difference).
const TOL: f32 = 1e-5;

#[derive(serde::Deserialize)]
struct Reference {
    ids: HashMap<String, Vec<Vec<u32>>>,
}

/// The fixture's packed sets: `long` (random ids, lengths 1 to 1,100) and `sentences`.
fn sets(name: &str) -> Vec<(String, Vec<Encoded>)> {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    let r: Reference = serde_json::from_str(&text).unwrap();
    let mut out: Vec<(String, Vec<Encoded>)> = r
        .ids
        .into_iter()
        .map(|(set, ids)| {
            let enc = ids
                .into_iter()
                .map(|x| Encoded {
                    type_ids: vec![0; x.len()],
                    ids: x,
                    truncated: false,
                })
                .collect();
            (set, enc)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out
        .iter()
        .any(|(_, s)| s.iter().any(|e| e.ids.len() > 1024)));
    out
}

fn assets(name: &str) -> ModelAssets {
    common::long::assets(&fixture(name))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The candle path's last hidden states of `seqs`, packed.
fn candle_hidden(enc: &Encoder, seqs: &[&Encoded]) -> Vec<f32> {
    let mut ws = Workspace::default();
    enc.forward_packed(seqs, &mut ws).unwrap().to_vec()
}

/// The f32 fast path equals the candle path within 1e-5 on every packed set.
#[test]
fn f32_fast_path_matches_the_candle_path() {
    for name in ARCHS {
        let a = assets(name);
        let enc = a.frozen(&Device::Cpu).unwrap();
        let fast = LongEncoder::from_encoder(&enc, Dtype::F32).unwrap();
        assert_eq!(fast.kernel_name(), "gemm-f32");
        for (set, seqs) in sets(name) {
            let items: Vec<&Encoded> = seqs.iter().collect();
            let want = candle_hidden(&enc, &items);
            let mut ws = Workspace::default();
            let got = fast.forward_packed(&items, &mut ws).unwrap();
            let d = max_diff(got, &want);
            eprintln!("{name} {set}: f32 fast path vs candle path, max abs diff {d:.2e}");
            assert!(d <= TOL, "{name} {set}: max abs diff {d}");
        }
    }
}

/// Every (dtype, kernel) pair this CPU runs, int8 and bf16, for `enc`.
fn quantized(enc: &Encoder) -> Vec<(String, Dtype, LongEncoder)> {
    let mut out = Vec::new();
    for k in Int8Kernel::all() {
        if !k.supported() {
            eprintln!("SKIPPED: int8 kernel {} (this CPU lacks it)", k.name());
            continue;
        }
        let e = LongEncoder::with_kernels(enc.clone(), Dtype::Int8, k, Bf16Kernel::portable());
        out.push((format!("int8/{}", k.name()), Dtype::Int8, e.unwrap()));
    }
    for k in Bf16Kernel::all() {
        if !k.supported() {
            eprintln!("SKIPPED: bf16 kernel {} (this CPU lacks it)", k.name());
            continue;
        }
        let e = LongEncoder::with_kernels(enc.clone(), Dtype::Bf16, Int8Kernel::portable(), k);
        out.push((format!("bf16/{}", k.name()), Dtype::Bf16, e.unwrap()));
    }
    out
}

/// bf16 and int8 on every kernel: token states and mean-pooled vectors within the quality
/// bounds of the BERT family's quantized paths, and each sequence's pooled vector
/// bit-identical alone and inside the packed batch.
#[test]
fn quantized_fast_paths_are_close_to_f32_and_batch_invariant() {
    for name in ARCHS {
        let a = assets(name);
        let enc = a.frozen(&Device::Cpu).unwrap();
        let h = a.config.hidden_size;
        let reference = LongEncoder::from_encoder(&enc, Dtype::F32).unwrap();
        for (kname, dtype, fast) in quantized(&enc) {
            for (set, seqs) in sets(name) {
                let items: Vec<&Encoded> = seqs.iter().collect();
                let mut ws = Workspace::default();
                let want = reference.forward_packed(&items, &mut ws).unwrap().to_vec();
                let got = fast.forward_packed(&items, &mut ws).unwrap().to_vec();
                let worst = got
                    .chunks(h)
                    .zip(want.chunks(h))
                    .map(|(g, w)| cosine(g, w))
                    .fold(1f64, f64::min);
                let pooled = fast.pooled_packed(&items, Pooling::Mean, &mut ws).unwrap();
                let f32_pooled = reference
                    .pooled_packed(&items, Pooling::Mean, &mut ws)
                    .unwrap();
                let min = pooled
                    .iter()
                    .zip(&f32_pooled)
                    .map(|(g, w)| cosine(g, w))
                    .fold(1f64, f64::min);
                eprintln!(
                    "{name} {set} {kname}: worst token cosine vs f32 {worst:.6}, worst pooled \
                     {min:.6}"
                );
                assert!(worst > 0.99, "{name} {set} {kname}: token cosine {worst}");
                let bound = if dtype == Dtype::Int8 { 0.99 } else { 0.999 };
                assert!(min >= bound, "{name} {set} {kname}: pooled cosine {min}");
                for (s, item) in items.iter().enumerate() {
                    let alone = fast.pooled_packed(&[item], Pooling::Mean, &mut ws).unwrap();
                    assert_eq!(
                        bits(&alone[0]),
                        bits(&pooled[s]),
                        "{name} {set} {kname}: sequence {s} changed with its batch"
                    );
                }
            }
        }
    }
}

/// f32 (dense weights transposed, few-row products as column tasks): each sequence's pooled
/// vector is bit-identical alone and inside the packed batch, as in the other dtypes.
#[test]
fn f32_fast_path_is_batch_invariant() {
    for name in ARCHS {
        let a = assets(name);
        let enc = a.frozen(&Device::Cpu).unwrap();
        let f32 = LongEncoder::from_encoder(&enc, Dtype::F32).unwrap();
        for (set, seqs) in sets(name) {
            let items: Vec<&Encoded> = seqs.iter().collect();
            let mut ws = Workspace::default();
            let pooled = f32.pooled_packed(&items, Pooling::Mean, &mut ws).unwrap();
            assert!(
                items.len() > 1,
                "{name} {set}: a batch of several sequences"
            );
            for (s, item) in items.iter().enumerate() {
                let alone = f32.pooled_packed(&[item], Pooling::Mean, &mut ws).unwrap();
                assert_eq!(
                    bits(&alone[0]),
                    bits(&pooled[s]),
                    "{name} {set} f32: sequence {s} changed with its batch"
                );
            }
        }
    }
}

/// A frozen multitask model on a long-context encoder runs its inference in bf16 and int8,
/// close to f32.
#[test]
fn multitask_inference_in_every_dtype() {
    use fetch_ml::model::freeze::{FreezePart, FreezePlan};
    use fetch_ml::model::multitask::{HeadInit, HeadsSpec};
    for name in ARCHS {
        let a = assets(name);
        let seqs = &sets(name)[1].1;
        let items: Vec<&Encoded> = seqs.iter().collect();
        let layers = a.config.num_hidden_layers;
        let model = |dtype| {
            let plan = FreezePlan::new(&[FreezePart::Encoder], None, layers).unwrap();
            let spec = HeadsSpec {
                hidden: 16,
                dropout: 0.1,
                labels: [vec!["a".into(), "b".into()], vec!["x".into()]],
            };
            let files = vec![a.weights.clone()];
            a.multitask(files, spec, plan, HeadInit::Seed(1), &Device::Cpu)
                .unwrap()
                .with_dtype(dtype)
                .unwrap()
        };
        let want = model(Dtype::F32).features_infer(&items).unwrap();
        let want = want.to_vec2::<f32>().unwrap();
        for dtype in [Dtype::Bf16, Dtype::Int8] {
            let got = model(dtype).features_infer(&items).unwrap();
            let got = got.to_vec2::<f32>().unwrap();
            let min = got
                .iter()
                .zip(&want)
                .map(|(g, w)| cosine(g, w))
                .fold(1f64, f64::min);
            eprintln!("{name} multitask {dtype}: worst pooled cosine vs f32 {min:.6}");
            assert!(min >= 0.99, "{name} multitask {dtype}: {min}");
            // Further from f32 than f32's own rounding: the dtype did run.
            let d = got
                .iter()
                .zip(&want)
                .map(|(g, w)| max_diff(g, w))
                .fold(0.0, f32::max);
            assert!(
                d > 1e-4,
                "{name} multitask {dtype}: max abs diff {d}, as f32"
            );
        }
    }
}
