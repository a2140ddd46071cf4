//! The arithmetic of the encoder's dense layers at inference ([`Dtype`]), and the quantized
//! layers and kernels of the kernel crate (`crates/kernels`, [`kernels::quant`]) that run
//! int8 and bf16.

use std::fmt;
use std::str::FromStr;

pub use kernels::quant::{
    Activation, Bf16Kernel, Bf16Linear, Int8Kernel, Int8Linear, QuantError, Scratch,
    ROW_OUTLIER_RATIO, WEIGHT_OUTLIER_RATIO,
};

/// The arithmetic of the encoder's dense layers at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Dtype {
    /// float32 everywhere (the reference).
    #[default]
    F32,
    /// bf16 x bf16 products with f32 accumulation.
    Bf16,
    /// int8 x int8 products with i32 accumulation, per-row and per-channel scales.
    Int8,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, QuantError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "int8" | "i8" => Ok(Dtype::Int8),
            _ => Err(QuantError(format!(
                "unknown dtype {s:?}; expected one of f32, bf16, int8"
            ))),
        }
    }
}

/// What `FETCH_ML_KERNEL` means for `dtype`: nothing when unset or when it names a kernel of
/// `dtype`; a note to print when it names a kernel of the other dtype, or any kernel under
/// f32 (which has one), since it is then ignored; an error when it names no kernel at all.
pub fn kernel_override_note(dtype: Dtype) -> Result<Option<String>, QuantError> {
    let Some(name) = std::env::var("FETCH_ML_KERNEL")
        .ok()
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let int8 = Int8Kernel::named(&name).is_some();
    let bf16 = Bf16Kernel::named(&name).is_some();
    let int8_names = Int8Kernel::all()
        .map(Int8Kernel::name)
        .collect::<Vec<_>>()
        .join(", ");
    let bf16_names = Bf16Kernel::all()
        .map(Bf16Kernel::name)
        .collect::<Vec<_>>()
        .join(", ");
    if !int8 && !bf16 {
        return Err(QuantError(format!(
            "FETCH_ML_KERNEL={name} names no kernel; expected one of {int8_names} (int8) or \
             {bf16_names} (bf16)"
        )));
    }
    let applies = match dtype {
        Dtype::F32 => false,
        Dtype::Int8 => int8,
        Dtype::Bf16 => bf16,
    };
    if applies {
        return Ok(None);
    }
    let choices = match dtype {
        Dtype::F32 => "f32 has one kernel and no choice".to_string(),
        Dtype::Int8 => format!("the int8 kernels are {int8_names}"),
        Dtype::Bf16 => format!("the bf16 kernels are {bf16_names}"),
    };
    Ok(Some(format!(
        "FETCH_ML_KERNEL={name} is ignored: the dense layers run in {dtype}, and {choices}"
    )))
}

/// The name of the kernel that runs the dense layers for `dtype` ("gemm-f32" for f32), as
/// `FETCH_ML_KERNEL` and the CPU decide; "unavailable" when the override cannot be honoured.
pub fn kernel_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "gemm-f32",
        Dtype::Int8 => Int8Kernel::select().map_or("unavailable", Int8Kernel::name),
        Dtype::Bf16 => Bf16Kernel::select().map_or("unavailable", Bf16Kernel::name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in [Dtype::F32, Dtype::Bf16, Dtype::Int8] {
            assert_eq!(d.to_string().parse::<Dtype>().unwrap(), d);
        }
        assert_eq!("INT8".parse::<Dtype>().unwrap(), Dtype::Int8);
        assert!("fp8".parse::<Dtype>().is_err());
        assert_eq!(Dtype::default(), Dtype::F32);
        assert_eq!(kernel_name(Dtype::F32), "gemm-f32");
    }
}
