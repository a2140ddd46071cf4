//! The bf16 products of the tiled attention (`--dtype bf16`): each (sequence, head)'s keys
//! and values are rounded to bf16 and packed once per layer, in blocks of `KEY_TILE` keys
//! from the sequence's first token (keys as the "weights" of the scores `Q K^T`, values
//! transposed as those of `P V`); each query tile's queries and each block's softmax weights
//! are written as bf16 rows by the softmax itself; the products run on the dense layers' bf16 kernels
//! (`kernels::quant::bf16_block`, AMX or AVX-512 BF16 where the CPU has them) with f32
//! sums. The running softmax stays f32. Blocks start at the sequence's first key, so a
//! sequence's result does not depend on its batch.

use rayon::prelude::*;

use super::{AttentionSpec, KEY_TILE};
use kernels::quant::{bf16_block, to_bf16, AlignedVec, Bf16Kernel, PackedBf16, Rows};

/// One block of a (sequence, head)'s keys and values, packed.
pub(super) struct Block {
    /// `[keys, head_dim]`: the scores' weights.
    pub keys: PackedBf16,
    /// `[head_dim, keys]`: the weighted values' weights.
    pub values: PackedBf16,
}

/// Every (sequence, head)'s blocks, indexed `sequence * heads + head`.
pub(super) fn pack(qkv: &[f32], offsets: &[usize], spec: &AttentionSpec) -> Vec<Vec<Block>> {
    let (heads, d) = (spec.heads, spec.head_dim);
    let hidden = heads * d;
    let ld = 3 * hidden;
    let jobs: Vec<(usize, usize, usize)> = offsets
        .windows(2)
        .flat_map(|w| (0..heads).map(move |h| (w[0], w[1] - w[0], h)))
        .collect();
    jobs.into_par_iter()
        .map(|(start, len, head)| {
            (0..len)
                .step_by(KEY_TILE)
                .map(|k0| {
                    let nk = KEY_TILE.min(len - k0);
                    let row = |j: usize, part: usize| {
                        let r = (start + k0 + j) * ld + part * hidden + head * d;
                        &qkv[r..r + d]
                    };
                    let keys: Vec<f32> = (0..nk).flat_map(|j| row(j, 1).iter().copied()).collect();
                    let mut values = vec![0f32; d * nk];
                    for j in 0..nk {
                        for (c, &v) in row(j, 2).iter().enumerate() {
                            values[c * nk + j] = v;
                        }
                    }
                    Block {
                        keys: PackedBf16::pack(&keys, nk, d).expect("key block of nk x d"),
                        values: PackedBf16::pack(&values, d, nk).expect("value block of d x nk"),
                    }
                })
                .collect()
        })
        .collect()
}

/// The query rows `qkv[first + i * ld..][..d]` (`rows` of them) as bf16 kernel rows.
pub(super) fn queries(
    qkv: &[f32],
    first: usize,
    ld: usize,
    rows: usize,
    d: usize,
    dst: &mut AlignedVec<u16>,
) {
    let kp = d.next_multiple_of(2);
    dst.resize(rows * kp);
    for i in 0..rows {
        let q = &qkv[first + i * ld..][..d];
        let out = &mut dst[i * kp..(i + 1) * kp];
        for (o, &v) in out.iter_mut().zip(q) {
            *o = to_bf16(v);
        }
        out[d..].fill(0);
    }
}

/// `out[i * ld + j] (+)= scale * dot(a_i, w_j)` for the `rows` kernel rows of `a`.
#[allow(clippy::too_many_arguments)]
pub(super) fn product(
    kernel: Bf16Kernel,
    a: &AlignedVec<u16>,
    rows: usize,
    w: &PackedBf16,
    scale: f32,
    accumulate: bool,
    out: &mut [f32],
    ld: usize,
) {
    let a = Rows {
        a: &a[..rows * w.kp],
        rows,
        kp: w.kp,
    };
    // The sizes are the tile's and the block's own, and `attend_packed` checked the kernel.
    bf16_block(kernel, &a, w, scale, accumulate, out, ld).expect("attention block product");
}
