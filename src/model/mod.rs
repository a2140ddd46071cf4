//! The neural network: our BERT encoder, pooling, and where parameters come from.

pub mod bert;
pub mod dropout;
pub mod pooling;
pub mod weights;
