//! Fused, differentiable ops for the training path, as candle custom ops: one pass forward and
//! one backward each, with the vectorised kernels of `kernels::math` and `gemm`. candle's
//! own fused softmax and LayerNorm have no backward pass, and its composite versions make a
//! new tensor for every step (about ten for a LayerNorm, as many again backward). Each op is
//! tested against candle's composite maths and its gradients.

mod attention;
mod linear;
mod norm;
mod pointwise;

pub use attention::{attention, attention_packed};
pub use linear::linear;
pub use norm::layer_norm;
pub use pointwise::{dropout, gelu, softmax_last_dim};

use candle_core::{bail, CpuStorage, Layout, Result};

/// The f32 data of a contiguous CPU tensor.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{what}: expected f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// The f32 data of a contiguous CPU tensor, for writing in place.
pub(crate) fn slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{what}: expected f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

/// Rows per parallel task in row-wise ops.
const ROWS: usize = 16;

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor, Var};

    pub fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        assert!(d < tol, "{what}: max abs diff {d}");
    }

    /// A deterministic input in [-2, 2).
    pub fn input(shape: (usize, usize, usize), seed: u64) -> Var {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 250.0) - 2.0)
            .collect();
        Var::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Fixed, uneven loss weights of a shape, so that every output element matters.
    pub fn weights(dims: (usize, usize, usize)) -> Tensor {
        let n = (dims.0 * dims.1 * dims.2) as f32;
        let t = Tensor::arange(0f32, n, &Device::Cpu).unwrap();
        t.reshape(dims).unwrap().sin().unwrap()
    }
}
