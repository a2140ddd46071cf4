//! The float32 fast path's dense layers are batch invariant: a row's output has the same bits
//! whatever the number of rows in the product.

use super::*;
use candle_core::Device;
use rand::{Rng, SeedableRng};

/// `linear` on the first `m` rows of 700, for every `m` a batch or an FFN chunk can have at
/// the layer shapes of all-MiniLM-L6-v2 and all-mpnet-base-v2, against all 700 at once: the
/// same bits. (A single row used to go through the gemm crate's matrix-vector path, whose
/// sums round differently: a sentence whose last token was alone in the FFN's last chunk of
/// 512 rows moved by about 1e-7.)
#[test]
fn linear_rows_do_not_depend_on_the_row_count() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let rows = 700;
    for (out, inp) in [(384, 384), (1536, 384), (384, 1536), (768, 3072)] {
        let w: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let b: Vec<f32> = (0..out).map(|_| rng.random_range(-0.1..0.1)).collect();
        let lin = Linear {
            weight: Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(),
            bias: Tensor::from_vec(b, out, &Device::Cpu).unwrap(),
        };
        let x: Vec<f32> = (0..rows * inp)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let mut all = vec![0f32; rows * out];
        linear(&x, rows, &lin, &mut all, out, 0).unwrap();
        for m in [1, 2, 3, 7, 16, 17, 64, 65, 129, 511, 512, 513] {
            // The window starts at row 5, so the rows also change places within the tiles.
            let mut part = vec![0f32; m * out];
            linear(&x[5 * inp..(5 + m) * inp], m, &lin, &mut part, out, 0).unwrap();
            let want = &all[5 * out..(5 + m) * out];
            let same = part
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "[{out}, {inp}]: {m} rows differ from the same rows among {rows}"
            );
        }
    }
}
