//! Multi-head self-attention over a fused Q/K/V projection, forward and backward, per
//! (sequence, head) in parallel, on the real tokens only. The forward kernel of one head,
//! [`attend_head`], is shared with the inference fast path.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::pointwise::{keep, mix};
use super::slice;
use crate::model::gemm::{matmul, Mat, MatMut};
use crate::model::kernels;

/// One head over `m` tokens: `probs = softmax(scale * Q K^T)` (`m x m`, kept for the
/// backward pass), then `out = (probs * mask) V`. `q`, `k`, `v` are rows of stride `ld` in the
/// fused projection; `out` has rows of stride `ld_out`.
///
/// # Safety
/// The pointers must cover `m` rows of `d` values at their strides; `out` must not overlap the
/// inputs or another thread's output.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attend_head(
    m: usize,
    d: usize,
    q: *const f32,
    k: *const f32,
    v: *const f32,
    ld: usize,
    out: MatMut,
    probs: &mut Vec<f32>,
    mask: Option<&[f32]>,
) {
    probs.resize(m * m, 0.0);
    let scale = 1.0 / (d as f32).sqrt();
    let none = Parallelism::None;
    let scores = MatMut {
        ptr: probs.as_mut_ptr(),
        ld: m,
    };
    matmul(
        m,
        m,
        d,
        scores,
        false,
        Mat::rows(q, ld),
        Mat::transposed(k, ld),
        scale,
        none,
    );
    for row in probs.chunks_mut(m) {
        kernels::softmax_inplace(row);
    }
    let dropped: Vec<f32>;
    let p = match mask {
        Some(mask) => {
            dropped = probs.iter().zip(mask).map(|(a, b)| a * b).collect();
            &dropped
        }
        None => &probs[..],
    };
    matmul(
        m,
        d,
        m,
        out,
        false,
        Mat::rows(p.as_ptr(), m),
        Mat::rows(v, ld),
        1.0,
        none,
    );
}

/// Self-attention on `qkv` rows of `3 * hidden` (`[batch, seq, 3h]` padded, or `[T, 3h]`
/// packed): sequence `i` is the `lengths[i]` rows from row `starts[i]`; other rows are padding
/// and come out zero. Dropout on the probabilities is drawn from (seed, sequence, head,
/// position).
struct AttentionOp {
    heads: usize,
    head_dim: usize,
    starts: Vec<usize>,
    lengths: Vec<usize>,
    dropout: Option<(f32, u64)>,
    /// Softmax probabilities of each (sequence, head), saved by the forward pass.
    probs: Mutex<Option<Vec<Vec<f32>>>>,
}

/// A buffer pointer shared by the per-(sequence, head) tasks.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: the tasks read the shared inputs and write disjoint (rows, head columns) blocks of
// the output; the buffers outlive the parallel loop that uses the pointer.
unsafe impl Send for Ptr {}
// SAFETY: as for Send: no two tasks write the same element.
unsafe impl Sync for Ptr {}

impl AttentionOp {
    /// `(rows, hidden)`, checked against the heads and the sequences: every sequence's rows
    /// lie inside the buffer (the kernels below rely on it).
    fn dims(&self, l: &Layout) -> Result<(usize, usize)> {
        let three_h = *l.dims().last().unwrap_or(&0);
        let h = self.heads * self.head_dim;
        let rows = l.shape().elem_count() / three_h.max(1);
        let fits = self
            .starts
            .iter()
            .zip(&self.lengths)
            .all(|(&a, &m)| a + m <= rows);
        if three_h != 3 * h || self.starts.len() != self.lengths.len() || !fits {
            bail!(
                "attention: qkv {:?} does not match {} heads of {} and sequences at {:?} of \
                 lengths {:?}",
                l.dims(),
                self.heads,
                self.head_dim,
                self.starts,
                self.lengths
            );
        }
        Ok((rows, h))
    }

    fn tasks(&self) -> Vec<(usize, usize)> {
        let heads = self.heads;
        (0..self.lengths.len())
            .flat_map(|b| (0..heads).map(move |h| (b, h)))
            .collect()
    }

    /// The dropout factors of one (sequence, head), or `None` without dropout.
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
        let (rows, h) = self.dims(l)?;
        let qkv = Ptr(slice(st, l, "attention qkv")?.as_ptr() as *mut f32);
        let d = self.head_dim;
        let mut out = vec![0f32; rows * h];
        let optr = Ptr(out.as_mut_ptr());
        let probs: Vec<Vec<f32>> = self
            .tasks()
            .par_iter()
            .map(|&(bi, hd)| {
                let (optr, qkv) = (optr, qkv);
                let (start, m) = (self.starts[bi], self.lengths[bi]);
                let mut p = Vec::new();
                // SAFETY: `dims` checked that rows start..start+m lie inside [rows, 3h] and
                // [rows, h]; each task writes those rows of sequence bi, columns of head hd
                // only.
                unsafe {
                    let q = qkv.0.add(start * 3 * h + hd * d) as *const f32;
                    let o = MatMut {
                        ptr: optr.0.add(start * h + hd * d),
                        ld: h,
                    };
                    let mask = self.mask(bi, hd, m);
                    attend_head(
                        m,
                        d,
                        q,
                        q.add(h),
                        q.add(2 * h),
                        3 * h,
                        o,
                        &mut p,
                        mask.as_deref(),
                    );
                }
                p
            })
            .collect();
        *self.probs.lock().expect("attention lock") = Some(probs);
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("qkv has dims") = h;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(probs) = self.probs.lock().expect("attention lock").take() else {
            bail!("attention: backward without a forward pass, or twice")
        };
        let g = AttentionGrad { op: self, probs };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &g)?))
    }
}

struct AttentionGrad<'a> {
    op: &'a AttentionOp,
    probs: Vec<Vec<f32>>,
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
        let (rows, h) = op.dims(l1)?;
        let qkv = Ptr(slice(s1, l1, "attention grad qkv")?.as_ptr() as *mut f32);
        let dout_all = slice(s2, l2, "attention grad")?;
        if dout_all.len() != rows * h {
            bail!(
                "attention grad: {} values for {rows} rows of {h}",
                dout_all.len()
            );
        }
        let dout = Ptr(dout_all.as_ptr() as *mut f32);
        let d = op.head_dim;
        let scale = 1.0 / (d as f32).sqrt();
        let none = Parallelism::None;
        let mut dqkv = vec![0f32; rows * 3 * h];
        let dptr = Ptr(dqkv.as_mut_ptr());
        op.tasks()
            .par_iter()
            .enumerate()
            .for_each(|(t, &(bi, hd))| {
                let (dptr, qkv, dout) = (dptr, qkv, dout);
                let (start, m) = (op.starts[bi], op.lengths[bi]);
                if m == 0 {
                    return;
                }
                let p = &self.probs[t];
                let mask = op.mask(bi, hd, m);
                let pd: Vec<f32> = match &mask {
                    Some(mk) => p.iter().zip(mk).map(|(a, b)| a * b).collect(),
                    None => p.clone(),
                };
                let mut dp = vec![0f32; m * m];
                let ld = 3 * h;
                // SAFETY: as in the forward pass (`dims` checked the rows, and dout has rows x h
                // values); each task writes rows start..start+m in the Q, K and V columns of
                // head hd only.
                unsafe {
                    let q = qkv.0.add(start * ld + hd * d) as *const f32;
                    let (k, v) = (q.add(h), q.add(2 * h));
                    let go = Mat::rows(dout.0.add(start * h + hd * d), h);
                    let dq = dptr.0.add(start * ld + hd * d);
                    let at = |ptr: *mut f32| MatMut { ptr, ld };
                    // dV = Pd^T dO
                    matmul(
                        m,
                        d,
                        m,
                        at(dq.add(2 * h)),
                        false,
                        Mat::transposed(pd.as_ptr(), m),
                        go,
                        1.0,
                        none,
                    );
                    // dPd = dO V^T, then through the mask and the softmax
                    let dpm = MatMut {
                        ptr: dp.as_mut_ptr(),
                        ld: m,
                    };
                    matmul(m, m, d, dpm, false, go, Mat::transposed(v, ld), 1.0, none);
                    if let Some(mk) = &mask {
                        dp.iter_mut().zip(mk).for_each(|(a, b)| *a *= b);
                    }
                    for (drow, prow) in dp.chunks_mut(m).zip(p.chunks(m)) {
                        kernels::softmax_grad_inplace(drow, prow);
                    }
                    // dQ = scale dS K,  dK = scale dS^T Q
                    matmul(
                        m,
                        d,
                        m,
                        at(dq),
                        false,
                        Mat::rows(dp.as_ptr(), m),
                        Mat::rows(k, ld),
                        scale,
                        none,
                    );
                    let ds_t = Mat::transposed(dp.as_ptr(), m);
                    matmul(
                        m,
                        d,
                        m,
                        at(dq.add(h)),
                        false,
                        ds_t,
                        Mat::rows(q, ld),
                        scale,
                        none,
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
    let (_, s, _) = qkv.dims3()?;
    let starts: Vec<usize> = (0..lengths.len()).map(|i| i * s).collect();
    attention_at(qkv, &starts, lengths, heads, head_dim, dropout)
}

/// As [`attention`], on packed sequences: `qkv` `[T, 3 * hidden]`, sequence `i` is the rows
/// `offsets[i]..offsets[i + 1]`. No work is spent on padding, whatever the batch.
pub fn attention_packed(
    qkv: &Tensor,
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let starts = &offsets[..offsets.len().saturating_sub(1)];
    let lengths: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    attention_at(qkv, starts, &lengths, heads, head_dim, dropout)
}

fn attention_at(
    qkv: &Tensor,
    starts: &[usize],
    lengths: &[usize],
    heads: usize,
    head_dim: usize,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp {
        heads,
        head_dim,
        starts: starts.to_vec(),
        lengths: lengths.to_vec(),
        dropout,
        probs: Mutex::new(None),
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, input, weights};
    use super::*;
    use candle_core::{Device, Var, D};

    /// The fused attention against candle's composite maths (padding masked): values and the
    /// gradient of the projection.
    #[test]
    fn attention_matches_composite_and_gradients() {
        let dev = Device::Cpu;
        let (b, s, heads, d) = (3, 6, 2, 4);
        let h = heads * d;
        let lengths = [6usize, 2, 4];
        let qkv = input((b, s, 3 * h), 3);
        let lw = weights((b, s, h));
        let real: Vec<f32> = (0..b)
            .flat_map(|i| (0..s).map(move |j| (j < lengths[i]) as u8 as f32))
            .collect();
        let row_mask = Tensor::from_vec(real.clone(), (b, s, 1), &dev).unwrap();
        let loss = |y: &Tensor| {
            (y * &lw)
                .unwrap()
                .broadcast_mul(&row_mask)
                .unwrap()
                .sum_all()
                .unwrap()
        };

        let split = |t: Tensor| {
            let t = t
                .reshape((b, s, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            t.contiguous().unwrap()
        };
        let x = qkv.as_tensor();
        let q = split(x.narrow(2, 0, h).unwrap());
        let k = split(x.narrow(2, h, h).unwrap());
        let v = split(x.narrow(2, 2 * h, h).unwrap());
        let additive = Tensor::from_vec(real, (b, 1, 1, s), &dev).unwrap();
        let additive = ((additive - 1.0).unwrap() * 1e9).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs =
            candle_nn::ops::softmax(&scores.broadcast_add(&additive).unwrap(), D::Minus1).unwrap();
        let composite = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, s, h))
            .unwrap();
        let fused = attention(x, &lengths, heads, d, None).unwrap();
        let masked = |t: &Tensor| t.broadcast_mul(&row_mask).unwrap();
        close(&masked(&fused), &masked(&composite), 1e-5, "attention");
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
        let lw = weights((b, s, h));
        let f = |v: &Vec<Vec<Vec<f32>>>| -> (f32, Option<Tensor>) {
            let x = Var::from_tensor(&Tensor::new(v.clone(), &dev).unwrap()).unwrap();
            let y = attention(x.as_tensor(), &lengths, heads, d, Some((0.3, 42))).unwrap();
            let l = (y * &lw).unwrap().sum_all().unwrap();
            let g = l.backward().unwrap().get(&x).cloned();
            (l.to_scalar::<f32>().unwrap(), g)
        };
        let g = f(&base).1.unwrap().to_vec3::<f32>().unwrap();
        let eps = 1e-2f32;
        for (bi, si, c) in [
            (0, 0, 0),
            (0, 4, 7),
            (1, 2, 13),
            (0, 3, 2 * h + 1),
            (1, 1, h + 2),
        ] {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[bi][si][c] += eps;
            minus[bi][si][c] -= eps;
            let numeric = (f(&plus).0 - f(&minus).0) / (2.0 * eps);
            let analytic = g[bi][si][c];
            assert!(
                (numeric - analytic).abs() < 2e-3,
                "({bi},{si},{c}): {numeric} vs {analytic}"
            );
        }
    }
}
