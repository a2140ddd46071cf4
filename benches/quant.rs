//! Quantized inference benchmark: all-MiniLM-L6-v2 forward + mean pooling in f32, bf16 and
//! int8 (every int8 kernel this CPU runs), then the matrix-product rate of each dtype at the
//! encoder's shapes and the instruction peak of each dtype, so each run can be stated as a
//! share of its peak. Run by hand:
//!
//!     cargo bench --bench quant [-- SENTENCES_FILE [BATCH]]
//!
//! Default sentences: bench/data/sentences-2k.txt (bench/make-sentences.py) if present, else
//! the repository's multitask texts plus each consecutive pair of them as a passage.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::fast::{FastEncoder, PackedEncoder, Workspace};
use fetch_ml::model::pooling::Pooling;
use fetch_ml::model::quant::{
    Activation, Bf16Kernel, Bf16Linear, Dtype, Int8Kernel, Int8Linear, Scratch,
};
use fetch_ml::tokenize::{length_sorted_batches, Encoded};
use kernels::matmul::{matmul, parallelism, MatMut, MatRef};

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn texts(root: &Path, file: Option<std::path::PathBuf>) -> anyhow::Result<(Vec<String>, String)> {
    let file = file.unwrap_or_else(|| root.join("bench/data/sentences-2k.txt"));
    if file.is_file() {
        let t = std::fs::read_to_string(&file)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        return Ok((t, file.display().to_string()));
    }
    let mut m = Vec::new();
    for f in ["data/multitask/train.jsonl", "data/multitask/eval.jsonl"] {
        for line in std::fs::read_to_string(root.join(f))?.lines() {
            if !line.trim().is_empty() {
                let v: serde_json::Value = serde_json::from_str(line)?;
                m.push(v["text"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    let pairs: Vec<String> = m.windows(2).map(|w| format!("{} {}", w[0], w[1])).collect();
    m.extend(pairs);
    Ok((m, "data/multitask texts + consecutive pairs".into()))
}

/// CPU seconds (user + system) of the whole process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage struct into `u`.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Seconds of `f`: (wall, CPU seconds / threads). On a machine shared with other work the
/// second is the fairer figure: it counts only this process's time on the cores.
fn timed(mut f: impl FnMut()) -> (f64, f64) {
    let threads = rayon::current_num_threads() as f64;
    let (t, c) = (Instant::now(), cpu_seconds());
    f();
    (t.elapsed().as_secs_f64(), (cpu_seconds() - c) / threads)
}

/// Best of `reps` runs of `f`, in seconds: the smaller of wall time and CPU time per thread.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let (w, c) = timed(&mut f);
            w.min(c)
        })
        .fold(f64::MAX, f64::min)
}

/// Register-only loops (12 independent accumulators) on every thread: the arithmetic peak in
/// G multiply-adds x 2 per second, per dtype.
#[cfg(target_arch = "x86_64")]
mod peak {
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    const ITERS: usize = 20_000_000;

    #[target_feature(enable = "avx512f")]
    unsafe fn fma() -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let (a, b) = (_mm512_set1_ps(1.0001), _mm512_set1_ps(0.9999));
        let (a, b) = std::hint::black_box((a, b));
        for _ in 0..ITERS {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(a, b, *v);
            }
        }
        acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dpbf16() -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f80));
        let a = std::hint::black_box(a);
        for _ in 0..ITERS {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, a);
            }
        }
        acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dpbusd() -> i32 {
        let mut acc = [_mm512_set1_epi32(0); 12];
        let a = _mm512_set1_epi8(1);
        let a = std::hint::black_box(a);
        for _ in 0..ITERS {
            for v in acc.iter_mut() {
                *v = _mm512_dpbusd_epi32(*v, a, a);
            }
        }
        acc.iter().map(|v| _mm512_reduce_add_epi32(*v)).sum()
    }

    /// AVX2 (no AVX-512): 256-bit FMAs, the f32 peak and that of bf16 widened to f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma256() -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let (a, b) = std::hint::black_box((_mm256_set1_ps(1.0001), _mm256_set1_ps(0.9999)));
        for _ in 0..ITERS {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(a, b, *v);
            }
        }
        // Every accumulator feeds the result, so that none of the 12 chains is dead code.
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), sum);
        out.iter().sum()
    }

    /// AVX2 int8 without VNNI: `vpmaddubsw` + `vpmaddwd` (ones) + `vpaddd` per 32 multiply-adds,
    /// the sequence of the AVX2 kernel and of ONNX Runtime's. Each accumulator also feeds its
    /// own `vpmaddubsw`, so that no product is loop-invariant.
    #[target_feature(enable = "avx2")]
    unsafe fn maddubs256() -> i32 {
        let mut acc = [_mm256_set1_epi32(1); 12];
        let (b, ones) = std::hint::black_box((_mm256_set1_epi8(3), _mm256_set1_epi16(1)));
        for _ in 0..ITERS {
            for v in acc.iter_mut() {
                *v = _mm256_add_epi32(*v, _mm256_madd_epi16(_mm256_maddubs_epi16(*v, b), ones));
            }
        }
        acc.iter().map(|v| _mm256_extract_epi32::<0>(*v)).sum()
    }

    /// (f32, bf16, int8) peaks in G ops/s (a multiply-add counts 2) with the instruction
    /// measured, `None` where unsupported.
    pub fn measure() -> [Option<(&'static str, f64)>; 3] {
        let avx512 = is_x86_feature_detected!("avx512f");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let threads = rayon::current_num_threads();
        let run = |f: &(dyn Fn() + Sync), ops_per_iter: f64| {
            let secs = super::best(3, || (0..threads).into_par_iter().for_each(|_| f()));
            ops_per_iter * ITERS as f64 * threads as f64 / secs / 1e9
        };
        let fma256p = || {
            // SAFETY: the CPU has avx2 and fma.
            let g = run(
                &|| {
                    std::hint::black_box(unsafe { fma256() });
                },
                12.0 * 8.0 * 2.0,
            );
            ("vfmadd ymm", g)
        };
        let f32p = if avx512 {
            // SAFETY: the CPU has avx512f.
            let g = run(
                &|| {
                    std::hint::black_box(unsafe { fma() });
                },
                12.0 * 16.0 * 2.0,
            );
            Some(("vfmadd zmm", g))
        } else {
            avx2.then(fma256p)
        };
        let bf16p = if avx512 && is_x86_feature_detected!("avx512bf16") {
            // SAFETY: the CPU has avx512f and avx512bf16.
            let g = run(
                &|| {
                    std::hint::black_box(unsafe { dpbf16() });
                },
                12.0 * 32.0 * 2.0,
            );
            Some(("vdpbf16ps", g))
        } else {
            // Without BF16 instructions, bf16 runs as widened f32 FMAs (avx2bf16).
            avx2.then(fma256p)
        };
        let i8p = if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
        {
            // SAFETY: the CPU has avx512f, avx512bw and avx512vnni.
            let g = run(
                &|| {
                    std::hint::black_box(unsafe { dpbusd() });
                },
                12.0 * 64.0 * 2.0,
            );
            Some(("vpdpbusd zmm", g))
        } else if avx2 {
            // SAFETY: the CPU has avx2.
            let g = run(
                &|| {
                    std::hint::black_box(unsafe { maddubs256() });
                },
                12.0 * 32.0 * 2.0,
            );
            Some(("vpmaddubsw ymm", g))
        } else {
            None
        };
        [f32p, bf16p, i8p]
    }
}

fn main() -> anyhow::Result<()> {
    fetch_ml::alloc::keep_freed_memory();
    fetch_ml::threads::configure(None)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/all-MiniLM-L6-v2");
    anyhow::ensure!(model.is_dir(), "run scripts/fetch-minilm.sh first");
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let file = args.next().map(std::path::PathBuf::from);
    let batch: usize = args.next().and_then(|b| b.parse().ok()).unwrap_or(32);
    let (texts, source) = texts(root, file)?;
    let a = ModelAssets::load(&ModelRef::new(model.to_str().unwrap()), None)?;
    let encoded = a.tokenizer.encode(&texts)?;
    let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();
    let batches = length_sorted_batches(
        &encoded.iter().map(|e| e.ids.len()).collect::<Vec<_>>(),
        batch,
        None,
    );
    let threads = rayon::current_num_threads();
    println!(
        "CPU: {} ({threads} threads); times: the smaller of wall and CPU seconds per thread",
        cpu_model()
    );
    println!(
        "all-MiniLM-L6-v2 forward + mean pooling: {} sentences ({tokens} tokens, mean {:.1}) from {source}, batch {batch}",
        texts.len(),
        tokens as f64 / texts.len() as f64
    );
    let cfg = &a.config;
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    // Dense-layer work per token (attention scores excluded): QKV, output, FFN in and out.
    let dense_flops = 2.0 * (4 * h * h + 2 * h * inter) as f64 * cfg.num_hidden_layers as f64;

    let mut runs: Vec<(String, Dtype, Int8Kernel, Bf16Kernel)> = vec![(
        "f32 (gemm crate)".into(),
        Dtype::F32,
        Int8Kernel::best(),
        Bf16Kernel::best(),
    )];
    // The portable kernels take minutes on the whole set: only with QUANT_BENCH_PORTABLE=1.
    let portable = std::env::var_os("QUANT_BENCH_PORTABLE").is_some();
    for k in Bf16Kernel::all().rev().filter(|k| k.supported()) {
        if k != Bf16Kernel::portable() || portable {
            runs.push((
                format!("bf16 {}", k.name()),
                Dtype::Bf16,
                Int8Kernel::best(),
                k,
            ));
        }
    }
    for k in Int8Kernel::all().rev().filter(|k| k.supported()) {
        if k != Int8Kernel::portable() || portable {
            runs.push((
                format!("int8 {}", k.name()),
                Dtype::Int8,
                k,
                Bf16Kernel::best(),
            ));
        }
    }
    if !portable {
        println!("(portable kernels skipped; QUANT_BENCH_PORTABLE=1 includes them)");
    }
    let mut encoder_rates = Vec::new();
    for (name, dtype, k8, k16) in &runs {
        let fast = FastEncoder::with_kernels(a.frozen_encoder(&Device::Cpu)?, *dtype, *k8, *k16)?;
        let mut ws = Workspace::default();
        let mut pass = || -> anyhow::Result<()> {
            for idx in &batches {
                let items: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
                std::hint::black_box(fast.pooled_packed(&items, Pooling::Mean, &mut ws)?);
            }
            Ok(())
        };
        pass()?; // warm-up
        let slow = *k8 == Int8Kernel::portable() && *dtype == Dtype::Int8
            || *k16 == Bf16Kernel::portable() && *dtype == Dtype::Bf16;
        let reps = if slow { 1 } else { 3 };
        let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            let mut r = Ok(());
            let (w, c) = timed(|| r = pass());
            r?;
            (wall, cpu) = (wall.min(w), cpu.min(c));
        }
        let secs = wall.min(cpu);
        let gflops = dense_flops * tokens as f64 / secs / 1e9;
        println!(
            "{name:<22} wall {wall:>6.2} s, CPU/thread {cpu:>6.2} s  {:>7.1} sentences/s  dense layers {gflops:>6.1} G ops/s",
            texts.len() as f64 / secs
        );
        encoder_rates.push((name.clone(), *dtype, gflops));
    }

    // Matrix products at the encoder's shapes, 2048 tokens.
    println!("\nmatrix products, m = 2048 tokens (G ops/s; a multiply-add counts 2):");
    let m = 2048;
    let shapes = [
        (3 * h, h, "QKV"),
        (h, h, "attn out"),
        (inter, h, "FFN in"),
        (h, inter, "FFN out"),
    ];
    let mut gemm_rates = [0f64; 3];
    for (n, k, label) in shapes {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104_729) % 1000) as f32 / 5000.0 - 0.1)
            .collect();
        let bias = vec![0.1f32; n];
        let mut dst = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let f32s = best(5, || {
            // x is m x k, w is n x k, dst is m x n.
            let (lhs, rhs) = (MatRef::rows(&x, m, k, k), MatRef::transposed(&w, k, n, k));
            let mut out = MatMut::rows(&mut dst, m, n, n);
            matmul(&mut out, false, lhs, rhs, 1.0, parallelism(m * n * k))
        });
        let mut s = Scratch::default();
        let b16 = Bf16Linear::new(&w, &bias, n, k)?;
        let bk = Bf16Kernel::best();
        let bf16s = best(5, || {
            b16.forward(bk, &x, m, &mut dst, n, 0, Activation::None, &mut s)
                .unwrap()
        });
        let q8 = Int8Linear::new(&w, &bias, n, k)?;
        let ik = Int8Kernel::best();
        let i8s = best(5, || {
            q8.forward(ik, &x, m, &mut dst, n, 0, Activation::None, &mut s)
                .unwrap()
        });
        let r = [flops / f32s / 1e9, flops / bf16s / 1e9, flops / i8s / 1e9];
        println!(
            "  {label:<9} [{m} x {k}] x [{k} x {n}]: f32 {:>6.1}  bf16 ({}) {:>6.1}  int8 ({}) {:>6.1}",
            r[0], bk.name(), r[1], ik.name(), r[2]
        );
        for i in 0..3 {
            gemm_rates[i] = gemm_rates[i].max(r[i]);
        }
    }
    #[cfg(target_arch = "x86_64")]
    let peaks = peak::measure();
    #[cfg(not(target_arch = "x86_64"))]
    let peaks = [None; 3];
    println!("\ninstruction peak ({threads} threads, register-only loops, G ops/s):");
    for (i, dtype) in ["f32", "bf16", "int8"].iter().enumerate() {
        match peaks[i] {
            Some((insn, p)) => println!(
                "  {:<20} {p:>7.1}   best layer product above: {:.1} = {:.0}% of it",
                format!("{dtype} {insn}"),
                gemm_rates[i],
                100.0 * gemm_rates[i] / p
            ),
            None => println!("  {dtype:<20} not supported here"),
        }
    }
    println!("\nencoder dense-layer rate as a share of the instruction peak and of the best product rate:");
    for (name, dtype, g) in &encoder_rates {
        let i = match dtype {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
            Dtype::Int8 => 2,
        };
        let peak = peaks[i].map_or("n/a".to_string(), |(_, p)| format!("{:.0}%", 100.0 * g / p));
        println!(
            "  {name:<22} {g:>6.1} G ops/s  {peak:>5} of peak  {:.0}% of the product rate",
            100.0 * g / gemm_rates[i]
        );
    }
    Ok(())
}
