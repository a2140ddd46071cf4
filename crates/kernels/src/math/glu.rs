//! Gated linear units: `out = gate(a) * b`, row by row, for the gated feed-forward layers of
//! the long-context encoders (GeGLU in ModernBERT and JinaBERT, SwiGLU in NomicBERT).
//!
//! The first product of a gated layer gives `[rows, 2n]`, the gated half first; [`glu_rows`]
//! turns it into `[rows, n]` for the second product. It runs on a chunk of rows that the
//! product has just written (still in cache); the GELU is the same vector code as the FFN
//! epilogue's (AVX-512 or AVX2 when the CPU has them), SiLU and the sigmoid the scalar
//! arithmetic of [`super::exp`] compiled for AVX2 where the CPU has it. A row's result
//! depends on that row alone.

use super::exp;
use crate::cpu::multiversion;
#[cfg(target_arch = "x86_64")]
use crate::cpu::{level, Level};

/// The gate of a gated linear unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glu {
    /// GELU (erf form): GeGLU.
    Gelu,
    /// SiLU, `x * sigmoid(x)`: SwiGLU.
    Silu,
    /// ReLU: ReGLU.
    Relu,
    /// The sigmoid: GLU.
    Sigmoid,
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `1 / (1 + exp(-x))`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

multiversion! {
    /// `out[j] = silu(a[j]) * b[j]`.
    fn silu_mul(a: &[f32], b: &[f32], out: &mut [f32]) for [Avx2 => "avx2,fma"] {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = silu(a) * b;
        }
    }
}

multiversion! {
    /// `out[j] = sigmoid(a[j]) * b[j]`.
    fn sigmoid_mul(a: &[f32], b: &[f32], out: &mut [f32]) for [Avx2 => "avx2,fma"] {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = sigmoid(a) * b;
        }
    }
}

multiversion! {
    /// `out[j] *= b[j]`.
    fn mul_inplace(out: &mut [f32], b: &[f32]) for [Avx2 => "avx2,fma"] {
        for (o, &b) in out.iter_mut().zip(b) {
            *o *= b;
        }
    }
}

/// GELU in place with the fastest vector code the CPU has (the FFN epilogue's).
fn gelu_inplace_fast(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: level Avx512 means the CPU has avx512f.
        Level::Avx512 => return unsafe { super::avx512::gelu_avx512(x) },
        // SAFETY: level Avx2 means the CPU has avx2 and fma.
        Level::Avx2 => return unsafe { super::avx2::gelu_avx2(x) },
        Level::Portable => {}
    }
    super::gelu_inplace(x)
}

/// One row: `out[j] = gate(a[j]) * b[j]`. Panics unless `a` and `b` are as long as `out`.
pub fn glu_row(a: &[f32], b: &[f32], out: &mut [f32], gate: Glu) {
    let n = out.len();
    assert!(
        a.len() == n && b.len() == n,
        "glu: a row of {n} outputs from {} gate and {} value inputs",
        a.len(),
        b.len()
    );
    match gate {
        Glu::Gelu => {
            out.copy_from_slice(a);
            gelu_inplace_fast(out);
            mul_inplace(out, b);
        }
        Glu::Relu => {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a.max(0.0) * b;
            }
        }
        Glu::Silu => silu_mul(a, b, out),
        Glu::Sigmoid => sigmoid_mul(a, b, out),
    }
}

/// Rows of a gated layer's first product, `x` `[rows, 2n]` (each row the `n` gate inputs,
/// then the `n` values), into `out` `[rows, n]`: `gate(x[r, j]) * x[r, n + j]`. Panics unless
/// `x` holds twice as many values as `out` and `n` divides `out`.
pub fn glu_rows(x: &[f32], out: &mut [f32], n: usize, gate: Glu) {
    assert!(
        n > 0 && out.len().is_multiple_of(n) && x.len() == 2 * out.len(),
        "glu: {} inputs for {} outputs in rows of {n}",
        x.len(),
        out.len()
    );
    for (row, o) in x.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
        let (a, b) = row.split_at(n);
        glu_row(a, b, o, gate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gelu64(x: f64) -> f64 {
        // erf by its series is slow but exact enough for |x| <= 6.
        let z = x / std::f64::consts::SQRT_2;
        let mut term = z;
        let mut sum = z;
        for n in 1..200 {
            term *= -z * z / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        0.5 * x * (1.0 + 2.0 / std::f64::consts::PI.sqrt() * sum)
    }

    /// Every gate against f64 maths, on rows whose lengths exercise the vector tails.
    #[test]
    fn gates_match_f64_maths() {
        for n in [1, 7, 16, 33] {
            let rows = 3;
            let x: Vec<f32> = (0..rows * 2 * n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
                .collect();
            for gate in [Glu::Gelu, Glu::Silu, Glu::Relu, Glu::Sigmoid] {
                let mut out = vec![0f32; rows * n];
                glu_rows(&x, &mut out, n, gate);
                for r in 0..rows {
                    for j in 0..n {
                        let (a, b) = (x[r * 2 * n + j] as f64, x[r * 2 * n + n + j] as f64);
                        let g = match gate {
                            Glu::Gelu => gelu64(a),
                            Glu::Silu => a / (1.0 + (-a).exp()),
                            Glu::Relu => a.max(0.0),
                            Glu::Sigmoid => 1.0 / (1.0 + (-a).exp()),
                        };
                        let want = g * b;
                        let got = out[r * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 2e-6 * (1.0 + want.abs()),
                            "{gate:?} n={n}: {got} vs {want} at a={a}, b={b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "glu")]
    fn mismatched_sizes_panic() {
        glu_rows(&[0.0; 6], &mut [0.0; 2], 2, Glu::Gelu);
    }
}
