//! The backward pass of the fused attention: per (sequence, head), from the probabilities the
//! forward pass kept, the gradients of Q, K and V (into the head's columns of the fused
//! projection's gradient) and, with MPNet's relative position bias, of the bias table.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape};
use kernels::attention::{for_each_head, head_views, HeadTask};
use kernels::math::softmax_grad_inplace;
use kernels::matmul::{matmul, MatMut, MatRef, Parallelism};

use super::{slice, AttentionOp};
use crate::model::mpnet;

pub(super) struct AttentionGrad<'a> {
    pub op: &'a AttentionOp,
    pub probs: Vec<Vec<f32>>,
    /// Rows of the bias table, and its gradient, written by the pass when the op has a bias.
    pub table_rows: usize,
    pub dtable: Mutex<Option<Vec<f32>>>,
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
        let qkv = slice(s1, l1, "attention grad qkv")?;
        let dout = slice(s2, l2, "attention grad")?;
        if dout.len() != rows * h {
            bail!(
                "attention grad: {} values for {rows} rows of {h}",
                dout.len()
            );
        }
        let mut dqkv = vec![0f32; rows * 3 * h];
        // Per task, with a bias: its share of the table's gradient.
        let groups = [0, h, 2 * h];
        let split = op.split(&groups);
        let dtables = for_each_head(
            &mut dqkv,
            split,
            || (),
            |_, task| self.head(task, qkv, dout),
        );
        if op.buckets.is_some() {
            let mut sum = vec![0f32; self.table_rows * op.heads];
            for d in dtables.iter().flatten() {
                sum.iter_mut().zip(d).for_each(|(a, b)| *a += b);
            }
            *self.dtable.lock().expect("attention lock") = Some(sum);
        }
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

impl AttentionGrad<'_> {
    /// One (sequence, head): dV, dQ and dK into the task's three blocks of the projection's
    /// gradient; with a bias, the head's share of the table's gradient.
    fn head(&self, task: &mut HeadTask<'_>, qkv: &[f32], dout: &[f32]) -> Option<Vec<f32>> {
        let op = self.op;
        let (bi, hd, m) = (task.seq, task.head, task.len);
        if m == 0 {
            return None;
        }
        let (d, h) = (op.head_dim, op.heads * op.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let none = Parallelism::None;
        let p = &self.probs[bi * op.heads + hd];
        let mask = op.mask(bi, hd, m);
        let pd: Vec<f32> = match &mask {
            Some(mk) => p.iter().zip(mk).map(|(a, b)| a * b).collect(),
            None => p.clone(),
        };
        // `dims` checked the rows, and dout has rows x h values.
        let [q, k, v] = head_views(qkv, 3 * h, (task.start, m), hd * d, d, h);
        let go = MatRef::rows(&dout[task.start * h + hd * d..], m, d, h);
        // dV = Pd^T dO
        let pd_t = MatRef::transposed(&pd, m, m, m);
        matmul(&mut task.block(2), false, pd_t, go, 1.0, none);
        // dPd = dO V^T, then through the mask and the softmax
        let mut dp = vec![0f32; m * m];
        matmul(
            &mut MatMut::rows(&mut dp, m, m, m),
            false,
            go,
            v.t(),
            1.0,
            none,
        );
        if let Some(mk) = &mask {
            dp.iter_mut().zip(mk).for_each(|(a, b)| *a *= b);
        }
        for (drow, prow) in dp.chunks_mut(m).zip(p.chunks(m)) {
            softmax_grad_inplace(drow, prow);
        }
        let dtable = op
            .buckets
            .as_ref()
            .map(|buckets| self.table_grad(&dp, m, hd, buckets));
        // dQ = scale dS K,  dK = scale dS^T Q
        let ds = MatRef::rows(&dp, m, m, m);
        matmul(&mut task.block(0), false, ds, k, scale, none);
        matmul(&mut task.block(1), false, ds.t(), q, scale, none);
        dtable
    }

    /// The bias adds to the scaled scores: its gradient by distance is the sum of dS along
    /// each diagonal, then per bucket of head `hd`.
    fn table_grad(&self, ds: &[f32], m: usize, hd: usize, buckets: &[u32]) -> Vec<f32> {
        let mut drel = vec![0f32; 2 * m - 1];
        for (i, row) in ds.chunks(m).enumerate() {
            let d = &mut drel[m - 1 - i..2 * m - 1 - i];
            d.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        let mut dt = vec![0f32; self.table_rows * self.op.heads];
        mpnet::head_bias_grad(&drel, self.op.heads, hd, buckets, &mut dt);
        dt
    }
}
