//! The neural network: our BERT encoder (and the architectures that share its blocks, see
//! [`arch`]), the long-context encoders (ModernBERT, NomicBERT, JinaBERT) behind the same
//! seam ([`encoder`]), pooling, the multitask heads, freezing, and where parameters come from.

pub mod arch;
pub mod attention_tiled;
pub mod batch;
pub mod bert;
pub mod blocks;
pub mod config;
pub mod dropout;
pub mod embeddings;
pub mod encoder;
pub mod fast;
pub mod freeze;
pub mod jina_bert;
pub mod layers;
pub mod modernbert;
pub mod mpnet;
pub mod multitask;
pub mod names;
pub mod nomic_bert;
pub mod ops;
pub mod pooling;
pub mod quant;
pub mod rotary;
pub mod weights;
