//! int8 outliers: output channels whose weights, and token rows whose activations, hold a few
//! values far above the rest keep their precision (the second passes of `outliers.rs`), on
//! every kernel, and a row's output still does not depend on its batch-mates.

use super::*;

/// `x W^T + b` in f64, and the sum of `|x_j w_j|` per output (the scale of its rounding).
fn reference(x: &[f32], w: &[f32], b: &[f32], k: usize) -> (Vec<f64>, Vec<f64>) {
    let (rows, n) = (x.len() / k, b.len());
    let mut y = vec![0f64; rows * n];
    let mut mag = vec![0f64; rows * n];
    for r in 0..rows {
        for c in 0..n {
            for t in 0..k {
                let p = x[r * k + t] as f64 * w[c * k + t] as f64;
                y[r * n + c] += p;
                mag[r * n + c] += p.abs();
            }
            y[r * n + c] += b[c] as f64;
        }
    }
    (y, mag)
}

/// The largest `|got - want| / mag` of each output in `cols` (all when empty), over `rows`.
fn worst(got: &[f32], want: &[f64], mag: &[f64], n: usize, rows: &[usize], cols: &[usize]) -> f64 {
    let all: Vec<usize> = (0..n).collect();
    let cols = if cols.is_empty() { &all[..] } else { cols };
    let mut w = 0f64;
    for &r in rows {
        for &c in cols {
            let i = r * n + c;
            w = w.max((got[i] as f64 - want[i]).abs() / mag[i]);
        }
    }
    w
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Three output channels whose weights hold two values about 14 times their RMS, on inputs that
/// int8 represents exactly (integers from -100 to 155: scale 1, zero point 100), so that all the
/// error is the weights'. One rounding step of the large weights left the outlier channels'
/// outputs 4% off the sum of |x w|; the residual rows keep them within 0.1% (the other
/// channels, whose weights are uniform, within 0.3%).
#[test]
fn outlier_weight_channels_keep_their_precision() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let (n, k, rows) = (40, 300, 9);
    let mut w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1..0.1)).collect();
    let outliers = [5, 17, 33];
    for &c in &outliers {
        w[c * k + 7] = 8.0;
        w[c * k + 100] = -6.0;
    }
    let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let x: Vec<f32> = (0..rows * k)
        .map(|i| match i % k {
            0 => -100.0,
            1 => 155.0,
            _ => rng.random_range(-100..=155) as f32,
        })
        .collect();
    let (want, mag) = reference(&x, &w, &b, k);
    let q = Int8Linear::new(&w, &b, n, k).unwrap();
    let all_rows: Vec<usize> = (0..rows).collect();
    for kernel in kernels_to_test() {
        let mut got = vec![0f32; rows * n];
        let mut s = Scratch::default();
        q.forward(kernel, &x, rows, &mut got, n, 0, Activation::None, &mut s)
            .unwrap();
        let e = worst(&got, &want, &mag, n, &all_rows, &outliers);
        let rest = worst(&got, &want, &mag, n, &all_rows, &[]);
        eprintln!(
            "{}: outlier channels {e:.2e}, all channels {rest:.2e}",
            kernel.name()
        );
        assert!(
            e < 1e-3,
            "{}: outlier channels off by {e:.2e}",
            kernel.name()
        );
        assert!(rest < 3e-3, "{}: channels off by {rest:.2e}", kernel.name());
    }
    assert_eq!(q.residual_channels(), outliers.len());
}

/// Two token rows of 1,024 values in [-1, 1] with one value of 500 (range 32 times the RMS):
/// one rounding step of 2 lost the rest of those rows (7% of the sum of |x w|); the residual
/// activation rows keep every output within 0.1%, and each row gives the same bits alone, in a
/// window, and in the whole batch, with the activation applied after the corrections.
#[test]
fn outlier_activation_rows_keep_their_precision_and_batch_invariance() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(32);
    let (n, k, rows) = (48, 1024, 21);
    // Weights that int8 represents exactly (multiples of 0.1 / 127, each row reaching 0.1), so
    // that all the error is the activations'.
    let step = 0.1f32 / 127.0;
    let w: Vec<f32> = (0..n * k)
        .map(|i| match i % k {
            0 => 127.0 * step,
            _ => rng.random_range(-127..=127) as f32 * step,
        })
        .collect();
    let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let spiky = [2, 9];
    for &r in &spiky {
        x[r * k + 300] = 500.0;
    }
    // And a channel with a weight outlier, so that both corrections meet in one product.
    let mut w2 = w.clone();
    w2[11 * k + 3] = 9.0;
    let (want, mag) = reference(&x, &w, &b, k);
    let q = Int8Linear::new(&w, &b, n, k)
        .unwrap()
        .with_row_residual(ROW_OUTLIER_RATIO);
    let q2 = Int8Linear::new(&w2, &b, n, k)
        .unwrap()
        .with_row_residual(ROW_OUTLIER_RATIO);
    let (ld, col) = (n + 7, 5);
    let gelu = crate::math::gelu;
    for kernel in kernels_to_test() {
        let name = kernel.name();
        let mut s = Scratch::default();
        let mut got = vec![0f32; rows * n];
        q.forward(kernel, &x, rows, &mut got, n, 0, Activation::None, &mut s)
            .unwrap();
        let e = worst(&got, &want, &mag, n, &spiky, &[]);
        let all: Vec<usize> = (0..rows).collect();
        let rest = worst(&got, &want, &mag, n, &all, &[]);
        eprintln!("{name}: outlier rows {e:.2e}, all rows {rest:.2e}");
        assert!(e < 1e-3, "{name}: outlier rows off by {e:.2e}");
        assert!(rest < 1e-3, "{name}: rows off by {rest:.2e}");
        for lin in [&q, &q2] {
            let mut batch = vec![f32::NAN; rows * ld];
            lin.forward(
                kernel,
                &x,
                rows,
                &mut batch,
                ld,
                col,
                Activation::Gelu,
                &mut s,
            )
            .unwrap();
            for r in 0..rows {
                let row = &batch[r * ld..(r + 1) * ld];
                assert!(row[..col].iter().chain(&row[col + n..]).all(|v| v.is_nan()));
            }
            for r in 0..rows {
                let want = gelu(want[r * n] as f32);
                let got = batch[r * ld + col];
                assert!(
                    (got - want).abs() < 0.05,
                    "{name}: row {r}: {got} vs {want}"
                );
            }
            for r in [0, 2, 9, 20] {
                let mut one = vec![0f32; ld];
                let xr = &x[r * k..(r + 1) * k];
                lin.forward(kernel, xr, 1, &mut one, ld, col, Activation::Gelu, &mut s)
                    .unwrap();
                assert_eq!(
                    bits(&one[col..col + n]),
                    bits(&batch[r * ld + col..r * ld + col + n]),
                    "{name}: row {r} alone differs"
                );
            }
            let mut part = vec![0f32; 9 * ld];
            lin.forward(
                kernel,
                &x[k..10 * k],
                9,
                &mut part,
                ld,
                col,
                Activation::Gelu,
                &mut s,
            )
            .unwrap();
            for r in 0..9 {
                assert_eq!(
                    bits(&part[r * ld + col..r * ld + col + n]),
                    bits(&batch[(r + 1) * ld + col..(r + 1) * ld + col + n]),
                    "{name}: row {} in a window of 9 differs",
                    r + 1
                );
            }
        }
    }
    assert_eq!((q.residual_channels(), q2.residual_channels()), (0, 1));
}
