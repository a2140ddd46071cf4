//! Kernel exactness: every int8 kernel against a plain i32 matrix product (exact equality), the
//! bf16 kernels against an f64 reference, and the layers' batch invariance.

use super::bf16::bf16_rows;
use super::epilogue::apply_act;
use super::quantize;
use super::*;
use crate::cpu::{self, Level};
use rand::{Rng, SeedableRng};

mod amx;
mod bf16;
mod outliers;
use bf16::bf16_kernels_to_test;

fn reference_i32(a: &[u8], q: &[i8], m: usize, n: usize, k: usize) -> Vec<i32> {
    let mut c = vec![0i32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0i64;
            for t in 0..k {
                s += a[i * k + t] as i64 * q[j * k + t] as i64;
            }
            c[i * n + j] = i32::try_from(s).expect("reference fits i32");
        }
    }
    c
}

/// Pads rows of `k` bytes to `kp` with `pad`.
fn pad_rows(a: &[u8], m: usize, k: usize, pad: u8) -> (Vec<u8>, usize) {
    let kp = k.div_ceil(4) * 4;
    let mut out = vec![pad; m * kp];
    for i in 0..m {
        out[i * kp..i * kp + k].copy_from_slice(&a[i * k..(i + 1) * k]);
    }
    (out, kp)
}

fn run_int8(kernel: Int8Kernel, a: &[u8], q: &[i8], m: usize, n: usize, k: usize) -> Vec<i32> {
    // Padding bytes are arbitrary (here 255): the zero weight padding must cancel them.
    let (ap, kp) = pad_rows(a, m, k, 255);
    let b = PackedI8::pack(q, n, k).unwrap();
    let rows = Rows {
        a: &ap,
        rows: m,
        kp,
    };
    product(kernel, &rows, &b).unwrap()
}

/// (m, n, k): m = 1, odd sizes, k and n not multiples of the vector widths, several tiles and
/// parallel blocks (m > 48, n > 64).
const SHAPES: [(usize, usize, usize); 13] = [
    (1, 1, 1),
    (1, 16, 4),
    (1, 384, 384),
    (2, 17, 5),
    (3, 15, 3),
    (5, 33, 13),
    (6, 64, 64),
    (7, 65, 67),
    (13, 100, 129),
    (49, 130, 255),
    (61, 200, 384),
    (97, 81, 1536),
    (9, 40, 1030),
];

/// Under `CI`, an x86-64 machine without AVX2 is a failure, not a skip: the AVX2 kernels
/// (the fallback of every CPU without VNNI or BF16) must not go untested.
fn require_avx2_in_ci() {
    if cfg!(target_arch = "x86_64") && std::env::var_os("CI").is_some() {
        let int8 = Int8Kernel::named("avx2").is_some_and(|k| k.supported());
        let bf16 = Bf16Kernel::named("avx2bf16").is_some_and(|k| k.supported());
        assert!(int8 && bf16, "CI machines have AVX2 and FMA");
    }
}

/// The kernels of a precision this CPU runs, each one whose instructions /proc/cpuinfo lists
/// among them: a kernel the CPU has that its probe refused would otherwise go untested.
fn supported<P: Precision>() -> Vec<Kernel<P>> {
    require_avx2_in_ci();
    Kernel::<P>::all()
        .filter(|k| {
            let ok = k.supported();
            assert!(
                ok || !k.listed_in_cpuinfo(),
                "/proc/cpuinfo lists what the {} kernel needs, but it is not usable here: it \
                 would go untested",
                k.name()
            );
            if !ok {
                eprintln!("SKIPPED: the {} kernel (this CPU lacks it)", k.name());
            }
            ok
        })
        .collect()
}

fn kernels_to_test() -> Vec<Int8Kernel> {
    supported::<Int8>()
}

#[test]
fn int8_kernels_are_exact_on_random_inputs() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for kernel in kernels_to_test() {
        for &(m, n, k) in &SHAPES {
            let a: Vec<u8> = (0..m * k).map(|_| rng.random()).collect();
            let q: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127)).collect();
            let got = run_int8(kernel, &a, &q, m, n, k);
            assert_eq!(
                got,
                reference_i32(&a, &q, m, n, k),
                "{} kernel, m={m} n={n} k={k}",
                kernel.name()
            );
        }
        eprintln!("{}: exact on {} random shapes", kernel.name(), SHAPES.len());
    }
}

#[test]
fn int8_kernels_are_exact_on_adversarial_inputs() {
    // Extreme values where vpmaddubsw would saturate (255 x 127 x 2 > 32767) and long k.
    let cases: [(u8, i8); 6] = [
        (255, 127),
        (255, -127),
        (0, -127),
        (127, -127),
        (128, 127),
        (1, 1),
    ];
    for kernel in kernels_to_test() {
        for &(av, qv) in &cases {
            for &(m, n, k) in &[(1, 1, 1), (7, 33, 13), (13, 17, 4096), (50, 70, 1536)] {
                let a = vec![av; m * k];
                let q = vec![qv; n * k];
                let got = run_int8(kernel, &a, &q, m, n, k);
                assert_eq!(
                    got,
                    reference_i32(&a, &q, m, n, k),
                    "{} kernel, a={av} q={qv} m={m} n={n} k={k}",
                    kernel.name()
                );
            }
        }
        // Alternating signs: pair sums that cancel or add up at the i16 limit.
        let (m, n, k) = (9, 31, 203);
        let a: Vec<u8> = (0..m * k)
            .map(|i| if i % 3 == 0 { 0 } else { 255 })
            .collect();
        let q: Vec<i8> = (0..n * k)
            .map(|i| if i % 2 == 0 { 127 } else { -127 })
            .collect();
        assert_eq!(
            run_int8(kernel, &a, &q, m, n, k),
            reference_i32(&a, &q, m, n, k),
            "{} kernel, alternating",
            kernel.name()
        );
    }
}

#[test]
fn all_int8_kernels_agree_with_the_portable_one() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (m, n, k) = (37, 1152, 384);
    let a: Vec<u8> = (0..m * k).map(|_| rng.random()).collect();
    let q: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127)).collect();
    let want = run_int8(Int8Kernel::portable(), &a, &q, m, n, k);
    for kernel in kernels_to_test() {
        assert_eq!(run_int8(kernel, &a, &q, m, n, k), want, "{}", kernel.name());
    }
}

#[test]
fn mismatched_buffers_are_errors_not_panics() {
    let b = PackedI8::pack(&[1i8; 8 * 12], 8, 12).unwrap();
    let short = vec![0u8; 11];
    let rows = Rows {
        a: &short,
        rows: 1,
        kp: 12,
    };
    assert!(product(Int8Kernel::portable(), &rows, &b).is_err());
    let rows = Rows {
        a: &[0u8; 16],
        rows: 1,
        kp: 16,
    };
    assert!(product(Int8Kernel::portable(), &rows, &b).is_err());
    assert!(PackedI8::pack(&[1i8; 5], 2, 3).is_err());
    // Public fields edited into an inconsistent shape are caught too.
    let mut bad = PackedI8::pack(&[1i8; 40 * 12], 40, 12).unwrap();
    bad.n = 3;
    let rows = Rows {
        a: &[0u8; 12],
        rows: 1,
        kp: 12,
    };
    assert!(product(Int8Kernel::portable(), &rows, &bad).is_err());
    let lin = Int8Linear::new(&[0.5f32; 12], &[0.0; 3], 3, 4).unwrap();
    let mut s = Scratch::default();
    let mut dst = vec![0f32; 5];
    // 2 rows of 3 outputs need 6 values.
    let e = lin.forward(
        Int8Kernel::portable(),
        &[1.0; 8],
        2,
        &mut dst,
        3,
        0,
        Activation::None,
        &mut s,
    );
    assert!(e.is_err());
    // Column offset past the stride.
    let mut dst = vec![0f32; 12];
    let e = lin.forward(
        Int8Kernel::portable(),
        &[1.0; 8],
        2,
        &mut dst,
        4,
        2,
        Activation::None,
        &mut s,
    );
    assert!(e.is_err());
    // Input too short.
    let e = lin.forward(
        Int8Kernel::portable(),
        &[1.0; 7],
        2,
        &mut dst,
        3,
        0,
        Activation::None,
        &mut s,
    );
    assert!(e.is_err());
    assert!(Int8Linear::new(&[0.5f32; 11], &[0.0; 3], 3, 4).is_err());
    assert!(Bf16Linear::new(&[0.5f32; 12], &[0.0; 2], 3, 4).is_err());
}

/// The quantized layers: close to the f32 layer, and a row's output does not depend on the
/// other rows (bit for bit), whatever the kernel.
#[test]
fn linear_layers_are_accurate_and_batch_invariant() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let (n, k) = (70, 131);
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1..0.1)).collect();
    let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let rows = 57;
    // Rows of very different ranges, one all zero.
    let mut x: Vec<f32> = (0..rows * k)
        .map(|i| rng.random_range(-1.0..1.0) * (1 + i / k % 5) as f32)
        .collect();
    x[3 * k..4 * k].iter_mut().for_each(|v| *v = 0.0);
    let f32_out: Vec<f32> = (0..rows * n)
        .map(|e| {
            let (r, c) = (e / n, e % n);
            (0..k).map(|t| x[r * k + t] * w[c * k + t]).sum::<f32>() + bias[c]
        })
        .collect();
    let q = Int8Linear::new(&w, &bias, n, k).unwrap();
    let b = Bf16Linear::new(&w, &bias, n, k).unwrap();
    let mut s = Scratch::default();
    let (ld, col) = (n + 5, 3);
    type Run<'a> = Box<dyn Fn(&[f32], usize, &mut [f32], &mut Scratch) + 'a>;
    let mut runs: Vec<(String, Run, f32)> = Vec::new();
    for kernel in kernels_to_test() {
        let q = &q;
        runs.push((
            format!("int8 {}", kernel.name()),
            Box::new(move |x, m, d, s| {
                q.forward(kernel, x, m, d, ld, col, Activation::Gelu, s)
                    .unwrap()
            }),
            0.05,
        ));
    }
    for kernel in bf16_kernels_to_test() {
        let b = &b;
        runs.push((
            format!("bf16 {}", kernel.name()),
            Box::new(move |x, m, d, s| {
                b.forward(kernel, x, m, d, ld, col, Activation::Gelu, s)
                    .unwrap()
            }),
            0.02,
        ));
    }
    let gelu = crate::math::gelu;
    for (name, run, tol) in &runs {
        let mut all = vec![f32::NAN; rows * ld];
        run(&x, rows, &mut all, &mut s);
        let mut worst = 0f32;
        for r in 0..rows {
            for c in 0..n {
                let want = gelu(f32_out[r * n + c]);
                worst = worst.max((all[r * ld + col + c] - want).abs());
            }
            // Untouched columns stay untouched.
            assert!(all[r * ld].is_nan() && all[r * ld + col + n].is_nan());
        }
        assert!(worst < *tol, "{name}: max abs error {worst}");
        // Each row alone, and a window of rows, give the same bits.
        for r in [0, 3, 5, 47, 48, 56] {
            let mut one = vec![0f32; ld];
            run(&x[r * k..(r + 1) * k], 1, &mut one, &mut s);
            assert_eq!(
                one[col..col + n]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                all[r * ld + col..r * ld + col + n]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{name}: row {r} alone differs"
            );
        }
        let mut part = vec![0f32; 11 * ld];
        run(&x[20 * k..31 * k], 11, &mut part, &mut s);
        for r in 0..11 {
            for c in 0..n {
                assert_eq!(
                    part[r * ld + col + c].to_bits(),
                    all[(20 + r) * ld + col + c].to_bits(),
                    "{name}"
                );
            }
        }
        eprintln!("{name}: max abs error vs f32 {worst:.2e}, batch invariant");
    }
}

#[test]
fn epilogue_gelu_matches_the_f32_gelu() {
    let xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 / 1000.0).collect();
    let mut got = xs.clone();
    apply_act(Activation::Gelu, &mut got[..24_000]);
    apply_act(Activation::Gelu, &mut got[24_000..]);
    let mut worst = 0f32;
    for (x, g) in xs.iter().zip(&got) {
        let want = crate::math::gelu(*x);
        worst = worst.max((g - want).abs() / x.abs().max(1.0));
    }
    assert!(worst < 1e-6, "epilogue GELU: max scaled error {worst}");
}

/// Widths whose int8 sums could overflow i32 are refused when the weights are packed.
#[test]
fn int8_packing_refuses_widths_beyond_exact_i32() {
    let k = MAX_INT8_K;
    assert!(255 * 127 * k as i64 <= i32::MAX as i64);
    assert!(PackedI8::pack(&vec![1; k], 1, k).is_ok());
    let e = PackedI8::pack(&vec![1; k + 1], 1, k + 1)
        .err()
        .expect("too wide");
    assert!(e.to_string().contains("exact i32"), "{e}");
}

/// -128 is outside the symmetric range (and would break the AVX2 kernel's sign trick).
#[test]
fn int8_packing_refuses_minus_128() {
    let mut q = vec![5i8; 3 * 8];
    q[13] = -128;
    let e = PackedI8::pack(&q, 3, 8).err().expect("-128 refused");
    assert!(e.to_string().contains("weight 13 is -128"), "{e}");
    q[13] = -127;
    assert!(PackedI8::pack(&q, 3, 8).is_ok());
}

/// A row's quantization range (min and max of the row and 0, NaNs skipped) is the same on
/// every code path: the vector paths must give the portable loop's values bit for bit, on
/// every length around the vector widths and with NaN, infinities and signed zeros.
#[test]
fn row_range_is_the_same_on_every_path() {
    require_avx2_in_ci();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
        1e-40,
        -1e-40,
    ];
    let mut checked = 0;
    for n in 0..70 {
        for trial in 0..6 {
            let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
            if trial == 1 {
                x.iter_mut().for_each(|v| *v = -v.abs() - 1.0);
            }
            if trial >= 2 && n > 0 {
                for _ in 0..trial {
                    x[rng.random_range(0..n)] = specials[rng.random_range(0..specials.len())];
                }
            }
            let want = quantize::row_range(&x);
            let bits = |(a, b): (f32, f32)| (a.to_bits(), b.to_bits());
            #[cfg(target_arch = "x86_64")]
            {
                if cpu::has_avx2_fma() {
                    // SAFETY: the CPU has avx2 and fma.
                    let got = unsafe { quantize::row_range_avx2(&x) };
                    assert_eq!(bits(got), bits(want), "avx2, {x:?}");
                    checked += 1;
                }
                if cpu::level() == Level::Avx512 {
                    // SAFETY: the CPU has avx512f.
                    let got = unsafe { quantize::row_range_avx512(&x) };
                    assert_eq!(bits(got), bits(want), "avx512, {x:?}");
                }
            }
        }
    }
    eprintln!("row_range: {checked} rows checked on the vector paths");
    assert!(
        checked > 0 || std::env::var_os("CI").is_none(),
        "CI machines check the vector paths"
    );
}
