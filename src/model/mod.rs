//! The neural network: our BERT encoder (and the architectures that share its blocks, see
//! [`arch`]), the long-context encoders (ModernBERT, NomicBERT, JinaBERT) behind the same
//! seam ([`encoder`]), pooling, the multitask heads, freezing, and where parameters come from.

pub mod arch;
pub mod attention_tiled;
pub mod batch;
pub mod bert;
pub mod blocks;
pub mod dropout;
pub mod encoder;
pub mod fast;
pub mod freeze;
pub mod gemm;
pub mod jina_bert;
pub mod kernels;
pub mod modernbert;
pub mod mpnet;
pub mod multitask;
pub mod names;
pub mod nomic_bert;
pub mod ops;
pub mod pooling;
pub mod quant;
pub mod rotary;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd_avx2;
pub mod weights;
