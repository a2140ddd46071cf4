//! The two f32 products of one block of tiled attention, on one thread: the scores of a tile
//! of queries against a block of keys (`S = scale * Q K^T`) and the weighted values
//! (`O += P V`), the queries and weights read in place (any row stride).
//!
//! The keys and values of each (sequence, head) are laid out once per layer ([`HeadKv`]:
//! keys transposed in panels of 16, values compact), for every query tile to read. With AVX-512 and a head
//! size that is a multiple of 16 (up to 64 for the values), register tiles of 6 rows by up
//! to 4 vectors of 16 run straight from them: the `gemm` crate's general products paid for
//! packing, dispatch and fresh buffers on every one of these small products. Other shapes and CPUs use `gemm` ([`crate::matmul`]). Each output
//! row is a function of its own row of Q (or P) only, summed in a fixed order, so results do
//! not depend on the number of rows.

use crate::matmul::{matmul, MatMut, MatRef, Parallelism};

/// Panics unless `rows` rows of `cols` values at stride `ld` lie in a slice of `len`.
fn check(what: &str, len: usize, rows: usize, cols: usize, ld: usize) {
    assert!(
        rows == 0 || cols == 0 || (cols <= ld && (rows - 1) * ld + cols <= len),
        "attention block: {what} of {rows} x {cols} at stride {ld} past a slice of {len}"
    );
}

/// Whether the AVX-512 tiles serve head size `d` (scores: any multiple of 16).
fn vector(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        d > 0 && d.is_multiple_of(16) && crate::cpu::level() == crate::cpu::Level::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// One (sequence, head)'s keys and values, laid out for the products once per layer; every
/// query tile of the sequence reads them. Values are compact (`[n, d]`). Keys, for the
/// AVX-512 tiles, are transposed in panels of 16 (`[n / 16][d][16]`, zero-padded: a tile's
/// keys then lie in a few pages whatever the sequence length); otherwise compact (`[n, d]`),
/// for `gemm`.
pub struct HeadKv {
    keys: Vec<f32>,
    panels: bool,
    v: Vec<f32>,
    n: usize,
    d: usize,
}

/// Keys per panel of [`HeadKv`]'s transposed keys.
pub const PANEL: usize = 16;

impl HeadKv {
    /// `n` keys `k[j * ldk..][..d]` and values `v[j * ldv..][..d]`. Panics when a slice is
    /// too small for the sizes given.
    pub fn new((k, ldk): (&[f32], usize), (v, ldv): (&[f32], usize), n: usize, d: usize) -> Self {
        check("keys", k.len(), n, d, ldk);
        check("values", v.len(), n, d, ldv);
        let panels = vector(d);
        let keys = match panels {
            true => {
                let mut kt = vec![0f32; n.div_ceil(PANEL) * d * PANEL];
                for j in 0..n {
                    let (p, l) = (j / PANEL, j % PANEL);
                    for (c, &x) in k[j * ldk..j * ldk + d].iter().enumerate() {
                        kt[(p * d + c) * PANEL + l] = x;
                    }
                }
                kt
            }
            false => compact(k, ldk, n, d),
        };
        Self {
            keys,
            panels,
            v: compact(v, ldv, n, d),
            n,
            d,
        }
    }

    /// Keys (and values) held.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn check_block(&self, k0: usize, nk: usize) {
        assert!(
            k0 + nk <= self.n,
            "attention block: keys {k0}..{} of {}",
            k0 + nk,
            self.n
        );
    }
}

/// `n` rows `x[j * ld..][..d]`, compact.
fn compact(x: &[f32], ld: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * d);
    for j in 0..n {
        out.extend_from_slice(&x[j * ld..j * ld + d]);
    }
    out
}

/// `s[i * lds + j] = scale * dot(q_i, k_{k0 + j})` for `i < rows`, `j < nk`, with `q_i =
/// q[i * ldq..][..d]`. Returns whether it also wrote `maxes[i]`, the largest of row `i`'s
/// scores: the AVX-512 tiles take it as they store the scores, so the softmax needs no pass
/// of its own to find it; `gemm` does not (a pass here would cost what it saves there).
/// Panics when a slice is too small for the sizes given, the keys `k0..k0 + nk` are not in
/// `kv`, or `k0` is not a multiple of [`PANEL`].
pub fn scores(
    (q, ldq): (&[f32], usize),
    kv: &HeadKv,
    (k0, nk): (usize, usize),
    rows: usize,
    scale: f32,
    (s, lds): (&mut [f32], usize),
    maxes: &mut [f32],
) -> bool {
    let d = kv.d;
    kv.check_block(k0, nk);
    assert!(
        k0.is_multiple_of(PANEL),
        "attention block: keys from {k0}, not a multiple of {PANEL}"
    );
    check("queries", q.len(), rows, d, ldq);
    check("scores", s.len(), rows, nk, lds);
    assert!(
        maxes.len() >= rows,
        "attention block: {} maxima for {rows} rows",
        maxes.len()
    );
    if rows == 0 || nk == 0 {
        maxes[..rows].fill(f32::NEG_INFINITY);
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if kv.panels {
        let kt = &kv.keys[k0 * d..];
        // SAFETY: panels are laid out only at level Avx512 with d a multiple of 16 (`vector`);
        // the operands were checked above, and `kt` holds the panels of keys k0..k0 + nk
        // rounded up to 16 (the last panel is zero-padded).
        unsafe { avx512::scores(q, ldq, kt, rows, nk, d, scale, s, lds, maxes) };
        return true;
    }
    let k = &kv.keys[k0 * d..(k0 + nk) * d];
    let mut dst = MatMut::rows(s, rows, nk, lds);
    let (lhs, rhs) = (MatRef::rows(q, rows, d, ldq), MatRef::rows(k, nk, d, d).t());
    matmul(&mut dst, false, lhs, rhs, scale, Parallelism::None);
    false
}

/// `o[i * ldo + c] += sum_j p[i * ldp + j] * v_{k0 + j}[c]` for `i < rows`, `c < d`, `j <
/// nk`. Panics when a slice is too small for the sizes given or the values `k0..k0 + nk` are
/// not in `kv`.
pub fn weighted_values(
    (p, ldp): (&[f32], usize),
    kv: &HeadKv,
    (k0, nk): (usize, usize),
    rows: usize,
    (o, ldo): (&mut [f32], usize),
) {
    let d = kv.d;
    kv.check_block(k0, nk);
    check("weights", p.len(), rows, nk, ldp);
    check("output", o.len(), rows, d, ldo);
    if rows == 0 || nk == 0 {
        return;
    }
    let v = &kv.v[k0 * d..(k0 + nk) * d];
    #[cfg(target_arch = "x86_64")]
    if vector(d) && d <= 64 {
        // SAFETY: level Avx512 (checked by `vector`); the operands were checked above.
        unsafe { avx512::weighted_values(p, ldp, v, d, rows, nk, d, o, ldo) };
        return;
    }
    let mut dst = MatMut::rows(o, rows, d, ldo);
    let (lhs, rhs) = (MatRef::rows(p, rows, nk, ldp), MatRef::rows(v, nk, d, d));
    matmul(&mut dst, true, lhs, rhs, 1.0, Parallelism::None);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::math::avx512::lane_mask;

    /// Rows per register tile.
    const MR: usize = 6;

    /// One tile of scores: rows `i0..i0 + R`, keys `j0..j0 + 16 * N` (those below `nk`
    /// stored, and taken into the rows' lane-wise maxima `lanes[r]`, row `i0 + r`).
    ///
    /// # Safety
    /// avx512f; rows `i0..i0 + R` of `q` (d values at stride ldq) and of `s` (keys below
    /// `nk` at stride lds) exist; `kt` holds the panels of keys `j0..j0 + 16 * N` (`d * 16`
    /// values each, from panel `j0 / 16`); `lanes` holds `R` vectors.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores_tile<const R: usize, const N: usize>(
        q: *const f32,
        ldq: usize,
        kt: *const f32,
        (i0, j0, nk, d): (usize, usize, usize, usize),
        scale: f32,
        (s, lds): (*mut f32, usize),
        lanes: *mut __m512,
    ) {
        // SAFETY: every address below is within the operands this function's contract names.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            let panel = kt.add(j0 * d);
            for c in 0..d {
                let mut kv = [_mm512_setzero_ps(); N];
                for (x, k) in kv.iter_mut().enumerate() {
                    *k = _mm512_loadu_ps(panel.add((x * d + c) * 16));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*q.add((i0 + r) * ldq + c));
                    for x in 0..N {
                        a[x] = _mm512_fmadd_ps(b, kv[x], a[x]);
                    }
                }
            }
            let sc = _mm512_set1_ps(scale);
            for (r, a) in acc.iter().enumerate() {
                let mut mx = *lanes.add(r);
                for (x, v) in a.iter().enumerate() {
                    let j = j0 + 16 * x;
                    let m = lane_mask(j.min(nk), nk);
                    let v = _mm512_mul_ps(*v, sc);
                    _mm512_mask_storeu_ps(s.add((i0 + r) * lds + j), m, v);
                    mx = _mm512_mask_max_ps(mx, m, mx, v);
                }
                *lanes.add(r) = mx;
            }
        }
    }

    /// As [`super::scores`], `kt` the panels of the block's keys (from its first key).
    ///
    /// # Safety
    /// avx512f (with bw, dq, vl: level Avx512); the operands hold what the sizes say, `kt`
    /// the panels of `nk` keys rounded up to 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores(
        q: &[f32],
        ldq: usize,
        kt: &[f32],
        rows: usize,
        nk: usize,
        d: usize,
        scale: f32,
        s: &mut [f32],
        lds: usize,
        maxes: &mut [f32],
    ) {
        // Rows in chunks of MAX_ROWS, whose lane-wise maxima stay on the stack (set to -inf
        // per chunk).
        let mut lanes = [_mm512_setzero_ps(); MAX_ROWS];
        for c0 in (0..rows).step_by(MAX_ROWS) {
            let n = MAX_ROWS.min(rows - c0);
            lanes[..n].fill(_mm512_set1_ps(f32::NEG_INFINITY));
            // SAFETY: rows c0..c0 + n of q and s exist (as this function's contract); `lanes`
            // holds n vectors.
            unsafe {
                let (qc, sc) = (q.as_ptr().add(c0 * ldq), s.as_mut_ptr().add(c0 * lds));
                scores_rows(
                    qc,
                    ldq,
                    kt.as_ptr(),
                    (n, nk, d),
                    scale,
                    (sc, lds),
                    lanes.as_mut_ptr(),
                )
            };
            for (m, l) in maxes[c0..c0 + n].iter_mut().zip(&lanes[..n]) {
                *m = _mm512_reduce_max_ps(*l);
            }
        }
    }

    /// Rows per chunk of [`scores`]: their maxima, 16 lanes each, are 8 KB.
    const MAX_ROWS: usize = 128;

    /// [`scores`] of `rows` rows, their lane-wise maxima into `lanes[0..rows]`.
    ///
    /// # Safety
    /// avx512f; rows `0..rows` of `q` (d values at stride ldq) and `s` (`nk` at stride lds)
    /// exist, `kt` holds the panels of `nk` keys rounded up to 16, and `lanes` `rows` vectors.
    #[inline(always)]
    unsafe fn scores_rows(
        qp: *const f32,
        ldq: usize,
        kp: *const f32,
        (rows, nk, d): (usize, usize, usize),
        scale: f32,
        (sp, lds): (*mut f32, usize),
        lanes: *mut __m512,
    ) {
        let mut j0 = 0;
        while j0 < nk {
            let nv = ((nk - j0).div_ceil(16)).min(4);
            let mut i0 = 0;
            while i0 < rows {
                let r = MR.min(rows - i0);
                let at = (i0, j0, nk, d);
                // SAFETY: i0 < rows, at most the vectors `lanes` holds (this function's
                // contract; MAX_ROWS from `scores`).
                let ln = unsafe { lanes.add(i0) };
                macro_rules! tile {
                    ($($rr:literal),*; $($nn:literal),*) => {
                        tile!(@rows [$($rr),*] [$($nn),*])
                    };
                    (@rows [$($rr:literal),*] $ns:tt) => {
                        match r { $($rr => tile!(@cols $rr $ns),)* _ => unreachable!() }
                    };
                    (@cols $rr:literal [$($nn:literal),*]) => {
                        match nv {
                            // SAFETY: the tile's rows lie in q, s and lanes (i0 + r <= rows),
                            // its keys j0..j0 + 16 * nv in the panels of nk keys rounded up.
                            $($nn => unsafe {
                                scores_tile::<$rr, $nn>(qp, ldq, kp, at, scale, (sp, lds), ln)
                            },)*
                            _ => unreachable!(),
                        }
                    };
                }
                tile!(1, 2, 3, 4, 5, 6; 1, 2, 3, 4);
                i0 += r;
            }
            j0 += 16 * nv;
        }
    }

    /// One tile of weighted values: rows `i0..i0 + R` of `o` (`16 * N` values each) plus
    /// their weights times the values.
    ///
    /// # Safety
    /// avx512f; rows `i0..i0 + R` of `p` (`nk` values at stride ldp) and of `o` (`16 * N`
    /// values at stride ldo), and `nk` rows of `v` (`16 * N` values at stride ldv) exist.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn values_tile<const R: usize, const N: usize>(
        p: *const f32,
        ldp: usize,
        v: *const f32,
        ldv: usize,
        (i0, nk): (usize, usize),
        o: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: every address below is within the operands this function's contract names.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            for (r, a) in acc.iter_mut().enumerate() {
                for (x, v) in a.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(o.add((i0 + r) * ldo + 16 * x));
                }
            }
            for j in 0..nk {
                let vr = v.add(j * ldv);
                let mut vv = [_mm512_setzero_ps(); N];
                for (x, w) in vv.iter_mut().enumerate() {
                    *w = _mm512_loadu_ps(vr.add(16 * x));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*p.add((i0 + r) * ldp + j));
                    for x in 0..N {
                        a[x] = _mm512_fmadd_ps(b, vv[x], a[x]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (x, v) in a.iter().enumerate() {
                    _mm512_storeu_ps(o.add((i0 + r) * ldo + 16 * x), *v);
                }
            }
        }
    }

    /// As [`super::weighted_values`], `d` a multiple of 16 up to 64.
    ///
    /// # Safety
    /// avx512f (with bw, dq, vl: level Avx512); the operands hold what the sizes say.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weighted_values(
        p: &[f32],
        ldp: usize,
        v: &[f32],
        ldv: usize,
        rows: usize,
        nk: usize,
        d: usize,
        o: &mut [f32],
        ldo: usize,
    ) {
        let (pp, vp, op) = (p.as_ptr(), v.as_ptr(), o.as_mut_ptr());
        let nv = d / 16;
        // Keys in runs of VALUE_RUN, each run over every row tile: the run's values stay in L1
        // while the row tiles read them. Each output is still summed in key order (a run
        // continues from the sums stored by the last), so the result is the same.
        let mut j0 = 0;
        while j0 < nk {
            let nj = VALUE_RUN.min(nk - j0);
            // SAFETY: keys j0..j0 + nj <= nk: columns of p, rows of v.
            let (pj, vj) = unsafe { (pp.add(j0), vp.add(j0 * ldv)) };
            // SAFETY: as this function's.
            unsafe { values_run(pj, ldp, vj, ldv, rows, nj, nv, op, ldo) };
            j0 += nj;
        }
    }

    /// Keys per run of [`weighted_values`]: 128 keys of 64 values are 32 KB.
    const VALUE_RUN: usize = 128;

    /// [`weighted_values`] for `nk` keys from `p` and `v` (`nv` vectors of 16 values a row).
    ///
    /// # Safety
    /// avx512f; rows `0..rows` of `p` (`nk` values at stride ldp) and of `o` (`16 * nv`
    /// values at stride ldo), and `nk` rows of `v` (`16 * nv` values at stride ldv) exist.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn values_run(
        pp: *const f32,
        ldp: usize,
        vp: *const f32,
        ldv: usize,
        rows: usize,
        nk: usize,
        nv: usize,
        op: *mut f32,
        ldo: usize,
    ) {
        let mut i0 = 0;
        while i0 < rows {
            let r = MR.min(rows - i0);
            macro_rules! tile {
                ($($rr:literal),*; $($nn:literal),*) => {
                    tile!(@rows [$($rr),*] [$($nn),*])
                };
                (@rows [$($rr:literal),*] $ns:tt) => {
                    match r { $($rr => tile!(@cols $rr $ns),)* _ => unreachable!() }
                };
                (@cols $rr:literal [$($nn:literal),*]) => {
                    match nv {
                        // SAFETY: rows i0..i0 + r <= rows of p and o, nk rows of v, 16 * nv
                        // = d values each.
                        $($nn => unsafe {
                            values_tile::<$rr, $nn>(pp, ldp, vp, ldv, (i0, nk), op, ldo)
                        },)*
                        _ => unreachable!(),
                    }
                };
            }
            tile!(1, 2, 3, 4, 5, 6; 1, 2, 3, 4);
            i0 += r;
        }
    }
}

#[cfg(test)]
mod tests;
