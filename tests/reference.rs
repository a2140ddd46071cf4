//! Correctness against independent references: sentence-transformers' own vectors for
//! all-MiniLM-L6-v2, and candle-transformers' `BertModel` on a tiny random BERT.

mod common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::{compare, minilm, tiny_model};
use fetch_ml::embed::Embedder;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::bert::Mode;
use fetch_ml::model::dropout::Dropout;
use fetch_ml::testutil::{random_sentence, TinyBert};
use rand::SeedableRng;

fn assets(path: &std::path::Path) -> ModelAssets {
    ModelAssets::load(&ModelRef::new(path.to_str().unwrap()), None).expect("load model")
}

#[derive(serde::Deserialize)]
struct Golden {
    max_seq_length: usize,
    normalized: bool,
    items: Vec<GoldenItem>,
}

#[derive(serde::Deserialize)]
struct GoldenItem {
    text: String,
    embedding: Vec<f32>,
}

/// Every golden sentence, embedded in one length-sorted run, matches sentence-transformers.
#[test]
fn minilm_matches_sentence_transformers() {
    let Some(path) = minilm() else { return };
    let golden: Golden =
        serde_json::from_str(include_str!("minilm-golden.json")).expect("golden file");
    let a = assets(&path);
    assert_eq!(a.tokenizer.max_len(), golden.max_seq_length);
    assert_eq!(a.pipeline.normalize, golden.normalized);
    let encoder = a.frozen_encoder(&Device::Cpu).unwrap();
    let embedder = Embedder::new(
        &encoder,
        &a.tokenizer,
        a.pipeline.pooling,
        a.pipeline.normalize,
        8,
    );
    let texts: Vec<&str> = golden.items.iter().map(|i| i.text.as_str()).collect();
    let got = embedder.embed(&texts).unwrap();
    assert!(
        got.iter().any(|e| e.truncated),
        "the long sentence must be truncated"
    );
    let (mut worst_cos, mut worst_max) = (1.0f64, 0.0f64);
    for (item, e) in golden.items.iter().zip(&got) {
        assert_eq!(e.vector.len(), 384);
        let (cos, max) = compare(&e.vector, &item.embedding);
        worst_cos = worst_cos.min(cos);
        worst_max = worst_max.max(max);
        assert!(
            cos > 0.99999 && max < 1e-4,
            "{:?}: cosine {cos}, max abs diff {max}",
            item.text
        );
    }
    eprintln!("golden: worst cosine {worst_cos:.9}, worst max abs diff {worst_max:.2e}");
}

/// Last hidden state of our encoder vs candle-transformers' BertModel, padded batch included.
#[test]
fn encoder_matches_candle_transformers_bert() {
    for spec in [
        TinyBert::default(),
        TinyBert {
            hf_legacy_names: true,
            layers: 2,
            seed: 3,
            ..TinyBert::default()
        },
    ] {
        let (_dir, path) = tiny_model(&spec);
        let a = assets(&path);
        let dev = Device::Cpu;
        let ours = a.frozen_encoder(&dev).unwrap();
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[path.join("model.safetensors")], DType::F32, &dev)
        }
        .unwrap();
        let reference = candle_transformers::models::bert::BertModel::load(vb, &a.config.base);
        // The legacy names (bert. prefix, gamma/beta) load there too, since candle #1888.
        let reference = reference.expect("candle-transformers loads the tiny model");

        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let texts: Vec<String> = [3, 17, 9, 1, 30]
            .iter()
            .map(|&n| random_sentence(&mut rng, n))
            .collect();
        let enc = a.tokenizer.encode(&texts).unwrap();
        let items: Vec<_> = enc.iter().collect();
        let batch = a.tokenizer.batch(&items, &dev).unwrap();
        let mask_u32 = batch.attention_mask.to_dtype(DType::U32).unwrap();
        let want = reference
            .forward(&batch.input_ids, &batch.token_type_ids, Some(&mask_u32))
            .unwrap();
        // Train mode with dropout off runs the differentiable LayerNorm and softmax: same maths.
        let no_dropout = Dropout::disabled();
        for mode in [Mode::Infer, Mode::Train(&no_dropout)] {
            let got = ours
                .forward(
                    &batch.input_ids,
                    &batch.token_type_ids,
                    &batch.attention_mask,
                    mode,
                )
                .unwrap();
            // Compare real tokens only: padding positions are not defined outputs.
            let mask = batch.attention_mask.unsqueeze(2).unwrap();
            let diff = ((got - &want).unwrap().broadcast_mul(&mask).unwrap())
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            eprintln!("vs candle-transformers: max abs diff {diff:.2e}");
            assert!(diff < 1e-5, "{}: max abs diff {diff}", path.display());
        }
    }
}

/// A sentence embedded alone equals the same sentence in a batch with much longer ones.
#[test]
fn batch_invariance() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let mut cases = vec![(path.clone(), None)];
    let real = minilm();
    if let Some(p) = &real {
        cases.push((p.clone(), Some(())));
    }
    for (path, _) in cases {
        let a = assets(&path);
        let encoder = a.frozen_encoder(&Device::Cpu).unwrap();
        let embedder = Embedder::new(
            &encoder,
            &a.tokenizer,
            a.pipeline.pooling,
            a.pipeline.normalize,
            64,
        );
        let short = "the cat sat on the mat";
        let long = "the team won the game and we love our phone app very much ".repeat(4);
        let alone = embedder.embed(&[short]).unwrap();
        let mixed = embedder
            .embed(&[long.as_str(), short, long.as_str()])
            .unwrap();
        let (_, max) = compare(&alone[0].vector, &mixed[1].vector);
        eprintln!(
            "batch invariance {}: max abs diff {max:.2e}",
            path.display()
        );
        assert!(max < 1e-5, "{}: max abs diff {max}", path.display());
    }
}

/// The output dimension is the model's hidden size: 768 for a BERT-base-shaped config.
#[test]
fn dimension_is_hidden_size() {
    let spec = TinyBert {
        hidden: 768,
        heads: 12,
        intermediate: 3072,
        layers: 1,
        ..TinyBert::default()
    };
    let (_dir, path) = tiny_model(&spec);
    let a = assets(&path);
    let encoder = a.frozen_encoder(&Device::Cpu).unwrap();
    let embedder = Embedder::new(&encoder, &a.tokenizer, a.pipeline.pooling, false, 4);
    let got = embedder.embed(&["hello world", "the cat"]).unwrap();
    assert!(got.iter().all(|e| e.vector.len() == 768));
    if let Some(p) = minilm() {
        let a = assets(&p);
        assert_eq!(a.config.hidden_size, 384);
    }
}

/// The inference fast path (packed tokens, gemm, vectorised kernels) against the candle path,
/// token by token, for each activation BERT configs use.
#[test]
fn fast_path_matches_candle_path() {
    for act in ["gelu", "gelu_approximate", "relu"] {
        let (_dir, path) = tiny_model(&TinyBert::default());
        let cfg = std::fs::read_to_string(path.join("config.json")).unwrap();
        let act_json = if act == "gelu_approximate" {
            "geluapproximate"
        } else {
            act
        };
        std::fs::write(
            path.join("config.json"),
            cfg.replace(
                "\"hidden_act\": \"gelu\"",
                &format!("\"hidden_act\": \"{act_json}\""),
            ),
        )
        .unwrap();
        let a = assets(&path);
        let enc = a.frozen_encoder(&Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let texts: Vec<String> = [1, 30, 7, 0, 12]
            .iter()
            .map(|&n| random_sentence(&mut rng, n))
            .collect();
        let encoded = a.tokenizer.encode(&texts).unwrap();
        let items: Vec<_> = encoded.iter().collect();
        let batch = a.tokenizer.batch(&items, &Device::Cpu).unwrap();
        let padded = enc
            .forward(
                &batch.input_ids,
                &batch.token_type_ids,
                &batch.attention_mask,
                Mode::Infer,
            )
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let mut ws = fetch_ml::model::fast::Workspace::default();
        let packed = enc.forward_packed(&items, &mut ws).unwrap().to_vec();
        let h = a.config.hidden_size;
        let offsets = fetch_ml::model::fast::offsets(&items);
        let mut worst = 0f32;
        for (s, e) in encoded.iter().enumerate() {
            for p in 0..e.ids.len() {
                let row = &packed[(offsets[s] + p) * h..(offsets[s] + p + 1) * h];
                for (x, y) in row.iter().zip(&padded[s][p]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
        eprintln!("fast path vs candle path ({act}): max abs diff {worst:.2e}");
        assert!(worst < 1e-5, "{act}: max abs diff {worst}");
    }
}

/// A mask that is not a run of real tokens followed by padding (a hole in the middle) takes
/// the general candle-ops attention; it must match candle-transformers too.
#[test]
fn general_attention_masks_match_candle_transformers() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let a = assets(&path);
    let dev = Device::Cpu;
    let ours = a.frozen_encoder(&dev).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[path.join("model.safetensors")], DType::F32, &dev)
    }
    .unwrap();
    let reference = candle_transformers::models::bert::BertModel::load(vb, &a.config.base).unwrap();
    let ids = candle_core::Tensor::new(&[[2u32, 7, 9, 11, 3], [2, 13, 17, 3, 0]], &dev).unwrap();
    let types = ids.zeros_like().unwrap();
    let mask =
        candle_core::Tensor::new(&[[1f32, 1., 0., 1., 1.], [1., 1., 1., 1., 0.]], &dev).unwrap();
    let want = reference
        .forward(&ids, &types, Some(&mask.to_dtype(DType::U32).unwrap()))
        .unwrap();
    let no_dropout = Dropout::disabled();
    for mode in [Mode::Infer, Mode::Train(&no_dropout)] {
        let got = ours.forward(&ids, &types, &mask, mode).unwrap();
        let diff = ((got - &want)
            .unwrap()
            .broadcast_mul(&mask.unsqueeze(2).unwrap())
            .unwrap())
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!(diff < 1e-5, "max abs diff {diff}");
    }
}
