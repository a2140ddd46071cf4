//! The bf16 kernels against an exact (f64) product of the bf16-rounded operands, within the
//! error bound of f32 accumulation, and bf16 rounding itself.

use rand::{Rng, SeedableRng};

use super::{supported, SHAPES};
use crate::quant::{
    bf16_rows, from_bf16, product, to_bf16, AlignedVec, Bf16, Bf16Kernel, PackedBf16, Rows,
};

pub(super) fn bf16_kernels_to_test() -> Vec<Bf16Kernel> {
    supported::<Bf16>()
}

#[test]
fn bf16_kernels_match_an_f64_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for &(m, n, k) in &SHAPES {
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.2..0.2)).collect();
        let b = PackedBf16::pack(&w, n, k).unwrap();
        let mut a16 = AlignedVec::default();
        bf16_rows(&x, m, k, b.kp, &mut a16);
        let rows = Rows {
            a: &a16[..m * b.kp],
            rows: m,
            kp: b.kp,
        };
        let mut results = Vec::new();
        for kernel in bf16_kernels_to_test() {
            let got = product(kernel, &rows, &b).unwrap();
            assert_bf16_product(kernel.name(), &x, &w, &got, (m, n, k));
            results.push((kernel, got));
        }
        let portable = &results[0].1;
        for (kernel, got) in &results[1..] {
            let same = portable
                .iter()
                .zip(got)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            eprintln!(
                "bf16 m={m} n={n} k={k}: portable == {} bitwise on {same}/{} values",
                kernel.name(),
                got.len()
            );
            // FMA rounds `acc + a * b` once, as the portable `acc += a * b` does when the
            // bf16 product is exact (always, away from f32 underflow and overflow): the same bits.
            if kernel.name() == "avx2bf16" {
                assert_eq!(
                    same,
                    got.len(),
                    "avx2bf16 differs from portable at {m}x{n}x{k}"
                );
            }
        }
    }
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(to_bf16(1.0), 0x3f80);
    // 1 + 2^-8 is half way between 1 and the next bf16: ties to even (1.0).
    assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    // 1 + 3 * 2^-8 is half way between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up to even.
    assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
}

/// Checks `got` `[m, n]` against the exact product of the bf16-rounded `x` `[m, k]` and `w`
/// `[n, k]`, within the error bound of k roundings of the f32 accumulator.
pub(super) fn assert_bf16_product(
    name: &str,
    x: &[f32],
    w: &[f32],
    got: &[f32],
    (m, n, k): (usize, usize, usize),
) {
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag) = (0f64, 0f64);
            for t in 0..k {
                let p = from_bf16(to_bf16(x[i * k + t])) as f64
                    * from_bf16(to_bf16(w[j * k + t])) as f64;
                s += p;
                mag += p.abs();
            }
            let tol = mag * k as f64 * f32::EPSILON as f64 + 1e-30;
            let g = got[i * n + j] as f64;
            assert!(
                (g - s).abs() <= tol,
                "{name} m={m} n={n} k={k} ({i},{j}): {g} vs {s}"
            );
        }
    }
}
