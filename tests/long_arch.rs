//! The long-context architectures (ModernBERT, NomicBERT, JinaBERT) against independent
//! implementations, on tiny random models in `tests/fixtures/arch/<name>/` written by
//! `scripts/make-long-fixtures.py`: ModernBERT against transformers' `ModernBertModel`
//! (outputs stored by the script), NomicBERT and JinaBERT against candle-transformers'
//! `nomic_bert` and `jina_bert` models run here on the same weights. Each runs as one packed
//! batch of sequences of 1 to 1,100 tokens (longer than ModernBERT's window and than 1,024)
//! through task 1's encoder (the fast path, tiled attention) and the training path
//! (composite attention), trains with every tensor getting a gradient, freezes exactly what
//! `--freeze-layers 1` names, and round-trips a checkpoint and an export (the binary's runs
//! are in `tests/long_binary.rs`, the fast path's own tests in `tests/long_fast.rs`).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::long::{assets, fixture, reference, ARCHS, TOL};
use common::{build_model, fetch_ml, max_diff, ok, param_bits, run, toy_rows, write_jsonl};
use fetch_ml::config::TrainConfig;
use fetch_ml::data::DataSource;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::batch::PackedBatch;
use fetch_ml::model::bert::Mode;
use fetch_ml::model::dropout::Dropout;
use fetch_ml::model::encoder::Encoder;
use fetch_ml::model::fast::{PackedEncoder, Workspace};
use fetch_ml::model::freeze::FreezePlan;
use fetch_ml::model::pooling::Pooling;
use fetch_ml::model::quant::Dtype;
use fetch_ml::tokenize::Encoded;
use fetch_ml::train::checkpoint::{self, Checkpoint, CheckpointMeta};
use fetch_ml::train::evaluate::predict_probs;
use fetch_ml::train::loss::{multitask_loss, HeadTargets};
use fetch_ml::train::session::{fit, Setup};
use fetch_ml::train::trainer::TrainSettings;

fn encoded(ids: &[Vec<u32>]) -> Vec<Encoded> {
    ids.iter()
        .map(|x| Encoded {
            ids: x.clone(),
            type_ids: vec![0; x.len()],
            truncated: false,
        })
        .collect()
}

/// Our last hidden states of `seqs` as one packed batch: (task 1's fast path, training path
/// with dropout off), each `[T * hidden]`.
fn ours(a: &ModelAssets, seqs: &[Encoded]) -> (Vec<f32>, Vec<f32>) {
    let items: Vec<&Encoded> = seqs.iter().collect();
    let infer = a.inference_encoder(Dtype::F32, &Device::Cpu).unwrap();
    let mut ws = Workspace::default();
    let x = infer.forward_packed(&items, &mut ws).unwrap().to_vec();
    let enc = a.frozen(&Device::Cpu).unwrap();
    let batch = PackedBatch::new(&items);
    let off = Dropout::disabled();
    let e = enc.embed_packed(&batch, Mode::Train(&off)).unwrap();
    let t = enc
        .forward_layers(&e, &batch, 0..enc.num_layers(), Mode::Train(&off))
        .unwrap();
    (x, t.flatten_all().unwrap().to_vec1().unwrap())
}

/// Checks both our paths against `want` (`[T * hidden]`), sequence by sequence.
fn check(name: &str, what: &str, got: &(Vec<f32>, Vec<f32>), want: &[f32]) {
    for (path, x) in [("fast (task 1)", &got.0), ("training", &got.1)] {
        let d = max_diff(x, want);
        let big = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("{name} {what}: {path} path, max abs diff {d:.2e} (largest value {big:.1})");
        assert!(d <= TOL, "{name} {what} {path}: max abs diff {d}");
    }
}

/// The fixtures load as their architecture, and our tokenizer gives the script's ids.
#[test]
fn fixtures_load_as_their_architecture() {
    for name in ARCHS {
        let r = reference(name);
        assert_eq!(r.model_type, name);
        let a = assets(&fixture(name));
        assert_eq!(a.config.arch.name(), name);
        assert!(a.config.arch.is_long());
        assert_eq!(a.tokenizer.max_len(), 2048, "{name}");
        let enc = a.tokenizer.encode(&r.sentences).unwrap();
        for (e, want) in enc.iter().zip(&r.ids["sentences"]) {
            assert_eq!(&e.ids, want, "{name}: token ids");
        }
    }
}

/// ModernBERT: transformers' float32 last hidden states and mean-pooled vectors, for the
/// long sequences and the sentences, each set as one packed batch.
#[test]
fn modernbert_matches_transformers() {
    let r = reference("modernbert");
    let a = assets(&fixture("modernbert"));
    let want = candle_core::safetensors::load(
        fixture("modernbert").join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let h = a.config.hidden_size;
    for set in ["long", "sentences"] {
        let seqs = encoded(&r.ids[set]);
        let got = ours(&a, &seqs);
        let hidden: Vec<f32> = want[&format!("{set}.hidden")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        check("modernbert", set, &got, &hidden);
        let items: Vec<&Encoded> = seqs.iter().collect();
        let infer = a.inference_encoder(Dtype::F32, &Device::Cpu).unwrap();
        let pooled = infer
            .pooled_packed(&items, Pooling::Mean, &mut Workspace::default())
            .unwrap();
        let mean = want[&format!("{set}.mean")].to_vec2::<f32>().unwrap();
        let d = pooled
            .iter()
            .zip(&mean)
            .map(|(g, w)| max_diff(g, w))
            .fold(0.0, f32::max);
        eprintln!("modernbert {set}: mean pooled, max abs diff {d:.2e}");
        assert!(d <= TOL && pooled[0].len() == h);
    }
}

/// The model candle-transformers builds from a fixture's files.
fn candle_vb(name: &str) -> VarBuilder<'static> {
    let tensors =
        candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}

fn config_text(name: &str) -> String {
    std::fs::read_to_string(fixture(name).join("config.json")).unwrap()
}

/// candle-transformers' last hidden states of each sequence alone, concatenated.
fn candle_reference(
    seqs: &[Encoded],
    forward: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Vec<f32> {
    let mut out = Vec::new();
    for s in seqs {
        let ids = Tensor::new(s.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let x = forward(&ids).unwrap();
        out.extend(x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

/// NomicBERT against candle-transformers' `nomic_bert` (which reads nomic's config keys).
#[test]
fn nomic_bert_matches_candle_transformers() {
    use candle_transformers::models::nomic_bert::{Config, NomicBertModel};
    let r = reference("nomic_bert");
    let a = assets(&fixture("nomic_bert"));
    let cfg: Config = serde_json::from_str(&config_text("nomic_bert")).unwrap();
    let model = NomicBertModel::load(candle_vb("nomic_bert"), &cfg).unwrap();
    for set in ["long", "sentences"] {
        let seqs = encoded(&r.ids[set]);
        let want = candle_reference(&seqs, |ids| {
            let types = ids.zeros_like()?;
            model.forward(ids, Some(&types), None)
        });
        check("nomic_bert", set, &ours(&a, &seqs), &want);
    }
}

/// JinaBERT against candle-transformers' `jina_bert` (ALiBi, GeGLU).
#[test]
fn jina_bert_matches_candle_transformers() {
    use candle_nn::Module;
    use candle_transformers::models::jina_bert::{BertModel, Config};
    let r = reference("jina_bert");
    let a = assets(&fixture("jina_bert"));
    let cfg: Config = serde_json::from_str(&config_text("jina_bert")).unwrap();
    let model = BertModel::new(candle_vb("jina_bert"), &cfg).unwrap();
    for set in ["long", "sentences"] {
        let seqs = encoded(&r.ids[set]);
        let want = candle_reference(&seqs, |ids| model.forward(ids));
        check("jina_bert", set, &ours(&a, &seqs), &want);
    }
}

fn train_config(model: &Path, dir: &Path, freeze_layers: Option<usize>) -> TrainConfig {
    let train = dir.join("train.jsonl");
    let eval = dir.join("eval.jsonl");
    write_jsonl(&train, &toy_rows(24, 1));
    write_jsonl(&eval, &toy_rows(8, 2));
    TrainConfig {
        model: ModelRef::new(model.to_str().unwrap()),
        model_given: true,
        max_seq_length: None,
        train_file: DataSource::File(train),
        eval_file: Some(DataSource::File(eval)),
        settings: TrainSettings {
            epochs: 2,
            batch_size: 8,
            lr: 1e-3,
            head_lr: 1e-2,
            ..TrainSettings::default()
        },
        head_hidden: 16,
        head_dropout: 0.1,
        freeze: vec![],
        freeze_layers,
        max_train_examples: None,
        embedding_cache: None,
        dtype: Default::default(),
    }
}

/// Whether `--freeze-layers 1` should leave `name` trainable: everything but the embeddings
/// and layer 0 (ModernBERT's final LayerNorm trains with its last layer).
fn trains_with_one_frozen_layer(name: &str) -> bool {
    !(name.starts_with("embeddings.") || name.starts_with("encoder.layer.0."))
}

/// Encoder parameters per architecture, counted from the fixture's layout: ModernBERT 2
/// embedding tensors, 5 in layer 0 (no attn_norm), 6 in the 3 others, the final norm;
/// NomicBERT 4 + 9 per layer (3 layers); JinaBERT 4 + 15 per layer (2 layers; the pooler is
/// not used).
fn encoder_params(name: &str) -> usize {
    match name {
        "modernbert" => 2 + 5 + 3 * 6 + 1,
        "nomic_bert" => 4 + 3 * 9,
        _ => 4 + 2 * 15,
    }
}

/// With nothing frozen every trainable tensor gets a non-zero gradient; with
/// `--freeze-layers 1` exactly the embeddings and layer 0 are frozen, stay bit-identical
/// through training while the rest changes, and a checkpoint predicts as the model did.
#[test]
fn long_architectures_train_freeze_and_checkpoint() {
    for name in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        for freeze_layers in [None, Some(1)] {
            let cfg = train_config(&fixture(name), dir.path(), freeze_layers);
            let setup = Setup::load(&cfg).unwrap();
            let layers = setup.assets.config.num_hidden_layers;
            let plan = FreezePlan::new(&[], freeze_layers, layers).unwrap();
            let model = build_model(&setup, &cfg, plan);
            assert!(!matches!(model.encoder, Encoder::Bert(_)), "{name}");
            let params = model.registry.params();
            assert_eq!(params.len(), encoder_params(name) + 8, "{name}");
            for p in &params {
                let want = freeze_layers.is_none() || trains_with_one_frozen_layer(&p.name);
                assert_eq!(p.trainable(), want, "{name} {freeze_layers:?}: {}", p.name);
            }

            let data = &setup.train.prepared;
            let items: Vec<_> = data.encoded[..8].iter().collect();
            let batch = PackedBatch::new(&items);
            let dropout = Dropout::new(3);
            let logits = model.forward_packed(&batch, Some(&dropout)).unwrap();
            let targets = [0, 1].map(|t| {
                let l: Vec<Option<u32>> = data.labels[..8].iter().map(|l| l[t]).collect();
                HeadTargets::new(&l, &Device::Cpu).unwrap()
            });
            let (loss, _) = multitask_loss(&logits, &targets, [1.0, 1.0]).unwrap();
            let grads = loss.backward().unwrap();
            for p in params.iter().filter(|p| p.trainable()) {
                let g = grads
                    .get(p.var.as_ref().unwrap().as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name));
                let norm = g.sqr().unwrap().sum_all().unwrap();
                let norm = norm.to_scalar::<f32>().unwrap();
                assert!(norm > 0.0, "{name}: zero gradient for {}", p.name);
            }

            let before: HashMap<_, _> = param_bits(&model).into_iter().collect();
            let result = fit(&model, &setup, &cfg.settings, &mut |_| {}).unwrap();
            let after: HashMap<_, _> = param_bits(&model).into_iter().collect();
            for (p, b) in &before {
                let changed = &after[p] != b;
                let want = freeze_layers.is_none() || trains_with_one_frozen_layer(p);
                assert_eq!(
                    changed, want,
                    "{name} {freeze_layers:?}: {p} changed={changed}"
                );
            }
            assert!(result.freeze_check.frozen_unchanged && result.freeze_check.trainable_changed);

            if freeze_layers.is_some() {
                let texts = ["i love my phone", "terrible pizza", "zyx"];
                let enc = setup.assets.tokenizer.encode(&texts).unwrap();
                let want = predict_probs(&model, &enc, 2, None).unwrap();
                let ck_dir = dir.path().join("ckpt");
                let meta = CheckpointMeta::new(
                    checkpoint::base_model(&setup.assets).unwrap(),
                    &model,
                    serde_json::json!({}),
                    serde_json::to_value(&result.eval).unwrap(),
                );
                let target = fetch_ml::train::save_target::SaveTarget::prepare(&ck_dir).unwrap();
                checkpoint::save(&target, &model, &meta).unwrap();
                drop(target);
                let ck = Checkpoint::load(&ck_dir).unwrap();
                let trained = &ck.meta.trained_encoder_tensors;
                assert!(
                    trained.iter().all(|n| trains_with_one_frozen_layer(n)
                        && n.starts_with("encoder.layer.")),
                    "{name}: {trained:?}"
                );
                let loaded = ck.model(&setup.assets, &Device::Cpu).unwrap();
                let got = predict_probs(&loaded, &enc, 2, None).unwrap();
                assert_eq!(want, got, "{name}: checkpoint predictions");
            }
        }
    }
}

/// The tensor names of a safetensors file, sorted.
fn tensor_names(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    names.sort();
    names
}

/// `--task=2 --export` writes the encoder under the architecture's own names (JinaBERT's
/// unused pooler carried over), and the export embeds.
#[test]
fn long_architectures_export_under_their_own_names() {
    for name in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        let exp = dir.path().join("export");
        ok(&run(fetch_ml()
            .args([
                "--task=2",
                "--threads=2",
                "--epochs=1",
                "--max-train-examples=16",
            ])
            .args(["--batch-size=8", "--model"])
            .arg(fixture(name))
            .arg("--save")
            .arg(dir.path().join("ck"))
            .arg("--export")
            .arg(&exp)
            .args(["--format=jsonl", "-s", "hi"])));
        assert_eq!(
            tensor_names(&exp.join("model.safetensors")),
            tensor_names(&fixture(name).join("model.safetensors")),
            "{name}"
        );
        let out = ok(&run(fetch_ml()
            .args(["--task=1", "--format=jsonl", "-s", "hello world", "--model"])
            .arg(&exp)));
        assert!(out.contains("\"embedding\""), "{name}: {out}");
    }
}
