//! LayerNorm with a fused backward pass for the input, the weight and the bias.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{last_dim, slice, ROWS};
use kernels::math;

/// Mean and 1/std of one row.
#[inline]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l1);
        let w = slice(s2, l2, "layer norm weight")?;
        let b = slice(s3, l3, "layer norm bias")?;
        let mut out = slice(s1, l1, "layer norm x")?.to_vec();
        out.par_chunks_mut(n * ROWS).for_each(|rows| {
            rows.chunks_mut(n)
                .for_each(|r| math::layer_norm_inplace(r, w, b, self.eps))
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &GradInput { eps: self.eps })?;
        let dwb = x.apply_op2_no_bwd(&grad, &GradParams { eps: self.eps })?; // [2, n]
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * w.
struct GradInput {
    eps: f32,
}

impl CustomOp3 for GradInput {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-x"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l1);
        let x = slice(s1, l1, "layer norm grad x")?;
        let w = slice(s2, l2, "layer norm grad w")?;
        let dy = slice(s3, l3, "layer norm grad dy")?;
        let mut out = vec![0f32; x.len()];
        let chunk = n * ROWS;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(dy.par_chunks(chunk))
            .for_each(|((o, x), dy)| {
                for ((o, x), dy) in o.chunks_mut(n).zip(x.chunks(n)).zip(dy.chunks(n)) {
                    let (mean, rstd) = moments(x, self.eps);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for i in 0..n {
                        let d = dy[i] * w[i];
                        m1 += d;
                        m2 += d * (x[i] - mean) * rstd;
                    }
                    let (m1, m2) = (m1 / n as f32, m2 / n as f32);
                    for i in 0..n {
                        let xhat = (x[i] - mean) * rstd;
                        o[i] = rstd * (dy[i] * w[i] - m1 - xhat * m2);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// dw = sum over rows of dy * xhat and db = sum over rows of dy, as one `[2, n]` tensor.
struct GradParams {
    eps: f32,
}

impl CustomOp2 for GradParams {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-wb"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l1);
        let x = slice(s1, l1, "layer norm grad x")?;
        let dy = slice(s2, l2, "layer norm grad dy")?;
        let chunk = n * ROWS * 4;
        let sums = x
            .par_chunks(chunk)
            .zip(dy.par_chunks(chunk))
            .map(|(x, dy)| {
                let mut acc = vec![0f32; 2 * n];
                for (x, dy) in x.chunks(n).zip(dy.chunks(n)) {
                    let (mean, rstd) = moments(x, self.eps);
                    for i in 0..n {
                        acc[i] += dy[i] * (x[i] - mean) * rstd;
                        acc[n + i] += dy[i];
                    }
                }
                acc
            })
            .reduce(|| vec![0f32; 2 * n], add_into);
        Ok((CpuStorage::F32(sums), Shape::from((2, n))))
    }
}

/// `a += b`, returning `a`: the reduction of per-thread partial sums.
pub(super) fn add_into(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
    a
}

/// LayerNorm over the last dimension with a fused backward pass for x, weight and bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(weight, bias, LayerNormOp { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, input, weights};
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn layer_norm_matches_composite_op_and_its_gradients() {
        let dev = Device::Cpu;
        let x = input((3, 5, 24), 7);
        let w = Var::from_vec((0..24).map(|i| 1.0 + i as f32 * 0.05).collect(), 24, &dev).unwrap();
        let b = Var::from_vec((0..24).map(|i| i as f32 * -0.03).collect(), 24, &dev).unwrap();
        let lw = weights((3, 5, 24));
        let loss = |y: Tensor| (y * &lw).unwrap().sum_all().unwrap();
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let composite = candle_nn::ops::layer_norm_slow(xt, wt, bt, 1e-5).unwrap();
        let fused = layer_norm(xt, wt, bt, 1e-5).unwrap();
        close(&fused, &composite, 2e-6, "layer norm");
        let g1 = loss(composite).backward().unwrap();
        let g2 = loss(fused).backward().unwrap();
        for (v, name) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
            close(g2.get(v).unwrap(), g1.get(v).unwrap(), 1e-5, name);
        }
    }
}
