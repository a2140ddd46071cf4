//! The kernels, one file per instruction set, and the one table per precision that lists
//! them, as MLAS's platform table does (`MLAS_GEMM_QUANT_DISPATCH`). A kernel file says
//! everything about its kernel in its [`Entry`]: its name, the CPU features it needs, its
//! tile shapes and its tile function. The driver (`walk.rs`) only ever reads entries.
//!
//! Adding an instruction set: a file here with its `Entry` (or one per precision), and its
//! line in [`INT8`] or [`BF16`] (plus the file's `mod` line).

use super::{Bf16, Int8, Precision, TileBuf};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2bf16;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
#[cfg(target_arch = "x86_64")]
mod avx512vnni;
#[cfg(target_arch = "x86_64")]
mod avxvnni;
mod portable;

/// The int8 kernels, portable first; the last one the CPU supports is the default.
#[cfg(target_arch = "x86_64")]
pub(crate) static INT8: &[Entry<Int8>] = &[
    portable::INT8,
    avx2::INT8,
    avxvnni::INT8,
    avx512vnni::INT8,
    amx::INT8,
];
/// The bf16 kernels, portable first; the last one the CPU supports is the default.
#[cfg(target_arch = "x86_64")]
pub(crate) static BF16: &[Entry<Bf16>] =
    &[portable::BF16, avx2bf16::BF16, avx512bf16::BF16, amx::BF16];

#[cfg(not(target_arch = "x86_64"))]
pub(crate) static INT8: &[Entry<Int8>] = &[portable::INT8];
#[cfg(not(target_arch = "x86_64"))]
pub(crate) static BF16: &[Entry<Bf16>] = &[portable::BF16];

/// (rows, panels) of a parallel task for the register-tile kernels, and for AMX (2 x 2 of its
/// 32 x 32 tiles: the weights of a pair of panels are reused over 64 rows).
pub(crate) const BLOCK: (usize, usize) = (48, 4);
pub(crate) const AMX_BLOCK: (usize, usize) = (64, 8);

/// A kernel, as its file describes it.
pub struct Entry<P: Precision> {
    /// Its `FETCH_ML_KERNEL` name.
    pub(crate) name: &'static str,
    /// The /proc/cpuinfo flags of a CPU that has what it needs (empty: every CPU), for the
    /// tests' check that no kernel the CPU has goes untested.
    pub(crate) cpuinfo: &'static [&'static str],
    /// Whether this CPU and its operating system can run it.
    pub(crate) supported: fn() -> bool,
    /// (rows, panels) of its register tile, at most: `mr <= tile.0`, `np <= tile.1`.
    pub(crate) tile: (usize, usize),
    /// (rows, panels) of one parallel task.
    pub(crate) block: (usize, usize),
    /// Computes one tile: `out[r * LANES + j]` receives the sums of row `r` and column `j`
    /// of the tile (`r < t.mr`, `j < 16 * t.np`).
    ///
    /// # Safety
    /// `supported()` said yes; `t.mr` and `t.np` are within `tile`; `t` holds what [`Tile`]
    /// says.
    pub(crate) run: unsafe fn(t: &Tile<'_, P>, out: &mut TileBuf<P::Acc>),
}

/// One tile's operands: `mr` rows of activations and `np` panels of packed weights.
pub(crate) struct Tile<'a, P: Precision> {
    /// `mr` rows of `kp` values at stride `kp`: exactly `mr * kp` values.
    pub a: &'a [P::A],
    pub mr: usize,
    /// `np` panels of `kp * 16` values: exactly `np * kp * 16`.
    pub b: &'a [P::W],
    pub np: usize,
    /// The padded input width, a multiple of `P::GROUP`.
    pub kp: usize,
    /// The `np * 16` column sums of the panels (int8; empty for bf16).
    pub colsum: &'a [i32],
}

impl<P: Precision> Tile<'_, P> {
    /// Checks the shape the kernels rely on (cheap: once per tile of thousands of products).
    #[inline(always)]
    pub(crate) fn check(&self, (max_mr, max_np): (usize, usize)) {
        assert!(
            (1..=max_mr).contains(&self.mr)
                && (1..=max_np).contains(&self.np)
                && self.kp.is_multiple_of(P::GROUP)
                && self.a.len() == self.mr * self.kp
                && self.b.len() == self.np * self.kp * super::PANEL
                && (!P::COLSUMS || self.colsum.len() == self.np * super::PANEL),
            "{} tile: {} rows, {} panels, kp {}",
            P::NAME,
            self.mr,
            self.np,
            self.kp
        );
    }
}

/// Calls `$f::<MR>(args)` (or `$f::<MR, NP>(args)`) with the tile's runtime `mr` (and `np`)
/// as constants, for the listed values: the one (rows, panels) dispatch of every kernel, so
/// that each compiles its register tile once per shape.
macro_rules! tile_shapes {
    ($mr:expr; [$($r:literal)*]; $f:ident $args:tt) => {
        match $mr {
            $($r => $f::<$r> $args,)*
            _ => unreachable!("tile rows"),
        }
    };
    ($mr:expr, $np:expr; [$($r:literal)*] x $ps:tt; $f:ident $args:tt) => {
        match $mr {
            $($r => $crate::quant::isa::tile_shapes!(@panels $np; $r; $ps; $f $args),)*
            _ => unreachable!("tile rows"),
        }
    };
    (@panels $np:expr; $r:literal; [$($p:literal)*]; $f:ident $args:tt) => {
        match $np {
            $($p => $f::<$r, $p> $args,)*
            _ => unreachable!("tile panels"),
        }
    };
}
pub(crate) use tile_shapes;
