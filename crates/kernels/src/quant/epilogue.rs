//! The epilogues of the quantized products: scale, bias and activation per tile, in AVX-512
//! or AVX2 (`epilogue_avx2.rs`) where the CPU has them, else row by row.

use super::{RowQuant, TileBuf, TileQuant, LANES, MAX_MR};
use crate::cpu::{level, multiversion, Level};
use crate::math;

/// What the epilogue applies after scale and bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// BERT's GELU, `x/2 (1 + erf(x/sqrt 2))`, the same function as the f32 path.
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Gelu => math::gelu(v),
            Activation::GeluTanh => math::gelu_tanh(v),
            Activation::Relu => v.max(0.0),
        }
    }
}

multiversion! {
    /// int8, one row: `out = act(scale_r * scale_n * (acc - zero_r * colsum_n) + bias_n)`.
    pub(crate) fn epilogue_i8(acc: &[i32], q: RowQuant<'_>, bias: &[f32], act: Activation, out: &mut [f32])
        for [Avx512 => "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma", Avx2 => "avx2,fma"]
    {
        let n = out.len();
        let (zero, scale) = (q.zero, q.scale);
        let (acc, colsum, wscale, bias) = (&acc[..n], &q.colsum[..n], &q.wscale[..n], &bias[..n]);
        for j in 0..n {
            let v = (acc[j] - zero * colsum[j]) as f32 * (scale * wscale[j]) + bias[j];
            out[j] = v;
        }
        apply_act(act, out);
    }
}

multiversion! {
    /// bf16, one row: `out = act(acc + bias)`.
    pub(crate) fn epilogue_bf16(acc: &[f32], bias: &[f32], act: Activation, out: &mut [f32])
        for [Avx512 => "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma", Avx2 => "avx2,fma"]
    {
        let n = out.len();
        let (acc, bias) = (&acc[..n], &bias[..n]);
        for j in 0..n {
            out[j] = acc[j] + bias[j];
        }
        apply_act(act, out);
    }
}

/// The activation in place, with the vector GELUs where the CPU has them.
#[inline(always)]
pub(crate) fn apply_act(act: Activation, out: &mut [f32]) {
    match act {
        Activation::None => {}
        #[cfg(target_arch = "x86_64")]
        Activation::Gelu if level() == Level::Avx512 => {
            // SAFETY: level Avx512 means the CPU has avx512f.
            unsafe { math::avx512::gelu_avx512(out) }
        }
        #[cfg(target_arch = "x86_64")]
        Activation::Gelu if level() == Level::Avx2 => {
            // SAFETY: level Avx2 means the CPU has avx2 and fma.
            unsafe { math::avx2::gelu_avx2(out) }
        }
        Activation::Gelu => out.iter_mut().for_each(|v| *v = Activation::Gelu.apply(*v)),
        Activation::GeluTanh => out
            .iter_mut()
            .for_each(|v| *v = Activation::GeluTanh.apply(*v)),
        Activation::Relu => out.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

/// The epilogue of a whole tile (`mr` rows of `cols` values of `acc`, rows of `LANES`
/// lanes), 16 lanes at a time, the per-column values loaded once per 16 columns for all the
/// rows, the GELU in registers. int8 (`q` given): `act(cvt(acc - zero * colsum) * (scale *
/// wscale) + bias)`, one FMA; bf16 (`q` = None, `acc` holds f32 bits): `act(acc + bias)`.
///
/// # Safety
/// The CPU has avx512f; `out` covers `mr` rows of `cols` values at stride `ld`, and no other
/// thread touches them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn epilogue_tile_avx512<T: Copy>(
    acc: &TileBuf<T>,
    mr: usize,
    cols: usize,
    q: Option<TileQuant<'_>>,
    bias: &[f32],
    gelu: bool,
    out: *mut f32,
    ld: usize,
) {
    use crate::math::avx512::{gelu16, lane_mask};
    use std::arch::x86_64::*;
    assert!(std::mem::size_of::<T>() == 4);
    assert!(mr <= MAX_MR && cols <= LANES && bias.len() >= cols);
    if let Some(q) = q {
        assert!(q.zero.len() >= mr && q.scale.len() >= mr);
        assert!(q.colsum.len() >= cols && q.wscale.len() >= cols);
    }
    let accp = acc.as_ptr() as *const u8;
    let mut j = 0;
    while j < cols {
        let m = lane_mask(j, cols);
        // SAFETY: the mask covers columns j..min(j + 16, cols), within every slice (asserted)
        // and every row of `acc` (cols <= LANES, 4-byte lanes); rows i < mr <= MAX_MR of
        // `acc`, and of `out` by this function's contract.
        unsafe {
            let b = _mm512_maskz_loadu_ps(m, bias.as_ptr().add(j));
            let at = |i: usize| accp.add((i * LANES + j) * 4);
            match q {
                Some(q) => {
                    let cs = _mm512_maskz_loadu_epi32(m, q.colsum.as_ptr().add(j));
                    let ws = _mm512_maskz_loadu_ps(m, q.wscale.as_ptr().add(j));
                    for i in 0..mr {
                        let a = _mm512_maskz_loadu_epi32(m, at(i) as *const i32);
                        let z = _mm512_set1_epi32(q.zero[i]);
                        let a = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, _mm512_mullo_epi32(z, cs)));
                        let w = _mm512_mul_ps(_mm512_set1_ps(q.scale[i]), ws);
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
/// says whether it did; otherwise the caller runs the row epilogue of its precision.
/// Arguments as `epilogue_tile_avx512`'s.
///
/// # Safety
/// `out` covers `mr` rows of `cols` values at stride `ld`, and no other thread touches them.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn epilogue_tile<T: Copy>(
    acc: &TileBuf<T>,
    mr: usize,
    cols: usize,
    q: Option<TileQuant<'_>>,
    bias: &[f32],
    act: Activation,
    out: *mut f32,
    ld: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(act, Activation::None | Activation::Gelu) {
        let gelu = act == Activation::Gelu;
        match level() {
            // SAFETY: level Avx512 means avx512f; `out` as this function's contract says.
            Level::Avx512 => unsafe { epilogue_tile_avx512(acc, mr, cols, q, bias, gelu, out, ld) },
            // SAFETY: level Avx2 means avx2 and fma; `out` as above.
            Level::Avx2 => unsafe {
                super::epilogue_avx2::epilogue_tile_avx2(acc, mr, cols, q, bias, gelu, out, ld)
            },
            Level::Portable => return false,
        }
        return true;
    }
    let _ = (acc, mr, cols, q, bias, out, ld);
    false
}
