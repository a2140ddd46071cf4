//! The neural network: our BERT encoder (and the architectures that share its blocks, see
//! [`arch`]), pooling, the multitask heads, freezing, and where parameters come from.

pub mod arch;
pub mod attention_tiled;
pub mod batch;
pub mod bert;
pub mod dropout;
pub mod fast;
pub mod freeze;
pub mod gemm;
pub mod kernels;
pub mod mpnet;
pub mod multitask;
pub mod names;
pub mod ops;
pub mod pooling;
pub mod quant;
pub mod rotary;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd_avx2;
pub mod weights;
