//! Finite numbers only: every weight tensor is checked once as it loads, and every output
//! vector before it is written, so a NaN or an infinity is an error naming its tensor or its
//! input instead of a `null` in the output (or, in int8, a silently different number).

use std::path::Path;

use rayon::prelude::*;

/// Position and kind of the first value of `v` that is not a finite number, and how many
/// such values `v` holds; `None` when every value is finite. One pass; the common case
/// (all finite) is a branch-free scan of the exponent bits.
pub fn non_finite(v: &[f32]) -> Option<NonFinite> {
    const EXP: u32 = 0x7f80_0000;
    // All-ones exponent: an infinity or a NaN. An OR of 0/1 words over a chunk vectorises
    // (compare, and, or) on any x86-64; large tensors are scanned by every core.
    let any = |chunk: &[f32]| {
        chunk
            .iter()
            .fold(0u32, |acc, x| acc | u32::from(x.to_bits() & EXP == EXP))
            != 0
    };
    let found = if v.len() >= 1 << 20 {
        v.par_chunks(1 << 16).any(any)
    } else {
        v.chunks(4096).any(any)
    };
    if !found {
        return None;
    }
    let first = v.iter().position(|x| !x.is_finite())?;
    Some(NonFinite {
        index: first,
        value: v[first],
        count: v.iter().filter(|x| !x.is_finite()).count(),
        len: v.len(),
    })
}

/// The values of a tensor or vector that are not finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFinite {
    /// Flat index of the first one.
    pub index: usize,
    /// Its value: NaN, inf or -inf.
    pub value: f32,
    /// How many there are.
    pub count: usize,
    /// How many values were checked.
    pub len: usize,
}

impl NonFinite {
    /// "NaN", "inf" or "-inf".
    pub fn kind(&self) -> &'static str {
        if self.value.is_nan() {
            "NaN"
        } else if self.value > 0.0 {
            "inf"
        } else {
            "-inf"
        }
    }
}

/// A weight tensor holding a value that is not a finite number.
#[derive(Debug, thiserror::Error)]
#[error(
    "tensor {tensor} in {file} holds {kind} at position {position:?} ({count} of its {len} \
     values are not finite numbers); the weights are damaged: restore the file from its source"
)]
pub struct NonFiniteWeight {
    pub tensor: String,
    pub file: String,
    pub kind: &'static str,
    /// The first bad value's index along each dimension.
    pub position: Vec<usize>,
    pub count: usize,
    pub len: usize,
}

/// Fails when the f32 values `v` of tensor `name` (of `shape`) in `file` are not all finite.
pub fn check_weight(
    v: &[f32],
    shape: &[usize],
    name: &str,
    file: &Path,
) -> Result<(), NonFiniteWeight> {
    match non_finite(v) {
        None => Ok(()),
        Some(bad) => Err(NonFiniteWeight {
            tensor: name.to_string(),
            file: file.display().to_string(),
            kind: bad.kind(),
            position: unflatten(bad.index, shape),
            count: bad.count,
            len: bad.len,
        }),
    }
}

/// Fails when the f32 tensor `t`, read as `name` from `file`, holds a value that is not
/// finite. Reads the values in place (no copy) when they are contiguous on the CPU.
pub fn check_tensor(t: &candle_core::Tensor, name: &str, file: &Path) -> candle_core::Result<()> {
    let wrap = |e: NonFiniteWeight| candle_core::Error::Msg(e.to_string());
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            if let Ok(v) = cpu.as_slice::<f32>() {
                return check_weight(&v[a..b], t.dims(), name, file).map_err(wrap);
            }
        }
    }
    let v: Vec<f32> = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    check_weight(&v, t.dims(), name, file).map_err(wrap)
}

/// `index` into a row-major array of `shape`, as one index per dimension.
fn unflatten(mut index: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for (o, &d) in out.iter_mut().zip(shape).rev() {
        *o = index % d.max(1);
        index /= d.max(1);
    }
    out
}

/// An output vector (a sentence vector, or a head's probabilities) holding a value that is
/// not finite: the model's arithmetic overflowed on that input. `index` is the input's
/// position among those embedded together; [`crate::tokenize::name_sentence`] names it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{count} of the {len} values of its {what} are not finite (NaN or infinite): the model's \
     arithmetic overflows on this input, although its weights are finite numbers"
)]
pub struct NonFiniteOutput {
    pub index: usize,
    /// "vector" or "class probabilities", ...
    pub what: &'static str,
    pub count: usize,
    pub len: usize,
}

/// Fails on the first of `rows` (input `i` is row `i`) that is not all finite.
pub fn check_rows<'a>(
    rows: impl IntoIterator<Item = &'a [f32]>,
    what: &'static str,
) -> Result<(), NonFiniteOutput> {
    for (index, row) in rows.into_iter().enumerate() {
        if let Some(bad) = non_finite(row) {
            return Err(NonFiniteOutput {
                index,
                what,
                count: bad.count,
                len: bad.len,
            });
        }
    }
    Ok(())
}

/// `e` with the input index of a [`NonFiniteOutput`] mapped through `f` (from a position in
/// a flattened list, such as windows, to the input's); other errors pass unchanged.
pub fn reindex(e: anyhow::Error, f: impl Fn(usize) -> usize) -> anyhow::Error {
    match e.downcast::<NonFiniteOutput>() {
        Ok(n) => NonFiniteOutput {
            index: f(n.index),
            ..n
        }
        .into(),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_non_finite_value_and_counts_them() {
        let mut v = vec![1.0f32; 10_000];
        assert_eq!(non_finite(&v), None);
        v[5000] = f32::NEG_INFINITY;
        v[9000] = f32::NAN;
        let bad = non_finite(&v).unwrap();
        assert_eq!((bad.index, bad.count, bad.len), (5000, 2, 10_000));
        assert_eq!(bad.kind(), "-inf");
        // The largest finite values are finite; subnormals too.
        assert_eq!(non_finite(&[f32::MAX, f32::MIN, 1e-45, -0.0]), None);
    }

    #[test]
    fn a_weight_error_names_tensor_file_and_position() {
        let mut v = vec![0.0f32; 12];
        v[7] = f32::NAN;
        let e = check_weight(
            &v,
            &[3, 4],
            "encoder.x.weight",
            Path::new("m/model.safetensors"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("encoder.x.weight")
                && e.contains("m/model.safetensors")
                && e.contains("NaN")
                && e.contains("[1, 3]"),
            "{e}"
        );
    }

    #[test]
    fn rows_are_checked_in_order_and_reindexed() {
        let rows = [
            vec![1.0f32, 2.0],
            vec![f32::INFINITY, 0.0],
            vec![f32::NAN, 0.0],
        ];
        let e = check_rows(rows.iter().map(|r| r.as_slice()), "vector").unwrap_err();
        assert_eq!(e.index, 1);
        let e = reindex(e.into(), |i| i + 10);
        assert_eq!(e.downcast_ref::<NonFiniteOutput>().unwrap().index, 11);
    }
}
