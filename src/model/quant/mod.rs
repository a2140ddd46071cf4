//! Quantized dense layers for inference: int8 (u8 activations x s8 weights -> exact i32) and
//! bf16 (bf16 x bf16 products, f32 accumulation), one kernel per instruction set chosen at run
//! time.
//!
//! The layout follows ONNX Runtime's MLAS: weights are packed once at load into panels of 16
//! output columns, each panel holding, for every group of 4 (int8) or 2 (bf16) input values,
//! the 16 columns' values side by side. That is the operand shape of `vpdpbusd` (4 u8 x 4 s8
//! per i32 lane) and `vdpbf16ps` (2 bf16 x 2 bf16 per f32 lane), so the kernels stream a panel
//! with plain vector loads and broadcast 4 (2) activation values per row.
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
//! The same panels are the B tiles of Intel AMX (16 groups x 64 bytes), so the AMX kernels
//! (`amx.rs`) read them as they are, 32 rows x 32 columns per call.
//!
//! Kernels: `FETCH_ML_KERNEL=portable|avx2|avxvnni|avx512vnni|amx` (int8) or
//! `portable|avx2bf16|avx512bf16|amxbf16` (bf16) forces one; without it the fastest the CPU
//! has (and the operating system allows, for AMX) is used.
//!
//! Files: this one holds the dtypes, kernel selection and the one tile walk; `int8.rs` and
//! `bf16.rs` the packing, products and layers of each; `quantize.rs` int8's activation rows;
//! `epilogue.rs` the fused epilogues (`epilogue_avx2.rs` their AVX2 versions); one file per
//! instruction set for the kernels.

use std::fmt;
use std::str::FromStr;

pub use aligned::AlignedVec;

mod aligned;
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

/// The arithmetic of the encoder's dense layers at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Dtype {
    /// float32 everywhere (the reference).
    #[default]
    F32,
    /// bf16 x bf16 products with f32 accumulation.
    Bf16,
    /// int8 x int8 products with i32 accumulation, per-row and per-channel scales.
    Int8,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, QuantError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "int8" | "i8" => Ok(Dtype::Int8),
            _ => Err(QuantError(format!(
                "unknown dtype {s:?}; expected one of f32, bf16, int8"
            ))),
        }
    }
}

/// An error of the quantized layers: a buffer of the wrong size or an unusable kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantError(pub String);

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantError {}

fn err<T>(msg: impl Into<String>) -> Result<T, QuantError> {
    Err(QuantError(msg.into()))
}

/// Output columns per packed panel: one 512-bit vector of i32 or f32 lanes.
pub const PANEL: usize = 16;

/// Rows of a tile, at most (the largest block of any kernel: AMX's 2 x 16 rows).
const MAX_MR: usize = 32;
/// Panels of a tile, at most.
const MAX_NP: usize = 4;
/// A kernel's output tile: `MAX_MR` rows of `MAX_NP * PANEL` lanes.
type TileBuf<T> = [T; MAX_MR * MAX_NP * PANEL];

/// An int8 kernel: how `dot(u8 row, s8 column)` is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// Plain Rust, correct on any CPU.
    Portable,
    /// AVX2: `vpmaddubsw` on rows shifted to signed, with the sign trick (exact, no saturation).
    Avx2,
    /// AVX-VNNI `vpdpbusd` on 256-bit vectors.
    AvxVnni,
    /// AVX-512 VNNI `vpdpbusd` on 512-bit vectors.
    Avx512Vnni,
    /// Intel AMX `tdpbusd` on 16 x 64-byte tiles.
    Amx,
}

/// A bf16 kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// Plain Rust emulation of `vdpbf16ps`, correct on any CPU.
    Portable,
    /// AVX2 + FMA: bf16 widened to f32, two FMAs per pair in `vdpbf16ps`'s order.
    Avx2,
    /// AVX-512 BF16 `vdpbf16ps`.
    Avx512Bf16,
    /// Intel AMX `tdpbf16ps` on 16 x 64-byte tiles.
    Amx,
}

impl Int8Kernel {
    pub const ALL: [Int8Kernel; 5] = [
        Int8Kernel::Portable,
        Int8Kernel::Avx2,
        Int8Kernel::AvxVnni,
        Int8Kernel::Avx512Vnni,
        Int8Kernel::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Portable => "portable",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::AvxVnni => "avxvnni",
            Int8Kernel::Avx512Vnni => "avx512vnni",
            Int8Kernel::Amx => "amx",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Int8Kernel::Portable => true,
                Int8Kernel::Avx2 => is_x86_feature_detected!("avx2"),
                Int8Kernel::AvxVnni => {
                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni")
                }
                Int8Kernel::Avx512Vnni => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
                Int8Kernel::Amx => amx::int8_supported(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Int8Kernel::Portable
        }
    }

    /// The fastest supported kernel.
    pub fn best() -> Self {
        [
            Int8Kernel::Amx,
            Int8Kernel::Avx512Vnni,
            Int8Kernel::AvxVnni,
            Int8Kernel::Avx2,
        ]
        .into_iter()
        .find(|k| k.supported())
        .unwrap_or(Int8Kernel::Portable)
    }

    /// The kernel `FETCH_ML_KERNEL` asks for, else the best one. Errors when the variable
    /// names no int8 kernel or one this CPU lacks.
    pub fn select() -> Result<Self, QuantError> {
        match kernel_override() {
            None => Ok(Self::best()),
            // A bf16-only kernel name leaves the int8 choice to the CPU.
            Some(name)
                if !Self::ALL.iter().any(|k| k.name() == name)
                    && Bf16Kernel::ALL.iter().any(|k| k.name() == name) =>
            {
                Ok(Self::best())
            }
            Some(name) => {
                let Some(k) = Self::ALL.into_iter().find(|k| k.name() == name) else {
                    return err(format!(
                        "FETCH_ML_KERNEL={name} names no int8 kernel; expected one of \
                         portable, avx2, avxvnni, avx512vnni, amx"
                    ));
                };
                if !k.supported() {
                    return err(format!(
                        "FETCH_ML_KERNEL={name}: this CPU (or its operating system) does not allow that kernel"
                    ));
                }
                Ok(k)
            }
        }
    }

    /// (rows, panels) of this kernel's register tile.
    fn tile_shape(self) -> (usize, usize) {
        match self {
            Int8Kernel::Portable => (4, 1),
            Int8Kernel::Avx2 => (4, 4),
            Int8Kernel::AvxVnni => (6, 1),
            Int8Kernel::Avx512Vnni => (6, 4),
            Int8Kernel::Amx => (32, 2),
        }
    }

    /// (rows, panels) of one parallel task.
    fn block_shape(self) -> (usize, usize) {
        match self {
            Int8Kernel::Amx => AMX_BLOCK,
            _ => BLOCK,
        }
    }
}

impl Bf16Kernel {
    pub const ALL: [Bf16Kernel; 4] = [
        Bf16Kernel::Portable,
        Bf16Kernel::Avx2,
        Bf16Kernel::Avx512Bf16,
        Bf16Kernel::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Portable => "portable",
            Bf16Kernel::Avx2 => "avx2bf16",
            Bf16Kernel::Avx512Bf16 => "avx512bf16",
            Bf16Kernel::Amx => "amxbf16",
        }
    }

    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Bf16Kernel::Portable => true,
                Bf16Kernel::Avx2 => crate::model::simd_avx2::has_avx2_fma(),
                Bf16Kernel::Avx512Bf16 => {
                    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
                }
                Bf16Kernel::Amx => amx::bf16_supported(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Bf16Kernel::Portable
        }
    }

    pub fn best() -> Self {
        [Bf16Kernel::Amx, Bf16Kernel::Avx512Bf16, Bf16Kernel::Avx2]
            .into_iter()
            .find(|k| k.supported())
            .unwrap_or(Bf16Kernel::Portable)
    }

    /// The kernel `FETCH_ML_KERNEL` asks for (`portable`, `avx2bf16`, `avx512bf16` or
    /// `amxbf16`; an int8 kernel name leaves the choice to the CPU), else the best one.
    pub fn select() -> Result<Self, QuantError> {
        match kernel_override() {
            None => Ok(Self::best()),
            Some(name) => {
                if let Some(k) = Self::ALL.into_iter().find(|k| k.name() == name) {
                    if !k.supported() {
                        return err(format!(
                            "FETCH_ML_KERNEL={name}: this CPU (or its operating system) does not allow that \
                             kernel"
                        ));
                    }
                    return Ok(k);
                }
                if Int8Kernel::ALL.iter().any(|k| k.name() == name) {
                    return Ok(Self::best());
                }
                err(format!(
                    "FETCH_ML_KERNEL={name} names no kernel; expected one of portable, avx2, \
                     avxvnni, avx512vnni, amx, avx2bf16, avx512bf16, amxbf16"
                ))
            }
        }
    }

    fn tile_shape(self) -> (usize, usize) {
        match self {
            Bf16Kernel::Portable => (4, 1),
            Bf16Kernel::Avx2 => (4, 4),
            Bf16Kernel::Avx512Bf16 => (6, 4),
            Bf16Kernel::Amx => (32, 2),
        }
    }

    fn block_shape(self) -> (usize, usize) {
        match self {
            Bf16Kernel::Amx => AMX_BLOCK,
            _ => BLOCK,
        }
    }
}

fn kernel_override() -> Option<String> {
    std::env::var("FETCH_ML_KERNEL")
        .ok()
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
}

/// What `FETCH_ML_KERNEL` means for `dtype`: nothing when unset or when it names a kernel of
/// `dtype`; a note to print when it names a kernel of the other dtype, or any kernel under
/// f32 (which has one), since it is then ignored; an error when it names no kernel at all.
pub fn kernel_override_note(dtype: Dtype) -> Result<Option<String>, QuantError> {
    let Some(name) = kernel_override() else {
        return Ok(None);
    };
    let int8 = Int8Kernel::ALL.iter().any(|k| k.name() == name);
    let bf16 = Bf16Kernel::ALL.iter().any(|k| k.name() == name);
    let list = |names: &mut dyn Iterator<Item = &'static str>| names.collect::<Vec<_>>().join(", ");
    let int8_names = list(&mut Int8Kernel::ALL.iter().map(|k| k.name()));
    let bf16_names = list(&mut Bf16Kernel::ALL.iter().map(|k| k.name()));
    if !int8 && !bf16 {
        return err(format!(
            "FETCH_ML_KERNEL={name} names no kernel; expected one of {int8_names} (int8) or \
             {bf16_names} (bf16)"
        ));
    }
    let applies = match dtype {
        Dtype::F32 => false,
        Dtype::Int8 => int8,
        Dtype::Bf16 => bf16,
    };
    if applies {
        return Ok(None);
    }
    let choices = match dtype {
        Dtype::F32 => "f32 has one kernel and no choice".to_string(),
        Dtype::Int8 => format!("the int8 kernels are {int8_names}"),
        Dtype::Bf16 => format!("the bf16 kernels are {bf16_names}"),
    };
    Ok(Some(format!(
        "FETCH_ML_KERNEL={name} is ignored: the dense layers run in {dtype}, and {choices}"
    )))
}

/// The name of the kernel that runs the dense layers for `dtype` ("gemm-f32" for f32), as
/// `FETCH_ML_KERNEL` and the CPU decide; "unavailable" when the override cannot be honoured.
pub fn kernel_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "gemm-f32",
        Dtype::Int8 => Int8Kernel::select().map_or("unavailable", Int8Kernel::name),
        Dtype::Bf16 => Bf16Kernel::select().map_or("unavailable", Bf16Kernel::name),
    }
}

/// What the epilogue applies after scale and bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// BERT's GELU, `x/2 (1 + erf(x/sqrt 2))`, the same function as the f32 path.
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Gelu => super::kernels::gelu(v),
            Activation::GeluTanh => {
                let y = 0.797_884_6 * (v + 0.044_715 * v * v * v);
                0.5 * v * (1.0 + y.tanh())
            }
            Activation::Relu => v.max(0.0),
        }
    }
}

/// A row-major output view shared by the tasks of one product; each task writes its own tile.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    pub(crate) ptr: *mut f32,
    pub(crate) ld: usize,
}

// SAFETY: tasks write disjoint (row, column) ranges of the buffer that `forward` checked.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// `len` values from element `offset`.
    ///
    /// # Safety
    /// `offset + len` is within the buffer, and no other live slice overlaps this one.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        // SAFETY: forwarded from this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

/// Reusable buffers for quantized activations.
#[derive(Default)]
pub struct Scratch {
    a8: AlignedVec<u8>,
    a16: AlignedVec<u16>,
    scale: Vec<f32>,
    zero: Vec<i32>,
    /// The second passes of int8 outliers.
    outliers: outliers::OutlierScratch,
}

/// Walks rows `r0..r1` x panels `p0..p1` in tiles of `shape` (rows, panels): `tile(r, mr, p,
/// np, buf)` fills `buf` (rows of `MAX_NP * PANEL` lanes), then `emit(r, mr, column, cols,
/// buf)` receives the tile: `mr` rows from `r`, `cols` valid columns from `column` (`n`
/// columns in all). The one tile walk of every kernel.
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
    let mut buf = Aligned([T::default(); MAX_MR * MAX_NP * PANEL]);
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

/// Adapts a per-row `f(row, column, values)` to the per-tile `emit` of [`walk_tiles`].
pub(crate) fn per_row<T>(
    mut f: impl FnMut(usize, usize, &[T]),
) -> impl FnMut(usize, usize, usize, usize, &TileBuf<T>) {
    move |r, mr, c0, cols, buf| {
        for i in 0..mr {
            let t = i * MAX_NP * PANEL;
            f(r + i, c0, &buf[t..t + cols]);
        }
    }
}

/// (rows, panels) of a parallel task for the register-tile kernels, and for AMX (2 x 2 of its
/// 32 x 32 tiles: the weights of a pair of panels are reused over 64 rows).
const BLOCK: (usize, usize) = (48, 4);
const AMX_BLOCK: (usize, usize) = (64, 8);

mod bf16;
mod epilogue;
#[cfg(target_arch = "x86_64")]
mod epilogue_avx2;
mod int8;
mod outliers;
mod quantize;
pub use bf16::*;
pub use int8::*;
pub use outliers::{ROW_OUTLIER_RATIO, WEIGHT_OUTLIER_RATIO};
pub use quantize::{quantize_row, QuantRows};

#[cfg(test)]
mod tests;
