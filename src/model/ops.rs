//! Fused, differentiable GELU, softmax and LayerNorm for the training path: one pass forward,
//! one pass backward, with the vectorised kernels of [`super::kernels`]. candle's own fused
//! softmax and LayerNorm have no backward pass, and its composite versions make a new tensor
//! for every step (about ten for a LayerNorm, and as many again backward).

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use gemm::{gemm, Parallelism};
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

// ---------------------------------------------------------------- dropout masks

/// A counter-based generator: the same (seed, index) always gives the same number, whatever
/// thread computes it, so masks can be recomputed in the backward pass instead of stored.
#[inline(always)]
fn mix(seed: u64, index: u64) -> u64 {
    // SplitMix64 finaliser.
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dropout factor of element `index`: 0 with probability `p`, else `1 / (1 - p)`.
#[inline(always)]
fn keep(seed: u64, index: u64, p: f32) -> f32 {
    let u = (mix(seed, index) >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// `x * mask`, the mask drawn from (seed, element index); backward recomputes the mask.
struct DropoutOp {
    p: f32,
    seed: u64,
}

impl DropoutOp {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = x.to_vec();
        out.par_chunks_mut(1 << 14)
            .enumerate()
            .for_each(|(c, chunk)| {
                let base = (c << 14) as u64;
                for (i, v) in chunk.iter_mut().enumerate() {
                    *v *= keep(self.seed, base + i as u64, self.p);
                }
            });
        out
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((
            CpuStorage::F32(self.apply(slice(s, l, "dropout")?)),
            l.shape().clone(),
        ))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = DropoutOp {
            p: self.p,
            seed: self.seed,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// Dropout with probability `p`, its mask a function of `seed`.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(DropoutOp { p, seed })
}

// ---------------------------------------------------------------- bias

/// `x + bias` over the last dimension; the bias gradient is a column sum in one pass.
struct AddBias;

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
            .reduce(
                || vec![0f32; n],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((CpuStorage::F32(sum), Shape::from(n)))
    }
}

/// `x + bias` broadcast over the last dimension, with a fused backward pass.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(bias, AddBias)
}

// ---------------------------------------------------------------- linear

fn gemm_parallelism(flops: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && flops > (1 << 20) {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `y = x W^T + b` over the last dimension of `x`, with a backward pass that writes each
/// gradient in its own layout with one gemm (candle's matmul of `W^T` accumulates the weight
/// gradient through a transposed, strided add).
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
        // SAFETY: sizes checked above.
        unsafe {
            gemm(
                rows,
                out,
                inp,
                y.as_mut_ptr(),
                1,
                out as isize,
                true,
                x.as_ptr(),
                1,
                inp as isize,
                w.as_ptr(),
                inp as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm_parallelism(rows * out * inp),
            );
        }
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
        let dx = grad.apply_op2_no_bwd(w, &LinearGradInput)?;
        let dw = grad.apply_op2_no_bwd(x, &LinearGradWeight)?;
        let db = grad.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// dx = dy W.
struct LinearGradInput;

impl CustomOp2 for LinearGradInput {
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
        // SAFETY: dy is [rows, out], w is [out, in], dx is [rows, in].
        unsafe {
            gemm(
                rows,
                inp,
                out,
                dx.as_mut_ptr(),
                1,
                inp as isize,
                false,
                dy.as_ptr(),
                1,
                out as isize,
                w.as_ptr(),
                1,
                inp as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm_parallelism(rows * out * inp),
            );
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("non-empty") = inp;
        Ok((CpuStorage::F32(dx), Shape::from(dims)))
    }
}

/// dW = dy^T x.
struct LinearGradWeight;

impl CustomOp2 for LinearGradWeight {
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
        // SAFETY: dy is [rows, out], x is [rows, in], dw is [out, in].
        unsafe {
            gemm(
                out,
                inp,
                rows,
                dw.as_mut_ptr(),
                1,
                inp as isize,
                false,
                dy.as_ptr(),
                out as isize,
                1,
                x.as_ptr(),
                1,
                inp as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm_parallelism(rows * out * inp),
            );
        }
        Ok((CpuStorage::F32(dw), Shape::from((out, inp))))
    }
}

/// `x W^T + b` over the last dimension, with a fused backward pass.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearOp)
}

// ---------------------------------------------------------------- attention

/// Saved between the forward and the backward pass of one attention call.
struct Saved {
    /// Softmax probabilities of each (sequence, head), `m x m` blocks, before dropout.
    probs: Vec<Vec<f32>>,
}

/// Self-attention over a fused projection `qkv` `[batch, seq, 3 * hidden]` whose rows past each
/// sequence's length are padding: output `[batch, seq, hidden]`, padding rows zero.
/// Dropout on the attention probabilities is drawn from (seed, sequence, head, position).
pub struct AttentionOp {
    heads: usize,
    head_dim: usize,
    lengths: Vec<usize>,
    dropout: Option<(f32, u64)>,
    saved: std::sync::Mutex<Option<Saved>>,
}

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl AttentionOp {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let (b, s, three_h) = l.shape().dims3()?;
        let h = self.heads * self.head_dim;
        if three_h != 3 * h || self.lengths.len() != b || self.lengths.iter().any(|&m| m > s) {
            bail!(
                "attention: qkv {:?} does not match {} heads of {} and lengths {:?}",
                l.dims(),
                self.heads,
                self.head_dim,
                self.lengths
            );
        }
        Ok((b, s, h))
    }

    fn mask(&self, b: usize, head: usize, m: usize) -> Option<Vec<f32>> {
        self.dropout.map(|(p, seed)| {
            let base = seed ^ mix(b as u64, head as u64);
            (0..m * m).map(|i| keep(base, i as u64, p)).collect()
        })
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, s, h) = self.dims(l)?;
        let qkv = slice(st, l, "attention qkv")?;
        let d = self.head_dim;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; b * s * h];
        let optr = Ptr(out.as_mut_ptr());
        let qptr = Ptr(qkv.as_ptr() as *mut f32);
        let tasks: Vec<(usize, usize)> = (0..b)
            .flat_map(|i| (0..self.heads).map(move |j| (i, j)))
            .collect();
        let probs: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(bi, hd)| {
                let (optr, qptr) = (optr, qptr);
                let m = self.lengths[bi];
                let mut p = vec![0f32; m * m];
                if m == 0 {
                    return p;
                }
                // SAFETY: offsets stay inside the [b, s, 3h] input and [b, s, h] output; each
                // task writes rows 0..m of sequence bi, columns of head hd only.
                unsafe {
                    let q = qptr.0.add(bi * s * 3 * h + hd * d) as *const f32;
                    let k = q.add(h);
                    let v = q.add(2 * h);
                    gemm(
                        m,
                        m,
                        d,
                        p.as_mut_ptr(),
                        1,
                        m as isize,
                        false,
                        q,
                        1,
                        (3 * h) as isize,
                        k,
                        (3 * h) as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    for row in p.chunks_mut(m) {
                        kernels::softmax_inplace(row);
                    }
                    let dropped;
                    let pd: &[f32] = match self.mask(bi, hd, m) {
                        Some(mask) => {
                            dropped = p
                                .iter()
                                .zip(&mask)
                                .map(|(a, b)| a * b)
                                .collect::<Vec<f32>>();
                            &dropped
                        }
                        None => &p,
                    };
                    let o = optr.0.add(bi * s * h + hd * d);
                    gemm(
                        m,
                        d,
                        m,
                        o,
                        1,
                        h as isize,
                        false,
                        pd.as_ptr(),
                        1,
                        m as isize,
                        v,
                        1,
                        (3 * h) as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                p
            })
            .collect();
        *self.saved.lock().expect("attention lock") = Some(Saved { probs });
        Ok((CpuStorage::F32(out), Shape::from((b, s, h))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().expect("attention lock").take();
        let Some(saved) = saved else {
            bail!("attention: backward called twice, or without a forward pass")
        };
        let g = AttentionGrad { op: self, saved };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &g)?))
    }
}

struct AttentionGrad<'a> {
    op: &'a AttentionOp,
    saved: Saved,
}

impl CustomOp2 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "fused-attention-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.op;
        let (b, s, h) = op.dims(l1)?;
        let qkv = slice(s1, l1, "attention grad qkv")?;
        let dout = slice(s2, l2, "attention grad")?;
        let d = op.head_dim;
        let scale = 1.0 / (d as f32).sqrt();
        let mut dqkv = vec![0f32; b * s * 3 * h];
        let dptr = Ptr(dqkv.as_mut_ptr());
        let qptr = Ptr(qkv.as_ptr() as *mut f32);
        let gptr = Ptr(dout.as_ptr() as *mut f32);
        let tasks: Vec<(usize, usize)> = (0..b)
            .flat_map(|i| (0..op.heads).map(move |j| (i, j)))
            .collect();
        tasks.par_iter().enumerate().for_each(|(t, &(bi, hd))| {
            let (dptr, qptr, gptr) = (dptr, qptr, gptr);
            let m = op.lengths[bi];
            if m == 0 {
                return;
            }
            let p = &self.saved.probs[t];
            let mask = op.mask(bi, hd, m);
            let pd: Vec<f32> = match &mask {
                Some(mk) => p.iter().zip(mk).map(|(a, b)| a * b).collect(),
                None => p.clone(),
            };
            let mut dp = vec![0f32; m * m];
            // SAFETY: as in the forward pass; each task writes rows 0..m of sequence bi in the
            // Q, K and V columns of head hd only.
            unsafe {
                let ld = (3 * h) as isize;
                let q = qptr.0.add(bi * s * 3 * h + hd * d) as *const f32;
                let k = q.add(h);
                let v = q.add(2 * h);
                let go = gptr.0.add(bi * s * h + hd * d) as *const f32;
                let dq = dptr.0.add(bi * s * 3 * h + hd * d);
                let dk = dq.add(h);
                let dv = dq.add(2 * h);
                // dV = Pd^T dO   [m, d]
                gemm(
                    m,
                    d,
                    m,
                    dv,
                    1,
                    ld,
                    false,
                    pd.as_ptr(),
                    m as isize,
                    1,
                    go,
                    1,
                    h as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                // dPd = dO V^T   [m, m]
                gemm(
                    m,
                    m,
                    d,
                    dp.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    go,
                    1,
                    h as isize,
                    v,
                    ld,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                if let Some(mk) = &mask {
                    dp.iter_mut().zip(mk).for_each(|(a, b)| *a *= b);
                }
                // dS = P * (dP - rowsum(dP * P))
                for (drow, prow) in dp.chunks_mut(m).zip(p.chunks(m)) {
                    let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
                    drow.iter_mut()
                        .zip(prow)
                        .for_each(|(a, b)| *a = b * (*a - dot));
                }
                // dQ = scale dS K   [m, d];  dK = scale dS^T Q   [m, d]
                gemm(
                    m,
                    d,
                    m,
                    dq,
                    1,
                    ld,
                    false,
                    dp.as_ptr(),
                    1,
                    m as isize,
                    k,
                    1,
                    ld,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                gemm(
                    m,
                    d,
                    m,
                    dk,
                    1,
                    ld,
                    false,
                    dp.as_ptr(),
                    m as isize,
                    1,
                    q,
                    1,
                    ld,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

/// Multi-head self-attention on a fused `[batch, seq, 3 * hidden]` projection, for batches
/// padded at the end (`lengths` real tokens per row), with dropout `(p, seed)` on the
/// attention probabilities. Differentiable.
pub fn attention(
    qkv: &Tensor,
    lengths: &[usize],
    heads: usize,
    head_dim: usize,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp {
        heads,
        head_dim,
        lengths: lengths.to_vec(),
        dropout,
        saved: std::sync::Mutex::new(None),
    })
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

    /// The fused attention against candle's composite maths (padding masked), values and
    /// the gradient of the projection.
    #[test]
    fn attention_matches_composite_and_gradients() {
        let dev = Device::Cpu;
        let (b, s, heads, d) = (3, 6, 2, 4);
        let h = heads * d;
        let lengths = [6usize, 2, 4];
        let qkv = input((b, s, 3 * h), 3);
        let weights = Tensor::arange(0f32, (b * s * h) as f32, &dev)
            .unwrap()
            .reshape((b, s, h))
            .unwrap()
            .cos()
            .unwrap();
        let mask_rows: Vec<f32> = (0..b)
            .flat_map(|i| (0..s).map(move |j| if j < lengths[i] { 1.0 } else { 0.0 }))
            .collect();
        let row_mask = Tensor::from_vec(mask_rows.clone(), (b, s, 1), &dev).unwrap();
        let loss = |y: &Tensor| {
            (y * &weights)
                .unwrap()
                .broadcast_mul(&row_mask)
                .unwrap()
                .sum_all()
                .unwrap()
        };

        // Composite: split heads, scores, additive mask, softmax, weighted sum.
        let split = |t: Tensor| {
            t.reshape((b, s, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let x = qkv.as_tensor();
        let q = split(x.narrow(2, 0, h).unwrap());
        let k = split(x.narrow(2, h, h).unwrap());
        let v = split(x.narrow(2, 2 * h, h).unwrap());
        let additive = ((Tensor::from_vec(mask_rows, (b, 1, 1, s), &dev).unwrap() - 1.0).unwrap()
            * 1e9)
            .unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt())
            .unwrap()
            .broadcast_add(&additive)
            .unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let composite = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, s, h))
            .unwrap();
        let fused = attention(x, &lengths, heads, d, None).unwrap();
        close(
            &fused.broadcast_mul(&row_mask).unwrap(),
            &composite.broadcast_mul(&row_mask).unwrap(),
            1e-5,
            "attention",
        );
        let g1 = loss(&composite).backward().unwrap();
        let g2 = loss(&fused).backward().unwrap();
        close(
            g2.get(&qkv).unwrap(),
            g1.get(&qkv).unwrap(),
            1e-5,
            "attention grad",
        );
    }

    /// With dropout, the analytic gradient agrees with finite differences (the masks are a
    /// function of the seed, so every evaluation drops the same units).
    #[test]
    fn attention_with_dropout_passes_a_gradient_check() {
        let dev = Device::Cpu;
        let (b, s, heads, d) = (2, 5, 2, 3);
        let h = heads * d;
        let lengths = [5usize, 3];
        let base = input((b, s, 3 * h), 11)
            .as_tensor()
            .to_vec3::<f32>()
            .unwrap();
        let weights = Tensor::arange(0f32, (b * s * h) as f32, &dev)
            .unwrap()
            .reshape((b, s, h))
            .unwrap()
            .sin()
            .unwrap();
        let f = |v: &Vec<Vec<Vec<f32>>>| -> (f32, Option<Tensor>) {
            let x = Var::from_tensor(&Tensor::new(v.clone(), &dev).unwrap()).unwrap();
            let y = attention(x.as_tensor(), &lengths, heads, d, Some((0.3, 42))).unwrap();
            let l = (y * &weights).unwrap().sum_all().unwrap();
            let g = l.backward().unwrap().get(&x).cloned();
            (l.to_scalar::<f32>().unwrap(), g)
        };
        let (_, g) = f(&base);
        let g = g.unwrap().to_vec3::<f32>().unwrap();
        let eps = 1e-2f32;
        for (bi, si, c) in [
            (0, 0, 0),
            (0, 4, 7),
            (1, 2, 13),
            (0, 3, 2 * h + 1),
            (1, 1, h + 2),
        ] {
            let mut plus = base.clone();
            plus[bi][si][c] += eps;
            let mut minus = base.clone();
            minus[bi][si][c] -= eps;
            let numeric = (f(&plus).0 - f(&minus).0) / (2.0 * eps);
            assert!(
                (numeric - g[bi][si][c]).abs() < 2e-3,
                "({bi},{si},{c}): numeric {numeric} vs analytic {}",
                g[bi][si][c]
            );
        }
    }

    #[test]
    fn dropout_and_bias_ops() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1f32; 100_000], (1000, 100), &dev).unwrap();
        let y = dropout(x.as_tensor(), 0.25, 9).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let zeros = v.iter().filter(|&&a| a == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.25).abs() < 0.01, "dropped share {zeros}");
        assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.75).abs() < 1e-6));
        assert_eq!(
            v,
            dropout(x.as_tensor(), 0.25, 9)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            v,
            "gradient = the mask"
        );

        let a = input((2, 3, 4), 5);
        let bias = Var::from_vec(vec![0.5f32, -1.0, 2.0, 0.0], 4, &dev).unwrap();
        let composite = a.as_tensor().broadcast_add(bias.as_tensor()).unwrap();
        let fused = add_bias(a.as_tensor(), bias.as_tensor()).unwrap();
        close(&fused, &composite, 1e-7, "add bias");
        let w = Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let g1 = (composite * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(
            g2.get(&bias).unwrap(),
            g1.get(&bias).unwrap(),
            1e-5,
            "bias grad",
        );
        close(g2.get(&a).unwrap(), g1.get(&a).unwrap(), 1e-7, "x grad");
    }

    #[test]
    fn linear_matches_matmul_and_gradients() {
        let dev = Device::Cpu;
        let x = input((4, 7, 12), 2);
        let w =
            Var::from_tensor(&input((5, 12, 1), 8).as_tensor().reshape((5, 12)).unwrap()).unwrap();
        let b = Var::from_vec(vec![0.1f32, -0.2, 0.3, 0.0, 1.0], 5, &dev).unwrap();
        let composite = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        let fused = linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        close(&fused, &composite, 1e-5, "linear");
        let weights = Tensor::arange(0f32, 140.0, &dev)
            .unwrap()
            .reshape((4, 7, 5))
            .unwrap()
            .sin()
            .unwrap();
        let g1 = (composite * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, name) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
            close(g2.get(v).unwrap(), g1.get(v).unwrap(), 1e-4, name);
        }
    }
}
