//! bf16 dense layers: weights rounded to bf16 once, activations per row, f32 sums in a fixed
//! order on the kernel the CPU has. See the module above for the scheme.

use rayon::prelude::*;

use super::epilogue::*;
use super::*;

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

pub(crate) fn convert_row_imp(x: &[f32], a: &mut [u16]) {
    for (d, &v) in a.iter_mut().zip(x) {
        *d = to_bf16(v);
    }
    a[x.len()..].iter_mut().for_each(|v| *v = 0);
}

/// bf16 weights packed for the kernels: panel `p` holds columns `16p..16p+16` as
/// `[k / 2][16 columns][2 values]` (k zero-padded to even, columns to a multiple of 16).
#[derive(Clone)]
pub struct PackedBf16 {
    pub n: usize,
    pub k: usize,
    pub kp: usize,
    pub panels: usize,
    pub data: AlignedVec<u16>,
}

impl PackedBf16 {
    /// Rounds `w` `[n, k]` row-major to bf16 and packs it.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Result<Self, QuantError> {
        if w.len() != n * k {
            return err(format!(
                "PackedBf16::pack: {} values for a [{n}, {k}] matrix",
                w.len()
            ));
        }
        let kp = k.div_ceil(2) * 2;
        let panels = n.div_ceil(PANEL);
        let mut data = AlignedVec::<u16>::zeroed(panels * kp * PANEL);
        for c in 0..n {
            let (p, l) = (c / PANEL, c % PANEL);
            let base = p * kp * PANEL;
            for i in 0..k {
                data[base + (i / 2) * PANEL * 2 + l * 2 + i % 2] = to_bf16(w[c * k + i]);
            }
        }
        Ok(Self {
            n,
            k,
            kp,
            panels,
            data,
        })
    }
}

/// # Safety
/// As [`int8_tile`], with `a` rows of `kp` bf16 values and panels of `kp * 16` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bf16_tile(
    kernel: Bf16Kernel,
    a: *const u16,
    lda: usize,
    mr: usize,
    b: *const u16,
    np: usize,
    kp: usize,
    out: &mut TileBuf<f32>,
) {
    match kernel {
        Bf16Kernel::Portable => portable::bf16_tile(a, lda, mr, b, np, kp, out),
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx2 => avx2bf16::bf16_tile(a, lda, mr, b, np, kp, out),
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx512Bf16 => avx512bf16::bf16_tile(a, lda, mr, b, np, kp, out),
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Amx => amx::bf16_tile(a, lda, mr, b, np, kp, out),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable kernel is supported off x86_64"),
    }
}

/// bf16 activations: rows of `kp` values.
pub struct Bf16Rows<'a> {
    pub a: &'a [u16],
    pub rows: usize,
    pub kp: usize,
}

/// Converts `rows` rows of `x` (`k` wide) to bf16 rows of `kp` values.
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
                convert_row_imp(x, a);
            }
        });
}

pub(crate) fn check_bf16(
    kernel: Bf16Kernel,
    a: &Bf16Rows,
    b: &PackedBf16,
) -> Result<(), QuantError> {
    if !kernel.supported() {
        return err(format!(
            "the {} kernel is not supported by this CPU",
            kernel.name()
        ));
    }
    if a.kp != b.kp || a.a.len() < a.rows * a.kp {
        return err(format!(
            "bf16 product: activations hold {} values for {} rows of {} (weights want {})",
            a.a.len(),
            a.rows,
            a.kp,
            b.kp
        ));
    }
    if b.panels != b.n.div_ceil(PANEL)
        || b.kp != b.k.div_ceil(2) * 2
        || b.data.len() != b.panels * b.kp * PANEL
    {
        return err("bf16 product: packed weights have the wrong size");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn bf16_block(
    kernel: Bf16Kernel,
    a: &Bf16Rows,
    b: &PackedBf16,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    emit: impl FnMut(usize, usize, usize, usize, &TileBuf<f32>),
) {
    let tile = |r: usize, mr: usize, p: usize, np: usize, buf: &mut TileBuf<f32>| {
        // SAFETY: check_bf16 verified the buffer sizes; walk_tiles keeps r + mr <= rows and
        // p + np <= panels, within the kernel's tile shape; the kernel is supported.
        unsafe {
            bf16_tile(
                kernel,
                a.a.as_ptr().add(r * a.kp),
                a.kp,
                mr,
                b.data.as_ptr().add(p * b.kp * PANEL),
                np,
                b.kp,
                buf,
            )
        }
    };
    walk_tiles(kernel.tile_shape(), b.n, (r0, r1), (p0, p1), tile, emit);
}

/// `C[m, n] = A[m, k] x B[n, k]^T` in bf16 with f32 accumulation, row-major (for the tests).
pub fn gemm_bf16_f32(
    kernel: Bf16Kernel,
    a: &Bf16Rows,
    b: &PackedBf16,
) -> Result<Vec<f32>, QuantError> {
    check_bf16(kernel, a, b)?;
    let (m, n) = (a.rows, b.n);
    let mut c = vec![0f32; m * n];
    let out = OutPtr {
        ptr: c.as_mut_ptr(),
        ld: n,
    };
    for_each_block(
        m,
        b.panels,
        kernel.block_shape(),
        2 * m * n * b.kp,
        |r0, r1, p0, p1| {
            let emit = per_row(|r, c0, v: &[f32]| {
                // SAFETY: r < m, c0 + v.len() <= n; blocks are disjoint.
                let d = unsafe { out.slice(r * n + c0, v.len()) };
                d.copy_from_slice(v);
            });
            bf16_block(kernel, a, b, r0, r1, p0, p1, emit);
        },
    );
    Ok(c)
}

/// A dense layer with bf16 weights; activations are rounded to bf16 per row.
pub struct Bf16Linear {
    w: PackedBf16,
    bias: Vec<f32>,
}

impl Bf16Linear {
    pub fn new(weight: &[f32], bias: &[f32], out: usize, inp: usize) -> Result<Self, QuantError> {
        if bias.len() != out {
            return err(format!(
                "Bf16Linear: bias of {} for {out} outputs",
                bias.len()
            ));
        }
        Ok(Self {
            w: PackedBf16::pack(weight, out, inp)?,
            bias: bias.to_vec(),
        })
    }

    pub fn out_dim(&self) -> usize {
        self.w.n
    }

    pub fn in_dim(&self) -> usize {
        self.w.k
    }

    /// As [`Int8Linear::forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        kernel: Bf16Kernel,
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
        bf16_rows(x, rows, k, kp, &mut scratch.a16);
        let a = Bf16Rows {
            a: &scratch.a16[..rows * kp],
            rows,
            kp,
        };
        check_bf16(kernel, &a, &self.w)?;
        let out = OutPtr {
            ptr: dst.as_mut_ptr(),
            ld,
        };
        let block = kernel.block_shape();
        for_each_block(
            rows,
            self.w.panels,
            block,
            2 * rows * n * k,
            |r0, r1, p0, p1| {
                bf16_block(
                    kernel,
                    &a,
                    &self.w,
                    r0,
                    r1,
                    p0,
                    p1,
                    |r, mr, c0, cols, buf| {
                        let bias = &self.bias[c0..c0 + cols];
                        // SAFETY: as in Int8Linear::forward.
                        let done = unsafe {
                            epilogue_tile(
                                buf,
                                mr,
                                cols,
                                None,
                                bias,
                                act,
                                out.ptr.add(r * out.ld + col + c0),
                                out.ld,
                            )
                        };
                        if done {
                            return;
                        }
                        for i in 0..mr {
                            // SAFETY: as in Int8Linear::forward.
                            let d = unsafe { out.slice((r + i) * out.ld + col + c0, cols) };
                            epilogue_bf16(&buf[i * MAX_NP * PANEL..][..cols], bias, act, d);
                        }
                    },
                );
            },
        );
        Ok(())
    }
}
