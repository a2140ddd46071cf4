//! What the load-time check for non-finite weights costs: for each model folder, the time of
//! one pass of [`fetch_ml::finite::non_finite`] over every tensor of its `model.safetensors`
//! (values already in memory as f32, as the loader has them), next to the time of loading the
//! model's f32 inference encoder (which includes that pass). Best of 5 of each:
//!
//!     cargo run --release --example finite_check -- models/all-MiniLM-L6-v2 models/all-mpnet-base-v2

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::quant::Dtype;

const RUNS: usize = 5;

fn best_of(mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..RUNS {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let folders: Vec<String> = std::env::args().skip(1).collect();
    if folders.is_empty() {
        anyhow::bail!("usage: finite_check MODEL_FOLDER...");
    }
    for folder in folders {
        let weights = Path::new(&folder).join("model.safetensors");
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
        let values: Vec<Vec<f32>> = tensors
            .values()
            .map(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let n: usize = values.iter().map(Vec::len).sum();
        let check = best_of(|| {
            for v in &values {
                anyhow::ensure!(fetch_ml::finite::non_finite(v).is_none(), "non-finite");
            }
            Ok(())
        })?;
        let model = ModelRef::new(folder.as_str());
        let load = best_of(|| {
            let assets = ModelAssets::load(&model, None)?;
            let encoder = assets.inference_encoder(Dtype::F32, &Device::Cpu)?;
            drop(encoder);
            Ok(())
        })?;
        println!(
            "{folder}: {n} values ({} MB as f32): check {:.1} ms ({:.1} GB/s); f32 load {:.1} ms; \
             the check is {:.1}% of the load",
            (n * 4) >> 20,
            check * 1e3,
            n as f64 * 4.0 / check / 1e9,
            load * 1e3,
            100.0 * check / load
        );
    }
    Ok(())
}
