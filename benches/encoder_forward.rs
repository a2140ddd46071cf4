//! Micro-benchmark of the encoder's forward pass on all-MiniLM-L6-v2: the same length-sorted
//! batches through candle-transformers' BertModel, our encoder on candle ops, and our packed
//! fast path, one after the other in one run. Run by hand:
//!
//!     cargo bench --bench encoder_forward [-- SENTENCES_FILE [BATCH]]
//!
//! Default sentences: bench/data/sentences-2k.txt (bench/make-sentences.py), else the
//! shipped training set.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::bert::Mode;
use fetch_ml::model::fast::{PackedEncoder, Workspace};
use fetch_ml::model::pooling::Pooling;
use fetch_ml::tokenize::{length_sorted_batches, Encoded};

fn main() -> anyhow::Result<()> {
    fetch_ml::alloc::keep_freed_memory();
    fetch_ml::threads::configure(None).expect("threads");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/all-MiniLM-L6-v2");
    anyhow::ensure!(model.is_dir(), "run scripts/fetch-minilm.sh first");
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let file = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("bench/data/sentences-2k.txt"));
    let batch: usize = args.next().and_then(|b| b.parse().ok()).unwrap_or(32);
    let texts: Vec<String> = if file.is_file() {
        std::fs::read_to_string(&file)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    } else {
        let d = fetch_ml::data::Dataset::load(&fetch_ml::data::DataSource::default_train())?;
        d.examples.into_iter().map(|e| e.text).collect()
    };
    let a = ModelAssets::load(&ModelRef::new(model.to_str().unwrap()), None)?;
    let dev = Device::Cpu;
    let encoded = a.tokenizer.encode(&texts)?;
    let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();
    let batches = length_sorted_batches(
        &encoded.iter().map(|e| e.ids.len()).collect::<Vec<_>>(),
        batch,
        None,
    );
    println!(
        "encoder forward + mean pooling, all-MiniLM-L6-v2: {} sentences ({} tokens) from {}, batch {batch}, {} threads",
        texts.len(),
        tokens,
        if file.is_file() { file.display().to_string() } else { "the shipped training set".into() },
        rayon::current_num_threads()
    );

    let padded: Vec<_> = batches
        .iter()
        .map(|idx| {
            let items: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
            a.tokenizer.batch(&items, &dev)
        })
        .collect::<anyhow::Result<_>>()?;

    // candle-transformers' BertModel (attention mask passed), mean pooling with candle ops.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[model.join("model.safetensors")], DType::F32, &dev)?
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &a.config.base)?;
    let t = Instant::now();
    for b in &padded {
        let mask = b.attention_mask.to_dtype(DType::U32)?;
        let h = reference.forward(&b.input_ids, &b.token_type_ids, Some(&mask))?;
        let _: Tensor = Pooling::Mean.forward(&h, &b.attention_mask)?;
    }
    let ct = t.elapsed().as_secs_f64();

    // Our encoder on candle ops (the training code in inference mode).
    let ours = a.frozen_encoder(&dev)?;
    let t = Instant::now();
    for b in &padded {
        let h = ours.forward(
            &b.input_ids,
            &b.token_type_ids,
            &b.attention_mask,
            Mode::Infer,
        )?;
        let _: Tensor = Pooling::Mean.forward(&h, &b.attention_mask)?;
    }
    let candle_ops = t.elapsed().as_secs_f64();

    // The packed fast path.
    let mut ws = Workspace::default();
    let t = Instant::now();
    for idx in &batches {
        let items: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
        let _ = ours.pooled_packed(&items, Pooling::Mean, &mut ws)?;
    }
    let fast = t.elapsed().as_secs_f64();

    let n = texts.len() as f64;
    for (name, secs) in [
        ("candle-transformers BertModel", ct),
        ("our encoder, candle ops", candle_ops),
        ("our encoder, fast path", fast),
    ] {
        println!(
            "{name:<32} {secs:>7.2} s  {:>7.1} sentences/s  {:>6.2}x candle-transformers",
            n / secs,
            ct / secs
        );
    }
    Ok(())
}
