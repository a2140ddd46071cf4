//! int8 outliers: where a few values far above the rest set a coarse rounding step, a second
//! int8 pass adds back what the first rounding lost. Output channels whose weights are so
//! (found at load) get a residual weight row; token rows whose activations are so (found per
//! row at run time, so a row's result still never depends on its batch-mates) get a residual
//! activation row, in the products that read a LayerNorm's output (Q/K/V and the FFN's
//! first), where a model's outlier dimensions live. Both passes run on the kernels of the main
//! product, on the same quantized rows.
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

use super::int8::{product, RowScales};
use super::quantize::round_small;
use super::*;

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

/// Symmetric int8 of one weight row into `q`; returns the scale (0 for an all-zero or
/// non-finite row, which becomes zeros).
pub(crate) fn quantize_weights(row: &[f32], q: &mut [i8]) -> f32 {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !(amax > 0.0 && amax.is_finite()) {
        q.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let inv = 127.0 / amax;
    for (d, &v) in q.iter_mut().zip(row) {
        // round_small is round_ties_even for |v| < 2^22 (here <= 127), without the libm call
        // per weight.
        *d = round_small(v * inv).clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
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
pub(crate) fn coarse_row(x: &[f32], scale: f32, ratio: f32) -> bool {
    scale > 0.0 && exceeds_rms(x, scale * 255.0, ratio)
}

/// The residual weight rows of the output channels that [`WEIGHT_OUTLIER_RATIO`] picks:
/// `w[cols[j]][i] ~ wscale[cols[j]] * q[cols[j]][i] + rscale[j] * r[j][i]`.
pub(crate) struct WeightResidual {
    w: PackedI8,
    rscale: Vec<f32>,
    /// The output channel of each residual row, ascending.
    pub(crate) cols: Vec<usize>,
    /// Zeros: the residual rows add no bias.
    zeros: Vec<f32>,
}

impl WeightResidual {
    /// The residual rows of `weight` `[out, inp]` quantized as `q` with `wscale`; `None` when
    /// no channel needs one.
    pub(crate) fn new(
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
            rscale.push(quantize_weights(&rest, &mut rq[start..]));
            cols.push(c);
        }
        if cols.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            w: PackedI8::pack(&rq, cols.len(), inp)?,
            zeros: vec![0.0; cols.len()],
            rscale,
            cols,
        }))
    }

    /// The residual rows' products for the rows of `a` into `corr` (`[rows, cols.len()]`).
    pub(crate) fn run(
        &self,
        kernel: Int8Kernel,
        a: &QuantRows,
        rs: RowScales,
        corr: &mut Vec<f32>,
    ) -> Result<(), QuantError> {
        let m = self.cols.len();
        if corr.len() < a.rows * m {
            corr.resize(a.rows * m, 0.0);
        }
        check_int8(kernel, a, &self.w)?;
        let out = OutPtr {
            ptr: corr.as_mut_ptr(),
            ld: m,
        };
        // `out` holds a.rows rows of m values, and only this call writes them.
        let none = Activation::None;
        product(
            kernel,
            a,
            rs,
            &self.w,
            &self.rscale,
            &self.zeros,
            none,
            out,
            0,
        );
        Ok(())
    }
}

/// Buffers of the second passes, reused across layers and batches.
#[derive(Default)]
pub(crate) struct OutlierScratch {
    /// Per row of the batch: whether its activations are coarse ([`coarse_row`]).
    pub(crate) coarse: Vec<bool>,
    /// The residual weight rows' products, `[rows, channels]`.
    pub(crate) wcorr: Vec<f32>,
    /// The coarse rows, ascending, and each row's place among them (`usize::MAX`: none).
    list: Vec<usize>,
    slot: Vec<usize>,
    /// The coarse rows' residuals in float32, then quantized.
    fine: Vec<f32>,
    a8: AlignedVec<u8>,
    scale: Vec<f32>,
    zero: Vec<i32>,
    zeros: Vec<f32>,
    /// The residual activation rows' products, `[coarse rows, n]`.
    rcorr: Vec<f32>,
}

impl OutlierScratch {
    /// For each coarse row of `a` (quantized from `x`, `k` values a row): quantizes what the
    /// first rounding lost and multiplies it by `w`, into `rcorr`.
    pub(crate) fn run_rows(
        &mut self,
        kernel: Int8Kernel,
        x: &[f32],
        a: &QuantRows,
        rs: RowScales,
        w: &PackedI8,
        wscale: &[f32],
    ) -> Result<(), QuantError> {
        let (rows, kp, k, n) = (a.rows, a.kp, w.k, w.n);
        self.list.clear();
        self.list.extend((0..rows).filter(|&r| self.coarse[r]));
        self.slot.clear();
        self.slot.resize(rows, usize::MAX);
        for (i, &r) in self.list.iter().enumerate() {
            self.slot[r] = i;
        }
        let m = self.list.len();
        if m == 0 {
            return Ok(());
        }
        self.fine.resize(m * k, 0.0);
        if self.a8.len() < m * kp {
            self.a8.resize(m * kp);
        }
        self.scale.resize(m, 0.0);
        self.zero.resize(m, 0);
        let list = &self.list;
        self.fine
            .par_chunks_mut(k)
            .zip(self.a8[..m * kp].par_chunks_mut(kp))
            .zip(self.scale.par_iter_mut().zip(self.zero.par_iter_mut()))
            .zip(list.par_iter())
            .for_each(|(((f, q), (sc, z)), &r)| {
                let (xr, ar) = (&x[r * k..(r + 1) * k], &a.a[r * kp..r * kp + k]);
                let (s, z0) = (rs.scale[r], rs.zero[r]);
                for ((f, &v), &u) in f.iter_mut().zip(xr).zip(ar) {
                    *f = v - s * (u as i32 - z0) as f32;
                }
                (*sc, *z) = quantize_row(f, q);
            });
        let fine = QuantRows {
            a: &self.a8[..m * kp],
            rows: m,
            kp,
        };
        check_int8(kernel, &fine, w)?;
        self.zeros.resize(n, 0.0);
        self.rcorr.resize(self.rcorr.len().max(m * n), 0.0);
        let out = OutPtr {
            ptr: self.rcorr.as_mut_ptr(),
            ld: n,
        };
        let frs = RowScales {
            scale: &self.scale[..m],
            zero: &self.zero[..m],
        };
        // `out` holds m rows of n values, and only this call writes them.
        let none = Activation::None;
        product(kernel, &fine, frs, w, wscale, &self.zeros, none, out, 0);
        Ok(())
    }

    /// Adds the corrections to `dst` (`rows` rows of `n` values from column `col`, stride
    /// `ld`): the residual weight rows' products `wres` (their channels, and `[rows,
    /// channels]` values), then the residual activation rows' of [`Self::run_rows`]; then
    /// applies `act`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
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
                epilogue::apply_act(act, d);
            });
    }
}
