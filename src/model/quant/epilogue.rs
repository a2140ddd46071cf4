//! The epilogues of the quantized products: scale, bias and activation per tile, in AVX-512
//! or AVX2 where the CPU has them, and the check of the destination sizes they rely on.

use super::*;
#[cfg(target_arch = "x86_64")]
use kernels::consts::{ERF_CLAMP, ERF_P, ERF_Q};

/// Runs `$body` compiled for AVX2+FMA when the CPU has them (the same IEEE operations
/// either way: Rust does not contract `a * b + c` into an FMA, so results are identical).
macro_rules! multiversion {
    ($name:ident, ($($arg:ident : $ty:ty),*), $body:block) => {
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide($($arg: $ty),*) { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) { imp($($arg),*) }
                match simd_level() {
                    // SAFETY: the CPU supports the features enabled on `wide`.
                    2 => return unsafe { wide($($arg),*) },
                    // SAFETY: the CPU supports the features enabled on `fast`.
                    1 => return unsafe { fast($($arg),*) },
                    _ => {}
                }
            }
            imp($($arg),*)
        }
    };
}

/// 2: AVX-512 (F, BW, DQ, VL) and AVX2+FMA; 1: AVX2+FMA only; 0: neither.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_level() -> u8 {
    kernels::cpu::level() as u8
}

multiversion!(epilogue_i8, (acc: &[i32], zero: i32, scale: f32, colsum: &[i32], wscale: &[f32], bias: &[f32], act: Activation, out: &mut [f32]), {
    // out = act(scale_r * scale_n * (acc - zero_r * colsum_n) + bias_n)
    let n = out.len();
    let (acc, colsum, wscale, bias) = (&acc[..n], &colsum[..n], &wscale[..n], &bias[..n]);
    for j in 0..n {
        let v = (acc[j] - zero * colsum[j]) as f32 * (scale * wscale[j]) + bias[j];
        out[j] = v;
    }
    apply_act(act, out);
});

multiversion!(epilogue_bf16, (acc: &[f32], bias: &[f32], act: Activation, out: &mut [f32]), {
    let n = out.len();
    let (acc, bias) = (&acc[..n], &bias[..n]);
    for j in 0..n {
        out[j] = acc[j] + bias[j];
    }
    apply_act(act, out);
});

#[inline(always)]
pub(crate) fn apply_act(act: Activation, out: &mut [f32]) {
    match act {
        Activation::None => {}
        #[cfg(target_arch = "x86_64")]
        Activation::Gelu if simd_level() == 2 => {
            // SAFETY: simd_level 2 means the CPU has avx512f.
            unsafe { gelu_avx512(out) }
        }
        #[cfg(target_arch = "x86_64")]
        Activation::Gelu if simd_level() == 1 => {
            // SAFETY: simd_level 1 means the CPU has avx2 and fma.
            unsafe { super::epilogue_avx2::gelu_avx2(out) }
        }
        Activation::Gelu => out.iter_mut().for_each(|v| *v = Activation::Gelu.apply(*v)),
        Activation::GeluTanh => out
            .iter_mut()
            .for_each(|v| *v = Activation::GeluTanh.apply(*v)),
        Activation::Relu => out.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

/// BERT's GELU on 16 lanes: the erf of [`super::kernels::erf`] (same coefficients), with
/// FMAs and its division replaced by a reciprocal estimate and one Newton step (within an ulp
/// or two of the division, which alone cost more than the int8 product of the FFN's first
/// layer).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn gelu16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    let lim = c(ERF_CLAMP);
    let z = _mm512_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
    let z = _mm512_min_ps(_mm512_max_ps(z, c(-ERF_CLAMP)), lim);
    let z2 = _mm512_mul_ps(z, z);
    let mut p = c(ERF_P[0]);
    for &k in &ERF_P[1..] {
        p = _mm512_fmadd_ps(p, z2, c(k));
    }
    let p = _mm512_mul_ps(p, z);
    let mut q = c(ERF_Q[0]);
    for &k in &ERF_Q[1..] {
        q = _mm512_fmadd_ps(q, z2, c(k));
    }
    let r = _mm512_rcp14_ps(q);
    // One Newton step: r (2 - q r).
    let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, c(2.0)));
    let erf = _mm512_mul_ps(p, r);
    let half_x = _mm512_mul_ps(v, c(0.5));
    _mm512_fmadd_ps(half_x, erf, half_x)
}

/// The mask of the 16-lane chunk starting at `i` of `n` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lane_mask(i: usize, n: usize) -> u16 {
    if n - i >= 16 {
        0xffff
    } else {
        (1u16 << (n - i)) - 1
    }
}

/// GELU in place, 16 lanes at a time; every value, the tail included, goes through the same
/// vector code.
///
/// # Safety
/// The CPU has avx512f.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn gelu_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let mut i = 0;
    while i < n {
        let m = lane_mask(i, n);
        // SAFETY: the mask covers elements i..min(i + 16, n) only.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), m, gelu16(v));
        }
        i += 16;
    }
}

/// The epilogue of a whole tile (`mr` rows of `cols` values of `acc`, rows of `MAX_NP *
/// PANEL` lanes), 16 lanes at a time, the per-column values loaded once per 16 columns for
/// all the rows, the GELU in registers. int8 (`q` = per-row zero points and scales,
/// per-column weight sums and scales): `act(cvt(acc - zero * colsum) * (scale * wscale) +
/// bias)`, one FMA; bf16 (`q` = None, `acc` holds f32 bits): `act(acc + bias)`.
///
/// # Safety
/// The CPU has avx512f; `out` covers `mr` rows of `cols` values at stride `ld`, and no other
/// thread touches them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) unsafe fn epilogue_tile_avx512<T: Copy>(
    acc: &TileBuf<T>,
    mr: usize,
    cols: usize,
    q: Option<(&[i32], &[f32], &[i32], &[f32])>,
    bias: &[f32],
    gelu: bool,
    out: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    assert!(std::mem::size_of::<T>() == 4);
    assert!(mr <= MAX_MR && cols <= MAX_NP * PANEL && bias.len() >= cols);
    if let Some((zero, scale, colsum, wscale)) = q {
        assert!(zero.len() >= mr && scale.len() >= mr);
        assert!(colsum.len() >= cols && wscale.len() >= cols);
    }
    let accp = acc.as_ptr() as *const u8;
    let mut j = 0;
    while j < cols {
        let m = lane_mask(j, cols);
        // SAFETY: the mask covers columns j..min(j + 16, cols), within every slice (asserted)
        // and every row of `acc` (cols <= MAX_NP * PANEL, 4-byte lanes); rows i < mr <=
        // MAX_MR of `acc`, and of `out` by this function's contract.
        unsafe {
            let b = _mm512_maskz_loadu_ps(m, bias.as_ptr().add(j));
            let at = |i: usize| accp.add((i * MAX_NP * PANEL + j) * 4);
            match q {
                Some((zero, scale, colsum, wscale)) => {
                    let cs = _mm512_maskz_loadu_epi32(m, colsum.as_ptr().add(j));
                    let ws = _mm512_maskz_loadu_ps(m, wscale.as_ptr().add(j));
                    for i in 0..mr {
                        let a = _mm512_maskz_loadu_epi32(m, at(i) as *const i32);
                        let z = _mm512_set1_epi32(zero[i]);
                        let a = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, _mm512_mullo_epi32(z, cs)));
                        let w = _mm512_mul_ps(_mm512_set1_ps(scale[i]), ws);
                        let mut v = _mm512_fmadd_ps(a, w, b);
                        if gelu {
                            v = gelu16(v);
                        }
                        _mm512_mask_storeu_ps(out.add(i * ld + j), m, v);
                    }
                }
                None => {
                    for i in 0..mr {
                        let mut v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, at(i) as *const f32), b);
                        if gelu {
                            v = gelu16(v);
                        }
                        _mm512_mask_storeu_ps(out.add(i * ld + j), m, v);
                    }
                }
            }
        }
        j += 16;
    }
}

/// Runs the vector tile epilogue the CPU has (AVX-512, else AVX2) for `act` None or GELU, and
/// says whether it did; otherwise the caller runs `epilogue_i8`/`epilogue_bf16` per row.
/// Arguments as `epilogue_tile_avx512`'s.
///
/// # Safety
/// `out` covers `mr` rows of `cols` values at stride `ld`, and no other thread touches them.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) unsafe fn epilogue_tile<T: Copy>(
    acc: &TileBuf<T>,
    mr: usize,
    cols: usize,
    q: Option<(&[i32], &[f32], &[i32], &[f32])>,
    bias: &[f32],
    act: Activation,
    out: *mut f32,
    ld: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(act, Activation::None | Activation::Gelu) {
        let gelu = act == Activation::Gelu;
        match simd_level() {
            // SAFETY: simd_level 2 means avx512f; `out` as this function's contract says.
            2 => unsafe { epilogue_tile_avx512(acc, mr, cols, q, bias, gelu, out, ld) },
            // SAFETY: simd_level 1 means avx2 and fma; `out` as above.
            1 => unsafe {
                super::epilogue_avx2::epilogue_tile_avx2(acc, mr, cols, q, bias, gelu, out, ld)
            },
            _ => return false,
        }
        return true;
    }
    let _ = (acc, mr, cols, q, bias, out, ld);
    false
}

pub(crate) fn check_dst(
    x_len: usize,
    rows: usize,
    k: usize,
    dst_len: usize,
    ld: usize,
    col: usize,
    n: usize,
) -> Result<(), QuantError> {
    if x_len < rows * k {
        return err(format!(
            "dense layer: input of {x_len} values for {rows} rows of {k}"
        ));
    }
    if col + n > ld || (rows > 0 && (rows - 1) * ld + col + n > dst_len) {
        return err(format!(
            "dense layer: output of {dst_len} values cannot hold {rows} rows of {n} at column \
             {col} with stride {ld}"
        ));
    }
    Ok(())
}
