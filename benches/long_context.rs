//! Time per token of one long input on a long-context model (ModernBERT, NomicBERT, JinaBERT),
//! and how far it is from the arithmetic: the model is loaded once, then one input of each
//! length (token ids drawn from a fixed seed) goes through the fast path
//! (`ModelAssets::inference_encoder`, the same as `--task=1`) and mean pooling; the attention
//! alone (the tiled kernel on random Q, K, V of the model's shape, each layer kind) is timed
//! too. Run by hand, or from bench/long.sh:
//!
//!     cargo bench --bench long_context -- MODEL_DIR [--dtype f32|bf16|int8]
//!         [--lengths 512,1024,2048,4096,8192] [--repeat 1] [--threads N] [--attention-only]
//!
//! One JSON line per length: seconds (best of --repeat, after one warm-up input of 128
//! tokens), ms per 1,000 tokens, the GFLOP of the dense layers (2 per multiply-add) and of the
//! attention (QK^T and PV over the keys each query sees: the whole sequence in global layers,
//! the window in local ones), the whole pass's GFLOP/s, and the attention alone: its seconds
//! and GFLOP/s (its products in bf16 with `--dtype bf16`, as the encoder runs them), best of
//! --repeat too. `--attention-only` times the attention alone (the weights are not loaded).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::attention_tiled::{alibi_slopes, attend_packed, AttentionSpec};
use fetch_ml::model::config::BertConfig;
use fetch_ml::model::encoder::LongConfig;
use fetch_ml::model::fast::{PackedEncoder, Workspace};
use fetch_ml::model::modernbert::LayerKind;
use fetch_ml::model::pooling::Pooling;
use fetch_ml::model::quant::{Bf16Kernel, Dtype};
use fetch_ml::tokenize::Encoded;

struct Args {
    model: PathBuf,
    dtype: Dtype,
    lengths: Vec<usize>,
    repeat: usize,
    threads: Option<usize>,
    /// Time the attention kernel only (no model pass).
    attention_only: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut a = Args {
        model: PathBuf::new(),
        dtype: Dtype::F32,
        lengths: vec![512, 1024, 2048, 4096, 8192],
        repeat: 1,
        threads: None,
        attention_only: false,
    };
    while let Some(x) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{x} needs a value"))
        };
        match x.as_str() {
            "--dtype" => a.dtype = val()?.parse()?,
            "--lengths" => {
                a.lengths = val()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--repeat" => a.repeat = val()?.parse()?,
            "--threads" => a.threads = Some(val()?.parse()?),
            "--attention-only" => a.attention_only = true,
            _ if a.model.as_os_str().is_empty() => a.model = x.into(),
            _ => anyhow::bail!("unexpected argument {x}"),
        }
    }
    anyhow::ensure!(
        !a.model.as_os_str().is_empty(),
        "usage: MODEL_DIR [--dtype ..]"
    );
    Ok(a)
}

/// One layer's attention: its window (if local) and whether it has ALiBi.
#[derive(Clone, Copy, PartialEq)]
struct Kind {
    window: Option<usize>,
    alibi: bool,
}

/// Each layer's attention kind.
fn kinds(cfg: &BertConfig) -> anyhow::Result<Vec<Kind>> {
    let n = cfg.num_hidden_layers;
    Ok(match &cfg.long {
        Some(LongConfig::ModernBert(c)) => c
            .layer_kinds()?
            .into_iter()
            .map(|k| Kind {
                window: (k == LayerKind::Local).then(|| c.window()),
                alibi: false,
            })
            .collect(),
        Some(LongConfig::JinaBert(_)) => vec![
            Kind {
                window: None,
                alibi: true
            };
            n
        ],
        _ => vec![
            Kind {
                window: None,
                alibi: false
            };
            n
        ],
    })
}

/// Keys all queries of a `t`-token sequence see, summed.
fn keys_seen(t: usize, window: Option<usize>) -> f64 {
    match window {
        None => (t * t) as f64,
        Some(w) => (0..t)
            .map(|i| (i + w + 1).min(t) - i.saturating_sub(w))
            .sum::<usize>() as f64,
    }
}

/// (dense, attention) GFLOP of one `t`-token input.
fn gflop(cfg: &BertConfig, kinds: &[Kind], t: usize) -> (f64, f64) {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    // Q, K, V, output, the gated input (2I) and the FFN output.
    let per_token = 2.0 * (3.0 * h * h + h * h + 2.0 * i * h + i * h);
    let dense = per_token * t as f64 * kinds.len() as f64;
    let attn: f64 = kinds.iter().map(|k| 4.0 * h * keys_seen(t, k.window)).sum();
    (dense / 1e9, attn / 1e9)
}

/// Token ids of a `t`-token input: [CLS]-like 101, pseudo-random ids, [SEP]-like 102.
fn input(t: usize, vocab: usize) -> Encoded {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ t as u64;
    let hi = vocab.min(30_000) as u64;
    let ids: Vec<u32> = (0..t)
        .map(|p| match p {
            0 => 101,
            _ if p + 1 == t => 102,
            _ => {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (1000 + s % (hi - 1000)) as u32
            }
        })
        .collect();
    Encoded {
        type_ids: vec![0; t],
        ids,
        truncated: false,
    }
}

/// The attention kernel alone on random Q, K, V of `t` tokens for every layer, in seconds.
fn attention_seconds(cfg: &BertConfig, kinds: &[Kind], t: usize, dtype: Dtype) -> f64 {
    let h = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let qkv: Vec<f32> = (0..t * 3 * h)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut ctx = vec![0f32; t * h];
    let start = Instant::now();
    for k in kinds {
        let spec = AttentionSpec {
            heads,
            head_dim: h / heads,
            scale: 1.0 / ((h / heads) as f32).sqrt(),
            alibi: k.alibi.then(|| alibi_slopes(heads)),
            window: k.window,
            // As the encoder runs it: bf16 products with --dtype bf16, else f32.
            bf16: match dtype {
                Dtype::Bf16 => Bf16Kernel::select().ok(),
                _ => None,
            },
        };
        attend_packed(&qkv, &[0, t], &spec, &mut ctx).expect("attention");
    }
    start.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    fetch_ml::alloc::keep_freed_memory();
    let threads = fetch_ml::threads::configure(a.threads)?;
    let assets = ModelAssets::load(&ModelRef::new(a.model.to_str().unwrap()), None)?;
    let cfg = assets.config.clone();
    let kinds = kinds(&cfg)?;
    if a.attention_only {
        // A warm-up (the thread pool's start, first touches), as the model's pass has.
        attention_seconds(&cfg, &kinds, 128, a.dtype);
        for &t in &a.lengths {
            let attn = (0..a.repeat.max(1))
                .map(|_| attention_seconds(&cfg, &kinds, t, a.dtype))
                .fold(f64::INFINITY, f64::min);
            let (_, attention) = gflop(&cfg, &kinds, t);
            let line = serde_json::json!({
                "tool": "fetch-ml",
                "dtype": a.dtype.name(),
                "threads": threads,
                "tokens": t,
                "attention_seconds": attn,
                "attention_gflops": attention / attn,
            });
            println!("{line}");
        }
        return Ok(());
    }
    let encoder = assets.inference_encoder(a.dtype, &Device::Cpu)?;
    let mut ws = Workspace::default();
    let warm = input(128, cfg.vocab_size);
    encoder.pooled_packed(&[&warm], Pooling::Mean, &mut ws)?;
    for &t in &a.lengths {
        let x = input(t, cfg.vocab_size);
        let mut best = f64::INFINITY;
        for _ in 0..a.repeat.max(1) {
            let start = Instant::now();
            let v = encoder.pooled_packed(&[&x], Pooling::Mean, &mut ws)?;
            best = best.min(start.elapsed().as_secs_f64());
            assert!(v[0].iter().all(|x| x.is_finite()));
        }
        let attn = (0..a.repeat.max(1))
            .map(|_| attention_seconds(&cfg, &kinds, t, a.dtype))
            .fold(f64::INFINITY, f64::min);
        let (dense, attention) = gflop(&cfg, &kinds, t);
        let line = serde_json::json!({
            "tool": "fetch-ml",
            "model": a.model.file_name().map(|n| n.to_string_lossy().to_string()),
            "arch": cfg.arch.name(),
            "dtype": a.dtype.name(),
            "kernel": encoder.kernel_name(),
            "threads": threads,
            "tokens": t,
            "seconds": best,
            "ms_per_1k_tokens": 1e6 * best / t as f64,
            "gflop_dense": dense,
            "gflop_attention": attention,
            "gflops": (dense + attention) / best,
            "attention_seconds": attn,
            "attention_gflops": attention / attn,
        });
        println!("{line}");
    }
    Ok(())
}
