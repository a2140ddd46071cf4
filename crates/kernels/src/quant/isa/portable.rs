//! Portable kernels in plain Rust: correct on every CPU, and the definition of what the SIMD
//! kernels compute (exact i32 for int8; `vdpbf16ps`'s order of operations for bf16).

use super::{Entry, Tile, BLOCK};
use crate::quant::{from_bf16, Bf16, Int8, TileBuf, LANES, PANEL};

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
    let kp = t.kp;
    for p in 0..t.np {
        let panel = &t.b[p * kp * PANEL..(p + 1) * kp * PANEL];
        for r in 0..t.mr {
            let row = &t.a[r * kp..(r + 1) * kp];
            let mut acc = [0i32; PANEL];
            for (g, quad) in row.chunks_exact(4).enumerate() {
                let group = &panel[g * PANEL * 4..(g + 1) * PANEL * 4];
                for (l, acc) in acc.iter_mut().enumerate() {
                    for i in 0..4 {
                        *acc += quad[i] as i32 * group[l * 4 + i] as i32;
                    }
                }
            }
            out[r * LANES + p * PANEL..][..PANEL].copy_from_slice(&acc);
        }
    }
}

/// bf16 products with f32 accumulation, in `vdpbf16ps`'s order: for each pair of k, the odd
/// product is added first, then the even one, each rounded to f32 (the products themselves
/// are exact in f32). Denormals are not flushed, unlike the instruction.
fn bf16_tile(t: &Tile<'_, Bf16>, out: &mut TileBuf<f32>) {
    t.check(BF16.tile);
    let kp = t.kp;
    for p in 0..t.np {
        let panel = &t.b[p * kp * PANEL..(p + 1) * kp * PANEL];
        for r in 0..t.mr {
            let row = &t.a[r * kp..(r + 1) * kp];
            let mut acc = [0f32; PANEL];
            for (g, pair) in row.chunks_exact(2).enumerate() {
                let (a0, a1) = (from_bf16(pair[0]), from_bf16(pair[1]));
                let group = &panel[g * PANEL * 2..(g + 1) * PANEL * 2];
                for (l, acc) in acc.iter_mut().enumerate() {
                    *acc += a1 * from_bf16(group[l * 2 + 1]);
                    *acc += a0 * from_bf16(group[l * 2]);
                }
            }
            out[r * LANES + p * PANEL..][..PANEL].copy_from_slice(&acc);
        }
    }
}
