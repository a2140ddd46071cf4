//! The small blocks every encoder layer is made of: [`Mode`] (inference or training),
//! [`Linear`], [`LayerNorm`] and the softmax, each with a fused backward pass in training.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::dropout::Dropout;

/// How a block runs: inference (fused ops, no dropout) or training (differentiable, dropout).
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    Infer,
    Train(&'a Dropout),
}

impl Mode<'_> {
    pub(super) fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self {
            Mode::Infer => Ok(x.clone()),
            Mode::Train(d) => d.apply(x, p),
        }
    }
}

/// A dense layer `y = x W^T + b`: one matrix product over all leading dims, fused backward.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// Reads `weight` `[out, in]` and `bias` `[out]` under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = vb.get_with_hints(out_dim, "bias", init)?;
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::ops::linear(x, &self.weight, &self.bias)
    }
}

/// LayerNorm over the last dim: candle's fused op in inference (no backward), our fused op
/// with a backward pass in training.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            Mode::Train(_) => super::ops::layer_norm(x, &self.weight, &self.bias, self.eps),
        }
    }
}

/// Softmax over the last dim: candle's fused op in inference, ours (with backward) in training.
pub(super) fn softmax(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Infer => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        Mode::Train(_) => super::ops::softmax_last_dim(x),
    }
}
