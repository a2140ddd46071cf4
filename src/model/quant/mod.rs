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
//! `portable|avx512bf16|amxbf16` (bf16) forces one; without it the fastest the CPU has (and
//! the operating system allows, for AMX) is used.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

pub use aligned::AlignedVec;

mod aligned;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
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
    /// AVX2: widened to i16, `vpmaddwd` (exact, no saturation).
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
                        "FETCH_ML_KERNEL={name}: this CPU lacks the instructions of that kernel"
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
            Int8Kernel::Avx2 => (2, 1),
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
    pub const ALL: [Bf16Kernel; 3] = [
        Bf16Kernel::Portable,
        Bf16Kernel::Avx512Bf16,
        Bf16Kernel::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Portable => "portable",
            Bf16Kernel::Avx512Bf16 => "avx512bf16",
            Bf16Kernel::Amx => "amxbf16",
        }
    }

    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Bf16Kernel::Portable => true,
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
        [Bf16Kernel::Amx, Bf16Kernel::Avx512Bf16]
            .into_iter()
            .find(|k| k.supported())
            .unwrap_or(Bf16Kernel::Portable)
    }

    /// The kernel `FETCH_ML_KERNEL` asks for (`portable`, `avx512bf16` or `amxbf16`; an int8
    /// kernel name leaves the choice to the CPU), else the best one.
    pub fn select() -> Result<Self, QuantError> {
        match kernel_override() {
            None => Ok(Self::best()),
            Some(name) => {
                if let Some(k) = Self::ALL.into_iter().find(|k| k.name() == name) {
                    if !k.supported() {
                        return err(format!(
                            "FETCH_ML_KERNEL={name}: this CPU lacks the instructions of that \
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
                     avxvnni, avx512vnni, amx, avx512bf16, amxbf16"
                ))
            }
        }
    }

    fn tile_shape(self) -> (usize, usize) {
        match self {
            Bf16Kernel::Portable => (4, 1),
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
struct OutPtr {
    ptr: *mut f32,
    ld: usize,
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
}

// ---------------------------------------------------------------------------------------------
// int8

/// Activations quantized per row: `x[r][i] = scale[r] * (a[r][i] - zero[r])`, `a` in [0, 255].
/// Rows are `kp` bytes (k rounded up to 4); the padding holds `zero[r]`, which the zero weight
/// padding multiplies away.
pub struct QuantRows<'a> {
    pub a: &'a [u8],
    pub rows: usize,
    pub kp: usize,
}

/// Rounds `v` (|v| < 2^22) to the nearest integer, ties to even: adding and subtracting
/// 1.5 * 2^23 leaves no fraction bits under the current (default) rounding mode. Plain IEEE
/// additions, so it vectorizes (`round_ties_even` can become a libm call per value).
#[inline(always)]
fn round_small(v: f32) -> f32 {
    (v + MAGIC) - MAGIC
}

/// 1.5 * 2^23: for 0 <= v < 2^22, `v + MAGIC` is `MAGIC + round(v)` exactly.
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: u32 = 0x4B40_0000;

/// Quantizes one row of `x` into `a` (length `kp` >= x.len()); returns (scale, zero point).
#[inline(always)]
fn quantize_row_imp(x: &[f32], a: &mut [u8]) -> (f32, i32) {
    let (lo, hi) = row_range(x);
    quantize_in_range(x, a, lo, hi)
}

/// The minimum and maximum of `x` and 0 (NaNs skipped). Exact whatever the order.
#[inline(always)]
fn row_range(x: &[f32]) -> (f32, f32) {
    // Min and max over 16 lanes (comparisons, so it vectorizes; NaNs are skipped), starting
    // from 0 so that the range holds 0.
    const L: usize = 16;
    let (mut lo, mut hi) = ([0f32; L], [0f32; L]);
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
    }
    let lo = lo.iter().fold(0f32, |m, &v| if v < m { v } else { m });
    let hi = hi.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    (lo, hi)
}

/// [`row_range`] with AVX-512 minima and maxima: `vminps(v, lo)` keeps `lo` when `v` is NaN
/// and takes `v` only when `v < lo`, the comparison of the portable loop, so the result is
/// the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_range_avx512(x: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let n = x.len();
    // Four accumulators of each, so that the minima do not wait on each other.
    let mut lo = [_mm512_setzero_ps(); 4];
    let mut hi = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        let j = (i / 16) % 4;
        // SAFETY: the mask covers elements i..min(i + 16, n) only; masked-off lanes load 0,
        // which the range holds already.
        let v = unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().add(i)) };
        lo[j] = _mm512_min_ps(v, lo[j]);
        hi[j] = _mm512_max_ps(v, hi[j]);
        i += 16;
    }
    let lo = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
    let hi = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
    (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi))
}

/// Quantizes `x` into `a` with the range `lo <= 0 <= hi` of [`row_range`].
#[inline(always)]
fn quantize_in_range(x: &[f32], a: &mut [u8], lo: f32, hi: f32) -> (f32, i32) {
    let range = hi - lo;
    if !range.is_finite() || range <= 0.0 {
        // All zeros (or non-finite input, which int8 cannot represent): the row becomes 0.
        a.iter_mut().for_each(|v| *v = 0);
        return (0.0, 0);
    }
    let scale = range / 255.0;
    let inv = 255.0 / range;
    // lo <= 0 <= hi, so the zero point is in [0, 255].
    let zero = round_small((-lo * inv).clamp(0.0, 255.0));
    for (q, &v) in a.iter_mut().zip(x) {
        // The clamp gives [0, 255] (NaN stays NaN); adding 1.5 * 2^23 rounds to the nearest
        // integer, ties to even, and leaves it in the low mantissa bits, read as an integer
        // (no float-to-int conversion, which LLVM does not vectorize when saturating).
        let bits = ((v * inv + zero).clamp(0.0, 255.0) + MAGIC).to_bits();
        *q = bits.wrapping_sub(MAGIC_BITS) as u8;
    }
    let z = zero as u8;
    a[x.len()..].iter_mut().for_each(|v| *v = z);
    (scale, zero as i32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], a: &mut [u8]) -> (f32, i32) {
    quantize_row_imp(x, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn quantize_row_avx512(x: &[f32], a: &mut [u8]) -> (f32, i32) {
    // SAFETY: this function's features include avx512f.
    let (lo, hi) = unsafe { row_range_avx512(x) };
    quantize_in_range(x, a, lo, hi)
}

/// Quantizes one row (same result whichever code path runs: only IEEE operations without
/// contraction, and an order-independent min/max).
pub fn quantize_row(x: &[f32], a: &mut [u8]) -> (f32, i32) {
    assert!(
        a.len() >= x.len(),
        "quantize_row: output shorter than input"
    );
    #[cfg(target_arch = "x86_64")]
    match simd_level() {
        // SAFETY: the CPU has the features the function is compiled for.
        2 => return unsafe { quantize_row_avx512(x, a) },
        // SAFETY: as above.
        1 => return unsafe { quantize_row_avx2(x, a) },
        _ => {}
    }
    quantize_row_imp(x, a)
}

/// int8 weights packed for the kernels: panel `p` holds output columns `16p..16p+16`, as
/// `[k / 4][16 columns][4 values]` signed bytes (k zero-padded to a multiple of 4, columns
/// zero-padded to a multiple of 16).
#[derive(Clone)]
pub struct PackedI8 {
    pub n: usize,
    pub k: usize,
    pub kp: usize,
    pub panels: usize,
    pub data: AlignedVec<i8>,
    /// Sum over k of each (padded) column's weights, for the zero-point correction.
    pub colsum: Vec<i32>,
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
/// `b` (`np` panels); `out[r * 64 + j]` receives the exact i32 products.
///
/// # Safety
/// `kernel.supported()`; `a` covers `mr` rows of `kp` bytes at stride `lda`; `b` covers `np`
/// panels of `kp * 16` bytes; `mr`, `np` fit the kernel's tile shape.
#[allow(clippy::too_many_arguments)]
unsafe fn int8_tile(
    kernel: Int8Kernel,
    a: *const u8,
    lda: usize,
    mr: usize,
    b: *const i8,
    np: usize,
    kp: usize,
    out: &mut TileBuf<i32>,
) {
    match kernel {
        Int8Kernel::Portable => portable::int8_tile(a, lda, mr, b, np, kp, out),
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => avx2::int8_tile(a, lda, mr, b, np, kp, out),
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

/// (rows, panels) of a parallel task for the register-tile kernels, and for AMX (2 x 2 of its
/// 32 x 32 tiles: the weights of a pair of panels are reused over 64 rows).
const BLOCK: (usize, usize) = (48, 4);
const AMX_BLOCK: (usize, usize) = (64, 8);

/// Splits `rows` x `panels` into tasks of `block` (rows, panels) and runs `f(r0, r1, p0, p1)`
/// on each, in parallel when the product is large enough.
fn for_each_block(
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

struct SharedI32(*mut i32);
// SAFETY: tasks write disjoint elements.
unsafe impl Sync for SharedI32 {}

fn check_int8(kernel: Int8Kernel, a: &QuantRows, b: &PackedI8) -> Result<(), QuantError> {
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

/// Walks rows `r0..r1` x panels `p0..p1` in tiles of `shape` (rows, panels): `tile(r, mr, p,
/// np, buf)` fills `buf` (rows of `MAX_NP * PANEL` lanes), then `emit(r, mr, column, cols,
/// buf)` receives the tile: `mr` rows from `r`, `cols` valid columns from `column` (`n`
/// columns in all). The one tile walk of every kernel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn walk_tiles<T: Copy + Default>(
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
fn per_row<T>(
    mut f: impl FnMut(usize, usize, &[T]),
) -> impl FnMut(usize, usize, usize, usize, &TileBuf<T>) {
    move |r, mr, c0, cols, buf| {
        for i in 0..mr {
            let t = i * MAX_NP * PANEL;
            f(r + i, c0, &buf[t..t + cols]);
        }
    }
}

/// Rows `r0..r1`, panels `p0..p1`: `emit` receives each tile of exact i32 products (as
/// [`walk_tiles`]).
/// The caller has checked the sizes (`check_int8`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn int8_block(
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
        // kernel's tile shape; the kernel is supported.
        unsafe {
            int8_tile(
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

/// A dense layer `y = x W^T + b` with int8 weights (symmetric, per output channel) and
/// activations quantized per row at run time.
pub struct Int8Linear {
    w: PackedI8,
    /// Per output channel: `w[n][i] ~ wscale[n] * q[n][i]`.
    wscale: Vec<f32>,
    bias: Vec<f32>,
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
            let row = &weight[c * inp..(c + 1) * inp];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax > 0.0 && amax.is_finite() {
                wscale[c] = amax / 127.0;
                let inv = 127.0 / amax;
                for (d, &v) in q[c * inp..(c + 1) * inp].iter_mut().zip(row) {
                    // round_small is round_ties_even for |v| < 2^22 (here <= 127), without
                    // the libm call per weight.
                    *d = round_small(v * inv).clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Ok(Self {
            w: PackedI8::pack(&q, out, inp)?,
            wscale,
            bias: bias.to_vec(),
        })
    }

    pub fn out_dim(&self) -> usize {
        self.w.n
    }

    pub fn in_dim(&self) -> usize {
        self.w.k
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
        let s = scratch;
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
        let a = QuantRows {
            a: &s.a8[..rows * kp],
            rows,
            kp,
        };
        check_int8(kernel, &a, &self.w)?;
        let (scale, zero) = (&s.scale[..rows], &s.zero[..rows]);
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
                int8_block(
                    kernel,
                    &a,
                    &self.w,
                    r0,
                    r1,
                    p0,
                    p1,
                    |r, mr, c0, cols, buf| {
                        let c1 = c0 + cols;
                        #[cfg(target_arch = "x86_64")]
                        if simd_level() == 2 && matches!(act, Activation::None | Activation::Gelu) {
                            // SAFETY: simd_level 2 means avx512f; rows r..r + mr <= rows and
                            // columns col + c0..col + c1 <= col + n <= ld, and check_dst verified
                            // (rows - 1) * ld + col + n <= dst.len(); tasks own disjoint (row,
                            // column) blocks.
                            unsafe {
                                epilogue_tile_avx512(
                                    buf,
                                    mr,
                                    cols,
                                    Some((
                                        &zero[r..r + mr],
                                        &scale[r..r + mr],
                                        &self.w.colsum[c0..c1],
                                        &self.wscale[c0..c1],
                                    )),
                                    &self.bias[c0..c1],
                                    act == Activation::Gelu,
                                    out.ptr.add(r * out.ld + col + c0),
                                    out.ld,
                                )
                            };
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
                                &self.w.colsum[c0..c1],
                                &self.wscale[c0..c1],
                                &self.bias[c0..c1],
                                act,
                                d,
                            );
                        }
                    },
                );
            },
        );
        Ok(())
    }
}

/// Runs `$body` compiled for AVX2+FMA when the CPU has them (the same IEEE operations
/// either way: Rust does not contract `a * b + c` into an FMA, so results are identical).
macro_rules! multiversion {
    ($name:ident, ($($arg:ident : $ty:ty),*), $body:block) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide($($arg: $ty),*) { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) { imp($($arg),*) }
                match simd_level() {
                    // SAFETY: the CPU supports the features enabled on `wide`.
                    2 => return unsafe { wide($($arg),*) },
                    // SAFETY: the CPU supports the features enabled on `fast`.
                    1 => return unsafe { fast($($arg),*) },
                    _ => {}
                }
            }
            imp($($arg),*)
        }
    };
}

/// 2: AVX-512 (F, BW, DQ, VL) and AVX2+FMA; 1: AVX2+FMA only; 0: neither.
#[cfg(target_arch = "x86_64")]
fn simd_level() -> u8 {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        match (avx2, avx512) {
            (true, true) => 2,
            (true, false) => 1,
            _ => 0,
        }
    })
}

multiversion!(epilogue_i8, (acc: &[i32], zero: i32, scale: f32, colsum: &[i32], wscale: &[f32], bias: &[f32], act: Activation, out: &mut [f32]), {
    // out = act(scale_r * scale_n * (acc - zero_r * colsum_n) + bias_n)
    let n = out.len();
    let (acc, colsum, wscale, bias) = (&acc[..n], &colsum[..n], &wscale[..n], &bias[..n]);
    for j in 0..n {
        let v = (acc[j] - zero * colsum[j]) as f32 * (scale * wscale[j]) + bias[j];
        out[j] = v;
    }
    apply_act(act, out);
});

multiversion!(epilogue_bf16, (acc: &[f32], bias: &[f32], act: Activation, out: &mut [f32]), {
    let n = out.len();
    let (acc, bias) = (&acc[..n], &bias[..n]);
    for j in 0..n {
        out[j] = acc[j] + bias[j];
    }
    apply_act(act, out);
});

#[inline(always)]
fn apply_act(act: Activation, out: &mut [f32]) {
    match act {
        Activation::None => {}
        #[cfg(target_arch = "x86_64")]
        Activation::Gelu if simd_level() == 2 => {
            // SAFETY: simd_level 2 means the CPU has avx512f.
            unsafe { gelu_avx512(out) }
        }
        Activation::Gelu => out.iter_mut().for_each(|v| *v = Activation::Gelu.apply(*v)),
        Activation::GeluTanh => out
            .iter_mut()
            .for_each(|v| *v = Activation::GeluTanh.apply(*v)),
        Activation::Relu => out.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

/// BERT's GELU on 16 lanes: the erf of [`super::kernels::erf`] (same coefficients), with
/// FMAs and its division replaced by a reciprocal estimate and one Newton step (within an ulp
/// or two of the division, which alone cost more than the int8 product of the FFN's first
/// layer).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::excessive_precision)]
unsafe fn gelu16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    let lim = c(3.832_506_9);
    let z = _mm512_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
    let z = _mm512_min_ps(_mm512_max_ps(z, c(-3.832_506_9)), lim);
    let z2 = _mm512_mul_ps(z, z);
    let mut p = c(-2.72614225801306e-10);
    for k in [
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    ] {
        p = _mm512_fmadd_ps(p, z2, c(k));
    }
    let p = _mm512_mul_ps(p, z);
    let mut q = c(-1.45660718464996e-05);
    for k in [
        -2.13374055278905e-04,
        -1.68282697438203e-03,
        -7.37332916720468e-03,
        -1.42647390514189e-02,
    ] {
        q = _mm512_fmadd_ps(q, z2, c(k));
    }
    let r = _mm512_rcp14_ps(q);
    // One Newton step: r (2 - q r).
    let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, c(2.0)));
    let erf = _mm512_mul_ps(p, r);
    let half_x = _mm512_mul_ps(v, c(0.5));
    _mm512_fmadd_ps(half_x, erf, half_x)
}

/// The mask of the 16-lane chunk starting at `i` of `n` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lane_mask(i: usize, n: usize) -> u16 {
    if n - i >= 16 {
        0xffff
    } else {
        (1u16 << (n - i)) - 1
    }
}

/// GELU in place, 16 lanes at a time; every value, the tail included, goes through the same
/// vector code.
///
/// # Safety
/// The CPU has avx512f.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: the mask covers elements i..min(i + 16, n) only.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), m, gelu16(v));
        }
        i += 16;
    }
}

/// The epilogue of a whole tile (`mr` rows of `cols` values of `acc`, rows of `MAX_NP *
/// PANEL` lanes), 16 lanes at a time, the per-column values loaded once per 16 columns for
/// all the rows, the GELU in registers. int8 (`q` = per-row zero points and scales,
/// per-column weight sums and scales): `act(cvt(acc - zero * colsum) * (scale * wscale) +
/// bias)`, one FMA; bf16 (`q` = None, `acc` holds f32 bits): `act(acc + bias)`.
///
/// # Safety
/// The CPU has avx512f; `out` covers `mr` rows of `cols` values at stride `ld`, and no other
/// thread touches them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
unsafe fn epilogue_tile_avx512<T: Copy>(
    acc: &TileBuf<T>,
    mr: usize,
    cols: usize,
    q: Option<(&[i32], &[f32], &[i32], &[f32])>,
    bias: &[f32],
    gelu: bool,
    out: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    assert!(std::mem::size_of::<T>() == 4);
    assert!(mr <= MAX_MR && cols <= MAX_NP * PANEL && bias.len() >= cols);
    if let Some((zero, scale, colsum, wscale)) = q {
        assert!(zero.len() >= mr && scale.len() >= mr);
        assert!(colsum.len() >= cols && wscale.len() >= cols);
    }
    let accp = acc.as_ptr() as *const u8;
    let mut j = 0;
    while j < cols {
        let m = lane_mask(j, cols);
        // SAFETY: the mask covers columns j..min(j + 16, cols), within every slice (asserted)
        // and every row of `acc` (cols <= MAX_NP * PANEL, 4-byte lanes); rows i < mr <=
        // MAX_MR of `acc`, and of `out` by this function's contract.
        unsafe {
            let b = _mm512_maskz_loadu_ps(m, bias.as_ptr().add(j));
            let at = |i: usize| accp.add((i * MAX_NP * PANEL + j) * 4);
            match q {
                Some((zero, scale, colsum, wscale)) => {
                    let cs = _mm512_maskz_loadu_epi32(m, colsum.as_ptr().add(j));
                    let ws = _mm512_maskz_loadu_ps(m, wscale.as_ptr().add(j));
                    for i in 0..mr {
                        let a = _mm512_maskz_loadu_epi32(m, at(i) as *const i32);
                        let z = _mm512_set1_epi32(zero[i]);
                        let a = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, _mm512_mullo_epi32(z, cs)));
                        let w = _mm512_mul_ps(_mm512_set1_ps(scale[i]), ws);
                        let mut v = _mm512_fmadd_ps(a, w, b);
                        if gelu {
                            v = gelu16(v);
                        }
                        _mm512_mask_storeu_ps(out.add(i * ld + j), m, v);
                    }
                }
                None => {
                    for i in 0..mr {
                        let mut v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, at(i) as *const f32), b);
                        if gelu {
                            v = gelu16(v);
                        }
                        _mm512_mask_storeu_ps(out.add(i * ld + j), m, v);
                    }
                }
            }
        }
        j += 16;
    }
}

fn check_dst(
    x_len: usize,
    rows: usize,
    k: usize,
    dst_len: usize,
    ld: usize,
    col: usize,
    n: usize,
) -> Result<(), QuantError> {
    if x_len < rows * k {
        return err(format!(
            "dense layer: input of {x_len} values for {rows} rows of {k}"
        ));
    }
    if col + n > ld || (rows > 0 && (rows - 1) * ld + col + n > dst_len) {
        return err(format!(
            "dense layer: output of {dst_len} values cannot hold {rows} rows of {n} at column \
             {col} with stride {ld}"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bf16

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

fn convert_row_imp(x: &[f32], a: &mut [u16]) {
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
unsafe fn bf16_tile(
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

fn check_bf16(kernel: Bf16Kernel, a: &Bf16Rows, b: &PackedBf16) -> Result<(), QuantError> {
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
fn bf16_block(
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
                        #[cfg(target_arch = "x86_64")]
                        if simd_level() == 2 && matches!(act, Activation::None | Activation::Gelu) {
                            // SAFETY: as in Int8Linear::forward.
                            unsafe {
                                epilogue_tile_avx512(
                                    buf,
                                    mr,
                                    cols,
                                    None,
                                    bias,
                                    act == Activation::Gelu,
                                    out.ptr.add(r * out.ld + col + c0),
                                    out.ld,
                                )
                            };
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

#[cfg(test)]
mod tests;
