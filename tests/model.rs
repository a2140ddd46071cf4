//! The encoder and its loading code on tiny random BERTs: gradients, dropout, pipelines,
//! tokenizers, and every way a model folder can be broken.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::tiny_model;
use fetch_ml::embed::Embedder;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::bert::Mode;
use fetch_ml::model::dropout::Dropout;
use fetch_ml::model::pooling::Pooling;
use fetch_ml::model::weights::ParamRegistry;
use fetch_ml::testutil::TinyBert;

fn load(path: &std::path::Path) -> anyhow::Result<ModelAssets> {
    ModelAssets::load(&ModelRef::new(path.to_str().unwrap()), None)
}

fn texts() -> Vec<&'static str> {
    vec![
        "the cat sat on the mat",
        "hello world",
        "we love our phone app very much today",
    ]
}

/// Every encoder parameter gets a non-zero gradient in training mode: no op on the path
/// (LayerNorm, softmax, GELU, embeddings) silently lacks a backward pass.
#[test]
fn every_encoder_tensor_receives_a_gradient() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let a = load(&path).unwrap();
    let registry = ParamRegistry::new();
    let enc = a
        .encoder(
            vec![a.weights.clone()],
            Arc::new(|_| true),
            registry.clone(),
            &Device::Cpu,
        )
        .unwrap();
    let encoded = a.tokenizer.encode(&texts()).unwrap();
    let items: Vec<_> = encoded.iter().collect();
    let batch = a.tokenizer.batch(&items, &Device::Cpu).unwrap();
    let dropout = Dropout::new(1);
    let hidden = enc
        .as_bert()
        .unwrap()
        .forward(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            Mode::Train(&dropout),
        )
        .unwrap();
    let pooled = Pooling::Mean
        .forward(&hidden, &batch.attention_mask)
        .unwrap();
    // A loss that depends on every output coordinate unevenly.
    let w = Tensor::arange(0f32, pooled.elem_count() as f32, &Device::Cpu)
        .unwrap()
        .reshape(pooled.shape())
        .unwrap();
    let loss = (pooled * w).unwrap().sin().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let params = registry.params();
    assert_eq!(
        params.len(),
        5 + 16 * 3,
        "embeddings (5) + 16 tensors per layer"
    );
    for p in params {
        let var = p.var.as_ref().expect("all trainable");
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{} has no gradient", p.name));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Word embeddings of tokens not in the batch get zero rows; the tensor as a whole not.
        assert!(norm > 0.0, "{} has an all-zero gradient", p.name);
    }
}

/// Dropout acts in training only: inference is deterministic, training varies with the seed
/// and repeats with the same seed.
#[test]
fn dropout_only_in_training() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let a = load(&path).unwrap();
    let enc = a.frozen_encoder(&Device::Cpu).unwrap();
    let encoded = a.tokenizer.encode(&texts()).unwrap();
    let items: Vec<_> = encoded.iter().collect();
    let b = a.tokenizer.batch(&items, &Device::Cpu).unwrap();
    let run = |mode: Mode| -> Vec<f32> {
        enc.forward(&b.input_ids, &b.token_type_ids, &b.attention_mask, mode)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(run(Mode::Infer), run(Mode::Infer));
    let (d1, d1b, d2) = (Dropout::new(1), Dropout::new(1), Dropout::new(2));
    let t1 = run(Mode::Train(&d1));
    assert_eq!(t1, run(Mode::Train(&d1b)), "same seed, same dropout masks");
    assert_ne!(t1, run(Mode::Train(&d2)), "another seed drops other units");
    assert_ne!(t1, run(Mode::Infer), "training drops units");
}

/// sentence-transformers files decide pooling, normalisation and max length.
#[test]
fn sentence_transformers_pipeline_is_followed() {
    let spec = TinyBert {
        sentence_transformers: Some(("cls", true, 8)),
        ..TinyBert::default()
    };
    let (_dir, path) = tiny_model(&spec);
    let a = load(&path).unwrap();
    assert_eq!(a.pipeline.pooling, Pooling::Cls);
    assert!(a.pipeline.normalize);
    assert_eq!(a.tokenizer.max_len(), 8);
    let enc = a.frozen_encoder(&Device::Cpu).unwrap();
    let e = Embedder::new(
        &enc,
        &a.tokenizer,
        a.pipeline.pooling,
        a.pipeline.normalize,
        2,
    );
    let out = e
        .embed(&["hello world", "the team won the game and we love it a lot"])
        .unwrap();
    assert!(!out[0].truncated && out[1].truncated);
    assert_eq!(out[1].tokens, 8);
    for v in &out {
        let norm: f32 = v.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised, got {norm}");
    }
    // Plain BERT: mean pooling, no normalisation, the position limit.
    let (_d2, plain) = tiny_model(&TinyBert::default());
    let p = load(&plain).unwrap();
    assert_eq!(p.pipeline.pooling, Pooling::Mean);
    assert!(!p.pipeline.normalize);
    assert_eq!(p.tokenizer.max_len(), 64);
}

/// Pooling uses real tokens only, and each mode computes what it says.
#[test]
fn pooling_modes_by_hand() {
    let dev = Device::Cpu;
    // batch 1, seq 3 (last is padding), hidden 2
    let h = Tensor::new(&[[[1f32, -2.], [3., 4.], [100., 100.]]], &dev).unwrap();
    let m = Tensor::new(&[[1f32, 1., 0.]], &dev).unwrap();
    let get = |p: Pooling| p.forward(&h, &m).unwrap().to_vec2::<f32>().unwrap()[0].clone();
    assert_eq!(get(Pooling::Mean), vec![2., 1.]);
    assert_eq!(get(Pooling::Cls), vec![1., -2.]);
    assert_eq!(get(Pooling::Max), vec![3., 4.]);
    let s = 2f32.sqrt();
    assert_eq!(get(Pooling::MeanSqrtLen), vec![4. / s, 2. / s]);
}

/// vocab.txt (WordPiece built in code) and tokenizer.json give the same token ids.
#[test]
fn vocab_txt_fallback_matches_tokenizer_json() {
    let (_d1, with_json) = tiny_model(&TinyBert::default());
    let (_d2, vocab_only) = tiny_model(&TinyBert {
        tokenizer_json: false,
        ..TinyBert::default()
    });
    assert!(!vocab_only.join("tokenizer.json").exists());
    let sentences = [
        "Hello, World!",
        "THE CAT  sat on the mat.",
        "zyx unknown-ish words",
        "",
    ];
    let a = load(&with_json)
        .unwrap()
        .tokenizer
        .encode(&sentences)
        .unwrap();
    let b = load(&vocab_only)
        .unwrap()
        .tokenizer
        .encode(&sentences)
        .unwrap();
    assert_eq!(a, b);
    // lower-cased, [CLS] ... [SEP]
    assert_eq!(a[3].ids, vec![2, 3], "empty string is [CLS] [SEP]");
    assert_eq!(
        a[1].ids,
        load(&with_json)
            .unwrap()
            .tokenizer
            .encode(&["the cat sat on the mat."])
            .unwrap()[0]
            .ids
    );
}

/// Checkpoints named like bert-base-uncased (bert. prefix, gamma/beta) load to the same model.
#[test]
fn legacy_tensor_names_load() {
    let (_d1, modern) = tiny_model(&TinyBert::default());
    let (_d2, legacy) = tiny_model(&TinyBert {
        hf_legacy_names: true,
        ..TinyBert::default()
    });
    let embed = |p: &std::path::Path| {
        let a = load(p).unwrap();
        let enc = a.frozen_encoder(&Device::Cpu).unwrap();
        let e = Embedder::new(&enc, &a.tokenizer, Pooling::Mean, false, 8);
        e.embed(&texts()).unwrap()
    };
    let (x, y) = (embed(&modern), embed(&legacy));
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(a.vector, b.vector);
    }
}

fn err_of(r: anyhow::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn encoder_error(path: &std::path::Path) -> String {
    err_of(load(path).and_then(|a| a.frozen_encoder(&Device::Cpu)))
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let (_d, path) = tiny_model(&TinyBert::default());
    let f = path.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len / 2).unwrap();
    let e = encoder_error(&path);
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt or truncated"),
        "{e}"
    );
}

#[test]
fn garbage_safetensors_is_a_clear_error() {
    let (_d, path) = tiny_model(&TinyBert::default());
    std::fs::write(
        path.join("model.safetensors"),
        b"not a safetensors file at all",
    )
    .unwrap();
    let e = encoder_error(&path);
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt or truncated"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let spec = TinyBert::default();
    let (_d, path) = tiny_model(&spec);
    let mut w = spec.weights().unwrap();
    w.remove("encoder.layer.1.attention.self.key.bias");
    candle_core::safetensors::save(&w, path.join("model.safetensors")).unwrap();
    let e = encoder_error(&path);
    assert!(
        e.contains("encoder.layer.1.attention.self.key.bias") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_is_named() {
    let (_d, path) = tiny_model(&TinyBert::default());
    let cfg = std::fs::read_to_string(path.join("config.json")).unwrap();
    std::fs::write(
        path.join("config.json"),
        cfg.replace("\"intermediate_size\": 64", "\"intermediate_size\": 48"),
    )
    .unwrap();
    let e = encoder_error(&path);
    assert!(
        e.contains("encoder.layer.0.intermediate.dense.weight")
            && e.contains("[64, 32]")
            && e.contains("[48, 32]"),
        "{e}"
    );
}

#[test]
fn more_layers_in_config_than_in_file_is_an_error() {
    let (_d, path) = tiny_model(&TinyBert::default());
    let cfg = std::fs::read_to_string(path.join("config.json")).unwrap();
    std::fs::write(
        path.join("config.json"),
        cfg.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4"),
    )
    .unwrap();
    let e = encoder_error(&path);
    assert!(
        e.contains("encoder.layer.3.") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn unsupported_pipeline_module_is_refused() {
    let (_d, path) = tiny_model(&TinyBert {
        sentence_transformers: Some(("mean", false, 16)),
        ..TinyBert::default()
    });
    let m = std::fs::read_to_string(path.join("modules.json")).unwrap();
    std::fs::write(
        path.join("modules.json"),
        m.replace("]", ",{\"idx\":2,\"name\":\"2\",\"path\":\"2_LSTM\",\"type\":\"sentence_transformers.models.LSTM\"}]"),
    )
    .unwrap();
    let e = err_of(load(&path));
    assert!(e.contains("modules.json") && e.contains("LSTM"), "{e}");
    // A Dense module is implemented, but its files must be there.
    std::fs::write(
        path.join("modules.json"),
        m.replace("]", ",{\"idx\":2,\"name\":\"2\",\"path\":\"2_Dense\",\"type\":\"sentence_transformers.models.Dense\"}]"),
    )
    .unwrap();
    let e = err_of(load(&path));
    assert!(
        e.contains("2_Dense/config.json") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn max_seq_length_above_the_model_limit_is_an_error() {
    let (_d, path) = tiny_model(&TinyBert::default());
    let e = err_of(ModelAssets::load(
        &ModelRef::new(path.to_str().unwrap()),
        Some(65),
    ));
    assert!(
        e.contains("length of 65") && e.contains("64") && !e.contains("--"),
        "{e}"
    );
}

/// Ids the model does not know are an error from the fast path, not an out-of-bounds panic
/// (a tokenizer.json from another model can produce them).
#[test]
fn fast_path_rejects_unknown_token_ids() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let a = load(&path).unwrap();
    let enc = a.frozen_encoder(&Device::Cpu).unwrap();
    let vocab = a.config.vocab_size as u32;
    let mut ws = fetch_ml::model::fast::Workspace::default();
    for (ids, types, needle) in [
        (vec![2, vocab, 3], vec![0, 0, 0], "outside the vocabulary"),
        (vec![2, 5, 3], vec![0, 7, 0], "token type"),
    ] {
        let e = fetch_ml::tokenize::Encoded {
            ids,
            type_ids: types,
            truncated: false,
        };
        let err = enc
            .forward_packed(&[&e], &mut ws)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
}

/// Batches run side by side on the thread pool; every vector still lands at its sentence's
/// place, equal to that sentence embedded alone.
#[test]
fn parallel_batches_keep_input_order() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let a = load(&path).unwrap();
    let enc = a.frozen_encoder(&Device::Cpu).unwrap();
    let words = [
        "cat", "mat", "the", "game", "won", "we", "love", "it", "a", "lot",
    ];
    // 41 sentences of 1 to 12 words, in no length order, in batches of 3: 14 batches.
    let texts: Vec<String> = (0..41)
        .map(|i| {
            let n = 1 + (i * 7) % 12;
            (0..n)
                .map(|j| words[(i + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let e = Embedder::new(&enc, &a.tokenizer, Pooling::Mean, false, 3);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let got = pool.install(|| e.embed(&texts).unwrap());
    assert_eq!(got.len(), texts.len());
    let encoded = a.tokenizer.encode(&texts).unwrap();
    for (i, (g, one)) in got.iter().zip(&encoded).enumerate() {
        let alone = e.embed_items(&[one]).unwrap().remove(0);
        assert_eq!(g.tokens, one.ids.len(), "sentence {i}");
        let (_, max_abs) = common::compare(&g.vector, &alone);
        assert!(max_abs < 1e-5, "sentence {i} {:?}: {max_abs}", texts[i]);
    }
}

/// A batch that fails (a token id past the vocabulary) fails the whole call with its error,
/// whichever of the side-by-side batches it is, and nothing panics.
#[test]
fn a_failing_batch_fails_the_embedding_call() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let a = load(&path).unwrap();
    let enc = a.frozen_encoder(&Device::Cpu).unwrap();
    let texts: Vec<String> = (0..30).map(|i| "the cat ".repeat(1 + i % 7)).collect();
    let mut encoded = a.tokenizer.encode(&texts).unwrap();
    encoded[17].ids[1] = 1_000_000;
    let e = Embedder::new(&enc, &a.tokenizer, Pooling::Mean, false, 3);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let err = pool.install(|| e.embed_encoded(&encoded)).unwrap_err();
    assert!(
        format!("{err:#}").contains("outside the vocabulary"),
        "the error says what is wrong: {err:#}"
    );
}
