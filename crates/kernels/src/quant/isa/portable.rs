//! Portable kernels in plain Rust: correct on every CPU, and the definition of what the SIMD
//! kernels compute (exact i32 for int8; `vdpbf16ps`'s order of operations for bf16).

use super::{Entry, Tile, BLOCK};
use crate::quant::{from_bf16, Bf16, Int8, Precision, TileBuf, LANES, PANEL};

pub(crate) const INT8: Entry<Int8> = Entry {
    name: "portable",
    cpuinfo: &[],
    supported: || true,
    tile: (4, 1),
    block: BLOCK,
    run: int8_tile,
};

pub(crate) const BF16: Entry<Bf16> = Entry {
    name: "portable",
    cpuinfo: &[],
    supported: || true,
    tile: (4, 1),
    block: BLOCK,
    run: bf16_tile,
};

/// Exact `dot(u8 row, s8 column)` for the tile's rows and panels.
fn int8_tile(t: &Tile<'_, Int8>, out: &mut TileBuf<i32>) {
    t.check(INT8.tile);
    tile(t, out, |acc, quad, group| {
        for (l, acc) in acc.iter_mut().enumerate() {
            for i in 0..4 {
                *acc += quad[i] as i32 * group[l * 4 + i] as i32;
            }
        }
    });
}

/// bf16 products with f32 accumulation, in `vdpbf16ps`'s order: for each pair of k, the odd
/// product is added first, then the even one, each rounded to f32 (the products themselves
/// are exact in f32). Denormals are not flushed, unlike the instruction.
fn bf16_tile(t: &Tile<'_, Bf16>, out: &mut TileBuf<f32>) {
    t.check(BF16.tile);
    tile(t, out, |acc, pair, group| {
        let (a0, a1) = (from_bf16(pair[0]), from_bf16(pair[1]));
        for (l, acc) in acc.iter_mut().enumerate() {
            *acc += a1 * from_bf16(group[l * 2 + 1]);
            *acc += a0 * from_bf16(group[l * 2]);
        }
    });
}

/// The loops of both portable kernels: for each panel and row, `group(sums, values, weights)`
/// adds one group of `P::GROUP` input values (`weights`: the 16 columns' values of that
/// group) to the row's 16 sums, group after group in order of k.
fn tile<P: Precision>(
    t: &Tile<'_, P>,
    out: &mut TileBuf<P::Acc>,
    group: impl Fn(&mut [P::Acc; PANEL], &[P::A], &[P::W]),
) {
    let (kp, g) = (t.kp, P::GROUP);
    for p in 0..t.np {
        let panel = &t.b[p * kp * PANEL..(p + 1) * kp * PANEL];
        for r in 0..t.mr {
            let row = &t.a[r * kp..(r + 1) * kp];
            let mut acc = [P::Acc::default(); PANEL];
            for (i, values) in row.chunks_exact(g).enumerate() {
                group(&mut acc, values, &panel[i * PANEL * g..(i + 1) * PANEL * g]);
            }
            out[r * LANES + p * PANEL..][..PANEL].copy_from_slice(&acc);
        }
    }
}
