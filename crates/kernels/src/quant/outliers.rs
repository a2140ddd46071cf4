//! int8 outliers: where a few values far above the rest set a coarse rounding step, a second
//! int8 pass adds back what the first rounding lost. Output channels whose weights are so
//! (found at load) get a residual weight row; token rows whose activations are so (found per
//! row at run time, so a row's result still never depends on its batch-mates) get a residual
//! activation row, in the products that read a LayerNorm's output (Q/K/V and the FFN's
//! first), where a model's outlier dimensions live. Both passes are products of the one
//! driver ([`Linear::run`]) on the kernel of the main product.
//!
//! Why: all-mpnet-base-v2 has outlier dimensions (555, 568, 461, ...). The FFN's second
//! product writes them with weight rows whose largest values reach 55 times their RMS, and
//! the LayerNorm outputs that feed Q, K, V and the FFN hold them with values up to 28 times
//! the row's RMS (the `<s>` and `</s>` tokens most). With one int8 step for such a row, the
//! rest of it rounds coarsely; on "Afghan police kill 5 Taliban fighters" the error moved the
//! token "kill" to the outlier tokens' pattern by layer 8, and the vector's cosine to float32
//! fell to 0.9435. The weight rows fixed that sentence; the activation rows fixed the next
//! ones (a fortune quote at 0.972) and raised the mean cosine from 0.9987 to 0.9994.

use rayon::prelude::*;

use super::epilogue::{apply_act, Activation};
use super::int8::{quantize_weight_row, quantize_weights};
use super::linear::{check_dst, check_layer, Linear};
use super::walk::SharedOut;
use super::{ActScratch, Int8, Int8Kernel, Packed, Precision, Prepared, QuantError, Scratch};

/// An output channel whose largest weight exceeds this many times the RMS of its weights gets
/// a residual weight row. Rounding to 127 steps of the largest weight leaves an RMS error of
/// `ratio / 440` of the weights' RMS: 2.7% at 12, against 1.2% for the median channel of
/// all-mpnet-base-v2 (ratio about 5.4). About 2% of that model's channels are above it, and
/// 1% of all-MiniLM-L6-v2's.
pub const WEIGHT_OUTLIER_RATIO: f32 = 12.0;

/// A token row (of a LayerNorm's output) whose range, largest minus smallest value, exceeds
/// this many times the RMS of its values gets a residual activation row. 255 steps over the
/// range leave an RMS error of `ratio / 883` of the row's RMS: 2.3% at 20.
pub const ROW_OUTLIER_RATIO: f32 = 20.0;

/// A dense layer `y = x W^T + b` with int8 weights (symmetric, per output channel) and
/// activations quantized per row at run time: the int8 [`Linear`], plus the second passes
/// of its outliers.
///
/// An output channel whose weights hold a few values far above the rest gets a residual
/// weight row, and (with [`Int8Linear::with_row_residual`]) a token row whose values hold a
/// few far above the rest gets a residual activation row, each holding what the first
/// rounding lost. Both run on the same kernel; the activation, if any, runs after them.
pub struct Int8Linear {
    lin: Linear<Int8>,
    residual: Option<Box<WeightResidual>>,
    /// Token rows whose range exceeds this many times their RMS get a residual activation
    /// row; `None`: no row does.
    row_ratio: Option<f32>,
}

impl Int8Linear {
    /// Quantizes `weight` `[out, inp]` (row-major) and keeps `bias` `[out]`.
    pub fn new(weight: &[f32], bias: &[f32], out: usize, inp: usize) -> Result<Self, QuantError> {
        check_layer::<Int8>(weight.len(), bias.len(), out, inp)?;
        let (q, wscale) = quantize_weights(weight, out, inp);
        Ok(Self {
            residual: WeightResidual::new(weight, &q, &wscale, inp)?.map(Box::new),
            lin: Linear::from_parts(Packed::<Int8>::pack(&q, out, inp)?, wscale, bias.to_vec()),
            row_ratio: None,
        })
    }

    /// Gives token rows whose range exceeds `ratio` times their RMS a residual activation row
    /// (for inputs with outlier dimensions, such as LayerNorm outputs).
    pub fn with_row_residual(mut self, ratio: f32) -> Self {
        self.row_ratio = Some(ratio);
        self
    }

    pub fn out_dim(&self) -> usize {
        self.lin.out_dim()
    }

    pub fn in_dim(&self) -> usize {
        self.lin.in_dim()
    }

    /// How many output channels carry a residual weight row.
    pub fn residual_channels(&self) -> usize {
        self.residual.as_ref().map_or(0, |r| r.cols.len())
    }

    /// `dst[r * ld + col + j] = act(x[r] W^T + b)[j]` for `rows` rows of `x` (`in_dim` wide),
    /// on `kernel`. Errors when a buffer is too small for the sizes given or the CPU lacks the
    /// kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        kernel: Int8Kernel,
        x: &[f32],
        rows: usize,
        dst: &mut [f32],
        ld: usize,
        col: usize,
        act: Activation,
        scratch: &mut Scratch,
    ) -> Result<(), QuantError> {
        let lin = &self.lin;
        let (n, k) = (lin.out_dim(), lin.in_dim());
        check_dst(x.len(), rows, k, dst.len(), ld, col, n)?;
        if rows == 0 {
            return Ok(());
        }
        let Scratch { acts, outliers } = scratch;
        let prep = Int8::prepare(x, rows, k, lin.kp(), acts);
        let any_coarse = outliers.mark_coarse(x, k, &prep, self.row_ratio);
        if self.residual.is_none() && !any_coarse {
            return lin.run(kernel, &prep, lin.bias(), act, SharedOut::new(dst, ld), col);
        }
        // The corrections join their columns before the activation, which runs after them.
        let none = Activation::None;
        lin.run(
            kernel,
            &prep,
            lin.bias(),
            none,
            SharedOut::new(dst, ld),
            col,
        )?;
        if let Some(res) = &self.residual {
            res.run(kernel, &prep, &mut outliers.wcorr)?;
        }
        outliers.run_rows(kernel, x, &prep, lin)?;
        let wres = self
            .residual
            .as_ref()
            .map(|r| (&r.cols[..], &outliers.wcorr[..]));
        outliers.apply(dst, rows, ld, col, n, wres, act);
        Ok(())
    }
}

/// The sum of squares of `x`, over 16 lanes then across them in a fixed order: the same bits
/// whatever vector width the compiler picks.
fn sum_squares(x: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            acc[i] += c[i] * c[i];
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        acc[i] += v * v;
    }
    acc.iter().fold(0f32, |s, &v| s + v)
}

/// Whether `spread` exceeds `ratio` times the RMS of `x`.
fn exceeds_rms(x: &[f32], spread: f32, ratio: f32) -> bool {
    let ms = sum_squares(x) / x.len().max(1) as f32;
    ms > 0.0 && spread * spread > ratio * ratio * ms
}

/// Whether an activation row quantized with `scale` (its range / 255) is coarse for its RMS:
/// its range exceeds `ratio` times its RMS.
fn coarse_row(x: &[f32], scale: f32, ratio: f32) -> bool {
    scale > 0.0 && exceeds_rms(x, scale * 255.0, ratio)
}

/// The residual weight rows of the output channels that [`WEIGHT_OUTLIER_RATIO`] picks, as a
/// layer of their own without bias: `w[cols[j]][i] ~ wscale[cols[j]] * q[cols[j]][i] +
/// rscale[j] * r[j][i]`.
struct WeightResidual {
    lin: Linear<Int8>,
    /// The output channel of each residual row, ascending.
    cols: Vec<usize>,
}

impl WeightResidual {
    /// The residual rows of `weight` `[out, inp]` quantized as `q` with `wscale`; `None` when
    /// no channel needs one.
    fn new(
        weight: &[f32],
        q: &[i8],
        wscale: &[f32],
        inp: usize,
    ) -> Result<Option<Self>, QuantError> {
        let t = WEIGHT_OUTLIER_RATIO;
        let (mut rq, mut rscale, mut cols) = (Vec::new(), Vec::new(), Vec::new());
        let mut rest = vec![0f32; inp];
        for (c, &s) in wscale.iter().enumerate() {
            let row = &weight[c * inp..(c + 1) * inp];
            if s == 0.0 || !exceeds_rms(row, s * 127.0, t) {
                continue;
            }
            for ((r, &v), &qv) in rest.iter_mut().zip(row).zip(&q[c * inp..(c + 1) * inp]) {
                *r = v - s * qv as f32;
            }
            let start = rq.len();
            rq.resize(start + inp, 0i8);
            rscale.push(quantize_weight_row(&rest, &mut rq[start..]));
            cols.push(c);
        }
        if cols.is_empty() {
            return Ok(None);
        }
        let w = Packed::<Int8>::pack(&rq, cols.len(), inp)?;
        let zeros = vec![0.0; cols.len()];
        Ok(Some(Self {
            lin: Linear::from_parts(w, rscale, zeros),
            cols,
        }))
    }

    /// The residual rows' products for the prepared rows into `corr` (`[rows, cols.len()]`).
    fn run(
        &self,
        kernel: Int8Kernel,
        prep: &Prepared<'_, u8>,
        corr: &mut Vec<f32>,
    ) -> Result<(), QuantError> {
        let m = self.cols.len();
        let rows = prep.rows.rows;
        if corr.len() < rows * m {
            corr.resize(rows * m, 0.0);
        }
        let out = SharedOut::new(&mut corr[..rows * m], m);
        let lin = &self.lin;
        lin.run(kernel, prep, lin.bias(), Activation::None, out, 0)
    }
}

/// Buffers of the second passes, reused across layers and batches.
#[derive(Default)]
pub(crate) struct OutlierScratch {
    /// Per row of the batch: whether its activations are coarse ([`coarse_row`]).
    coarse: Vec<bool>,
    /// The residual weight rows' products, `[rows, channels]`.
    wcorr: Vec<f32>,
    /// The coarse rows, ascending, and each row's place among them (`usize::MAX`: none).
    list: Vec<usize>,
    slot: Vec<usize>,
    /// The coarse rows' residuals in float32, then prepared for the kernels.
    fine: Vec<f32>,
    acts: ActScratch,
    zeros: Vec<f32>,
    /// The residual activation rows' products, `[coarse rows, n]`.
    rcorr: Vec<f32>,
}

impl OutlierScratch {
    /// Marks the rows of `x` (`k` values a row, prepared as `prep`) whose range exceeds
    /// `ratio` times their RMS; whether any does (none without a ratio).
    fn mark_coarse(
        &mut self,
        x: &[f32],
        k: usize,
        prep: &Prepared<'_, u8>,
        ratio: Option<f32>,
    ) -> bool {
        let rows = prep.rows.rows;
        self.coarse.clear();
        self.coarse.resize(rows, false);
        let (Some(t), Some((_, scale))) = (ratio, prep.quant) else {
            return false;
        };
        self.coarse
            .par_chunks_mut(16)
            .zip(x[..rows * k].par_chunks(k * 16))
            .zip(scale.par_chunks(16))
            .for_each(|((c, x), sc)| {
                for ((c, x), &s) in c.iter_mut().zip(x.chunks(k)).zip(sc) {
                    *c = coarse_row(x, s, t);
                }
            });
        self.coarse.contains(&true)
    }

    /// For each coarse row of `prep` (prepared from `x`): quantizes what the first rounding
    /// lost and multiplies it by `lin`'s weights (without bias), into `rcorr`.
    fn run_rows(
        &mut self,
        kernel: Int8Kernel,
        x: &[f32],
        prep: &Prepared<'_, u8>,
        lin: &Linear<Int8>,
    ) -> Result<(), QuantError> {
        let (rows, kp, k, n) = (prep.rows.rows, prep.rows.kp, lin.in_dim(), lin.out_dim());
        self.list.clear();
        self.list.extend((0..rows).filter(|&r| self.coarse[r]));
        self.slot.clear();
        self.slot.resize(rows, usize::MAX);
        for (i, &r) in self.list.iter().enumerate() {
            self.slot[r] = i;
        }
        let m = self.list.len();
        let Some((zero, scale)) = prep.quant.filter(|_| m > 0) else {
            return Ok(());
        };
        self.fine.resize(m * k, 0.0);
        let a = prep.rows.a;
        self.fine
            .par_chunks_mut(k)
            .zip(self.list.par_iter())
            .for_each(|(f, &r)| {
                let (xr, ar) = (&x[r * k..(r + 1) * k], &a[r * kp..r * kp + k]);
                let (s, z0) = (scale[r], zero[r]);
                for ((f, &v), &u) in f.iter_mut().zip(xr).zip(ar) {
                    *f = v - s * (u as i32 - z0) as f32;
                }
            });
        let fine = Int8::prepare(&self.fine, m, k, kp, &mut self.acts);
        self.zeros.resize(n, 0.0);
        if self.rcorr.len() < m * n {
            self.rcorr.resize(m * n, 0.0);
        }
        let out = SharedOut::new(&mut self.rcorr[..m * n], n);
        lin.run(kernel, &fine, &self.zeros, Activation::None, out, 0)
    }

    /// Adds the corrections to `dst` (`rows` rows of `n` values from column `col`, stride
    /// `ld`): the residual weight rows' products `wres` (their channels, and `[rows,
    /// channels]` values), then the residual activation rows' of [`Self::run_rows`]; then
    /// applies `act`.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        dst: &mut [f32],
        rows: usize,
        ld: usize,
        col: usize,
        n: usize,
        wres: Option<(&[usize], &[f32])>,
        act: Activation,
    ) {
        let slot = &self.slot[..rows];
        let rcorr = &self.rcorr;
        dst[..(rows - 1) * ld + col + n]
            .par_chunks_mut(ld)
            .enumerate()
            .for_each(|(r, d)| {
                let d = &mut d[col..col + n];
                if let Some((cols, corr)) = wres {
                    let m = cols.len();
                    for (&j, &v) in cols.iter().zip(&corr[r * m..(r + 1) * m]) {
                        d[j] += v;
                    }
                }
                if let Some(&i) = slot.get(r).filter(|&&i| i != usize::MAX) {
                    for (v, &c) in d.iter_mut().zip(&rcorr[i * n..(i + 1) * n]) {
                        *v += c;
                    }
                }
                apply_act(act, d);
            });
    }
}
