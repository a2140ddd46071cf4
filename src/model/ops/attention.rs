//! Multi-head self-attention over a fused Q/K/V projection, forward and backward, per
//! (sequence, head) in parallel, on the real tokens only, optionally with MPNet's relative
//! position bias (a second input, the `[buckets, heads]` table, which gets its gradient too).
//! The forward kernel of one head, [`attend_head`], is shared with the inference fast path.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::pointwise::{keep, mix};
use super::slice;
use crate::model::gemm::{matmul, Mat, MatMut};
use crate::model::kernels;
use crate::model::mpnet;

/// One head over `m` tokens: `probs = softmax(scale * Q K^T + bias)` (`m x m`, kept for the
/// backward pass), then `out = (probs * mask) V`. `q`, `k`, `v` are rows of stride `ld` in the
/// fused projection; `out` has rows of stride `ld_out`. `bias`, MPNet's relative position bias
/// of this head by distance ([`mpnet::head_bias`], `2m - 1` values), adds
/// `bias[j - i + m - 1]` to the score of query `i` and key `j`.
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
    bias: Option<&[f32]>,
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
    for (i, row) in probs.chunks_mut(m).enumerate() {
        if let Some(rel) = bias {
            let rel = &rel[m - 1 - i..2 * m - 1 - i];
            row.iter_mut().zip(rel).for_each(|(s, b)| *s += b);
        }
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
    /// The buckets of MPNet's relative position bias (see [`mpnet::distance_buckets`]) for
    /// the longest sequence, when the op adds the bias; the table is the op's second input.
    buckets: Option<Vec<u32>>,
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

impl AttentionOp {
    /// Checks the bias table `[buckets, heads]` against the op; its row count.
    fn table_rows(&self, l: &Layout) -> Result<usize> {
        match l.dims() {
            &[rows, heads] if heads == self.heads && rows >= mpnet::BUCKETS => Ok(rows),
            d => bail!(
                "attention: relative bias table {d:?}, expected [>= {}, {}]",
                mpnet::BUCKETS,
                self.heads
            ),
        }
    }

    /// The forward pass, with the bias table `[buckets, heads]` when the op has one.
    fn forward(
        &self,
        st: &CpuStorage,
        l: &Layout,
        table: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, h) = self.dims(l)?;
        let bias = match (&self.buckets, table) {
            (Some(b), Some(t)) => Some((b, t)),
            (None, None) => None,
            _ => bail!("attention: a bias table without buckets, or buckets without a table"),
        };
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
                let mut rel = Vec::new();
                if let Some((buckets, table)) = bias {
                    mpnet::head_bias(table, self.heads, hd, buckets, m, &mut rel);
                }
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
                        bias.map(|_| &rel[..]),
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

    /// The gradients of `qkv` and, with a bias, of its table (`rows` rows).
    fn backward(
        &self,
        qkv: &Tensor,
        grad: &Tensor,
        rows: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let Some(probs) = self.probs.lock().expect("attention lock").take() else {
            bail!("attention: backward without a forward pass, or twice")
        };
        let g = AttentionGrad {
            op: self,
            probs,
            table_rows: rows,
            dtable: Mutex::new(None),
        };
        let dqkv = qkv.apply_op2_no_bwd(&grad.contiguous()?, &g)?;
        let dtable = match g.dtable.lock().expect("attention lock").take() {
            Some(d) => Some(Tensor::from_vec(d, (rows, self.heads), qkv.device())?),
            None => None,
        };
        Ok((dqkv, dtable))
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(st, l, None)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(arg, grad, 0)?.0))
    }
}

/// With MPNet's relative position bias: `qkv` and the bias table `[buckets, heads]`.
impl CustomOp2 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.table_rows(l2)?;
        self.forward(s1, l1, Some(slice(s2, l2, "attention bias table")?))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        table: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dqkv, dtable) = self.backward(qkv, grad, table.dim(0)?)?;
        Ok((Some(dqkv), dtable))
    }
}

struct AttentionGrad<'a> {
    op: &'a AttentionOp,
    probs: Vec<Vec<f32>>,
    /// Rows of the bias table, and its gradient, written by the pass when the op has a bias.
    table_rows: usize,
    dtable: Mutex<Option<Vec<f32>>>,
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
        let table_len = self.table_rows * op.heads;
        // Per task, with a bias: its share of the table's gradient.
        let dtables: Vec<Option<Vec<f32>>> = op
            .tasks()
            .par_iter()
            .enumerate()
            .map(|(t, &(bi, hd))| {
                let (dptr, qkv, dout) = (dptr, qkv, dout);
                let (start, m) = (op.starts[bi], op.lengths[bi]);
                if m == 0 {
                    return None;
                }
                let p = &self.probs[t];
                let mask = op.mask(bi, hd, m);
                let pd: Vec<f32> = match &mask {
                    Some(mk) => p.iter().zip(mk).map(|(a, b)| a * b).collect(),
                    None => p.clone(),
                };
                let mut dp = vec![0f32; m * m];
                let mut dtable = None;
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
                    // The bias adds to the scaled scores: its gradient by distance is the sum
                    // of dS along each diagonal.
                    if let Some(buckets) = &op.buckets {
                        let mut drel = vec![0f32; 2 * m - 1];
                        for (i, row) in dp.chunks(m).enumerate() {
                            let d = &mut drel[m - 1 - i..2 * m - 1 - i];
                            d.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                        }
                        let mut dt = vec![0f32; table_len];
                        mpnet::head_bias_grad(&drel, op.heads, hd, buckets, &mut dt);
                        dtable = Some(dt);
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
                dtable
            })
            .collect();
        if op.buckets.is_some() {
            let mut sum = vec![0f32; table_len];
            for d in dtables.iter().flatten() {
                sum.iter_mut().zip(d).for_each(|(a, b)| *a += b);
            }
            *self.dtable.lock().expect("attention lock") = Some(sum);
        }
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

/// Multi-head self-attention on a fused `[batch, seq, 3 * hidden]` projection, for batches
/// padded at the end (`lengths` real tokens per row), with MPNet's relative position bias
/// table `[buckets, heads]` when given, and dropout `(p, seed)` on the attention
/// probabilities. Differentiable, in the table too.
pub fn attention(
    qkv: &Tensor,
    lengths: &[usize],
    heads: usize,
    head_dim: usize,
    bias: Option<&Tensor>,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let (_, s, _) = qkv.dims3()?;
    let starts: Vec<usize> = (0..lengths.len()).map(|i| i * s).collect();
    attention_at(qkv, &starts, lengths, heads, head_dim, bias, dropout)
}

/// As [`attention`], on packed sequences: `qkv` `[T, 3 * hidden]`, sequence `i` is the rows
/// `offsets[i]..offsets[i + 1]`. No work is spent on padding, whatever the batch.
pub fn attention_packed(
    qkv: &Tensor,
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    bias: Option<&Tensor>,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let starts = &offsets[..offsets.len().saturating_sub(1)];
    let lengths: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    attention_at(qkv, starts, &lengths, heads, head_dim, bias, dropout)
}

fn attention_at(
    qkv: &Tensor,
    starts: &[usize],
    lengths: &[usize],
    heads: usize,
    head_dim: usize,
    bias: Option<&Tensor>,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let op = AttentionOp {
        heads,
        head_dim,
        starts: starts.to_vec(),
        lengths: lengths.to_vec(),
        dropout,
        buckets: bias.map(|_| mpnet::distance_buckets(longest)),
        probs: Mutex::new(None),
    };
    let qkv = qkv.contiguous()?;
    match bias {
        Some(table) => qkv.apply_op2(&table.contiguous()?, op),
        None => qkv.apply_op1(op),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, input, weights};
    use super::*;
    use candle_core::{Device, Var, D};

    /// The fused attention against candle's composite maths (padding masked): values and the
    /// gradient of the projection.
    /// `[b, s, 3h]` -> q, k, v as `[b, heads, s, d]`, for the composite reference.
    fn split_qkv(x: &Tensor, heads: usize, d: usize) -> (Tensor, Tensor, Tensor) {
        let (b, s, _) = x.dims3().unwrap();
        let h = heads * d;
        let part = |i: usize| {
            x.narrow(2, i * h, h)
                .unwrap()
                .reshape((b, s, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        (part(0), part(1), part(2))
    }

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

        let x = qkv.as_tensor();
        let (q, k, v) = split_qkv(x, heads, d);
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
        let fused = attention(x, &lengths, heads, d, None, None).unwrap();
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

    /// With MPNet's relative position bias, padded and packed: values and the gradients of
    /// the projection and of the bias table against candle's composite maths.
    #[test]
    fn attention_with_relative_bias_matches_composite_and_gradients() {
        let dev = Device::Cpu;
        // Sequences longer than 8 tokens reach the logarithmic buckets.
        let (b, s, heads, d) = (2, 20, 2, 4);
        let h = heads * d;
        let qkv = input((b, s, 3 * h), 5);
        let table: Vec<f32> = (0..mpnet::BUCKETS * heads)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 4.0)
            .collect();
        let table = Var::from_vec(table, (mpnet::BUCKETS, heads), &dev).unwrap();
        let lw = weights((b, s, h));
        let x = qkv.as_tensor();
        let (q, k, v) = split_qkv(x, heads, d);
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let bias = mpnet::bias_matrix(table.as_tensor(), s).unwrap();
        let scores = scores.broadcast_add(&bias).unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let composite = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, s, h))
            .unwrap();
        let loss = |y: &Tensor| (y * &lw).unwrap().sum_all().unwrap();
        let g1 = loss(&composite).backward().unwrap();
        let fused = attention(x, &[s, s], heads, d, Some(table.as_tensor()), None).unwrap();
        close(&fused, &composite, 1e-5, "attention with bias");
        let g2 = loss(&fused).backward().unwrap();
        close(
            g2.get(&qkv).unwrap(),
            g1.get(&qkv).unwrap(),
            1e-4,
            "qkv grad",
        );
        let (want, got) = (g1.get(&table).unwrap(), g2.get(&table).unwrap());
        close(got, want, 1e-4, "table grad");
        assert!(
            got.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.1
        );

        // Packed: the same two sequences back to back give the same rows.
        let flat = x.reshape((b * s, 3 * h)).unwrap();
        let packed = attention_packed(
            &flat,
            &[0, s, 2 * s],
            heads,
            d,
            Some(table.as_tensor()),
            None,
        )
        .unwrap();
        close(
            &packed.reshape((b, s, h)).unwrap(),
            &composite,
            1e-5,
            "packed attention with bias",
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
            let y = attention(x.as_tensor(), &lengths, heads, d, None, Some((0.3, 42))).unwrap();
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
