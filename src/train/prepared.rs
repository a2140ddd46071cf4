//! A data set ready for the model: its texts, their tokens and their label indices. Shared by
//! the training loop and evaluation, which otherwise do not depend on each other's modules.

use crate::tokenize::Encoded;

/// Tokenized sentences with their label indices.
pub struct Prepared {
    pub texts: Vec<String>,
    pub encoded: Vec<Encoded>,
    pub labels: Vec<[Option<u32>; 2]>,
}
