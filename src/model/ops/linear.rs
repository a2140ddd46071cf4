//! Dense layers: `x W^T + b` with both gradients as single gemms in their own layouts, and a
//! bias add whose gradient is a column sum. (candle's matmul of `W^T` accumulates the weight
//! gradient through a transposed, strided add, and its broadcast add reduces with a strided
//! sum.)

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::norm::add_into;
use super::{last_dim, slice, ROWS};
use kernels::matmul::{matmul, parallelism, MatMut, MatRef};

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let x = slice(s1, l1, "linear x")?;
        let w = slice(s2, l2, "linear weight")?;
        let b = slice(s3, l3, "linear bias")?;
        let (out, inp) = l2.shape().dims2()?;
        if last_dim(l1) != inp || b.len() != out {
            bail!(
                "linear: input {:?}, weight {:?}, bias {}",
                l1.dims(),
                l2.dims(),
                b.len()
            );
        }
        let rows = x.len() / inp;
        let mut y = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        // x is [rows, in], w is [out, in], y is [rows, out].
        let mut dst = MatMut::rows(&mut y, rows, out, out);
        let lhs = MatRef::rows(x, rows, inp, inp);
        let rhs = MatRef::transposed(w, inp, out, inp);
        matmul(&mut dst, true, lhs, rhs, 1.0, parallelism(rows * out * inp));
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("non-empty") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
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
        let dx = grad.apply_op2_no_bwd(w, &GradInput)?;
        let dw = grad.apply_op2_no_bwd(x, &GradWeight)?;
        let db = grad.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// dx = dy W.
struct GradInput;

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "fused-linear-grad-input"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dy = slice(s1, l1, "linear grad")?;
        let w = slice(s2, l2, "linear weight")?;
        let (out, inp) = l2.shape().dims2()?;
        let rows = dy.len() / out;
        let mut dx = vec![0f32; rows * inp];
        // dy is [rows, out], w is [out, in], dx is [rows, in].
        let mut dst = MatMut::rows(&mut dx, rows, inp, inp);
        let (lhs, rhs) = (
            MatRef::rows(dy, rows, out, out),
            MatRef::rows(w, out, inp, inp),
        );
        matmul(
            &mut dst,
            false,
            lhs,
            rhs,
            1.0,
            parallelism(rows * out * inp),
        );
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("non-empty") = inp;
        Ok((CpuStorage::F32(dx), Shape::from(dims)))
    }
}

/// dW = dy^T x.
struct GradWeight;

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "fused-linear-grad-weight"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dy = slice(s1, l1, "linear grad")?;
        let x = slice(s2, l2, "linear x")?;
        let (out, inp) = (last_dim(l1), last_dim(l2));
        let rows = dy.len() / out;
        let mut dw = vec![0f32; out * inp];
        // dy is [rows, out], x is [rows, in], dw is [out, in].
        let mut dst = MatMut::rows(&mut dw, out, inp, inp);
        let (lhs, rhs) = (
            MatRef::transposed(dy, out, rows, out),
            MatRef::rows(x, rows, inp, inp),
        );
        matmul(
            &mut dst,
            false,
            lhs,
            rhs,
            1.0,
            parallelism(rows * out * inp),
        );
        Ok((CpuStorage::F32(dw), Shape::from((out, inp))))
    }
}

/// `x W^T + b` over the last dimension, with a fused backward pass.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearOp)
}

/// `x + bias` over the last dimension (a reference for the tests: [`linear`] fuses it).
#[cfg(test)]
struct AddBias;

#[cfg(test)]
impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fused-add-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l1);
        let b = slice(s2, l2, "bias")?;
        let mut out = slice(s1, l1, "add bias x")?.to_vec();
        out.par_chunks_mut(n * ROWS).for_each(|rows| {
            for r in rows.chunks_mut(n) {
                r.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        Ok((Some(grad.clone()), Some(grad.apply_op1_no_bwd(&ColumnSum)?)))
    }
}

/// Sums the rows of a `[.., n]` tensor into `[n]`.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l);
        let x = slice(s, l, "column sum")?;
        let sum = x
            .par_chunks(n * ROWS * 8)
            .map(|rows| {
                let mut acc = vec![0f32; n];
                for r in rows.chunks(n) {
                    acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .reduce(|| vec![0f32; n], add_into);
        Ok((CpuStorage::F32(sum), Shape::from(n)))
    }
}

/// `x + bias` broadcast over the last dimension, with a fused backward pass (only the tests
/// use it on its own; [`linear`] fuses it).
#[cfg(test)]
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(bias, AddBias)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, input, weights};
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn linear_and_bias_match_composite_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let x = input((4, 7, 12), 2);
        let w =
            Var::from_tensor(&input((5, 12, 1), 8).as_tensor().reshape((5, 12)).unwrap()).unwrap();
        let b = Var::from_vec(vec![0.1f32, -0.2, 0.3, 0.0, 1.0], 5, &dev).unwrap();
        let lw = weights((4, 7, 5));
        let loss = |y: Tensor| (y * &lw).unwrap().sum_all().unwrap();
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let product = xt.broadcast_matmul(&wt.t().unwrap()).unwrap();
        let composite = product.broadcast_add(bt).unwrap();
        for (name, fused) in [
            ("linear", linear(xt, wt, bt).unwrap()),
            ("matmul + add_bias", add_bias(&product, bt).unwrap()),
        ] {
            close(&fused, &composite, 1e-5, name);
            let g1 = loss(composite.clone()).backward().unwrap();
            let g2 = loss(fused).backward().unwrap();
            for (v, what) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
                close(
                    g2.get(v).unwrap(),
                    g1.get(v).unwrap(),
                    1e-4,
                    &format!("{name}: {what}"),
                );
            }
        }
    }
}
