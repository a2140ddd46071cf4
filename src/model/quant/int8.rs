//! int8 dense layers: weights packed per output channel (s8), activations quantized per row
//! (`quantize.rs`), exact i32 products on the kernel the CPU has, and the fused epilogue. See
//! the module above for the scheme.

use rayon::prelude::*;

use super::epilogue::*;
use super::outliers::{coarse_row, quantize_weights, WeightResidual};
use super::*;

/// int8 weights packed for the kernels: panel `p` holds output columns `16p..16p+16`, as
/// `[k / 4][16 columns][4 values]` signed bytes (k zero-padded to a multiple of 4, columns
/// zero-padded to a multiple of 16).
#[derive(Clone)]
pub struct PackedI8 {
    pub n: usize,
    pub k: usize,
    pub kp: usize,
    pub panels: usize,
    /// Crate-private: the AVX2 kernel relies on `pack`'s guarantee that no weight is -128.
    pub(crate) data: AlignedVec<i8>,
    /// Sum over k of each (padded) column's weights, for the zero-point correction.
    pub(crate) colsum: Vec<i32>,
}

impl PackedI8 {
    /// Packs `q` `[n, k]` row-major (one row per output column).
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
        // Symmetric weights lie in [-127, 127]; the AVX2 kernel relies on it (|w| <= 127).
        if let Some(i) = q.iter().position(|&v| v == i8::MIN) {
            return err(format!(
                "PackedI8::pack: weight {i} is -128; symmetric int8 weights lie in [-127, 127]"
            ));
        }
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(PANEL);
        let mut data = AlignedVec::<i8>::zeroed(panels * kp * PANEL);
        let mut colsum = vec![0i32; panels * PANEL];
        for c in 0..n {
            let (p, l) = (c / PANEL, c % PANEL);
            let base = p * kp * PANEL;
            for i in 0..k {
                let v = q[c * k + i];
                data[base + (i / 4) * PANEL * 4 + l * 4 + i % 4] = v;
                colsum[c] += v as i32;
            }
        }
        Ok(Self {
            n,
            k,
            kp,
            panels,
            data,
            colsum,
        })
    }
}

/// Runs the int8 kernel on one tile: rows `a` (stride `lda`, `mr` rows), panels starting at
/// `b` (`np` panels, whose column sums start at `colsum`); `out[r * 64 + j]` receives the
/// exact i32 products.
///
/// # Safety
/// `kernel.supported()`; `a` covers `mr` rows of `kp` bytes at stride `lda`; `b` covers `np`
/// panels of `kp * 16` bytes packed by [`PackedI8::pack`] (so no weight is -128) and `colsum`
/// their `np * 16` column sums; `mr`, `np` fit the kernel's tile shape.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn int8_tile(
    kernel: Int8Kernel,
    a: *const u8,
    lda: usize,
    mr: usize,
    b: *const i8,
    np: usize,
    kp: usize,
    colsum: *const i32,
    out: &mut TileBuf<i32>,
) {
    match kernel {
        Int8Kernel::Portable => portable::int8_tile(a, lda, mr, b, np, kp, out),
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => avx2::int8_tile(a, lda, mr, b, np, kp, colsum, out),
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::AvxVnni => avxvnni::int8_tile(a, lda, mr, b, np, kp, out),
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx512Vnni => avx512vnni::int8_tile(a, lda, mr, b, np, kp, out),
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Amx => amx::int8_tile(a, lda, mr, b, np, kp, out),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable kernel is supported off x86_64"),
    }
}

/// Splits `rows` x `panels` into tasks of `block` (rows, panels) and runs `f(r0, r1, p0, p1)`
/// on each, in parallel when the product is large enough.
pub(crate) fn for_each_block(
    rows: usize,
    panels: usize,
    block: (usize, usize),
    flops: usize,
    f: impl Fn(usize, usize, usize, usize) + Sync,
) {
    let (row_block, panel_block) = block;
    let rb = rows.div_ceil(row_block);
    let pb = panels.div_ceil(panel_block);
    let task = |t: usize| {
        let (i, j) = (t / pb, t % pb);
        let r0 = i * row_block;
        let p0 = j * panel_block;
        f(
            r0,
            (r0 + row_block).min(rows),
            p0,
            (p0 + panel_block).min(panels),
        );
    };
    if rayon::current_num_threads() > 1 && flops > (1 << 20) {
        (0..rb * pb).into_par_iter().for_each(task);
    } else {
        (0..rb * pb).for_each(task);
    }
}

/// The exact i32 product `C[m, n] = A[m, k] (u8) x B[n, k]^T (s8)`, row-major, through
/// `kernel`; the reference the layers build on, used by the tests.
pub fn gemm_u8s8_i32(
    kernel: Int8Kernel,
    a: &QuantRows,
    b: &PackedI8,
) -> Result<Vec<i32>, QuantError> {
    check_int8(kernel, a, b)?;
    let (m, n) = (a.rows, b.n);
    let mut c = vec![0i32; m * n];
    let out = SharedI32(c.as_mut_ptr());
    for_each_block(
        m,
        b.panels,
        kernel.block_shape(),
        2 * m * n * b.kp,
        |r0, r1, p0, p1| {
            let out = &out;
            let emit = per_row(|r, c0, acc: &[i32]| {
                // SAFETY: r < m and c0 + acc.len() <= n; blocks are disjoint.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add(r * n + c0), acc.len()) };
                dst.copy_from_slice(acc);
            });
            int8_block(kernel, a, b, r0, r1, p0, p1, emit);
        },
    );
    Ok(c)
}

/// The largest input width whose int8 sums stay exact in i32: 255 * 127 * k < 2^31.
pub const MAX_INT8_K: usize = (i32::MAX as usize) / (255 * 127);

pub(crate) struct SharedI32(*mut i32);
// SAFETY: tasks write disjoint elements.
unsafe impl Sync for SharedI32 {}

pub(crate) fn check_int8(
    kernel: Int8Kernel,
    a: &QuantRows,
    b: &PackedI8,
) -> Result<(), QuantError> {
    if !kernel.supported() {
        return err(format!(
            "the {} kernel is not supported by this CPU",
            kernel.name()
        ));
    }
    if a.kp != b.kp || a.a.len() < a.rows * a.kp {
        return err(format!(
            "int8 product: activations hold {} bytes for {} rows of {} (weights want {})",
            a.a.len(),
            a.rows,
            a.kp,
            b.kp
        ));
    }
    if b.panels != b.n.div_ceil(PANEL)
        || b.kp != b.k.div_ceil(4) * 4
        || b.data.len() != b.panels * b.kp * PANEL
        || b.colsum.len() != b.panels * PANEL
    {
        return err("int8 product: packed weights have the wrong size");
    }
    Ok(())
}

/// Rows `r0..r1`, panels `p0..p1`: `emit` receives each tile of exact i32 products (as
/// [`walk_tiles`]).
/// The caller has checked the sizes (`check_int8`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn int8_block(
    kernel: Int8Kernel,
    a: &QuantRows,
    b: &PackedI8,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    emit: impl FnMut(usize, usize, usize, usize, &TileBuf<i32>),
) {
    let tile = |r: usize, mr: usize, p: usize, np: usize, buf: &mut TileBuf<i32>| {
        // SAFETY: check_int8 verified that `a` holds rows * kp bytes and `b` panels * kp * 16;
        // walk_tiles keeps r + mr <= r1 <= rows and p + np <= p1 <= panels, within the
        // kernel's tile shape; the kernel is supported. `b` was built by `PackedI8::pack`
        // (its data and column sums are crate-private), so no weight is -128 and
        // `colsum` holds panels * 16 sums.
        unsafe {
            int8_tile(
                kernel,
                a.a.as_ptr().add(r * a.kp),
                a.kp,
                mr,
                b.data.as_ptr().add(p * b.kp * PANEL),
                np,
                b.kp,
                b.colsum.as_ptr().add(p * PANEL),
                buf,
            )
        }
    };
    walk_tiles(kernel.tile_shape(), b.n, (r0, r1), (p0, p1), tile, emit);
}

/// A dense layer `y = x W^T + b` with int8 weights (symmetric, per output channel) and
/// activations quantized per row at run time.
///
/// Outliers get a second int8 pass (see `outliers.rs`): an output channel whose weights hold
/// a few values far above the rest gets a residual weight row, and a token row whose values
/// hold a few far above the rest gets a residual activation row, each holding what the first
/// rounding lost. Both run on the same kernels; the activation, if any, runs after them.
pub struct Int8Linear {
    w: PackedI8,
    /// Per output channel: `w[n][i] ~ wscale[n] * q[n][i]`.
    wscale: Vec<f32>,
    bias: Vec<f32>,
    residual: Option<Box<WeightResidual>>,
    /// Token rows whose range exceeds this many times their RMS get a residual activation
    /// row; `None`: no row does.
    row_ratio: Option<f32>,
}

impl Int8Linear {
    /// Quantizes `weight` `[out, in]` (row-major) and keeps `bias` `[out]`.
    pub fn new(weight: &[f32], bias: &[f32], out: usize, inp: usize) -> Result<Self, QuantError> {
        if weight.len() != out * inp || bias.len() != out {
            return err(format!(
                "Int8Linear: weight of {} values and bias of {} for [{out}, {inp}]",
                weight.len(),
                bias.len()
            ));
        }
        let mut q = vec![0i8; out * inp];
        let mut wscale = vec![0f32; out];
        for c in 0..out {
            let (row, qc) = (
                &weight[c * inp..(c + 1) * inp],
                &mut q[c * inp..(c + 1) * inp],
            );
            wscale[c] = quantize_weights(row, qc);
        }
        Ok(Self {
            residual: WeightResidual::new(weight, &q, &wscale, inp)?.map(Box::new),
            w: PackedI8::pack(&q, out, inp)?,
            wscale,
            bias: bias.to_vec(),
            row_ratio: None,
        })
    }

    /// Gives token rows whose range exceeds `ratio` times their RMS a residual activation row
    /// (for inputs with outlier dimensions, such as LayerNorm outputs: see `outliers.rs`).
    pub fn with_row_residual(mut self, ratio: f32) -> Self {
        self.row_ratio = Some(ratio);
        self
    }

    pub fn out_dim(&self) -> usize {
        self.w.n
    }

    pub fn in_dim(&self) -> usize {
        self.w.k
    }

    /// How many output channels carry a residual weight row.
    pub fn residual_channels(&self) -> usize {
        self.residual.as_ref().map_or(0, |r| r.cols.len())
    }

    /// `dst[r * ld + col + j] = act(x[r] W^T + b)[j]` for `rows` rows of `x` (`in_dim` wide).
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
        let (n, k, kp) = (self.w.n, self.w.k, self.w.kp);
        check_dst(x.len(), rows, k, dst.len(), ld, col, n)?;
        if rows == 0 {
            return Ok(());
        }
        let Scratch {
            a8,
            scale,
            zero,
            outliers,
            ..
        } = scratch;
        if a8.len() < rows * kp {
            a8.resize(rows * kp);
        }
        scale.resize(rows.max(scale.len()), 0.0);
        zero.resize(rows.max(zero.len()), 0);
        outliers
            .coarse
            .resize(rows.max(outliers.coarse.len()), false);
        let ratio = self.row_ratio;
        a8[..rows * kp]
            .par_chunks_mut(kp * 16)
            .zip(x[..rows * k].par_chunks(k * 16))
            .zip(scale[..rows].par_chunks_mut(16))
            .zip(zero[..rows].par_chunks_mut(16))
            .zip(outliers.coarse[..rows].par_chunks_mut(16))
            .for_each(|((((a, x), sc), z), c)| {
                let rows = a.chunks_mut(kp).zip(x.chunks(k)).zip(sc).zip(z).zip(c);
                for ((((a, x), sc), z), c) in rows {
                    (*sc, *z) = quantize_row(x, a);
                    *c = ratio.is_some_and(|t| coarse_row(x, *sc, t));
                }
            });
        let a = QuantRows {
            a: &a8[..rows * kp],
            rows,
            kp,
        };
        check_int8(kernel, &a, &self.w)?;
        let rs = RowScales {
            scale: &scale[..rows],
            zero: &zero[..rows],
        };
        let out = OutPtr {
            ptr: dst.as_mut_ptr(),
            ld,
        };
        let any_coarse = outliers.coarse[..rows].contains(&true);
        if self.residual.is_none() && !any_coarse {
            product(
                kernel,
                &a,
                rs,
                &self.w,
                &self.wscale,
                &self.bias,
                act,
                out,
                col,
            );
            return Ok(());
        }
        // The corrections join their columns before the activation, which runs after them.
        let none = Activation::None;
        product(
            kernel,
            &a,
            rs,
            &self.w,
            &self.wscale,
            &self.bias,
            none,
            out,
            col,
        );
        if let Some(res) = &self.residual {
            res.run(kernel, &a, rs, &mut outliers.wcorr)?;
        }
        outliers.run_rows(kernel, x, &a, rs, &self.w, &self.wscale)?;
        let wres = self
            .residual
            .as_ref()
            .map(|r| (&r.cols[..], &outliers.wcorr[..]));
        outliers.apply(dst, rows, ld, col, n, wres, act);
        Ok(())
    }
}

/// The per-row scales and zero points of quantized activations.
#[derive(Clone, Copy)]
pub(crate) struct RowScales<'a> {
    pub scale: &'a [f32],
    pub zero: &'a [i32],
}

/// `out[r, col + j] = act(scale_r * wscale_j * (dot(a_r, w_j) - zero_r * colsum_j) + bias_j)`
/// for every row of `a` and column of `w`, in parallel blocks.
///
/// The caller has checked the sizes (`check_int8`), and `out` holds `a.rows` rows of `col +
/// w.n` values at stride `out.ld` (`check_dst`) that nothing else touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    kernel: Int8Kernel,
    a: &QuantRows,
    rs: RowScales,
    w: &PackedI8,
    wscale: &[f32],
    bias: &[f32],
    act: Activation,
    out: OutPtr,
    col: usize,
) {
    let (scale, zero) = (rs.scale, rs.zero);
    for_each_block(
        a.rows,
        w.panels,
        kernel.block_shape(),
        2 * a.rows * w.n * w.k,
        |r0, r1, p0, p1| {
            int8_block(kernel, a, w, r0, r1, p0, p1, |r, mr, c0, cols, buf| {
                let c1 = c0 + cols;
                // SAFETY: rows r..r + mr <= a.rows and columns col + c0..col + c1 <= col +
                // w.n <= out.ld, within `out` by this function's contract; tasks own
                // disjoint (row, column) blocks.
                let done = unsafe {
                    epilogue_tile(
                        buf,
                        mr,
                        cols,
                        Some((
                            &zero[r..r + mr],
                            &scale[r..r + mr],
                            &w.colsum[c0..c1],
                            &wscale[c0..c1],
                        )),
                        &bias[c0..c1],
                        act,
                        out.ptr.add(r * out.ld + col + c0),
                        out.ld,
                    )
                };
                if done {
                    return;
                }
                for i in 0..mr {
                    let acc = &buf[i * MAX_NP * PANEL..][..cols];
                    // SAFETY: as above, row r + i.
                    let d = unsafe { out.slice((r + i) * out.ld + col + c0, cols) };
                    epilogue_i8(
                        acc,
                        zero[r + i],
                        scale[r + i],
                        &w.colsum[c0..c1],
                        &wscale[c0..c1],
                        &bias[c0..c1],
                        act,
                        d,
                    );
                }
            });
        },
    );
}
