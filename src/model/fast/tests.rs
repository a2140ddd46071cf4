//! The float32 fast path's dense layers are batch invariant: a row's output has the same bits
//! whatever the number of rows in the product.

use super::dense_f32::F32Linear;
use super::*;
use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A dense layer `[out, inp]` of random weights and biases.
fn random_linear(rng: &mut StdRng, out: usize, inp: usize) -> Linear {
    let w: Vec<f32> = (0..out * inp)
        .map(|_| rng.random_range(-0.1..0.1))
        .collect();
    let b: Vec<f32> = (0..out).map(|_| rng.random_range(-0.1..0.1)).collect();
    Linear {
        weight: Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(),
        bias: Tensor::from_vec(b, out, &Device::Cpu).unwrap(),
    }
}

/// `rows` rows of `inp` random inputs.
fn random_rows(rng: &mut StdRng, rows: usize, inp: usize) -> Vec<f32> {
    (0..rows * inp)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect()
}

/// The transposed layer against `linear` on the checkpoint's layout, at the layer shapes of
/// MiniLM, MPNet and nomic-embed (its gated FFN is 6,144 wide), for row counts from one
/// sentence's token to a batch's (up to 256 rows in column tasks, more in the gemm crate's own
/// split), on a pool of two threads: the same bits, into a strided output.
#[test]
fn transposed_weights_give_the_bits_of_the_checkpoint_layout() {
    let mut rng = StdRng::seed_from_u64(21);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let shapes = [
        (1152, 384),
        (1536, 384),
        (384, 1536),
        (768, 3072),
        (6144, 768),
    ];
    for (out, inp) in shapes {
        let lin = random_linear(&mut rng, out, inp);
        let t = F32Linear::new(&lin).unwrap();
        assert_eq!(t.out(), out);
        for rows in [1, 2, 39, 200, 600] {
            let x = random_rows(&mut rng, rows, inp);
            let ld = out + 3;
            let mut want = vec![0f32; rows * ld];
            let mut got = vec![0f32; rows * ld];
            pool.install(|| {
                linear(&x, rows, &lin, &mut want, ld, 1).unwrap();
                t.forward(&x, rows, &mut got, ld, 1).unwrap();
            });
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "[{out}, {inp}] on {rows} rows: the layouts differ");
            assert!(got.iter().any(|v| *v != 0.0), "something was written");
        }
    }
}

/// Both layouts of a dense layer (`linear` on the checkpoint's `[out, in]`, and the inference
/// encoders' transposed [`F32Linear`], whose products of up to 256 rows run as column tasks,
/// on a pool of two threads)
/// on the first `m` rows of 700, for every `m` a batch or an FFN chunk can have, at the layer
/// shapes of all-MiniLM-L6-v2, all-mpnet-base-v2 and nomic-embed and at widths that are no
/// multiple of the column block, against all 700 at once: the same bits. (A single row used
/// to go through the gemm crate's matrix-vector path, whose sums round differently: a
/// sentence whose last token was alone in the FFN's last chunk of 512 rows moved by about
/// 1e-7.)
#[test]
fn linear_rows_do_not_depend_on_the_row_count() {
    let mut rng = StdRng::seed_from_u64(9);
    let rows = 700;
    // Two threads whatever the machine, so that the column tasks run.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let shapes = [
        (384, 384),
        (1536, 384),
        (384, 1536),
        (768, 3072),
        (6144, 768),
        (1000, 768),
        (200, 1000),
    ];
    for (out, inp) in shapes {
        let lin = random_linear(&mut rng, out, inp);
        let t = F32Linear::new(&lin).unwrap();
        let x = random_rows(&mut rng, rows, inp);
        type Run<'a> = Box<dyn Fn(&[f32], usize, &mut [f32]) + Sync + 'a>;
        let layouts: [(&str, Run); 2] = [
            (
                "checkpoint",
                Box::new(|x, m, d| linear(x, m, &lin, d, out, 0).unwrap()),
            ),
            (
                "transposed",
                Box::new(|x, m, d| t.forward(x, m, d, out, 0).unwrap()),
            ),
        ];
        for (name, run) in &layouts {
            let mut all = vec![0f32; rows * out];
            pool.install(|| run(&x, rows, &mut all));
            for m in [1, 2, 3, 7, 16, 17, 64, 65, 129, 256, 257, 511, 512, 513] {
                // The window starts at row 5, so the rows also change places within the tiles.
                let mut part = vec![0f32; m * out];
                pool.install(|| run(&x[5 * inp..(5 + m) * inp], m, &mut part));
                let want = &all[5 * out..(5 + m) * out];
                let same = part
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{name} [{out}, {inp}]: {m} rows differ from the same rows among {rows}"
                );
            }
        }
    }
}
