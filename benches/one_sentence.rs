//! Latency of one sentence through task 1's inference encoder (the serve mode's case at one
//! client): the model is loaded once, then the same sentence goes through the fast path and
//! mean pooling again and again; p10/p50/p90/p99 of the passes. Run by hand:
//!
//!     cargo bench --bench one_sentence -- [MODEL_DIR] [--dtype f32|bf16|int8] [--passes 300]
//!
//! Default model: models/all-MiniLM-L6-v2; the sentence is bench/serve.sh's 39-token tweet.
//! Threads: `RAYON_NUM_THREADS` (default: every core).

use std::time::Instant;

use candle_core::Device;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::fast::{PackedEncoder, Workspace};
use fetch_ml::model::pooling::Pooling;
use fetch_ml::model::quant::Dtype;

const TWEET: &str = "Just landed in Lisbon and the sunset over the river is unreal, can't wait \
                     to try the pastéis de nata everyone keeps talking about with my two best \
                     friends #travel";

fn main() -> anyhow::Result<()> {
    fetch_ml::alloc::keep_freed_memory();
    fetch_ml::threads::configure(None)?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut model = root.join("models/all-MiniLM-L6-v2");
    let (mut dtype, mut passes) = (Dtype::F32, 300usize);
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dtype" => dtype = args.next().unwrap_or_default().parse()?,
            "--passes" => passes = args.next().unwrap_or_default().parse()?,
            _ => model = a.into(),
        }
    }
    anyhow::ensure!(model.is_dir(), "{}: no such model folder", model.display());
    let a = ModelAssets::load(&ModelRef::new(model.to_str().unwrap()), None)?;
    let enc = a.tokenizer.encode(&[TWEET.to_string()])?;
    let encoder = a.inference_encoder(dtype, &Device::Cpu)?;
    let (mut ws, items) = (Workspace::default(), [&enc[0]]);
    for _ in 0..20 {
        encoder.pooled_packed(&items, Pooling::Mean, &mut ws)?;
    }
    let mut ms: Vec<f64> = (0..passes.max(1))
        .map(|_| {
            let t = Instant::now();
            let v = encoder.pooled_packed(&items, Pooling::Mean, &mut ws);
            v.map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<candle_core::Result<_>>()?;
    ms.sort_by(f64::total_cmp);
    let q = |p: usize| ms[(ms.len() * p / 100).min(ms.len() - 1)];
    println!(
        "{}: one sentence of {} tokens, {dtype} on {}, {} threads, {} passes: \
         p10 {:.2} ms, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
        model.file_name().unwrap_or_default().to_string_lossy(),
        enc[0].ids.len(),
        encoder.kernel_name(),
        rayon::current_num_threads(),
        ms.len(),
        q(10),
        q(50),
        q(90),
        q(99)
    );
    Ok(())
}
