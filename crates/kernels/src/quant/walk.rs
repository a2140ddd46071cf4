//! The one driver of both precisions: packed weights ([`Packed`]), kernel rows ([`Rows`]),
//! their size checks, the split of a product into parallel blocks, and the tile walk that
//! hands each register tile to the kernel and each finished tile to an epilogue.

use std::marker::PhantomData;

use rayon::prelude::*;

use super::isa::Tile;
use super::{err, AlignedVec, Bf16, Int8, Kernel, Precision, QuantError, TileBuf};
use super::{LANES, MAX_MR, MAX_NP, PANEL};

/// Weights packed for the kernels: panel `p` holds output columns `16p..16p+16`, as
/// `[k / G][16 columns][G values]` (`G` = [`Precision::GROUP`]; k zero-padded to a multiple
/// of `G`, columns zero-padded to a multiple of 16).
#[derive(Clone)]
pub struct Packed<P: Precision> {
    pub n: usize,
    pub k: usize,
    pub kp: usize,
    pub panels: usize,
    /// Crate-private: the AVX2 int8 kernel relies on `pack`'s guarantee that no weight is
    /// -128.
    pub(crate) data: AlignedVec<P::W>,
    /// int8: the sum over k of each (padded) column's weights, for the zero-point correction.
    pub(crate) colsum: Vec<i32>,
}

/// int8 weights packed for the kernels.
pub type PackedI8 = Packed<Int8>;
/// bf16 weights packed for the kernels.
pub type PackedBf16 = Packed<Bf16>;

impl<P: Precision> Packed<P> {
    /// Packs the `[n, k]` row-major matrix whose element `c * k + i` is `value(c * k + i)`.
    pub(crate) fn from_fn(n: usize, k: usize, value: impl Fn(usize) -> P::W) -> Self {
        let g = P::GROUP;
        let kp = k.div_ceil(g) * g;
        let panels = n.div_ceil(PANEL);
        let mut data = AlignedVec::<P::W>::zeroed(panels * kp * PANEL);
        for c in 0..n {
            let (p, l) = (c / PANEL, c % PANEL);
            let base = p * kp * PANEL;
            for i in 0..k {
                data[base + (i / g) * PANEL * g + l * g + i % g] = value(c * k + i);
            }
        }
        Self {
            n,
            k,
            kp,
            panels,
            data,
            colsum: Vec::new(),
        }
    }
}

/// Kernel rows: `rows` rows of `kp` values (k padded to the precision's group).
pub struct Rows<'a, A> {
    pub a: &'a [A],
    pub rows: usize,
    pub kp: usize,
}

/// Checks a product's operands against each other and the kernel.
pub(crate) fn check<P: Precision>(
    kernel: Kernel<P>,
    a: &Rows<P::A>,
    b: &Packed<P>,
) -> Result<(), QuantError> {
    if !kernel.supported() {
        return err(format!(
            "the {} kernel is not supported by this CPU",
            kernel.name()
        ));
    }
    if a.kp != b.kp || a.a.len() < a.rows * a.kp {
        return err(format!(
            "{} product: activations hold {} values for {} rows of {} (weights want {})",
            P::NAME,
            a.a.len(),
            a.rows,
            a.kp,
            b.kp
        ));
    }
    let colsums = if P::COLSUMS { b.panels * PANEL } else { 0 };
    if b.panels != b.n.div_ceil(PANEL)
        || b.kp != b.k.div_ceil(P::GROUP) * P::GROUP
        || b.data.len() != b.panels * b.kp * PANEL
        || b.colsum.len() != colsums
    {
        return err(format!(
            "{} product: packed weights have the wrong size",
            P::NAME
        ));
    }
    Ok(())
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

/// Walks rows `r0..r1` x panels `p0..p1` in tiles of `shape` (rows, panels): `tile(r, mr, p,
/// np, buf)` fills `buf` (rows of `LANES` lanes), then `emit(r, mr, column, cols, buf)`
/// receives the tile: `mr` rows from `r`, `cols` valid columns from `column` (`n` columns in
/// all).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn walk_tiles<T: Copy + Default>(
    shape: (usize, usize),
    n: usize,
    (r0, r1): (usize, usize),
    (p0, p1): (usize, usize),
    mut tile: impl FnMut(usize, usize, usize, usize, &mut TileBuf<T>),
    mut emit: impl FnMut(usize, usize, usize, usize, &TileBuf<T>),
) {
    let (mr_max, np_max) = shape;
    debug_assert!(mr_max <= MAX_MR && np_max <= MAX_NP);
    // 64-byte aligned: AMX stores its tiles there.
    #[repr(C, align(64))]
    struct Aligned<T>(TileBuf<T>);
    let mut buf = Aligned([T::default(); MAX_MR * LANES]);
    let buf = &mut buf.0;
    let mut p = p0;
    while p < p1 {
        let np = np_max.min(p1 - p);
        let cols = (np * PANEL).min(n - p * PANEL);
        let mut r = r0;
        while r < r1 {
            let mr = mr_max.min(r1 - r);
            tile(r, mr, p, np, buf);
            emit(r, mr, p * PANEL, cols, buf);
            r += mr;
        }
        p += np;
    }
}

/// Rows `r0..r1`, panels `p0..p1` of `a x b^T` on `kernel`: `emit` receives each tile of sums
/// (as [`walk_tiles`]). The caller has checked the operands ([`check`]).
#[inline(always)]
pub(crate) fn walk_block<P: Precision>(
    kernel: Kernel<P>,
    a: &Rows<P::A>,
    b: &Packed<P>,
    rows: (usize, usize),
    panels: (usize, usize),
    emit: impl FnMut(usize, usize, usize, usize, &TileBuf<P::Acc>),
) {
    let (kp, run) = (b.kp, kernel.0.run);
    let tile = |r: usize, mr: usize, p: usize, np: usize, buf: &mut TileBuf<P::Acc>| {
        let t = Tile::<P> {
            a: &a.a[r * kp..(r + mr) * kp],
            mr,
            b: &b.data[p * kp * PANEL..(p + np) * kp * PANEL],
            np,
            kp,
            colsum: if P::COLSUMS {
                &b.colsum[p * PANEL..(p + np) * PANEL]
            } else {
                &[]
            },
        };
        // SAFETY: `check` verified that the CPU supports the kernel; walk_tiles keeps mr and
        // np within the kernel's tile shape; the slices above are the tile's operands, and
        // `b` was packed by this crate (so int8 weights are never -128).
        unsafe { run(&t, buf) }
    };
    walk_tiles(kernel.tile_shape(), b.n, rows, panels, tile, emit);
}

/// A row-major output shared by the tasks of one product; each task writes its own tiles.
/// It holds the buffer's exclusive borrow for as long as it lives.
pub(crate) struct SharedOut<'a, T> {
    ptr: *mut T,
    len: usize,
    pub ld: usize,
    _buf: PhantomData<&'a mut [T]>,
}

// SAFETY: the tasks of a product write disjoint (row, column) ranges of the buffer, through
// `slice` and `tile_ptr` only, while the buffer's borrow lives (`new` takes it for 'a).
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T> SharedOut<'a, T> {
    pub(crate) fn new(buf: &'a mut [T], ld: usize) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            ld,
            _buf: PhantomData,
        }
    }

    /// `len` values from element `offset`.
    ///
    /// # Safety
    /// No other live slice of the buffer overlaps this one (bounds are checked).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        assert!(offset + len <= self.len, "shared output: out of bounds");
        // SAFETY: within the buffer (asserted); no overlap (this function's contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }

    /// The address of element `offset`, for the tile epilogues, which write `rows` rows of
    /// `cols` values at stride `ld` from it.
    pub(crate) fn tile_ptr(&self, offset: usize, rows: usize, cols: usize) -> *mut T {
        assert!(
            rows == 0 || offset + (rows - 1) * self.ld + cols <= self.len,
            "shared output: tile out of bounds"
        );
        self.ptr.wrapping_add(offset)
    }
}

/// The sums `C[m, n] = A[m, k] x B[n, k]^T` (row-major) on `kernel`: exact i32 for int8, f32
/// for bf16. The reference the layers build on, for the tests and benchmarks.
pub fn product<P: Precision>(
    kernel: Kernel<P>,
    a: &Rows<P::A>,
    b: &Packed<P>,
) -> Result<Vec<P::Acc>, QuantError> {
    check(kernel, a, b)?;
    let (m, n) = (a.rows, b.n);
    let mut c = vec![P::Acc::default(); m * n];
    let out = SharedOut::new(&mut c, n);
    let block = kernel.block_shape();
    for_each_block(m, b.panels, block, 2 * m * n * b.kp, |r0, r1, p0, p1| {
        walk_block(kernel, a, b, (r0, r1), (p0, p1), |r, mr, c0, cols, buf| {
            for i in 0..mr {
                // SAFETY: blocks, and the tiles within a block, cover disjoint (row, column)
                // ranges; r + i < m and c0 + cols <= n.
                let dst = unsafe { out.slice((r + i) * n + c0, cols) };
                dst.copy_from_slice(&buf[i * LANES..][..cols]);
            }
        });
    });
    Ok(c)
}
