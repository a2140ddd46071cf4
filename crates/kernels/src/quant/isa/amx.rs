//! Intel AMX tile kernels: int8 (`tdpbusd`, u8 x s8 -> exact i32) and bf16 (`tdpbf16ps`,
//! f32 accumulation) on 16 x 64-byte tiles, through stable `asm!` (Rust's AMX intrinsics are
//! unstable).
//!
//! The packed weights of `Packed<Int8>` and `Packed<Bf16>` already have the AMX
//! B-tile layout: a panel of 16 columns holds, for each group of 4 int8 (2 bf16) input values,
//! the 16 columns' values side by side, 64 bytes. So 16 consecutive groups (64 int8 or 32
//! bf16 input values) are one B tile of 16 rows x 64 bytes, stride 64. An A tile is 16
//! activation rows x 64 bytes at the activations' own stride. A call computes up to 32 rows x
//! 32 columns: C tiles tmm0..tmm3 (2 x 2), A tiles tmm4, tmm5, B tiles tmm6, tmm7.
//!
//! Remainders are copied into zeroed buffers: a row tile that would read past the last of the
//! `mr` rows, and the last k block when `kp` is not a multiple of 64 bytes. Zero bytes
//! multiply to zero, so the padding adds nothing, and every output still sums its k values in
//! the same order (k block by k block) whatever `mr`: results are batch invariant.
//!
//! Linux hands out the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`), once per process; each thread loads the tile configuration once
//! (`ldtilecfg` is slow, hundreds of nanoseconds) and keeps it; the kernel saves and
//! restores the configuration with the thread's state. That relies on nothing else in the
//! process loading another tile configuration on the same threads: candle 0.11 has an AMX
//! kernel of its own (its Q4K quantized matmul, `repack_x86.rs`) with other tile shapes,
//! which fetch-ml never calls. Whoever adds a second AMX user must reload the configuration
//! per call (or compare it with `sttilecfg`).
//!
//! Whether the CPU and the operating system allow AMX is [`crate::cpu::amx`]'s to say.

use std::arch::asm;
use std::cell::{Cell, RefCell};

use super::{Entry, Tile, AMX_BLOCK};
use crate::quant::{AlignedVec, Bf16, Int8, TileBuf, LANES, MAX_MR, MAX_NP, PANEL};

pub(crate) const INT8: Entry<Int8> = Entry {
    name: "amx",
    cpuinfo: &["amx_tile", "amx_int8"],
    supported: || crate::cpu::amx().int8,
    tile: (2 * TR, 2),
    block: AMX_BLOCK,
    run: int8_tile,
};

pub(crate) const BF16: Entry<Bf16> = Entry {
    name: "amxbf16",
    cpuinfo: &["amx_tile", "amx_bf16"],
    supported: || crate::cpu::amx().bf16,
    tile: (2 * TR, 2),
    block: AMX_BLOCK,
    run: bf16_tile,
};

/// Rows of a tile, and bytes of a tile row.
const TR: usize = 16;
const TB: usize = 64;

/// The tile configuration (palette 1): tiles 0..8 all 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

thread_local! {
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    /// Zero-padded copies of the remainder tiles (rows past `mr`, k past `kp`).
    static PAD: RefCell<AlignedVec<u8>> = RefCell::new(AlignedVec::default());
}

/// Loads the tile configuration on this thread, once.
///
/// # Safety
/// [`crate::cpu::amx`] granted AMX.
unsafe fn configure() {
    if CONFIGURED.get() {
        return;
    }
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = TB as u16;
        cfg.rows[t] = TR as u8;
    }
    // SAFETY: the CPU has AMX and the process has the permission (the caller's contract);
    // `cfg` is a valid 64-byte palette-1 configuration.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack)) };
    CONFIGURED.set(true);
}

/// Which dot product the tiles run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `tdpbusd`: u8 (A) x s8 (B), 4 per i32 lane.
    U8S8,
    /// `tdpbf16ps`: bf16 x bf16, 2 per f32 lane.
    Bf16,
}

/// Exact `dot(u8 row, s8 column)` for up to 32 rows and 2 panels.
///
/// # Safety
/// [`crate::cpu::amx`] granted AMX int8.
unsafe fn int8_tile(t: &Tile<'_, Int8>, out: &mut TileBuf<i32>) {
    t.check(INT8.tile);
    let (a, b) = (t.a.as_ptr(), t.b.as_ptr() as *const u8);
    // SAFETY: forwarded, in bytes; `check` verified the sizes; i32 lanes are 4 bytes.
    unsafe {
        tile(
            Op::U8S8,
            a,
            t.kp,
            t.mr,
            b,
            t.np,
            t.kp,
            out.as_mut_ptr() as *mut u8,
        )
    }
}

/// bf16 products with f32 accumulation for up to 32 rows and 2 panels.
///
/// # Safety
/// [`crate::cpu::amx`] granted AMX bf16.
unsafe fn bf16_tile(t: &Tile<'_, Bf16>, out: &mut TileBuf<f32>) {
    t.check(BF16.tile);
    let (a, b) = (t.a.as_ptr() as *const u8, t.b.as_ptr() as *const u8);
    let kb = t.kp * 2;
    // SAFETY: forwarded, in bytes (2 per value); `check` verified the sizes; f32 lanes are 4
    // bytes.
    unsafe {
        tile(
            Op::Bf16,
            a,
            kb,
            t.mr,
            b,
            t.np,
            kb,
            out.as_mut_ptr() as *mut u8,
        )
    }
}

/// The A operands of a call: where each of its (up to 2) row tiles starts, and its stride.
struct RowTiles {
    rows: [*const u8; 2],
    strides: [usize; 2],
}

/// The shared body, in bytes: `a` rows of `kb` bytes at stride `lda`, panels of `kb * 16`
/// bytes; `out` rows of `LANES` 4-byte lanes.
///
/// # Safety
/// AMX granted for `op`; `a` covers `mr` rows of `kb` bytes at stride `lda`, `b` covers `np`
/// panels of `kb * 16` bytes, `out` covers `mr` rows of `LANES` 4-byte lanes; `mr <= 32`,
/// `np <= 2`, `kb % 4 == 0`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    op: Op,
    a: *const u8,
    lda: usize,
    mr: usize,
    b: *const u8,
    np: usize,
    kb: usize,
    out: *mut u8,
) {
    assert!((1..=2 * TR).contains(&mr) && (1..=2).contains(&np) && kb.is_multiple_of(4));
    const { assert!(2 * TR <= MAX_MR && 2 <= MAX_NP) };
    // SAFETY: AMX granted (the caller's contract).
    unsafe { configure() };
    let mt = mr.div_ceil(TR);
    let full_k = kb / TB;
    let rem_k = kb % TB;
    PAD.with_borrow_mut(|pad| {
        // Zero-padded copies: the partial row tile (when mr is not a multiple of 16), then the
        // last k block's A and B tiles (when kb is not a multiple of 64).
        let row_pad = if mr.is_multiple_of(TR) {
            0
        } else {
            TR * kb.next_multiple_of(TB)
        };
        let k_pad = if rem_k != 0 {
            2 * TR * TB + 2 * TR * TB
        } else {
            0
        };
        if pad.len() < row_pad + k_pad {
            pad.resize(row_pad + k_pad);
        }
        let (rows_buf, k_buf) = pad.split_at_mut(row_pad);
        // Only this call's share: the buffer keeps the size of the largest earlier call.
        let k_buf = &mut k_buf[..k_pad];
        // SAFETY: `a` covers mr rows of kb bytes at stride lda (contract); `rows_buf` has
        // room for one row tile of kb rounded up to 64.
        let at = unsafe { row_tiles(a, lda, mr, kb, rows_buf) };
        // SAFETY (every asm block below): the tiles are configured 16 x 64 bytes; each
        // `tileloadd` reads 16 rows of 64 bytes at the given stride, within `a` (rows < mr or
        // the padded copy), the panels (kb bytes per group of 16 rows, k < full_k * 64), or
        // `k_buf`.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            let pstride = kb * PANEL;
            for k in 0..full_k {
                step(
                    op,
                    mt,
                    np,
                    [at.rows[0].add(k * TB), at.rows[1].add(k * TB)],
                    at.strides,
                    [b.add(k * TR * TB), b.wrapping_add(pstride + k * TR * TB)],
                    TB,
                );
            }
            if rem_k != 0 {
                last_k_block(op, &at, mr, b, np, kb, k_buf);
            }
            store(out, mt, np);
        }
    });
}

/// The row tiles of `a`: tile `i` reads from `rows[i]` at stride `strides[i]`; a partial row
/// tile (fewer than 16 rows left) is first copied into `rows_buf`, zero rows after the last.
///
/// # Safety
/// `a` covers `mr` rows of `kb` bytes at stride `lda`; `rows_buf` holds 16 rows of `kb`
/// rounded up to 64 when `mr` is not a multiple of 16.
unsafe fn row_tiles(
    a: *const u8,
    lda: usize,
    mr: usize,
    kb: usize,
    rows_buf: &mut [u8],
) -> RowTiles {
    let mt = mr.div_ceil(TR);
    let mut rows = [a, a];
    let mut strides = [lda, lda];
    if mt == 2 {
        // SAFETY: row 16 exists (mr > 16).
        rows[1] = unsafe { a.add(TR * lda) };
    }
    if !mr.is_multiple_of(TR) {
        let last = mt - 1;
        let (src, n) = (rows[last], mr - last * TR);
        let ld = kb.next_multiple_of(TB);
        rows_buf.fill(0);
        for r in 0..n {
            // SAFETY: row last * 16 + r < mr is within `a` (kb bytes).
            let s = unsafe { std::slice::from_raw_parts(src.add(r * lda), kb) };
            rows_buf[r * ld..r * ld + kb].copy_from_slice(s);
        }
        rows[last] = rows_buf.as_ptr();
        strides[last] = ld;
    }
    RowTiles { rows, strides }
}

/// The last k block: `kb % 64` bytes of each row, `(kb % 64) / 4` rows of each panel, copied
/// into zeroed tiles in `k_buf`, then one [`step`].
///
/// # Safety
/// The tiles are configured; `at` covers `mr` rows of `kb` bytes; `b` covers `np` panels of
/// `kb * 16` bytes; `k_buf` holds 4 tiles of 16 x 64 bytes.
unsafe fn last_k_block(
    op: Op,
    at: &RowTiles,
    mr: usize,
    b: *const u8,
    np: usize,
    kb: usize,
    k_buf: &mut [u8],
) {
    let (mt, rem_k, k0) = (mr.div_ceil(TR), kb % TB, kb / TB * TB);
    let (ka, kbuf) = k_buf.split_at_mut(2 * TR * TB);
    ka.fill(0);
    kbuf.fill(0);
    for t in 0..mt {
        let n = (mr - t * TR).min(TR);
        for r in 0..n {
            // SAFETY: row r of row tile t is one of the mr rows (or its padded copy), whose
            // bytes k0..kb exist.
            let s = unsafe {
                std::slice::from_raw_parts(at.rows[t].add(r * at.strides[t] + k0), rem_k)
            };
            let d = (t * TR + r) * TB;
            ka[d..d + rem_k].copy_from_slice(s);
        }
    }
    for p in 0..np {
        let n = rem_k / 4 * TB;
        // SAFETY: the panel's last k rows: within its kb * 16 bytes.
        let s = unsafe { std::slice::from_raw_parts(b.add(p * kb * PANEL + k0 * PANEL), n) };
        kbuf[p * TR * TB..p * TR * TB + n].copy_from_slice(s);
    }
    let (ka, kbuf) = (ka.as_ptr(), kbuf.as_ptr());
    // SAFETY: the tiles are configured; both buffers hold 2 tiles of 16 x 64 bytes.
    unsafe {
        step(
            op,
            mt,
            np,
            [ka, ka.add(TR * TB)],
            [TB, TB],
            [kbuf, kbuf.add(TR * TB)],
            TB,
        )
    };
}

/// Stores the C tiles: `tilestored` writes 16 rows of 64 bytes at stride `LANES * 4`.
///
/// # Safety
/// The tiles hold a call's sums; `out` covers `16 * mt` rows of `LANES` 4-byte lanes.
unsafe fn store(out: *mut u8, mt: usize, np: usize) {
    let ld = LANES * 4;
    // SAFETY: C tile (i, j) goes to rows 16 i.., bytes 64 j..64 j + 64 of each: within `out`.
    unsafe {
        asm!("tilestored [{c} + {ld}*1], tmm0", c = in(reg) out, ld = in(reg) ld, options(nostack));
        if np == 2 {
            asm!("tilestored [{c} + {ld}*1], tmm1", c = in(reg) out.add(TB), ld = in(reg) ld, options(nostack));
        }
        if mt == 2 {
            asm!("tilestored [{c} + {ld}*1], tmm2", c = in(reg) out.add(TR * ld), ld = in(reg) ld, options(nostack));
            if np == 2 {
                asm!("tilestored [{c} + {ld}*1], tmm3", c = in(reg) out.add(TR * ld + TB), ld = in(reg) ld, options(nostack));
            }
        }
    }
}

/// One k block: loads the A tiles (`mt` of them) and B tiles (`np`), and accumulates
/// C[i][j] += A[i] B[j] into tmm(2 i + j), always in this order.
///
/// # Safety
/// The tiles are configured; each pointer covers 16 rows of 64 bytes at its stride.
#[inline(always)]
unsafe fn step(
    op: Op,
    mt: usize,
    np: usize,
    a: [*const u8; 2],
    lda: [usize; 2],
    b: [*const u8; 2],
    ldb: usize,
) {
    macro_rules! dp {
        ($c:literal, $a:literal, $b:literal) => {
            match op {
                Op::U8S8 => asm!(
                    concat!("tdpbusd tmm", $c, ", tmm", $a, ", tmm", $b),
                    options(nostack, nomem)
                ),
                Op::Bf16 => asm!(
                    concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
                    options(nostack, nomem)
                ),
            }
        };
    }
    // SAFETY: the caller's contract.
    unsafe {
        asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) a[0], s = in(reg) lda[0], options(nostack, readonly));
        asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) b[0], s = in(reg) ldb, options(nostack, readonly));
        dp!("0", "4", "6");
        if np == 2 {
            asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) b[1], s = in(reg) ldb, options(nostack, readonly));
            dp!("1", "4", "7");
        }
        if mt == 2 {
            asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) a[1], s = in(reg) lda[1], options(nostack, readonly));
            dp!("2", "5", "6");
            if np == 2 {
                dp!("3", "5", "7");
            }
        }
    }
}
