//! Fused, differentiable GELU, softmax and LayerNorm for the training path: one pass forward,
//! one pass backward, with the vectorised kernels of [`super::kernels`]. candle's own fused
//! softmax and LayerNorm have no backward pass, and its composite versions make a new tensor
//! for every step (about ten for a LayerNorm, and as many again backward).

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::kernels;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{what}: expected f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

/// Rows per parallel task.
const ROWS: usize = 16;

// ---------------------------------------------------------------- GELU

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = slice(s, l, "gelu")?.to_vec();
        out.par_chunks_mut(1 << 14).for_each(kernels::gelu_inplace);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// `grad * gelu'(x)`, gelu'(x) = (1 + erf(x/√2))/2 + x φ(x).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "gelu grad x")?;
        let g = slice(s2, l2, "gelu grad")?;
        let mut out = g.to_vec();
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, x)| kernels::gelu_grad_inplace(o, x));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU (erf form) with a fused backward pass.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

// ---------------------------------------------------------------- softmax

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l);
        let mut out = slice(s, l, "softmax")?.to_vec();
        out.par_chunks_mut(n * ROWS)
            .for_each(|rows| rows.chunks_mut(n).for_each(kernels::softmax_inplace));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `y * (dy - sum(dy * y))` per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l1);
        let y = slice(s1, l1, "softmax grad y")?;
        let mut out = slice(s2, l2, "softmax grad")?.to_vec();
        out.par_chunks_mut(n * ROWS)
            .zip(y.par_chunks(n * ROWS))
            .for_each(|(gs, ys)| {
                for (g, y) in gs.chunks_mut(n).zip(ys.chunks(n)) {
                    let dot: f32 = g.iter().zip(y).map(|(a, b)| a * b).sum();
                    for (g, y) in g.iter_mut().zip(y) {
                        *g = y * (*g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension with a fused backward pass.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

// ---------------------------------------------------------------- LayerNorm

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
        let x = slice(s1, l1, "layer norm x")?;
        let w = slice(s2, l2, "layer norm weight")?;
        let b = slice(s3, l3, "layer norm bias")?;
        let mut out = x.to_vec();
        out.par_chunks_mut(n * ROWS).for_each(|rows| {
            rows.chunks_mut(n)
                .for_each(|r| kernels::layer_norm_inplace(r, w, b, self.eps))
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
        let dx = x.apply_op3_no_bwd(w, &grad, &LayerNormGradX { eps: self.eps })?;
        let dwb = x.apply_op2_no_bwd(&grad, &LayerNormGradWB { eps: self.eps })?; // [2, n]
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * w.
struct LayerNormGradX {
    eps: f32,
}

impl CustomOp3 for LayerNormGradX {
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
        out.par_chunks_mut(n * ROWS)
            .zip(x.par_chunks(n * ROWS))
            .zip(dy.par_chunks(n * ROWS))
            .for_each(|((o, x), dy)| {
                for ((o, x), dy) in o.chunks_mut(n).zip(x.chunks(n)).zip(dy.chunks(n)) {
                    let (mean, rstd) = moments(x, self.eps);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for i in 0..n {
                        let xhat = (x[i] - mean) * rstd;
                        let d = dy[i] * w[i];
                        m1 += d;
                        m2 += d * xhat;
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

/// dw = sum over rows of dy * xhat, db = sum over rows of dy, as a `[2, n]` tensor.
struct LayerNormGradWB {
    eps: f32,
}

impl CustomOp2 for LayerNormGradWB {
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
        let sums = x
            .par_chunks(n * ROWS * 4)
            .zip(dy.par_chunks(n * ROWS * 4))
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
            .reduce(
                || vec![0f32; 2 * n],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((CpuStorage::F32(sums), Shape::from((2, n))))
    }
}

/// LayerNorm over the last dimension with a fused backward pass for x, weight and bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(weight, bias, LayerNormOp { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < tol, "{what}: max abs diff {d}");
    }

    fn input(shape: (usize, usize, usize), seed: u64) -> Var {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 250.0) - 2.0)
            .collect();
        Var::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Each fused op against the same maths in candle's differentiable ops: values and the
    /// gradients of every input.
    #[test]
    fn fused_ops_match_composite_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let x = input((3, 5, 24), 7);
        let w = Var::from_vec(
            (0..24).map(|i| 1.0 + i as f32 * 0.05).collect::<Vec<_>>(),
            24,
            &dev,
        )
        .unwrap();
        let b = Var::from_vec(
            (0..24).map(|i| i as f32 * -0.03).collect::<Vec<_>>(),
            24,
            &dev,
        )
        .unwrap();
        let weights = Tensor::arange(0f32, 360.0, &dev)
            .unwrap()
            .reshape((3, 5, 24))
            .unwrap()
            .sin()
            .unwrap();
        let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();

        // GELU
        let composite = x.as_tensor().gelu_erf().unwrap();
        let fused = gelu(x.as_tensor()).unwrap();
        close(&fused, &composite, 2e-6, "gelu");
        let g1 = loss(composite).backward().unwrap();
        let g2 = loss(fused).backward().unwrap();
        close(g2.get(&x).unwrap(), g1.get(&x).unwrap(), 2e-6, "gelu grad");

        // softmax
        let composite = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        close(&fused, &composite, 1e-6, "softmax");
        let g1 = loss(composite).backward().unwrap();
        let g2 = loss(fused).backward().unwrap();
        close(
            g2.get(&x).unwrap(),
            g1.get(&x).unwrap(),
            1e-6,
            "softmax grad",
        );

        // LayerNorm
        let composite =
            candle_nn::ops::layer_norm_slow(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
                .unwrap();
        let fused = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        close(&fused, &composite, 2e-6, "layer norm");
        let g1 = loss(composite).backward().unwrap();
        let g2 = loss(fused).backward().unwrap();
        close(
            g2.get(&x).unwrap(),
            g1.get(&x).unwrap(),
            1e-5,
            "layer norm grad x",
        );
        close(
            g2.get(&w).unwrap(),
            g1.get(&w).unwrap(),
            1e-5,
            "layer norm grad w",
        );
        close(
            g2.get(&b).unwrap(),
            g1.get(&b).unwrap(),
            1e-5,
            "layer norm grad b",
        );
    }
}
