//! Portable kernels in plain Rust: correct on every CPU, and the definition of what the SIMD
//! kernels compute (exact i32 for int8; `vdpbf16ps`'s order of operations for bf16).

use super::{MAX_MR, MAX_NP, PANEL};

/// Exact `dot(u8 row, s8 column)` for `mr` rows and `np` panels of the packed layout.
///
/// # Safety
/// `a` covers `mr` rows of `kp` bytes at stride `lda`; `b` covers `np` panels of `kp * 16`
/// bytes; `mr <= MAX_MR`, `np <= MAX_NP`; `kp` is a multiple of 4.
pub unsafe fn int8_tile(
    a: *const u8,
    lda: usize,
    mr: usize,
    b: *const i8,
    np: usize,
    kp: usize,
    out: &mut [i32; MAX_MR * MAX_NP * PANEL],
) {
    debug_assert!(mr <= MAX_MR && np <= MAX_NP && kp.is_multiple_of(4));
    for p in 0..np {
        // SAFETY: the caller guarantees `np` panels of `kp * 16` bytes.
        let panel = unsafe { std::slice::from_raw_parts(b.add(p * kp * PANEL), kp * PANEL) };
        for r in 0..mr {
            // SAFETY: the caller guarantees `mr` rows of `kp` bytes at stride `lda`.
            let row = unsafe { std::slice::from_raw_parts(a.add(r * lda), kp) };
            let mut acc = [0i32; PANEL];
            for (g, quad) in row.chunks_exact(4).enumerate() {
                let group = &panel[g * PANEL * 4..(g + 1) * PANEL * 4];
                for (l, acc) in acc.iter_mut().enumerate() {
                    for i in 0..4 {
                        *acc += quad[i] as i32 * group[l * 4 + i] as i32;
                    }
                }
            }
            out[r * MAX_NP * PANEL + p * PANEL..][..PANEL].copy_from_slice(&acc);
        }
    }
}

/// bf16 products with f32 accumulation, in `vdpbf16ps`'s order: for each pair of k, the odd
/// product is added first, then the even one, each rounded to f32 (the products themselves
/// are exact in f32). Denormals are not flushed, unlike the instruction.
///
/// # Safety
/// As [`int8_tile`], with rows and panels of `kp` (even) bf16 values.
pub unsafe fn bf16_tile(
    a: *const u16,
    lda: usize,
    mr: usize,
    b: *const u16,
    np: usize,
    kp: usize,
    out: &mut [f32; MAX_MR * MAX_NP * PANEL],
) {
    use super::from_bf16;
    debug_assert!(mr <= MAX_MR && np <= MAX_NP && kp.is_multiple_of(2));
    for p in 0..np {
        // SAFETY: the caller guarantees `np` panels of `kp * 16` values.
        let panel = unsafe { std::slice::from_raw_parts(b.add(p * kp * PANEL), kp * PANEL) };
        for r in 0..mr {
            // SAFETY: the caller guarantees `mr` rows of `kp` values at stride `lda`.
            let row = unsafe { std::slice::from_raw_parts(a.add(r * lda), kp) };
            let mut acc = [0f32; PANEL];
            for (g, pair) in row.chunks_exact(2).enumerate() {
                let (a0, a1) = (from_bf16(pair[0]), from_bf16(pair[1]));
                let group = &panel[g * PANEL * 2..(g + 1) * PANEL * 2];
                for (l, acc) in acc.iter_mut().enumerate() {
                    *acc += a1 * from_bf16(group[l * 2 + 1]);
                    *acc += a0 * from_bf16(group[l * 2]);
                }
            }
            out[r * MAX_NP * PANEL + p * PANEL..][..PANEL].copy_from_slice(&acc);
        }
    }
}
