//! The quantized dense layer `y = act(x W^T + b)`, one type for both precisions: weights
//! packed at construction, activations prepared per call, the product walked tile by tile and
//! each tile finished by the fused epilogue straight into the caller's output. int8's
//! outlier passes (`outliers.rs`) are more products of this driver ([`Linear::run`]).

use super::epilogue::{epilogue_tile, Activation};
use super::walk::{check, for_each_block, walk_block, SharedOut};
use super::{err, Bf16, Kernel, Packed, Precision, Prepared, QuantError, Scratch};
use super::{TileBuf, TileQuant, LANES};

/// A dense layer `y = x W^T + b` in precision `P`.
pub struct Linear<P: Precision> {
    w: Packed<P>,
    /// int8: per output channel, `w[n][i] ~ wscale[n] * q[n][i]`; empty for bf16.
    wscale: Vec<f32>,
    bias: Vec<f32>,
}

/// bf16 weights; activations rounded to bf16 per row.
pub type Bf16Linear = Linear<Bf16>;

impl<P: Precision> Linear<P> {
    /// Converts `weight` `[out, inp]` (row-major) and keeps `bias` `[out]`.
    pub fn new(weight: &[f32], bias: &[f32], out: usize, inp: usize) -> Result<Self, QuantError> {
        check_layer::<P>(weight.len(), bias.len(), out, inp)?;
        let (w, wscale) = P::pack_weights(weight, out, inp)?;
        Ok(Self::from_parts(w, wscale, bias.to_vec()))
    }

    /// A layer of packed weights, their scales (int8) and `bias`.
    pub(crate) fn from_parts(w: Packed<P>, wscale: Vec<f32>, bias: Vec<f32>) -> Self {
        Self { w, wscale, bias }
    }

    pub fn out_dim(&self) -> usize {
        self.w.n
    }

    pub fn in_dim(&self) -> usize {
        self.w.k
    }

    /// The input width padded to the precision's group, as the kernel rows hold it.
    pub(crate) fn kp(&self) -> usize {
        self.w.kp
    }

    pub(crate) fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// `dst[r * ld + col + j] = act(x[r] W^T + b)[j]` for `rows` rows of `x` (`in_dim` wide),
    /// on `kernel`. Errors when a buffer is too small for the sizes given or the CPU lacks the
    /// kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        kernel: Kernel<P>,
        x: &[f32],
        rows: usize,
        dst: &mut [f32],
        ld: usize,
        col: usize,
        act: Activation,
        scratch: &mut Scratch,
    ) -> Result<(), QuantError> {
        let (n, k, kp) = (self.w.n, self.w.k, self.w.kp);
        check_dst(x.len(), rows, k, dst.len(), ld, col, n)?;
        if rows == 0 {
            return Ok(());
        }
        let prep = P::prepare(x, rows, k, kp, &mut scratch.acts);
        self.run(kernel, &prep, &self.bias, act, SharedOut::new(dst, ld), col)
    }

    /// `out[r, col + j] = act(prep[r] W^T + bias)[j]` for every prepared row, in parallel
    /// blocks, each tile finished by the epilogue. `bias` holds `out_dim` values (this
    /// layer's, or zeros for a correction pass); `out` holds the rows (its bounds are
    /// asserted).
    pub(crate) fn run(
        &self,
        kernel: Kernel<P>,
        prep: &Prepared<'_, P::A>,
        bias: &[f32],
        act: Activation,
        out: SharedOut<'_, f32>,
        col: usize,
    ) -> Result<(), QuantError> {
        check(kernel, &prep.rows, &self.w)?;
        let (rows, n, k) = (prep.rows.rows, self.w.n, self.w.k);
        let block = kernel.block_shape();
        for_each_block(
            rows,
            self.w.panels,
            block,
            2 * rows * n * k,
            |r0, r1, p0, p1| {
                walk_block(
                    kernel,
                    &prep.rows,
                    &self.w,
                    (r0, r1),
                    (p0, p1),
                    |r, mr, c0, cols, buf| {
                        let q = prep.quant.map(|(zero, scale)| TileQuant {
                            zero: &zero[r..r + mr],
                            scale: &scale[r..r + mr],
                            colsum: &self.w.colsum[c0..c0 + cols],
                            wscale: &self.wscale[c0..c0 + cols],
                        });
                        let bias = &bias[c0..c0 + cols];
                        finish::<P>(&out, col, (r, mr), (c0, cols), buf, q, bias, act);
                    },
                );
            },
        );
        Ok(())
    }
}

/// The epilogue of one tile: `mr` rows from `r`, `cols` columns from `c0` (`bias` holds
/// theirs), into `out` at column offset `col`; the vector tile epilogue where the CPU has
/// one, else row by row.
#[allow(clippy::too_many_arguments)]
fn finish<P: Precision>(
    out: &SharedOut<f32>,
    col: usize,
    (r, mr): (usize, usize),
    (c0, cols): (usize, usize),
    buf: &TileBuf<P::Acc>,
    q: Option<TileQuant<'_>>,
    bias: &[f32],
    act: Activation,
) {
    let start = r * out.ld + col + c0;
    let ptr = out.tile_ptr(start, mr, cols);
    // SAFETY: `tile_ptr` checked that the mr rows of cols values at stride ld lie in
    // `dst`; the blocks of a product, and the tiles within a block, own disjoint (row,
    // column) ranges, so no other thread touches them.
    if unsafe { epilogue_tile(buf, mr, cols, q, bias, act, ptr, out.ld) } {
        return;
    }
    for i in 0..mr {
        // SAFETY: as above, row r + i.
        let d = unsafe { out.slice(start + i * out.ld, cols) };
        P::row_epilogue(&buf[i * LANES..][..cols], q.map(|q| q.row(i)), bias, act, d);
    }
}

/// Checks that a weight of `w_len` values and a bias of `b_len` fit a `[out, inp]` layer.
pub(crate) fn check_layer<P: Precision>(
    w_len: usize,
    b_len: usize,
    out: usize,
    inp: usize,
) -> Result<(), QuantError> {
    if w_len != out * inp || b_len != out {
        return err(format!(
            "{} dense layer: weight of {w_len} values and bias of {b_len} for [{out}, {inp}]",
            P::NAME
        ));
    }
    Ok(())
}

/// Checks that `x` holds `rows` rows of `k` and that `dst` holds `rows` rows of `n` values at
/// column `col` with stride `ld`.
pub(crate) fn check_dst(
    x_len: usize,
    rows: usize,
    k: usize,
    dst_len: usize,
    ld: usize,
    col: usize,
    n: usize,
) -> Result<(), QuantError> {
    if x_len < rows * k {
        return err(format!(
            "dense layer: input of {x_len} values for {rows} rows of {k}"
        ));
    }
    if col + n > ld || (rows > 0 && (rows - 1) * ld + col + n > dst_len) {
        return err(format!(
            "dense layer: output of {dst_len} values cannot hold {rows} rows of {n} at column \
             {col} with stride {ld}"
        ));
    }
    Ok(())
}
