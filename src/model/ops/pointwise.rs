//! GELU, softmax and dropout with fused backward passes.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{last_dim, slice, ROWS};
use kernels::math;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = slice(s, l, "gelu")?.to_vec();
        out.par_chunks_mut(CHUNK).for_each(math::gelu_inplace);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// `grad * gelu'(x)`.
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
        let mut out = slice(s2, l2, "gelu grad")?.to_vec();
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| math::gelu_grad_inplace(o, x));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU (erf form) with a fused backward pass.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l);
        let mut out = slice(s, l, "softmax")?.to_vec();
        out.par_chunks_mut(n * ROWS)
            .for_each(|rows| rows.chunks_mut(n).for_each(math::softmax_inplace));
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
                    math::softmax_grad_inplace(g, y);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension with a fused backward pass.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// A counter-based generator: the same (seed, index) always gives the same number, whatever
/// thread computes it, so masks are recomputed in the backward pass instead of stored.
#[inline(always)]
pub(crate) fn mix(seed: u64, index: u64) -> u64 {
    // SplitMix64's finaliser.
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dropout factor of element `index`: 0 with probability `p`, else `1 / (1 - p)`.
#[inline(always)]
pub(crate) fn keep(seed: u64, index: u64, p: f32) -> f32 {
    let u = (mix(seed, index) >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// `x * mask`, the mask a function of (seed, element index).
struct DropoutOp {
    p: f32,
    seed: u64,
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = slice(s, l, "dropout")?.to_vec();
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let base = (c * CHUNK) as u64;
                for (i, v) in chunk.iter_mut().enumerate() {
                    *v *= keep(self.seed, base + i as u64, self.p);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let same = DropoutOp {
            p: self.p,
            seed: self.seed,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&same)?))
    }
}

/// Dropout with probability `p`, its mask a function of `seed`.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(DropoutOp { p, seed })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, input, weights};
    use super::*;
    use candle_core::{Device, Var, D};

    /// GELU and softmax against candle's composite ops: values and input gradients.
    #[test]
    fn gelu_and_softmax_match_composite_ops() {
        let x = input((3, 5, 24), 7);
        let w = weights((3, 5, 24));
        let loss = |y: Tensor| (y * &w).unwrap().sum_all().unwrap();
        let cases: [(&str, Tensor, Tensor); 2] = [
            (
                "gelu",
                x.as_tensor().gelu_erf().unwrap(),
                gelu(x.as_tensor()).unwrap(),
            ),
            (
                "softmax",
                candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap(),
                softmax_last_dim(x.as_tensor()).unwrap(),
            ),
        ];
        for (name, composite, fused) in cases {
            close(&fused, &composite, 2e-6, name);
            let g1 = loss(composite).backward().unwrap();
            let g2 = loss(fused).backward().unwrap();
            close(g2.get(&x).unwrap(), g1.get(&x).unwrap(), 2e-6, name);
        }
    }

    #[test]
    fn dropout_drops_its_share_and_its_gradient_is_the_mask() {
        let x = Var::from_vec(vec![1f32; 100_000], (1000, 100), &Device::Cpu).unwrap();
        let y = dropout(x.as_tensor(), 0.25, 9).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let zeros = v.iter().filter(|&&a| a == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.25).abs() < 0.01, "dropped share {zeros}");
        assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.75).abs() < 1e-6));
        let again = dropout(x.as_tensor(), 0.25, 9).unwrap();
        assert_eq!(v, again.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(g, v, "the gradient of sum(dropout(x)) is the mask");
    }
}
