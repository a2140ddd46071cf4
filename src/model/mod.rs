//! The neural network: our BERT encoder (and the architectures that share its blocks, see
//! [`arch`]), pooling, the multitask heads, freezing, and where parameters come from.

pub mod arch;
pub mod batch;
pub mod bert;
pub mod config;
pub mod dropout;
pub mod embeddings;
pub mod fast;
pub mod freeze;
pub mod layers;
pub mod mpnet;
pub mod multitask;
pub mod names;
pub mod ops;
pub mod pooling;
pub mod quant;
pub mod weights;
