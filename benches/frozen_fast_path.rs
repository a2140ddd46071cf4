//! Benchmark: training the heads on a frozen encoder, with sentence vectors cached once versus
//! recomputing the encoder for every batch. Run by hand, not by CI:
//!
//!     ./scripts/fetch-minilm.sh && cargo bench --bench frozen_fast_path [-- EPOCHS]
//!
//! Uses all-MiniLM-L6-v2 on the shipped data set (900 training, 225 evaluation sentences).

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use fetch_ml::config::TrainConfig;
use fetch_ml::data::DataSource;
use fetch_ml::hub::ModelRef;
use fetch_ml::model::freeze::{FreezePart, FreezePlan};
use fetch_ml::model::multitask::HeadInit;
use fetch_ml::train::session::{fit, Setup};
use fetch_ml::train::trainer::TrainSettings;

fn main() -> anyhow::Result<()> {
    // The same process set-up as the binary.
    fetch_ml::alloc::keep_freed_memory();
    fetch_ml::threads::configure(None).expect("threads");
    let epochs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    anyhow::ensure!(
        model.is_dir(),
        "run scripts/fetch-minilm.sh first ({} is missing)",
        model.display()
    );
    let cfg = TrainConfig {
        model: ModelRef::new(model.to_str().unwrap()),
        model_given: true,
        max_seq_length: None,
        train_file: DataSource::default_train(),
        eval_file: Some(DataSource::default_eval()),
        settings: TrainSettings {
            epochs,
            ..TrainSettings::default()
        },
        head_hidden: 256,
        head_dropout: 0.1,
        freeze: vec![FreezePart::Encoder],
        freeze_layers: None,
        max_train_examples: None,
        embedding_cache: None,
        dtype: Default::default(),
    };
    let cache_dir = tempfile::tempdir()?;
    let cached_cfg = TrainConfig {
        embedding_cache: Some(cache_dir.path().to_path_buf()),
        ..cfg.clone()
    };
    let setup = Setup::load(&cfg)?;
    let layers = setup.assets.config.num_hidden_layers;
    let plan = FreezePlan::new(&cfg.freeze, None, layers)?;
    println!(
        "heads on a frozen all-MiniLM-L6-v2: {} train / {} eval sentences, {epochs} epochs, batch {}, threads: all cores",
        setup.train.prepared.texts.len(),
        setup.eval.as_ref().map_or(0, |e| e.prepared.texts.len()),
        cfg.settings.batch_size
    );
    // (label, settings, which setup): the disk-cache rows share one cache folder, cold then warm.
    let disk_setup = Setup::load(&cached_cfg)?;
    let runs: [(&str, bool, &Setup); 4] = [
        ("recompute encoder", false, &setup),
        ("cached in memory", true, &setup),
        ("disk cache, cold", true, &disk_setup),
        ("disk cache, warm", true, &disk_setup),
    ];
    let mut results = Vec::new();
    for (label, cache, setup) in runs {
        let m = setup.assets.multitask(
            vec![setup.assets.weights.clone()],
            setup.heads_spec(&cfg),
            plan,
            HeadInit::Seed(cfg.settings.seed),
            &Device::Cpu,
        )?;
        let s = TrainSettings {
            cache_features: cache,
            ..cfg.settings.clone()
        };
        let start = Instant::now();
        let r = fit(&m, setup, &s, &mut |_| {})?;
        let wall = start.elapsed().as_secs_f64();
        let eval = r.eval.as_ref().expect("eval set");
        println!(
            "{label:<20} training {:>7.2}s  wall (with per-epoch evaluation) {:>7.2}s  class acc {:.4}  sentiment acc {:.4}",
            r.training.train_seconds, wall, eval[0].accuracy, eval[1].accuracy
        );
        results.push((label, r.training.train_seconds, wall));
    }
    let (_, base_train, base_wall) = results[0];
    for (label, train, wall) in &results[1..] {
        println!(
            "speedup of {label} over recomputing: training {:.1}x, wall {:.1}x",
            base_train / train,
            base_wall / wall
        );
    }
    Ok(())
}
