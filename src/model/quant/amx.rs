//! Intel AMX tile kernels: int8 (`tdpbusd`, u8 x s8 -> exact i32) and bf16 (`tdpbf16ps`,
//! f32 accumulation) on 16 x 64-byte tiles, through stable `asm!` (Rust's AMX intrinsics are
//! unstable).
//!
//! The packed weights of [`super::PackedI8`] and [`super::PackedBf16`] already have the AMX
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
//! The OS check is twofold: the tile permission from Linux, and XCR0 bits 17 and 18 (the OS
//! saves the tile state), so a sandbox that accepts the request without managing the state
//! does not get AMX.

use std::arch::asm;
use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use super::{AlignedVec, MAX_MR, MAX_NP, PANEL};

/// Rows of a tile, and bytes of a tile row.
const TR: usize = 16;
const TB: usize = 64;

/// What the CPU and the operating system allow ([`kernels::cpu::amx`]); the first call says
/// on stderr when the CPU has AMX but the permission was refused.
fn support() -> kernels::cpu::Amx {
    static S: OnceLock<kernels::cpu::Amx> = OnceLock::new();
    *S.get_or_init(|| {
        let amx = kernels::cpu::amx();
        if amx.refused {
            eprintln!(
                "note: this CPU has AMX but the operating system refused the tile state \
                 (arch_prctl ARCH_REQ_XCOMP_PERM); the AVX-512 kernels run instead"
            );
        }
        amx
    })
}

/// Whether the AMX int8 kernel can run here (CPU and OS).
pub fn int8_supported() -> bool {
    support().int8
}

/// Whether the AMX bf16 kernel can run here (CPU and OS).
pub fn bf16_supported() -> bool {
    support().bf16
}

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
/// `support()` granted AMX.
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

/// Exact `dot(u8 row, s8 column)` for `mr` <= 32 rows and `np` <= 2 panels.
///
/// # Safety
/// [`int8_supported`]; `a` covers `mr` rows of `kp` bytes at stride `lda`; `b` covers `np`
/// panels of `kp * 16` bytes; `kp % 4 == 0`.
pub unsafe fn int8_tile(
    a: *const u8,
    lda: usize,
    mr: usize,
    b: *const i8,
    np: usize,
    kp: usize,
    out: &mut [i32; MAX_MR * MAX_NP * PANEL],
) {
    debug_assert!(int8_supported() && kp.is_multiple_of(4));
    // SAFETY: forwarded; i32 and the kernel's output are both 4-byte lanes.
    unsafe {
        tile(
            Op::U8S8,
            a,
            lda,
            mr,
            b as *const u8,
            np,
            kp,
            out.as_mut_ptr() as *mut u8,
        )
    }
}

/// bf16 products with f32 accumulation for `mr` <= 32 rows and `np` <= 2 panels.
///
/// # Safety
/// [`bf16_supported`]; `a` covers `mr` rows of `kp` values at stride `lda`; `b` covers `np`
/// panels of `kp * 16` values; `kp % 2 == 0`.
pub unsafe fn bf16_tile(
    a: *const u16,
    lda: usize,
    mr: usize,
    b: *const u16,
    np: usize,
    kp: usize,
    out: &mut [f32; MAX_MR * MAX_NP * PANEL],
) {
    debug_assert!(bf16_supported() && kp.is_multiple_of(2));
    // SAFETY: forwarded, in bytes.
    unsafe {
        tile(
            Op::Bf16,
            a as *const u8,
            lda * 2,
            mr,
            b as *const u8,
            np,
            kp * 2,
            out.as_mut_ptr() as *mut u8,
        )
    }
}

/// The shared body, in bytes: `a` rows of `kb` bytes at stride `lda`, panels of `kb * 16`
/// bytes; `out` rows of `MAX_NP * PANEL` 4-byte lanes.
///
/// # Safety
/// As the typed wrappers; `mr <= 32`, `np <= 2`, `kb % 4 == 0`.
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
    // SAFETY: support() granted AMX (the caller's contract).
    unsafe { configure() };
    let mt = mr.div_ceil(TR);
    let full_k = kb / TB;
    let rem_k = kb % TB;
    let pstride = kb * PANEL;
    PAD.with_borrow_mut(|pad| {
        // Row tiles: tile `i` reads from `rows[i]` at stride `strides[i]`; a partial row tile
        // (fewer than 16 rows left) is copied into `pad` first, zero rows after the last.
        let need_rows = !mr.is_multiple_of(TR);
        let row_pad = if need_rows { TR * kb.next_multiple_of(TB) } else { 0 };
        let k_pad = if rem_k != 0 { 2 * TR * TB + 2 * TR * TB } else { 0 };
        if pad.len() < row_pad + k_pad {
            pad.resize(row_pad + k_pad);
        }
        let (rows_buf, k_buf) = pad.split_at_mut(row_pad);
        // Only this call's share: the buffer keeps the size of the largest earlier call.
        let k_buf = &mut k_buf[..k_pad];
        let mut rows = [a, a];
        let mut strides = [lda, lda];
        if mt == 2 {
            // SAFETY: row 16 exists (mr > 16).
            rows[1] = unsafe { a.add(TR * lda) };
        }
        if need_rows {
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
        // SAFETY (every asm block below): the tiles are configured 16 x 64 bytes; each
        // `tileloadd` reads 16 rows of 64 bytes at the given stride, within `a` (rows < mr or
        // the padded copy), the panels (kb bytes per group of 16 rows, k < full_k * 64), or
        // `k_buf`; `tilestored` writes 16 rows of 64 bytes at stride 256 within `out`
        // (32 rows x 64 lanes of 4 bytes).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for k in 0..full_k {
                step(
                    op,
                    mt,
                    np,
                    [rows[0].add(k * TB), rows[1].add(k * TB)],
                    strides,
                    [b.add(k * TR * TB), b.wrapping_add(pstride + k * TR * TB)],
                    TB,
                );
            }
            if rem_k != 0 {
                // The last k block: `rem_k` bytes of each row, `rem_k / 4` rows of each
                // panel, copied into zeroed tiles.
                let (ka, kbuf) = k_buf.split_at_mut(2 * TR * TB);
                ka.fill(0);
                kbuf.fill(0);
                let k0 = full_k * TB;
                for t in 0..mt {
                    let n = (mr - t * TR).min(TR);
                    for r in 0..n {
                        let s = std::slice::from_raw_parts(rows[t].add(r * strides[t] + k0), rem_k);
                        let d = (t * TR + r) * TB;
                        ka[d..d + rem_k].copy_from_slice(s);
                    }
                }
                for p in 0..np {
                    let n = rem_k / 4 * TB;
                    let s = std::slice::from_raw_parts(b.add(p * pstride + k0 * PANEL), n);
                    kbuf[p * TR * TB..p * TR * TB + n].copy_from_slice(s);
                }
                let (ka, kbuf) = (ka.as_ptr(), kbuf.as_ptr());
                step(
                    op,
                    mt,
                    np,
                    [ka, ka.add(TR * TB)],
                    [TB, TB],
                    [kbuf, kbuf.add(TR * TB)],
                    TB,
                );
            }
            let ld = MAX_NP * PANEL * 4;
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
    });
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
