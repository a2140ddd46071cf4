//! bf16: weights rounded to bf16 once, activations per row, f32 sums in a fixed order. See
//! the module above for the scheme.

use rayon::prelude::*;

use super::epilogue::{epilogue_bf16, Activation};
use super::walk::{Packed, Rows};
use super::{err, isa, sealed, ActScratch, AlignedVec, Precision, Prepared, QuantError, RowQuant};

/// The bf16 precision: bf16 x bf16 products, f32 sums.
pub struct Bf16;

/// f32 -> bf16 bits, round to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
#[inline(always)]
pub fn from_bf16(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

impl Packed<Bf16> {
    /// Rounds `w` `[n, k]` row-major (one row per output column) to bf16 and packs it.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Result<Self, QuantError> {
        if w.len() != n * k {
            return err(format!(
                "PackedBf16::pack: {} values for a [{n}, {k}] matrix",
                w.len()
            ));
        }
        Ok(Self::from_fn(n, k, |i| to_bf16(w[i])))
    }
}

/// Converts `rows` rows of `x` (`k` wide) to bf16 rows of `kp` values (zero-padded).
pub fn bf16_rows(x: &[f32], rows: usize, k: usize, kp: usize, dst: &mut AlignedVec<u16>) {
    assert!(x.len() >= rows * k && kp >= k, "bf16_rows: sizes");
    if dst.len() < rows * kp {
        dst.resize(rows * kp);
    }
    if rows == 0 || k == 0 {
        dst[..rows * kp].iter_mut().for_each(|v| *v = 0);
        return;
    }
    dst[..rows * kp]
        .par_chunks_mut(kp * 16)
        .zip(x[..rows * k].par_chunks(k * 16))
        .for_each(|(a, x)| {
            for (a, x) in a.chunks_mut(kp).zip(x.chunks(k)) {
                for (d, &v) in a.iter_mut().zip(x) {
                    *d = to_bf16(v);
                }
                a[x.len()..].iter_mut().for_each(|v| *v = 0);
            }
        });
}

impl sealed::Sealed for Bf16 {}

impl Precision for Bf16 {
    type A = u16;
    type W = u16;
    type Acc = f32;
    const NAME: &'static str = "bf16";
    const GROUP: usize = 2;
    const COLSUMS: bool = false;

    fn table() -> &'static [isa::Entry<Self>] {
        isa::BF16
    }

    fn pack_weights(w: &[f32], n: usize, k: usize) -> Result<(Packed<Self>, Vec<f32>), QuantError> {
        Ok((Packed::<Bf16>::pack(w, n, k)?, Vec::new()))
    }

    fn prepare<'s>(
        x: &[f32],
        rows: usize,
        k: usize,
        kp: usize,
        s: &'s mut ActScratch,
    ) -> Prepared<'s, u16> {
        bf16_rows(x, rows, k, kp, &mut s.a16);
        Prepared {
            rows: Rows {
                a: &s.a16[..rows * kp],
                rows,
                kp,
            },
            quant: None,
        }
    }

    fn row_epilogue(
        acc: &[f32],
        _q: Option<RowQuant<'_>>,
        bias: &[f32],
        act: Activation,
        out: &mut [f32],
    ) {
        epilogue_bf16(acc, bias, act, out);
    }
}
