//! A float32 dense layer for inference, its weights stored transposed (`[in, out]`).
//!
//! The checkpoint's `[out, in]` layout makes the gemm crate repack the whole weight matrix,
//! on one thread, in every product with a small row count (a sentence's 40 tokens, say), so
//! a one-sentence pass spent about 40% of its time packing and did not scale to a second
//! thread. Stored `[in, out]`, the weights are read where they lie. The sums of an element
//! are the same (in k order, in k blocks that depend on k and the caches), so the vectors
//! keep their bits; [`super::product`] says where that stops (products too small for any
//! real layer), and `fast/tests.rs` checks it.

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
