//! Multi-head self-attention over a fused Q/K/V projection, forward and backward, per
//! (sequence, head) in parallel, on the real tokens only, optionally with MPNet's relative
//! position bias (a second input, the `[buckets, heads]` table, which gets its gradient too).
//! The forward kernel of one head is the kernel crate's [`attend_head`], shared with the
//! inference fast path; the backward pass is in `backward.rs`.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use kernels::attention::{attend_head, for_each_head, head_views, HeadSplit};

use super::pointwise::{keep, mix};
use super::slice;
use crate::model::mpnet;

mod backward;
use backward::AttentionGrad;

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

impl AttentionOp {
    /// `(rows, hidden)`, checked against the heads and the sequences: every sequence's rows
    /// lie inside the buffer, one sequence after the other (the kernels below rely on it).
    fn dims(&self, l: &Layout) -> Result<(usize, usize)> {
        let three_h = *l.dims().last().unwrap_or(&0);
        let h = self.heads * self.head_dim;
        let rows = l.shape().elem_count() / three_h.max(1);
        // Inside the buffer and one after the other, so that the tasks' rows never overlap.
        let fits = self
            .starts
            .iter()
            .zip(&self.lengths)
            .all(|(&a, &m)| a + m <= rows)
            && self
                .starts
                .windows(2)
                .zip(&self.lengths)
                .all(|(s, &m)| s[0] + m <= s[1]);
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

    /// The dropout factors of one (sequence, head), or `None` without dropout.
    fn mask(&self, b: usize, head: usize, m: usize) -> Option<Vec<f32>> {
        self.dropout.map(|(p, seed)| {
            let base = seed ^ mix(b as u64, head as u64);
            (0..m * m).map(|i| keep(base, i as u64, p)).collect()
        })
    }

    /// How the tasks split an output of rows of `groups.len() * hidden` values.
    fn split<'a>(&'a self, groups: &'a [usize]) -> HeadSplit<'a> {
        HeadSplit {
            ld: groups.len() * self.heads * self.head_dim,
            starts: &self.starts,
            lengths: &self.lengths,
            heads: self.heads,
            width: self.head_dim,
            groups,
        }
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
        let qkv = slice(st, l, "attention qkv")?;
        let d = self.head_dim;
        let mut out = vec![0f32; rows * h];
        let probs = for_each_head(
            &mut out,
            self.split(&[0]),
            || (),
            |_, task| {
                let (bi, hd, m) = (task.seq, task.head, task.len);
                let mut p = Vec::new();
                let mut rel = Vec::new();
                if let Some((buckets, table)) = bias {
                    mpnet::head_bias(table, self.heads, hd, buckets, m, &mut rel);
                }
                // `dims` checked that rows start..start + m lie inside [rows, 3h].
                let [q, k, v] = head_views(qkv, 3 * h, (task.start, m), hd * d, d, h);
                let mask = self.mask(bi, hd, m);
                let rel = bias.map(|_| &rel[..]);
                attend_head(q, k, v, &mut task.block(0), &mut p, rel, mask.as_deref());
                p
            },
        );
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
mod tests;
