//! A float32 dense layer for inference, its weights stored transposed (`[in, out]`).
//!
//! The checkpoint's `[out, in]` layout makes the gemm crate repack the whole weight matrix,
//! on one thread, in every product with a small row count (a sentence's 40 tokens, say), so
//! a one-sentence pass spent about 40% of its time packing and did not scale to a second
//! thread. Stored `[in, out]`, the weights are read where they lie. The sums of an element
//! are the same (in k order, in k blocks that depend on k and the caches), so the vectors
//! keep their bits; [`super::product`] says where that stops (products too small for any
//! real layer), and the tests check it.

use candle_core::Result;

use super::{product, Linear};
use kernels::matmul::MatRef;

/// `y = x W^T + b` with `W^T` held row-major.
pub(crate) struct F32Linear {
    /// `W^T`: `inp` rows of `out` values.
    wt: Vec<f32>,
    bias: Vec<f32>,
    inp: usize,
    out: usize,
}

impl F32Linear {
    /// Copies `lin`'s weights, transposed.
    pub(crate) fn new(lin: &Linear) -> Result<Self> {
        let (out, inp) = lin.weight.dims2()?;
        let w = lin.weight.flatten_all()?.to_vec1::<f32>()?;
        let mut wt = vec![0f32; w.len()];
        // Blocks of 64 x 64 keep both sides of the copy in cache.
        const B: usize = 64;
        for o0 in (0..out).step_by(B) {
            for i0 in (0..inp).step_by(B) {
                for o in o0..(o0 + B).min(out) {
                    for i in i0..(i0 + B).min(inp) {
                        wt[i * out + o] = w[o * inp + i];
                    }
                }
            }
        }
        Ok(Self {
            wt,
            bias: lin.bias.to_vec1::<f32>()?,
            inp,
            out,
        })
    }

    /// Output width.
    pub(crate) fn out(&self) -> usize {
        self.out
    }

    /// `dst[r, col .. col + out] = x[r] W^T + b` for `rows` rows; `dst` has row stride `ld`.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        rows: usize,
        dst: &mut [f32],
        ld: usize,
        col: usize,
    ) -> Result<()> {
        let rhs = MatRef::rows(&self.wt, self.inp, self.out, self.out);
        product(x, rows, rhs, &self.bias, dst, ld, col)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// The transposed layer against `linear` on the checkpoint's layout, at the layer shapes
    /// of MiniLM, MPNet and nomic-embed (its gated FFN is 6,144 wide), for row counts from
    /// one sentence's token to a batch's (up to 256 rows in column tasks, more in the gemm
    /// crate's own split): the same bits, into a strided output.
    #[test]
    fn transposed_weights_give_the_bits_of_the_checkpoint_layout() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let shapes = [
            (1152, 384),
            (1536, 384),
            (384, 1536),
            (768, 3072),
            (6144, 768),
        ];
        for (out, inp) in shapes {
            let w: Vec<f32> = (0..out * inp)
                .map(|_| rng.random_range(-0.1..0.1))
                .collect();
            let b: Vec<f32> = (0..out).map(|_| rng.random_range(-0.1..0.1)).collect();
            let lin = Linear {
                weight: Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(),
                bias: Tensor::from_vec(b, out, &Device::Cpu).unwrap(),
            };
            let t = F32Linear::new(&lin).unwrap();
            assert_eq!(t.out(), out);
            for rows in [1, 2, 39, 200, 600] {
                let x: Vec<f32> = (0..rows * inp)
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect();
                let ld = out + 3;
                let mut want = vec![0f32; rows * ld];
                let mut got = vec![0f32; rows * ld];
                super::super::linear(&x, rows, &lin, &mut want, ld, 1).unwrap();
                t.forward(&x, rows, &mut got, ld, 1).unwrap();
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "[{out}, {inp}] on {rows} rows: the layouts differ");
                assert!(got.iter().any(|v| *v != 0.0), "something was written");
            }
        }
    }
}
