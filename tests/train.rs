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
        dtype: Default::default(),
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

/// The run's data and model, untrained, as `cfg` asks.
fn setup_and_model(cfg: &TrainConfig) -> (Setup, MultiTaskModel) {
    let setup = Setup::load(cfg).unwrap();
    let layers = setup.assets.config.num_hidden_layers;
    let plan = FreezePlan::new(&cfg.freeze, cfg.freeze_layers, layers).unwrap();
    let model = build_model(&setup, cfg, plan);
    (setup, model)
}

fn train_model(cfg: &TrainConfig) -> (Setup, MultiTaskModel, RunResult) {
    let (setup, model) = setup_and_model(cfg);
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
    fails_with(
        &o,
        &["diverged", "Nothing was saved", "to fix: try a lower --lr"],
    );
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
    let train = |dtype: &str| -> serde_json::Value {
        let o = run(fetch_ml()
            .args([
                "--task=2", "--freeze", "encoder", "--epochs", "10", "--format", "json", "--dtype",
                dtype, "--model",
            ])
            .arg(&model)
            .arg("--save")
            .arg(dir.path().join(format!("ck-{dtype}"))));
        serde_json::from_str(&ok(&o)).unwrap()
    };
    let report = train("f32");
    let acc = |r: &serde_json::Value, h: &str| r["eval"][h]["accuracy"].as_f64().unwrap();
    let f1 = |r: &serde_json::Value, h: &str| r["eval"][h]["macro_f1"].as_f64().unwrap();
    eprintln!(
        "MiniLM frozen encoder, heads 10 epochs: class acc {:.4} F1 {:.4}, sentiment acc {:.4} F1 {:.4}",
        acc(&report, "class"), f1(&report, "class"), acc(&report, "sentiment"), f1(&report, "sentiment")
    );
    assert!(
        acc(&report, "class") > 0.85,
        "class accuracy {}",
        acc(&report, "class")
    );
    assert!(
        acc(&report, "sentiment") > 0.70,
        "sentiment accuracy {}",
        acc(&report, "sentiment")
    );
    assert_eq!(report["training"]["cached_features"], true);
    assert_eq!(
        report["predictions"].as_array().unwrap().len(),
        fetch_ml::input::DEFAULT_SENTENCES.lines().count()
    );
    // The same recipe on an int8 encoder scores within 1 point of float32 on each head.
    let int8 = train("int8");
    for h in ["class", "sentiment"] {
        eprintln!(
            "{h}: f32 acc {:.4} F1 {:.4}, int8 acc {:.4} F1 {:.4}",
            acc(&report, h),
            f1(&report, h),
            acc(&int8, h),
            f1(&int8, h)
        );
        assert!(
            (acc(&report, h) - acc(&int8, h)).abs() <= 0.01,
            "{h} accuracy"
        );
        assert!(
            (f1(&report, h) - f1(&int8, h)).abs() <= 0.01,
            "{h} macro-F1"
        );
    }
}

/// The packed training path (no padding anywhere) computes what the padded one does: the
/// same logits and, in training mode, the same gradient for every trainable tensor, with the
/// whole encoder trainable and with a frozen prefix.
#[test]
fn packed_training_matches_the_padded_path() {
    use fetch_ml::model::batch::PackedBatch;
    use fetch_ml::model::dropout::Dropout;
    let t = toy();
    for freeze_layers in [None, Some(1)] {
        let cfg = config(&t, quick(), &[], freeze_layers);
        let (setup, model) = setup_and_model(&cfg);
        let texts = [
            "i love my phone and the app is great today",
            "bad",
            "the pizza was very tasty",
            "zyx",
        ];
        let enc = setup.assets.tokenizer.encode(&texts).unwrap();
        let items: Vec<_> = enc.iter().collect();
        let padded = setup.assets.tokenizer.batch(&items, &Device::Cpu).unwrap();
        let packed = PackedBatch::new(&items);
        let no_dropout = Dropout::disabled();
        let loss = |l: &[candle_core::Tensor; 2]| {
            let w0 = l[0].ones_like().unwrap().cumsum(1).unwrap().sin().unwrap();
            let w1 = l[1].ones_like().unwrap().cumsum(1).unwrap().cos().unwrap();
            ((&l[0] * &w0).unwrap().sum_all().unwrap() + (&l[1] * &w1).unwrap().sum_all().unwrap())
                .unwrap()
        };
        let a = model.forward(&padded, Some(&no_dropout)).unwrap();
        let b = model.forward_packed(&packed, Some(&no_dropout)).unwrap();
        for h in 0..2 {
            let d = (&a[h] - &b[h]).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "logits differ by {d}");
        }
        let (ga, gb) = (loss(&a).backward().unwrap(), loss(&b).backward().unwrap());
        let mut checked = 0;
        for p in model.registry.params() {
            let Some(v) = &p.var else { continue };
            let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            let scale = x
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1e-3);
            let d = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d / scale < 1e-4,
                "{}: gradients differ by {d} (scale {scale})",
                p.name
            );
            checked += 1;
        }
        assert!(checked > 10, "{checked} trainable tensors checked");
    }
}

/// A toy whose model has no dropout anywhere, so that differently batched runs are
/// comparable.
fn toy_without_dropout() -> Toy {
    let t = toy();
    let path = t.model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["hidden_dropout_prob"] = 0.0.into();
    v["attention_probs_dropout_prob"] = 0.0.into();
    std::fs::write(&path, v.to_string()).unwrap();
    t
}

fn max_param_diff(a: &MultiTaskModel, b: &MultiTaskModel) -> f32 {
    common::param_bits(a)
        .iter()
        .zip(common::param_bits(b))
        .flat_map(|((na, x), (nb, y))| {
            assert_eq!(na, &nb);
            x.iter()
                .zip(y)
                .map(|(p, q)| (f32::from_bits(*p) - f32::from_bits(q)).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0, f32::max)
}

/// Gradient accumulation: 2 micro-batches of 8 train exactly as batches of 16 (up to
/// rounding), and differently from plain batches of 8.
#[test]
fn grad_accum_equals_a_larger_batch() {
    let t = toy_without_dropout();
    let run = |batch_size: usize, grad_accum: usize| {
        let mut cfg = config(
            &t,
            TrainSettings {
                epochs: 2,
                batch_size,
                grad_accum,
                lr: 1e-3,
                head_lr: 1e-2,
                ..TrainSettings::default()
            },
            &[],
            None,
        );
        cfg.head_dropout = 0.0;
        let (_, model, r) = train_model(&cfg);
        (model, r.training.epochs[0].loss)
    };
    let (big, big_loss) = run(16, 1);
    let (accum, accum_loss) = run(8, 2);
    let (small, _) = run(8, 1);
    // The first epoch's mean losses agree to rounding.
    for h in 0..2 {
        let rel = (big_loss[h] - accum_loss[h]).abs() / big_loss[h];
        assert!(
            rel < 1e-5,
            "head {h}: loss {} vs {}",
            big_loss[h],
            accum_loss[h]
        );
    }
    // Weights: AdamW turns rounding-level gradient differences near zero into updates of
    // up to the learning rate, so compare against what a real difference in batching does.
    let d = max_param_diff(&big, &accum);
    let d_small = max_param_diff(&big, &small);
    eprintln!("max weight difference: accumulated {d}, small batches {d_small}");
    assert!(
        d < d_small / 100.0,
        "accumulated {d} vs small batches {d_small}"
    );
}

/// --keep-best leaves the model with the best evaluation's weights and reports it;
/// --early-stop ends training when the metric stops improving.
#[test]
fn keep_best_and_early_stop() {
    let t = toy();
    let mut cfg = config(
        &t,
        TrainSettings {
            epochs: 6,
            batch_size: 16,
            eval_every: Some(1),
            keep_best: Some(fetch_ml::train::metrics::Metric::MeanMacroF1),
            ..quick()
        },
        &[FreezePart::Encoder],
        None,
    );
    let (setup, model, result) = train_model(&cfg);
    let best = result.training.best.clone().expect("a best evaluation");
    assert_eq!(result.training.evaluations.len(), 6 * 4 /* steps */);
    let max = result
        .training
        .evaluations
        .iter()
        .map(|e| fetch_ml::train::metrics::Metric::MeanMacroF1.of(&e.metrics))
        .fold(f64::MIN, f64::max);
    assert_eq!(best.value, max);
    let now = fetch_ml::train::evaluate::evaluate(
        &model,
        &setup.eval.as_ref().unwrap().prepared,
        16,
        None,
    )
    .unwrap();
    assert_eq!(
        fetch_ml::train::metrics::Metric::MeanMacroF1.of(&now),
        best.value
    );
    assert_eq!(
        result.eval.as_ref().unwrap()[0].accuracy,
        best.eval[0].accuracy
    );

    // A learning rate too small to change a prediction: nothing improves after the first
    // evaluation.
    cfg.settings.lr = 1e-6;
    cfg.settings.head_lr = 1e-6;
    cfg.settings.early_stop = Some(2);
    let (_, _, r) = train_model(&cfg);
    assert!(r.training.stopped_early);
    assert_eq!(
        r.training.evaluations.len(),
        3,
        "the first, then two without improvement"
    );
    assert_eq!(r.training.steps, 3);
}

/// With the first layers frozen, their output is computed once: training on it gives the
/// weights that recomputing it every step gives.
#[test]
fn frozen_prefix_cache_trains_as_recomputing_does() {
    let t = toy();
    let run = |cache: bool| {
        let cfg = config(
            &t,
            TrainSettings {
                epochs: 2,
                cache_features: cache,
                ..quick()
            },
            &[],
            Some(2),
        );
        train_model(&cfg)
    };
    let (_, cached, r1) = run(true);
    let (_, recomputed, r2) = run(false);
    assert!(r1.training.cached_prefix && !r2.training.cached_prefix);
    let d = max_param_diff(&cached, &recomputed);
    assert!(d < 1e-5, "cached prefix training differs by {d}");
}

/// The trainer flags reach the JSON report and checkpoint.json.
#[test]
fn trainer_flags_are_reported_and_saved() {
    let t = toy();
    let dir = t._dir.path().join("ck");
    let out = ok(&run(fetch_ml()
        .args([
            "--task=2",
            "--epochs",
            "2",
            "--format",
            "json",
            "--batch-size",
            "8",
        ])
        .args([
            "--grad-accum",
            "2",
            "--eval-every",
            "2",
            "--keep-best",
            "class.macro_f1",
        ])
        .args(["--early-stop", "5", "--class-weights", "auto", "--model"])
        .arg(&t.model)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--eval-file")
        .arg(&t.eval)
        .arg("--save")
        .arg(&dir)));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &report["training"]["settings"];
    assert_eq!(s["grad_accum"], 2);
    assert_eq!(s["eval_every"], 2);
    assert_eq!(s["keep_best"], "class.macro_f1");
    assert_eq!(s["early_stop"], 5);
    assert_eq!(s["class_weights"], true);
    // 64 rows in steps of 16: 4 steps per epoch, an evaluation every 2.
    assert_eq!(
        report["training"]["evaluations"].as_array().unwrap().len(),
        4
    );
    let best = &report["training"]["best"];
    assert_eq!(best["metric"], "class.macro_f1");
    assert_eq!(report["eval"]["class"]["macro_f1"], best["value"]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap())
            .unwrap();
    assert_eq!(meta["training"]["settings"]["keep_best"], "class.macro_f1");
    // Both need an evaluation set; --early-stop needs --keep-best.
    fails_with(
        &run(fetch_ml()
            .args(["--task=2", "--keep-best", "class.accuracy", "--model"])
            .arg(&t.model)
            .arg("--train-file")
            .arg(&t.train)
            .arg("--save")
            .arg(&dir)),
        &["--eval-file"],
    );
    fails_with(
        &run(fetch_ml().args(["--task=2", "--early-stop", "2"])),
        &["--keep-best"],
    );
}

/// The word embeddings train with row-wise gradients: the rows of tokens in the training
/// data change, the rows of tokens never seen stay bit-identical (a dense AdamW would decay
/// them all).
#[test]
fn word_embeddings_train_row_wise() {
    let t = toy();
    let cfg = config(&t, quick(), &[], None);
    let (setup, model) = setup_and_model(&cfg);
    let word = |m: &MultiTaskModel| {
        m.encoder
            .as_bert()
            .unwrap()
            .embeddings
            .word_embeddings
            .embeddings()
            .to_vec2::<f32>()
            .unwrap()
    };
    let before = word(&model);
    fit(&model, &setup, &cfg.settings, &mut |_| {}).unwrap();
    let after = word(&model);
    let seen: std::collections::HashSet<u32> = setup
        .train
        .prepared
        .encoded
        .iter()
        .flat_map(|e| e.ids.iter().copied())
        .collect();
    let mut changed = 0;
    for (id, (b, a)) in before.iter().zip(&after).enumerate() {
        if seen.contains(&(id as u32)) {
            changed += (b != a) as usize;
        } else {
            assert_eq!(b, a, "row {id} was never seen but changed");
        }
    }
    assert_eq!(changed, seen.len(), "every seen row trained");
    assert!(seen.len() < before.len());
}

/// The feature pass runs batches side by side; each row still belongs to its sentence: equal
/// to that sentence's vector computed alone.
#[test]
fn parallel_feature_batches_keep_example_order() {
    use fetch_ml::train::evaluate::compute_features;
    let t = toy();
    let cfg = config(&t, quick(), &[], None);
    let (setup, model) = setup_and_model(&cfg);
    let encoded = &setup.train.prepared.encoded;
    assert!(encoded.len() > 20, "{} examples", encoded.len());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let all = pool
        .install(|| compute_features(&model, encoded, 3))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(all.len(), encoded.len());
    for (i, (row, e)) in all.iter().zip(encoded).enumerate() {
        let alone = model
            .features_infer(&[e])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (_, max_abs) = common::compare(row, &alone[0]);
        assert!(max_abs < 1e-5, "example {i}: {max_abs}");
    }
}
