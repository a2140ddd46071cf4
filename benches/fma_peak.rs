//! This CPU's f32 multiply-add peak: each thread runs independent chains of AVX-512 (24) or,
//! without it, AVX2 (12) FMAs on registers only, no memory, for about `--seconds`; the GFLOP/s
//! of all threads together (2 per multiply-add). No product of real data can beat it: BENCHMARKS.md
//! ("Long-context encoders") holds the f32 targets against it. (`--bench quant` measures
//! register peaks per dtype too, with 12 accumulators and intrinsics; this one is the f32 peak
//! alone, in assembly, so that no compiler choice of registers can lower it.) Run by hand:
//!
//!     cargo bench --bench fma_peak -- [--threads 2] [--seconds 3]

use std::time::{Duration, Instant};

/// Rounds per call of a kernel (one FMA per chain each).
const STEPS: usize = 1 << 20;

#[cfg(target_arch = "x86_64")]
mod chains {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::STEPS;

    /// `STEPS` rounds of one FMA on each of 24 zmm registers (24 chains hide the latency of
    /// two FMA units), from 0, adding 1.0001 x 0.9999 (ordinary values, as in a product).
    ///
    /// # Safety
    /// The CPU has avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512() {
        let (a, b) = (_mm512_set1_ps(1.0001), _mm512_set1_ps(0.9999));
        // SAFETY: only the registers declared below are written; no memory is touched.
        unsafe {
            asm!(
                "vpxord zmm0, zmm0, zmm0",
                "vpxord zmm1, zmm1, zmm1",
                "vpxord zmm2, zmm2, zmm2",
                "vpxord zmm3, zmm3, zmm3",
                "vpxord zmm4, zmm4, zmm4",
                "vpxord zmm5, zmm5, zmm5",
                "vpxord zmm6, zmm6, zmm6",
                "vpxord zmm7, zmm7, zmm7",
                "vpxord zmm8, zmm8, zmm8",
                "vpxord zmm9, zmm9, zmm9",
                "vpxord zmm10, zmm10, zmm10",
                "vpxord zmm11, zmm11, zmm11",
                "vpxord zmm12, zmm12, zmm12",
                "vpxord zmm13, zmm13, zmm13",
                "vpxord zmm14, zmm14, zmm14",
                "vpxord zmm15, zmm15, zmm15",
                "vpxord zmm16, zmm16, zmm16",
                "vpxord zmm17, zmm17, zmm17",
                "vpxord zmm18, zmm18, zmm18",
                "vpxord zmm19, zmm19, zmm19",
                "vpxord zmm20, zmm20, zmm20",
                "vpxord zmm21, zmm21, zmm21",
                "vpxord zmm22, zmm22, zmm22",
                "vpxord zmm23, zmm23, zmm23",
                "2:",
                "vfmadd231ps zmm0, zmm30, zmm31",
                "vfmadd231ps zmm1, zmm30, zmm31",
                "vfmadd231ps zmm2, zmm30, zmm31",
                "vfmadd231ps zmm3, zmm30, zmm31",
                "vfmadd231ps zmm4, zmm30, zmm31",
                "vfmadd231ps zmm5, zmm30, zmm31",
                "vfmadd231ps zmm6, zmm30, zmm31",
                "vfmadd231ps zmm7, zmm30, zmm31",
                "vfmadd231ps zmm8, zmm30, zmm31",
                "vfmadd231ps zmm9, zmm30, zmm31",
                "vfmadd231ps zmm10, zmm30, zmm31",
                "vfmadd231ps zmm11, zmm30, zmm31",
                "vfmadd231ps zmm12, zmm30, zmm31",
                "vfmadd231ps zmm13, zmm30, zmm31",
                "vfmadd231ps zmm14, zmm30, zmm31",
                "vfmadd231ps zmm15, zmm30, zmm31",
                "vfmadd231ps zmm16, zmm30, zmm31",
                "vfmadd231ps zmm17, zmm30, zmm31",
                "vfmadd231ps zmm18, zmm30, zmm31",
                "vfmadd231ps zmm19, zmm30, zmm31",
                "vfmadd231ps zmm20, zmm30, zmm31",
                "vfmadd231ps zmm21, zmm30, zmm31",
                "vfmadd231ps zmm22, zmm30, zmm31",
                "vfmadd231ps zmm23, zmm30, zmm31",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) STEPS => _,
                in("zmm30") a,
                in("zmm31") b,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _,
                out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
                out("zmm10") _, out("zmm11") _,
                out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                out("zmm16") _, out("zmm17") _,
                out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _,
                out("zmm22") _, out("zmm23") _,
                options(nomem, nostack),
            );
        }
    }

    /// As [`avx512`] on the 16 ymm registers of AVX2: 12 chains.
    ///
    /// # Safety
    /// The CPU has avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2() {
        let (a, b) = (_mm256_set1_ps(1.0001), _mm256_set1_ps(0.9999));
        // SAFETY: only the registers declared below are written; no memory is touched.
        unsafe {
            asm!(
                "vxorps ymm0, ymm0, ymm0",
                "vxorps ymm1, ymm1, ymm1",
                "vxorps ymm2, ymm2, ymm2",
                "vxorps ymm3, ymm3, ymm3",
                "vxorps ymm4, ymm4, ymm4",
                "vxorps ymm5, ymm5, ymm5",
                "vxorps ymm6, ymm6, ymm6",
                "vxorps ymm7, ymm7, ymm7",
                "vxorps ymm8, ymm8, ymm8",
                "vxorps ymm9, ymm9, ymm9",
                "vxorps ymm10, ymm10, ymm10",
                "vxorps ymm11, ymm11, ymm11",
                "2:",
                "vfmadd231ps ymm0, ymm14, ymm15",
                "vfmadd231ps ymm1, ymm14, ymm15",
                "vfmadd231ps ymm2, ymm14, ymm15",
                "vfmadd231ps ymm3, ymm14, ymm15",
                "vfmadd231ps ymm4, ymm14, ymm15",
                "vfmadd231ps ymm5, ymm14, ymm15",
                "vfmadd231ps ymm6, ymm14, ymm15",
                "vfmadd231ps ymm7, ymm14, ymm15",
                "vfmadd231ps ymm8, ymm14, ymm15",
                "vfmadd231ps ymm9, ymm14, ymm15",
                "vfmadd231ps ymm10, ymm14, ymm15",
                "vfmadd231ps ymm11, ymm14, ymm15",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) STEPS => _,
                in("ymm14") a,
                in("ymm15") b,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                out("ymm4") _, out("ymm5") _,
                out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _,
                out("ymm10") _, out("ymm11") _,
                options(nomem, nostack),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn main() -> anyhow::Result<()> {
    let (mut threads, mut seconds) = (2usize, 3.0f64);
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--threads" => threads = v.parse()?,
            "--seconds" => seconds = v.parse()?,
            _ => anyhow::bail!("unexpected argument {a}"),
        }
    }
    let has = |f: &str| match f {
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        _ => std::arch::is_x86_feature_detected!("fma"),
    };
    // (lanes, chains, kernel)
    let (lanes, chains, kernel): (usize, usize, unsafe fn()) = if has("avx512f") {
        (16, 24, chains::avx512)
    } else if has("avx2") && has("fma") {
        (8, 12, chains::avx2)
    } else {
        anyhow::bail!("this CPU has neither AVX-512 nor AVX2 with FMA")
    };
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let calls: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut n = 0usize;
                    while start.elapsed() < budget {
                        // SAFETY: the features this kernel needs were detected above.
                        unsafe { kernel() };
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let flop = calls.iter().sum::<usize>() as f64 * (chains * STEPS * lanes * 2) as f64;
    let line = serde_json::json!({
        "threads": threads,
        "lanes": lanes,
        "seconds": secs,
        "gflops": flop / secs / 1e9,
    });
    println!("{line}");
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("fma_peak: x86-64 only");
}
