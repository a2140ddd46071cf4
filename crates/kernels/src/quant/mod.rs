//! Quantized dense layers for inference: int8 (u8 activations x s8 weights -> exact i32) and
//! bf16 (bf16 x bf16 products, f32 accumulation), one kernel per instruction set chosen at run
//! time.
//!
//! The layout follows ONNX Runtime's MLAS: weights are packed once at load into panels of 16
//! output columns, each panel holding, for every group of 4 (int8) or 2 (bf16) input values,
//! the 16 columns' values side by side. That is the operand shape of `vpdpbusd` (4 u8 x 4 s8
//! per i32 lane) and `vdpbf16ps` (2 bf16 x 2 bf16 per f32 lane), so the kernels stream a panel
//! with plain vector loads and broadcast 4 (2) activation values per row. The same panels are
//! the B tiles of Intel AMX (16 groups x 64 bytes).
//!
//! int8: weights are symmetric per output channel, `w = s_n * q` with `q` in [-127, 127].
//! Activations are quantized per token row at run time, asymmetric u8 with the row's own scale
//! and zero point: `x = s_r * (a - z_r)` with `a` in [0, 255]. A kernel computes the exact
//! `dot(a_r, q_n)` in i32 (every kernel gives the same integers, which the tests check), and
//! the epilogue subtracts `z_r * colsum(q_n)`, the MLAS trick that makes the u8 x s8 product
//! of the VNNI instructions serve signed data. Since a row's scale depends on that row alone
//! and the integer product is exact, a token's output never depends on its batch-mates.
//!
//! bf16: weights are rounded to bf16 once (round to nearest even), activations per row. Each
//! output column is one f32 lane that accumulates the k pairs in a fixed order whatever the
//! number of rows or the tiling, so results are batch invariant too. The portable bf16 kernel
//! emulates `vdpbf16ps` (odd product first, then even, each rounded to f32); it matches the
//! AVX-512 kernel closely but not necessarily bit for bit (the instruction flushes denormals).
//!
//! One driver serves both precisions, as MLAS's `MlasGemmQuantOperation` does: a
//! [`Precision`] names the element types, the packing group and how activations are prepared
//! and results finished; `walk.rs` splits a product into parallel blocks and register tiles
//! and hands each tile to the kernel; `linear.rs` is the dense layer on top. The kernels, one
//! file per instruction set in `isa/`, are listed in one table per precision
//! ([`isa::INT8`], [`isa::BF16`]): adding an instruction set is one file and one line there.
//!
//! int8 outliers (`outliers.rs`): [`Int8Linear`] is the int8 [`Linear`] plus a second int8
//! pass, on the same driver and kernels, for output channels whose weights and token rows
//! whose activations hold a few values far above the rest.
//!
//! Kernels: `FETCH_ML_KERNEL=portable|avx2|avxvnni|avx512vnni|amx` (int8) or
//! `portable|avx2bf16|avx512bf16|amxbf16` (bf16) forces one; without it the fastest the CPU
//! has (and the operating system allows, for AMX) is used.

use std::fmt;

pub use aligned::{AlignedVec, Plain};
pub use bf16::{bf16_rows, from_bf16, to_bf16, Bf16};
pub use block::bf16_block;
pub use epilogue::Activation;
pub use int8::{Int8, MAX_INT8_K};
pub use kernel::{Bf16Kernel, Int8Kernel, Kernel};
pub use linear::{Bf16Linear, Linear};
pub use outliers::{Int8Linear, ROW_OUTLIER_RATIO, WEIGHT_OUTLIER_RATIO};
pub use quantize::quantize_row;
pub use walk::{product, Packed, PackedBf16, PackedI8, Rows};

mod aligned;
mod bf16;
mod block;
mod epilogue;
#[cfg(target_arch = "x86_64")]
mod epilogue_avx2;
mod int8;
pub(crate) mod isa;
mod kernel;
mod linear;
mod outliers;
mod quantize;
mod walk;

/// An error of the quantized layers: a buffer of the wrong size or an unusable kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantError(pub String);

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantError {}

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T, QuantError> {
    Err(QuantError(msg.into()))
}

/// Output columns per packed panel: one 512-bit vector of i32 or f32 lanes.
pub const PANEL: usize = 16;

/// Rows of a tile, at most (the largest block of any kernel: AMX's 2 x 16 rows).
pub(crate) const MAX_MR: usize = 32;
/// Panels of a tile, at most.
pub(crate) const MAX_NP: usize = 4;
/// Lanes of one row of a tile buffer.
pub(crate) const LANES: usize = MAX_NP * PANEL;
/// A kernel's output tile: `MAX_MR` rows of `LANES` lanes.
pub(crate) type TileBuf<T> = [T; MAX_MR * LANES];

mod sealed {
    pub trait Sealed {}
}

/// A precision of the quantized products: its element types, how its weights are packed and
/// its activations prepared, and how a tile of sums becomes outputs. Implemented by [`Int8`]
/// and [`Bf16`] only.
pub trait Precision: sealed::Sealed + Sized + Send + Sync + 'static {
    /// An activation value as the kernels read it (u8, or bf16 bits).
    type A: Plain + Send + Sync;
    /// A packed weight (s8, or bf16 bits).
    type W: Plain + Send + Sync;
    /// A kernel's sum (exact i32, or f32).
    type Acc: Copy + Default + Send + Sync + PartialEq + fmt::Debug + 'static;
    /// "int8" or "bf16", for messages.
    const NAME: &'static str;
    /// Input values per 32-bit lane of a panel (4 s8 or 2 bf16): rows and panels hold k
    /// rounded up to a multiple of it.
    const GROUP: usize;
    /// Whether the packed weights carry their column sums (int8's zero-point correction).
    const COLSUMS: bool;

    /// The kernels of this precision, portable first, best last (see [`isa`]).
    fn table() -> &'static [isa::Entry<Self>];

    /// Packs `weight` `[n, k]` (row-major, one row per output column) for the kernels, with
    /// one scale per output column when the values were quantized (empty otherwise).
    fn pack_weights(
        weight: &[f32],
        n: usize,
        k: usize,
    ) -> Result<(Packed<Self>, Vec<f32>), QuantError>;

    /// Converts `rows` rows of `x` (`k` wide) into kernel rows of `kp` values in `scratch`,
    /// with their per-row zero points and scales when the precision quantizes them.
    fn prepare<'s>(
        x: &[f32],
        rows: usize,
        k: usize,
        kp: usize,
        scratch: &'s mut ActScratch,
    ) -> Prepared<'s, Self::A>;

    /// One row of the epilogue without the vector tile code: `out = act(sums + bias)`, the
    /// int8 sums first corrected and scaled by `q`.
    fn row_epilogue(
        acc: &[Self::Acc],
        q: Option<RowQuant<'_>>,
        bias: &[f32],
        act: Activation,
        out: &mut [f32],
    );
}

/// Prepared activations: the kernel rows and, for int8, each row's zero point and scale.
pub struct Prepared<'s, A> {
    pub(crate) rows: Rows<'s, A>,
    pub(crate) quant: Option<(&'s [i32], &'s [f32])>,
}

/// The int8 epilogue's inputs for a tile: the rows' zero points and scales, the columns'
/// weight sums and scales.
#[derive(Clone, Copy)]
pub struct TileQuant<'a> {
    pub zero: &'a [i32],
    pub scale: &'a [f32],
    pub colsum: &'a [i32],
    pub wscale: &'a [f32],
}

/// The int8 epilogue's inputs for one row.
#[derive(Clone, Copy)]
pub struct RowQuant<'a> {
    pub zero: i32,
    pub scale: f32,
    pub colsum: &'a [i32],
    pub wscale: &'a [f32],
}

impl<'a> TileQuant<'a> {
    fn row(self, i: usize) -> RowQuant<'a> {
        RowQuant {
            zero: self.zero[i],
            scale: self.scale[i],
            colsum: self.colsum,
            wscale: self.wscale,
        }
    }
}

/// Reusable buffers of the quantized layers, kept across layers and batches.
#[derive(Default)]
pub struct Scratch {
    acts: ActScratch,
    /// int8's second passes (`outliers.rs`).
    outliers: outliers::OutlierScratch,
}

/// Buffers of prepared activations: the kernel rows and the rows' scales and zero points.
#[derive(Default)]
pub struct ActScratch {
    a8: AlignedVec<u8>,
    a16: AlignedVec<u16>,
    scale: Vec<f32>,
    zero: Vec<i32>,
}

#[cfg(test)]
mod tests;
