//! Attention on f32 rows: one head of one sequence ([`attend_head`]), and the parallel driver
//! that hands each (sequence, head) task its own columns of a shared output
//! ([`for_each_head`]), so that the tasks write one buffer without sharing a byte.

use rayon::prelude::*;

use crate::math;
use crate::matmul::{matmul, MatMut, MatRef, Parallelism};

/// One head over `m` tokens: `probs = softmax(scale * Q K^T + bias)` (`m x m`, kept for a
/// backward pass), then `out = (probs * mask) V`, with `scale = 1 / sqrt(d)`. `q`, `k`, `v`
/// are `m x d` views (in place in a fused projection); `out` is `m x d`. `bias`, a relative
/// position bias by distance (`2m - 1` values), adds `bias[j - i + m - 1]` to the score of
/// query `i` and key `j`; `mask` (`m x m`) multiplies the probabilities (dropout).
pub fn attend_head(
    q: MatRef<'_>,
    k: MatRef<'_>,
    v: MatRef<'_>,
    out: &mut MatMut<'_>,
    probs: &mut Vec<f32>,
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
) {
    let (m, d) = q.shape();
    assert!(
        k.shape() == (m, d)
            && v.shape() == (m, d)
            && out.shape() == (m, d)
            && bias.is_none_or(|b| b.len() + 1 >= 2 * m)
            && mask.is_none_or(|mk| mk.len() >= m * m),
        "attend_head: q {:?}, k {:?}, v {:?}, out {:?}, bias {:?}, mask {:?}",
        q.shape(),
        k.shape(),
        v.shape(),
        out.shape(),
        bias.map(<[f32]>::len),
        mask.map(<[f32]>::len)
    );
    probs.resize(m * m, 0.0);
    let scale = 1.0 / (d as f32).sqrt();
    let none = Parallelism::None;
    let mut scores = MatMut::rows(&mut probs[..], m, m, m);
    matmul(&mut scores, false, q, k.t(), scale, none);
    for (i, row) in probs.chunks_mut(m).enumerate() {
        if let Some(rel) = bias {
            let rel = &rel[m - 1 - i..2 * m - 1 - i];
            row.iter_mut().zip(rel).for_each(|(s, b)| *s += b);
        }
        math::softmax_inplace(row);
    }
    let dropped: Vec<f32>;
    let p = match mask {
        Some(mask) => {
            dropped = probs.iter().zip(mask).map(|(a, b)| a * b).collect();
            &dropped
        }
        None => &probs[..],
    };
    matmul(out, false, MatRef::rows(p, m, m, m), v, 1.0, none);
}

/// Q, K and V of one head in a fused projection: `rows` rows from row `start` of `qkv` (rows
/// of stride `ld`), the head's `width` columns from column `col` of each third (Q at `col`,
/// K at `hidden + col`, V at `2 hidden + col`). Empty views when `rows` is 0.
pub fn head_views(
    qkv: &[f32],
    ld: usize,
    (start, rows): (usize, usize),
    col: usize,
    width: usize,
    hidden: usize,
) -> [MatRef<'_>; 3] {
    let view = |third: usize| {
        if rows == 0 {
            return MatRef::rows(&[], 0, width, ld);
        }
        MatRef::rows(&qkv[start * ld + third * hidden + col..], rows, width, ld)
    };
    [view(0), view(1), view(2)]
}

/// How the tasks of [`for_each_head`] split a row-major output of stride `ld`: sequence `s`
/// owns rows `starts[s]..starts[s] + lengths[s]`, head `h` owns, in each group starting at
/// column `g` of `groups`, the columns `g + h * width..g + (h + 1) * width` (one group for an
/// attention output; three, at 0, H and 2H, for the gradient of a fused Q/K/V projection).
#[derive(Clone, Copy, Debug)]
pub struct HeadSplit<'a> {
    pub ld: usize,
    pub starts: &'a [usize],
    pub lengths: &'a [usize],
    pub heads: usize,
    pub width: usize,
    pub groups: &'a [usize],
}

impl HeadSplit<'_> {
    /// Panics unless the blocks of different tasks are disjoint and all lie in `len` values.
    fn check(&self, len: usize) {
        let span = self.heads * self.width;
        let rows_ok = self.starts.len() == self.lengths.len()
            && self
                .starts
                .windows(2)
                .zip(self.lengths)
                .all(|(s, &l)| s[0] + l <= s[1]);
        let end = self
            .starts
            .iter()
            .zip(self.lengths)
            .map(|(s, l)| s + l)
            .max();
        let cols_ok = self.groups.windows(2).all(|g| g[0] + span <= g[1])
            && self.groups.last().is_none_or(|&g| g + span <= self.ld);
        assert!(
            rows_ok && cols_ok && end.unwrap_or(0) * self.ld <= len,
            "head split: {self:?} does not split {len} values into disjoint blocks"
        );
    }
}

/// One task of [`for_each_head`]: a sequence, a head, and that head's blocks of the output.
pub struct HeadTask<'a> {
    pub seq: usize,
    pub head: usize,
    /// The sequence's first row and its row count.
    pub start: usize,
    pub len: usize,
    base: *mut f32,
    split: HeadSplit<'a>,
}

impl HeadTask<'_> {
    /// The task's block of group `g`: its `len` rows x `width` columns.
    pub fn block(&mut self, g: usize) -> MatMut<'_> {
        let (ld, width) = (self.split.ld, self.split.width);
        let c = self.split.groups[g] + self.head * width;
        // SAFETY: `for_each_head` checked that this block lies in the output and that no other
        // task's block overlaps it; `&mut self` keeps the task's own blocks from overlapping
        // in time.
        unsafe { MatMut::from_raw(self.base.add(self.start * ld + c), self.len, width, ld) }
    }
}

/// A pointer the tasks share; each writes only its own blocks.
#[derive(Clone, Copy)]
struct Base(*mut f32);

impl Base {
    /// The pointer (a method, so that closures capture the whole `Base`, which is `Sync`).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the blocks of different tasks are disjoint (checked by `HeadSplit::check`).
unsafe impl Send for Base {}
// SAFETY: as for Send.
unsafe impl Sync for Base {}

/// Runs `f` on every (sequence, head) of `split` in parallel, each with its own blocks of
/// `out` and a per-thread state from `init`; returns the results in (sequence, head) order.
pub fn for_each_head<S, R: Send>(
    out: &mut [f32],
    split: HeadSplit<'_>,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, &mut HeadTask<'_>) -> R + Sync + Send,
) -> Vec<R> {
    split.check(out.len());
    let base = Base(out.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..split.starts.len())
        .flat_map(|s| (0..split.heads).map(move |h| (s, h)))
        .collect();
    tasks
        .par_iter()
        .map_init(init, |state, &(seq, head)| {
            let mut task = HeadTask {
                seq,
                head,
                start: split.starts[seq],
                len: split.lengths[seq],
                base: base.get(),
                split,
            };
            f(state, &mut task)
        })
        .collect()
}
