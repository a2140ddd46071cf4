//! Pooling token states into one sentence vector, and L2 normalisation.

use candle_core::{DType, Result, Tensor};

/// How token states `[batch, seq, hidden]` become a sentence vector `[batch, hidden]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The average of the real (non-padding) tokens' states.
    Mean,
    /// The state of the first token, `[CLS]`.
    Cls,
    /// The element-wise maximum over real tokens.
    Max,
    /// The sum over real tokens divided by the square root of their count.
    MeanSqrtLen,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::MeanSqrtLen => "mean_sqrt_len",
        }
    }

    /// `hidden` `[batch, seq, hidden]`, `mask` `[batch, seq]` of 0/1 -> `[batch, hidden]`.
    /// Padding positions never contribute. Differentiable.
    pub fn forward(self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [batch, seq, 1]
        match self {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let sum = hidden.broadcast_mul(&mask)?.sum(1)?; // [batch, hidden]
                let count = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?; // [batch, 1]
                let denom = if self == Pooling::Mean {
                    count
                } else {
                    count.sqrt()?
                };
                sum.broadcast_div(&denom)
            }
            Pooling::Max => {
                // Padding gets a large negative so it never wins the max.
                let penalty = ((mask.ones_like()? - &mask)? * -1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)
            }
        }
    }
}
