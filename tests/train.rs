//! Training the multitask model on tiny models: learning, reproducibility, checkpoints,
//! divergence, and the real model on the shipped data.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use common::{
    build_model, fails_with, fetch_ml, ok, param_bits, run, tiny_model, toy_rows, write_jsonl,
};
use fetch_ml::config::TrainConfig;
use fetch_ml::data::DataSource;
use fetch_ml::hub::ModelRef;
use fetch_ml::model::freeze::{FreezePart, FreezePlan};
use fetch_ml::model::multitask::MultiTaskModel;
use fetch_ml::testutil::TinyBert;
use fetch_ml::train::checkpoint::{self, Checkpoint, CheckpointMeta};
use fetch_ml::train::evaluate::predict_probs;
use fetch_ml::train::session::{fit, RunResult, Setup};
use fetch_ml::train::trainer::TrainSettings;

struct Toy {
    _dir: tempfile::TempDir,
    model: PathBuf,
    train: PathBuf,
    eval: PathBuf,
}

fn toy() -> Toy {
    let (dir, model) = tiny_model(&TinyBert::default());
    let train = dir.path().join("train.jsonl");
    let eval = dir.path().join("eval.jsonl");
    write_jsonl(&train, &toy_rows(64, 1));
    write_jsonl(&eval, &toy_rows(32, 2));
    Toy {
        _dir: dir,
        model,
        train,
        eval,
    }
}

fn config(
    toy: &Toy,
    settings: TrainSettings,
    freeze: &[FreezePart],
    freeze_layers: Option<usize>,
) -> TrainConfig {
    TrainConfig {
        model: ModelRef::new(toy.model.to_str().unwrap()),
        model_given: true,
        max_seq_length: None,
        train_file: DataSource::File(toy.train.clone()),
        eval_file: Some(DataSource::File(toy.eval.clone())),
        settings,
        head_hidden: 32,
        head_dropout: 0.1,
        freeze: freeze.to_vec(),
        freeze_layers,
        max_train_examples: None,
        embedding_cache: None,
    }
}

fn quick() -> TrainSettings {
    TrainSettings {
        epochs: 12,
        batch_size: 16,
        lr: 1e-3,
        head_lr: 1e-2,
        ..TrainSettings::default()
    }
}

fn train_model(cfg: &TrainConfig) -> (Setup, MultiTaskModel, RunResult) {
    let setup = Setup::load(cfg).unwrap();
    let layers = setup.assets.config.num_hidden_layers;
    let plan = FreezePlan::new(&cfg.freeze, cfg.freeze_layers, layers).unwrap();
    let model = build_model(&setup, cfg, plan);
    let result = fit(&model, &setup, &cfg.settings, &mut |_| {}).unwrap();
    (setup, model, result)
}

/// The whole model (encoder and heads) learns a separable toy set: the loss falls and both
/// heads reach accuracy 1.0 on it.
#[test]
fn tiny_model_learns_a_separable_toy_set() {
    let t = toy();
    let mut cfg = config(
        &t,
        TrainSettings {
            epochs: 40,
            batch_size: 8,
            lr: 3e-3,
            ..quick()
        },
        &[],
        None,
    );
    cfg.eval_file = Some(cfg.train_file.clone());
    let (_, _, r) = train_model(&cfg);
    let first = r.training.epochs.first().unwrap().total_loss;
    let last = r.training.epochs.last().unwrap().total_loss;
    assert!(last < first / 4.0, "loss {first} -> {last}");
    let eval = r.eval.unwrap();
    assert_eq!(eval[0].accuracy, 1.0, "class {:?}", eval[0]);
    assert_eq!(eval[1].accuracy, 1.0, "sentiment {:?}", eval[1]);
    assert!(r.freeze_check.trainable_changed && r.freeze_check.frozen_tensors == 0);
}

/// Same seed, same data: identical losses and weights, bit for bit. Another seed differs.
#[test]
fn same_seed_same_weights() {
    let t = toy();
    let s = TrainSettings {
        epochs: 2,
        ..quick()
    };
    let (_, m1, r1) = train_model(&config(&t, s.clone(), &[], None));
    let (_, m2, r2) = train_model(&config(&t, s.clone(), &[], None));
    let losses = |r: &RunResult| {
        r.training
            .epochs
            .iter()
            .map(|e| e.total_loss)
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&r1), losses(&r2));
    assert!(
        param_bits(&m1) == param_bits(&m2),
        "weights differ between identical runs"
    );
    let (_, m3, _) = train_model(&config(&t, TrainSettings { seed: 7, ..s }, &[], None));
    assert!(
        param_bits(&m1) != param_bits(&m3),
        "another seed should give other weights"
    );
}

/// A saved checkpoint, loaded back, predicts exactly what the model predicted before.
#[test]
fn checkpoint_round_trip_predicts_identically() {
    let t = toy();
    let cfg = config(
        &t,
        TrainSettings {
            epochs: 2,
            ..quick()
        },
        &[],
        Some(1),
    );
    let (setup, model, result) = train_model(&cfg);
    let texts = [
        "i love my phone",
        "terrible pizza",
        "the app was ok today",
        "zyx",
    ];
    let enc = setup.assets.tokenizer.encode(&texts).unwrap();
    let before = predict_probs(&model, &enc, 2, None).unwrap();

    let dir = t._dir.path().join("ckpt");
    let meta = CheckpointMeta::new(
        checkpoint::base_model(&setup.assets).unwrap(),
        &model,
        serde_json::json!({}),
        serde_json::to_value(&result.eval).unwrap(),
    );
    let target = fetch_ml::train::save_target::SaveTarget::prepare(&dir).unwrap();
    checkpoint::save(&target, &model, &meta).unwrap();
    drop(target);
    for f in ["model.safetensors", "checkpoint.json", "metrics.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let ck = Checkpoint::load(&dir).unwrap();
    // Layers 1 and 2 trained (layer 0 and the embeddings were frozen): only they are stored.
    assert!(ck
        .meta
        .trained_encoder_tensors
        .iter()
        .all(|n| n.starts_with("encoder.layer.1.") || n.starts_with("encoder.layer.2.")));
    assert_eq!(ck.meta.trained_encoder_tensors.len(), 32);
    let loaded = ck.model(&setup.assets, &Device::Cpu).unwrap();
    let after = predict_probs(&loaded, &enc, 2, None).unwrap();
    assert_eq!(before, after);
    // Saving again replaces the folder whole.
    let target = fetch_ml::train::save_target::SaveTarget::prepare(&dir).unwrap();
    checkpoint::save(&target, &model, &meta).unwrap();
    drop(target);
    let leftovers: Vec<_> = std::fs::read_dir(t._dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn saved_checkpoint(t: &Toy) -> PathBuf {
    let dir = t._dir.path().join("ck");
    ok(&run(fetch_ml()
        .args(["--task=2", "--epochs", "1", "--format", "jsonl", "--model"])
        .arg(&t.model)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--eval-file")
        .arg(&t.eval)
        .arg("--save")
        .arg(&dir)));
    dir
}

#[test]
fn checkpoint_against_another_base_model_is_refused() {
    let t = toy();
    let dir = saved_checkpoint(&t);
    // Same shapes, other weights.
    let (_d, other) = tiny_model(&TinyBert {
        seed: 99,
        ..TinyBert::default()
    });
    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(&dir)
        .arg("--model")
        .arg(&other));
    fails_with(&o, &["other weights", "fingerprint"]);
    // Other shapes.
    let (_d2, wide) = tiny_model(&TinyBert {
        hidden: 48,
        heads: 4,
        ..TinyBert::default()
    });
    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(&dir)
        .arg("--model")
        .arg(&wide));
    fails_with(&o, &["hidden size 32", "hidden size 48"]);
    // The right base, named explicitly or taken from the checkpoint, works.
    let out = ok(&run(fetch_ml()
        .args([
            "--task=2",
            "--format=jsonl",
            "-s",
            "i love pizza",
            "--checkpoint",
        ])
        .arg(&dir)));
    let p: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(
        p["class"]["label"].is_string() && p["sentiment"]["probability"].as_f64().unwrap() > 0.0
    );
}

#[test]
fn damaged_checkpoints_are_refused() {
    let t = toy();
    let dir = saved_checkpoint(&t);
    let weights = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.remove("sentiment_head.fc2.bias");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(&dir));
    fails_with(&o, &["sentiment_head.fc2.bias", "missing"]);

    let dir2 = t._dir.path().join("ck2");
    std::fs::rename(saved_checkpoint(&t), &dir2).unwrap();
    let meta = std::fs::read_to_string(dir2.join("checkpoint.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&meta).unwrap();
    v["heads"]["labels"][0]
        .as_array_mut()
        .unwrap()
        .push("extra".into());
    std::fs::write(dir2.join("checkpoint.json"), v.to_string()).unwrap();
    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(&dir2));
    // The label lists are stored with the weights too, so the edit is caught by name.
    fails_with(&o, &["label lists", "checkpoint.json"]);

    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(t._dir.path()));
    fails_with(&o, &["checkpoint.json"]);
}

/// A diverging run stops with a clear message and leaves the earlier checkpoint untouched.
#[test]
fn divergence_stops_and_keeps_the_old_checkpoint() {
    let t = toy();
    let dir = saved_checkpoint(&t);
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    let o = run(fetch_ml()
        .args([
            "--task=2",
            "--epochs",
            "3",
            "--head-lr",
            "1e38",
            "--warmup",
            "0",
            "--model",
        ])
        .arg(&t.model)
        .arg("--eval-file")
        .arg(&t.eval)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--save")
        .arg(&dir));
    fails_with(&o, &["diverged", "Nothing was saved"]);
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn bad_training_data_fails_before_training() {
    let t = toy();
    let bad = t._dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"hi\", \"class\": \"a\", \"sentiment\": \"b\"}\n{\"text\": 3}\n",
    )
    .unwrap();
    let o = run(fetch_ml()
        .args(["--task=2", "--model"])
        .arg(&t.model)
        .arg("--train-file")
        .arg(&bad));
    let err = fails_with(&o, &["bad.jsonl, line 2"]);
    assert!(!err.contains("epoch"), "no training should start:\n{err}");

    let eval = t._dir.path().join("eval-unknown.csv");
    std::fs::write(
        &eval,
        "text,class,sentiment\ni love pizza,food,positive\nmy phone,tech,furious\n",
    )
    .unwrap();
    let o = run(fetch_ml()
        .args(["--task=2", "--model"])
        .arg(&t.model)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--eval-file")
        .arg(&eval));
    let err = fails_with(
        &o,
        &["eval-unknown.csv, line 3", "sentiment label 'furious'"],
    );
    assert!(!err.contains("epoch"), "no training should start:\n{err}");
}

#[test]
fn freeze_all_trains_nothing_and_still_evaluates() {
    let t = toy();
    let dir = t._dir.path().join("ck-all");
    let o = run(fetch_ml()
        .args([
            "--task=2", "--freeze", "all", "--format", "json", "-s", "hi", "--model",
        ])
        .arg(&t.model)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--eval-file")
        .arg(&t.eval)
        .arg("--save")
        .arg(&dir));
    let report: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert!(common::stderr(&o).contains("nothing to train"));
    assert_eq!(report["parameters"]["trainable"], 0);
    assert_eq!(report["training"]["epochs"].as_array().unwrap().len(), 0);
    assert!(report["eval"]["class"]["accuracy"].as_f64().is_some());
    assert_eq!(report["freeze_check"]["frozen_unchanged"], true);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(
        metrics["eval"]["class"]["accuracy"],
        report["eval"]["class"]["accuracy"]
    );
}

/// all-MiniLM-L6-v2 with its encoder frozen: the heads trained on the shipped data score well
/// above chance (1/5 for class, 1/3 for sentiment) on the shipped evaluation set.
#[test]
fn minilm_heads_learn_the_shipped_data() {
    let Some(model) = common::minilm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let o = run(fetch_ml()
        .args([
            "--task=2", "--freeze", "encoder", "--epochs", "10", "--format", "json", "--model",
        ])
        .arg(&model)
        .arg("--save")
        .arg(dir.path().join("ck")));
    let report: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let acc = |h: &str| report["eval"][h]["accuracy"].as_f64().unwrap();
    let f1 = |h: &str| report["eval"][h]["macro_f1"].as_f64().unwrap();
    eprintln!(
        "MiniLM frozen encoder, heads 10 epochs: class acc {:.4} F1 {:.4}, sentiment acc {:.4} F1 {:.4}",
        acc("class"), f1("class"), acc("sentiment"), f1("sentiment")
    );
    assert!(acc("class") > 0.85, "class accuracy {}", acc("class"));
    assert!(
        acc("sentiment") > 0.70,
        "sentiment accuracy {}",
        acc("sentiment")
    );
    assert_eq!(report["training"]["cached_features"], true);
    assert_eq!(
        report["predictions"].as_array().unwrap().len(),
        fetch_ml::input::DEFAULT_SENTENCES.lines().count()
    );
}
