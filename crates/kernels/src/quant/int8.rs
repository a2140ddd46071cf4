//! int8: weights symmetric per output channel (s8 in [-127, 127]), activations quantized per
//! row (`quantize.rs`), exact i32 sums, and the zero-point and scale epilogue. See the module
//! above for the scheme.

use rayon::prelude::*;

use super::epilogue::{epilogue_i8, Activation};
use super::quantize::{quantize_row, round_small};
use super::walk::{Packed, Rows};
use super::{err, isa, sealed, ActScratch, Precision, Prepared, QuantError, RowQuant, PANEL};

/// The int8 precision: u8 activations x s8 weights -> exact i32.
pub struct Int8;

/// The largest input width whose int8 sums stay exact in i32: 255 * 127 * k < 2^31.
pub const MAX_INT8_K: usize = (i32::MAX as usize) / (255 * 127);

impl Packed<Int8> {
    /// Packs `q` `[n, k]` row-major (one row per output column), with the column sums.
    /// Refuses -128 (outside the symmetric range; the AVX2 kernel's sign trick relies on
    /// |w| <= 127) and widths whose sums could overflow i32.
    pub fn pack(q: &[i8], n: usize, k: usize) -> Result<Self, QuantError> {
        if q.len() != n * k {
            return err(format!(
                "PackedI8::pack: {} values for a [{n}, {k}] matrix",
                q.len()
            ));
        }
        // 255 * 127 * k must fit an i32 for the sums (and the zero-point term) to be exact.
        if k > MAX_INT8_K {
            return err(format!(
                "PackedI8::pack: {k} inputs per output exceed the {MAX_INT8_K} that exact i32 \
                 sums allow"
            ));
        }
        if let Some(i) = q.iter().position(|&v| v == i8::MIN) {
            return err(format!(
                "PackedI8::pack: weight {i} is -128; symmetric int8 weights lie in [-127, 127]"
            ));
        }
        let mut packed = Self::from_fn(n, k, |i| q[i]);
        let mut colsum = vec![0i32; packed.panels * PANEL];
        for (c, sum) in colsum.iter_mut().enumerate().take(n) {
            *sum = q[c * k..(c + 1) * k].iter().map(|&v| v as i32).sum();
        }
        packed.colsum = colsum;
        Ok(packed)
    }
}

impl sealed::Sealed for Int8 {}

impl Precision for Int8 {
    type A = u8;
    type W = i8;
    type Acc = i32;
    const NAME: &'static str = "int8";
    const GROUP: usize = 4;
    const COLSUMS: bool = true;

    fn table() -> &'static [isa::Entry<Self>] {
        isa::INT8
    }

    /// Symmetric per output channel: `w[c][i] ~ scale[c] * q[c][i]`, `scale[c] = max|w[c]| / 127`.
    fn pack_weights(w: &[f32], n: usize, k: usize) -> Result<(Packed<Self>, Vec<f32>), QuantError> {
        let (q, wscale) = quantize_weights(w, n, k);
        Ok((Packed::<Int8>::pack(&q, n, k)?, wscale))
    }

    /// Quantizes each row with its own scale and zero point (in parallel, 16 rows a task).
    fn prepare<'s>(
        x: &[f32],
        rows: usize,
        k: usize,
        kp: usize,
        s: &'s mut ActScratch,
    ) -> Prepared<'s, u8> {
        if s.a8.len() < rows * kp {
            s.a8.resize(rows * kp);
        }
        s.scale.resize(rows.max(s.scale.len()), 0.0);
        s.zero.resize(rows.max(s.zero.len()), 0);
        s.a8[..rows * kp]
            .par_chunks_mut(kp * 16)
            .zip(x[..rows * k].par_chunks(k * 16))
            .zip(s.scale[..rows].par_chunks_mut(16))
            .zip(s.zero[..rows].par_chunks_mut(16))
            .for_each(|(((a, x), sc), z)| {
                for (((a, x), sc), z) in a.chunks_mut(kp).zip(x.chunks(k)).zip(sc).zip(z) {
                    (*sc, *z) = quantize_row(x, a);
                }
            });
        Prepared {
            rows: Rows {
                a: &s.a8[..rows * kp],
                rows,
                kp,
            },
            quant: Some((&s.zero[..rows], &s.scale[..rows])),
        }
    }

    fn row_epilogue(
        acc: &[i32],
        q: Option<RowQuant<'_>>,
        bias: &[f32],
        act: Activation,
        out: &mut [f32],
    ) {
        let q = q.expect("int8 rows carry their zero points and scales");
        epilogue_i8(acc, q, bias, act, out);
    }
}

/// Symmetric int8 of `w` `[n, k]` per output channel: the values `q` and each channel's scale,
/// `w[c][i] ~ scale[c] * q[c][i]`.
pub(crate) fn quantize_weights(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; n * k];
    let wscale = (0..n)
        .map(|c| quantize_weight_row(&w[c * k..(c + 1) * k], &mut q[c * k..(c + 1) * k]))
        .collect();
    (q, wscale)
}

/// Symmetric int8 of one weight row into `q`; returns the scale (0 for an all-zero or
/// non-finite row, which becomes zeros).
pub(crate) fn quantize_weight_row(row: &[f32], q: &mut [i8]) -> f32 {
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
