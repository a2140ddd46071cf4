//! fetch-ml's CPU kernels, behind a safe interface: every public function takes slices and
//! sizes and checks them, and `unsafe` stays inside this crate, each block with the
//! invariant that makes it sound. No candle here: the model code above passes plain `f32`
//! slices.
//!
//! - [`cpu`]: the feature probe (vector level, AMX and its permission).
//! - [`consts`]: the constants of the `exp`, `erf` and GELU approximations.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod consts;
pub mod cpu;
