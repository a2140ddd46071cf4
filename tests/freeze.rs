//! Freezing, checked independently of the code that reports it: for every scenario, which
//! tensors get gradients, which stay bit-identical and which change; the cached fast path
//! against recomputing; and `--task=3` end to end.

mod common;

use std::collections::HashMap;

use candle_core::Device;
use common::{
    build_model, fails_with, fetch_ml, ok, param_bits, run, tiny_model, toy_rows, write_jsonl,
};
use fetch_ml::config::TrainConfig;
use fetch_ml::data::DataSource;
use fetch_ml::hub::ModelRef;
use fetch_ml::model::dropout::Dropout;
use fetch_ml::model::freeze::{FreezePlan, Scenario};
use fetch_ml::testutil::TinyBert;
use fetch_ml::train::loss::{multitask_loss, HeadTargets};
use fetch_ml::train::session::{fit, Setup};
use fetch_ml::train::trainer::TrainSettings;

const LAYERS: usize = 3;

struct Fixture {
    dir: tempfile::TempDir,
    cfg: TrainConfig,
}

fn fixture() -> Fixture {
    let (dir, model) = tiny_model(&TinyBert {
        layers: LAYERS,
        ..TinyBert::default()
    });
    let train = dir.path().join("train.jsonl");
    let eval = dir.path().join("eval.jsonl");
    write_jsonl(&train, &toy_rows(32, 1));
    write_jsonl(&eval, &toy_rows(16, 2));
    let cfg = TrainConfig {
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
        freeze_layers: None,
        max_train_examples: None,
        embedding_cache: None,
        dtype: Default::default(),
    };
    Fixture { dir, cfg }
}

/// Which tensors each scenario should train, written out by name, not through the plan.
fn should_train(s: Scenario, n: usize, name: &str) -> bool {
    let layer = name
        .strip_prefix("encoder.layer.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok());
    let is_class = name.starts_with("class_head.");
    let is_sent = name.starts_with("sentiment_head.");
    match s {
        Scenario::None => true,
        Scenario::Encoder => is_class || is_sent,
        Scenario::ClassHead => !is_class,
        Scenario::SentimentHead => !is_sent,
        Scenario::Layers => is_class || is_sent || layer.is_some_and(|l| l >= n),
        Scenario::All => false,
    }
}

/// For each scenario (and each N of the layers scenario): trainable tensors are exactly the
/// expected ones, each gets a non-zero gradient; after training, frozen tensors are
/// bit-identical and trainable ones changed.
#[test]
fn every_scenario_trains_exactly_its_tensors() {
    let f = fixture();
    let setup = Setup::load(&f.cfg).unwrap();
    let mut cases: Vec<(Scenario, usize)> = Scenario::ALL.iter().map(|&s| (s, 1)).collect();
    cases.extend((0..=LAYERS).map(|n| (Scenario::Layers, n)));
    for (scenario, n) in cases {
        let plan = scenario.plan(LAYERS, n).unwrap();
        let model = build_model(&setup, &f.cfg, plan);
        let params = model.registry.params();
        assert_eq!(params.len(), 5 + 16 * LAYERS + 8);
        for p in &params {
            assert_eq!(
                p.trainable(),
                should_train(scenario, n, &p.name),
                "{scenario:?} N={n}: {}",
                p.name
            );
        }

        // One training step's gradients: every trainable tensor gets a non-zero one.
        let data = &setup.train.prepared;
        let items: Vec<_> = data.encoded[..8].iter().collect();
        let batch = setup.assets.tokenizer.batch(&items, &Device::Cpu).unwrap();
        let dropout = Dropout::new(3);
        let logits = model.forward(&batch, Some(&dropout)).unwrap();
        let targets = [0, 1].map(|t| {
            let l: Vec<Option<u32>> = data.labels[..8].iter().map(|l| l[t]).collect();
            HeadTargets::new(&l, &Device::Cpu).unwrap()
        });
        let (loss, _) = multitask_loss(&logits, &targets, [1.0, 1.0]).unwrap();
        if params.iter().any(|p| p.trainable()) {
            let grads = loss.backward().unwrap();
            for p in params.iter().filter(|p| p.trainable()) {
                let g = grads
                    .get(p.var.as_ref().unwrap().as_tensor())
                    .unwrap_or_else(|| panic!("{scenario:?}: no gradient for {}", p.name));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    norm > 0.0,
                    "{scenario:?} N={n}: zero gradient for {}",
                    p.name
                );
            }
        }

        let before = param_bits(&model).into_iter().collect::<HashMap<_, _>>();
        let r = fit(&model, &setup, &f.cfg.settings, &mut |_| {}).unwrap();
        let after = param_bits(&model).into_iter().collect::<HashMap<_, _>>();
        for (name, b) in &before {
            let changed = &after[name] != b;
            assert_eq!(
                changed,
                should_train(scenario, n, name),
                "{scenario:?} N={n}: {name} changed={changed}"
            );
        }
        assert!(r.freeze_check.frozen_unchanged && r.freeze_check.trainable_changed);
        if scenario == Scenario::All {
            assert!(
                r.training.epochs.is_empty() && r.eval.is_some(),
                "all frozen: no training, still evaluated"
            );
        }
    }
}

/// With the encoder frozen, training the heads on cached vectors gives the same head weights
/// as recomputing the encoder for every batch.
#[test]
fn cached_fast_path_matches_recomputing() {
    let f = fixture();
    let setup = Setup::load(&f.cfg).unwrap();
    let plan = Scenario::Encoder.plan(LAYERS, 0).unwrap();
    let heads = |cache: bool| {
        let model = build_model(&setup, &f.cfg, plan);
        let s = TrainSettings {
            cache_features: cache,
            epochs: 3,
            ..f.cfg.settings.clone()
        };
        let r = fit(&model, &setup, &s, &mut |_| {}).unwrap();
        assert_eq!(r.training.cached_features, cache);
        model
            .registry
            .params()
            .into_iter()
            .filter(|p| p.trainable())
            .map(|p| {
                (
                    p.name,
                    p.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let (cached, recomputed) = (heads(true), heads(false));
    assert_eq!(cached.len(), 8);
    let mut worst = 0f32;
    for ((n1, a), (n2, b)) in cached.iter().zip(&recomputed) {
        assert_eq!(n1, n2);
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("cached vs recomputed head weights: max abs diff {worst:.2e}");
    assert!(worst < 1e-4, "max abs diff {worst}");
}

/// The on-disk embedding cache gives the same training as computing the vectors, and a
/// second run reads them all from the file.
#[test]
fn embedding_cache_on_disk_is_used_and_safe() {
    let f = fixture();
    let dir = f.dir.path().join("cache");
    let mut cfg = f.cfg.clone();
    cfg.embedding_cache = Some(dir.clone());
    cfg.freeze = vec![fetch_ml::model::freeze::FreezePart::Encoder];
    let run_once = |cfg: &TrainConfig| {
        let setup = Setup::load(cfg).unwrap();
        let model = build_model(
            &setup,
            cfg,
            FreezePlan::new(&cfg.freeze, None, LAYERS).unwrap(),
        );
        let r = fit(&model, &setup, &cfg.settings, &mut |_| {}).unwrap();
        let cached = setup.cache.lock().unwrap().as_ref().map(|c| c.len());
        (r.training.epochs.last().unwrap().total_loss, cached)
    };
    let (loss1, n1) = run_once(&cfg);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one cache file: {files:?}");
    assert_eq!(n1, Some(32 + 16), "train and eval sentences cached");
    let (loss2, _) = run_once(&cfg);
    assert!((loss1 - loss2).abs() < 1e-5, "{loss1} vs {loss2}");
    // Corrupt the file: the run still succeeds, recomputing what it cannot trust.
    std::fs::write(&files[0], b"FMLEMB01 garbage").unwrap();
    let (loss3, n3) = run_once(&cfg);
    assert!((loss1 - loss3).abs() < 1e-5);
    assert_eq!(n3, Some(48));
}

#[test]
fn task3_end_to_end_json_table_and_plot() {
    let f = fixture();
    let Fixture { dir, cfg } = &f;
    let DataSource::File(train) = &cfg.train_file else {
        unreachable!()
    };
    let Some(DataSource::File(eval)) = &cfg.eval_file else {
        unreachable!()
    };
    let plot = dir.path().join("scenarios.png");
    let base = || {
        let mut c = fetch_ml();
        c.args([
            "--task=3",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--model",
            &cfg.model.id,
        ])
        .arg("--train-file")
        .arg(train)
        .arg("--eval-file")
        .arg(eval);
        c
    };
    let out = ok(&run(base().args(["--format", "json", "--plot"]).arg(&plot)));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "none",
            "encoder",
            "class-head",
            "sentiment-head",
            "layers",
            "all"
        ]
    );
    for r in &rows {
        for key in ["trainable_params", "frozen_params", "train_seconds"] {
            assert!(r[key].is_number(), "{key} in {r}");
        }
        assert_eq!(r["frozen_unchanged"], true);
        assert_eq!(r["trainable_changed"], true);
        for head in ["class", "sentiment"] {
            for m in ["accuracy", "macro_f1"] {
                assert!(
                    r["eval"][head][m].as_f64().is_some(),
                    "eval.{head}.{m} in {r}"
                );
            }
        }
    }
    assert_eq!(rows[5]["trainable_params"], 0);
    assert!(rows[5]["final_loss"].is_null());
    assert!(rows[0]["trainable_params"].as_u64() > rows[4]["trainable_params"].as_u64());
    assert_eq!(
        rows[4]["description"], "first 1 layers frozen",
        "default N is half of 3 layers"
    );
    assert_eq!(&std::fs::read(&plot).unwrap()[1..4], b"PNG");

    let text = ok(&run(base().args([
        "--scenarios",
        "encoder,all",
        "--freeze-layers",
        "2",
    ])));
    assert!(
        text.contains("encoder frozen")
            && text.contains("all frozen")
            && !text.contains("none frozen"),
        "{text}"
    );
    assert!(text.contains("Best class accuracy"), "{text}");

    let o = run(base().args(["--freeze-layers", "9"]));
    fails_with(
        &o,
        &[
            "9 frozen layers",
            "only 3 encoder layers",
            "to fix: pass --freeze-layers between 0 and 3",
        ],
    );
}
