//! fetch-ml's CPU kernels, behind a safe interface: every public function takes slices and
//! sizes and checks them, and `unsafe` stays inside this crate, each block with the
//! invariant that makes it sound. No candle here: the model code above passes plain `f32`
//! slices.
//!
//! - [`cpu`]: the feature probe (vector level, AMX and its permission).
//! - [`consts`]: the constants of the `exp`, `erf` and GELU approximations.
//! - [`math`]: row kernels on slices: exp, erf, GELU, softmax, LayerNorm (AVX-512, AVX2,
//!   portable).
//! - [`matmul`]: f32 products (the `gemm` crate) on checked strided views.
//! - [`attention`]: one attention head, and the per-(sequence, head) parallel driver.
//! - [`attention_blocks`]: the two f32 products of a block of tiled attention.
//! - [`quant`]: int8 and bf16 dense layers: packing, one tile walker for both precisions,
//!   one kernel file per instruction set listed in one table per precision, the epilogues.

pub mod attention;
pub mod attention_blocks;
pub mod consts;
pub mod cpu;
pub mod math;
pub mod matmul;
pub mod quant;
