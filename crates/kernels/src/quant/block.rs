//! One small bf16 product in the calling thread, for the blocks of tiled attention: the
//! scores of a tile of queries against a block of keys (`Q K^T`), and the weighted values
//! (`P V`), each with the block's keys (or values) packed as the "weights" of
//! [`super::Packed`]. The parallel split is the caller's (one task per tile of queries), so
//! this walks its rows and panels on one thread, with the same kernels and tile walk as the
//! dense layers.

use super::walk::{check, walk_block};
use super::{err, Bf16, Kernel, Packed, QuantError, Rows, LANES, PANEL};

/// `out[i * ld + j] = scale * dot(a_i, b_j)` (or `+=` with `accumulate`) for every row `i` of
/// `a` and every column `j` of `b` (`b.n` of them), on `kernel`, in the calling thread.
/// Errors when the operands do not fit each other, `out` is too small, or the CPU lacks the
/// kernel.
pub fn bf16_block(
    kernel: Kernel<Bf16>,
    a: &Rows<u16>,
    b: &Packed<Bf16>,
    scale: f32,
    accumulate: bool,
    out: &mut [f32],
    ld: usize,
) -> Result<(), QuantError> {
    check(kernel, a, b)?;
    let n = b.n;
    if n > ld || (a.rows > 0 && (a.rows - 1) * ld + n > out.len()) {
        return err(format!(
            "bf16 block: an output of {} values for {} rows of {n} at stride {ld}",
            out.len(),
            a.rows
        ));
    }
    walk_block(
        kernel,
        a,
        b,
        (0, a.rows),
        (0, b.panels),
        |r, mr, c0, cols, buf| {
            for i in 0..mr {
                let dst = &mut out[(r + i) * ld + c0..][..cols];
                let src = &buf[i * LANES..][..cols];
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += scale * s);
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = scale * s);
                }
            }
        },
    );
    debug_assert!(b.panels * PANEL >= n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{bf16_rows, from_bf16, to_bf16, AlignedVec, Bf16Kernel};
    use super::*;

    /// Every bf16 kernel the CPU has against f64 sums of the bf16-rounded operands, with a
    /// stride, a scale, accumulation, and sizes off the tile edges.
    #[test]
    fn blocks_match_rounded_sums() {
        let (m, n, k, ld) = (37, 41, 24, 50);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 5.0)
            .collect();
        let b = Packed::<Bf16>::pack(&w, n, k).unwrap();
        let mut rows = AlignedVec::<u16>::zeroed(0);
        bf16_rows(&a, m, k, b.kp, &mut rows);
        let r = Rows {
            a: &rows,
            rows: m,
            kp: b.kp,
        };
        let round = |v: f32| from_bf16(to_bf16(v)) as f64;
        for kernel in Bf16Kernel::all().filter(|k| k.supported()) {
            let mut out = vec![1.0f32; m * ld];
            bf16_block(kernel, &r, &b, 0.5, true, &mut out, ld).unwrap();
            for i in 0..m {
                for j in 0..ld {
                    let want = if j < n {
                        1.0 + 0.5
                            * (0..k)
                                .map(|c| round(a[i * k + c]) * round(w[j * k + c]))
                                .sum::<f64>()
                    } else {
                        1.0
                    };
                    let got = out[i * ld + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{kernel:?} ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
        let mut small = vec![0f32; 10];
        assert!(bf16_block(Bf16Kernel::portable(), &r, &b, 1.0, false, &mut small, ld).is_err());
    }
}
