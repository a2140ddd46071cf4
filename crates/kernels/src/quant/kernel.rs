//! [`Kernel`]: a handle on one line of a precision's kernel table, and the choice of kernel
//! (the best one the CPU has, or the one `FETCH_ML_KERNEL` names).

use std::fmt;

use super::isa::Entry;
use super::{err, Bf16, Int8, Precision, QuantError};

/// One kernel of precision `P`: a line of its table in [`super::isa`].
pub struct Kernel<P: Precision>(pub(crate) &'static Entry<P>);

/// An int8 kernel: how `dot(u8 row, s8 column)` is computed.
pub type Int8Kernel = Kernel<Int8>;
/// A bf16 kernel.
pub type Bf16Kernel = Kernel<Bf16>;

impl<P: Precision> Clone for Kernel<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Precision> Copy for Kernel<P> {}

impl<P: Precision> PartialEq for Kernel<P> {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl<P: Precision> Eq for Kernel<P> {}

impl<P: Precision> fmt::Debug for Kernel<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} kernel {}", P::NAME, self.0.name)
    }
}

impl<P: Precision> Kernel<P> {
    /// Every kernel of the precision, portable first, best last.
    pub fn all() -> impl DoubleEndedIterator<Item = Self> {
        P::table().iter().map(Kernel)
    }

    /// The plain Rust kernel, correct on any CPU: the reference of the others.
    pub fn portable() -> Self {
        Kernel(&P::table()[0])
    }

    /// The kernel of this name (`FETCH_ML_KERNEL`'s names), if the precision has one.
    pub fn named(name: &str) -> Option<Self> {
        Self::all().find(|k| k.name() == name)
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// Whether this CPU (and its operating system) can run the kernel.
    pub fn supported(self) -> bool {
        (self.0.supported)()
    }

    /// Whether /proc/cpuinfo lists what the kernel needs (a second opinion for the tests,
    /// independent of [`Kernel::supported`]; false where there is no /proc/cpuinfo).
    pub fn listed_in_cpuinfo(self) -> bool {
        crate::cpu::cpuinfo_lists(self.0.cpuinfo)
    }

    /// The fastest supported kernel.
    pub fn best() -> Self {
        Self::all()
            .rev()
            .find(|k| k.supported())
            .unwrap_or_else(Self::portable)
    }

    /// The kernel `FETCH_ML_KERNEL` asks for, else the best one. A name of the other
    /// precision's kernels leaves this precision's choice to the CPU. Errors when the variable
    /// names no kernel at all, or one this CPU lacks.
    pub fn select() -> Result<Self, QuantError> {
        let Some(name) = kernel_override() else {
            return Ok(Self::best());
        };
        if let Some(k) = Self::named(&name) {
            if !k.supported() {
                return err(format!(
                    "FETCH_ML_KERNEL={name}: this CPU (or its operating system) does not allow \
                     that kernel"
                ));
            }
            return Ok(k);
        }
        let names = kernel_names();
        if names.contains(&name.as_str()) {
            return Ok(Self::best());
        }
        err(format!(
            "FETCH_ML_KERNEL={name} names no kernel; expected one of {}",
            names.join(", ")
        ))
    }

    /// (rows, panels) of the kernel's register tile.
    pub(crate) fn tile_shape(self) -> (usize, usize) {
        self.0.tile
    }

    /// (rows, panels) of one parallel task.
    pub(crate) fn block_shape(self) -> (usize, usize) {
        self.0.block
    }
}

/// Every kernel name of both precisions, in table order, each once.
fn kernel_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = Int8Kernel::all().map(Kernel::name).collect();
    for k in Bf16Kernel::all() {
        if !names.contains(&k.name()) {
            names.push(k.name());
        }
    }
    names
}

/// `FETCH_ML_KERNEL`, trimmed and lower-cased; None when unset or empty.
fn kernel_override() -> Option<String> {
    std::env::var("FETCH_ML_KERNEL")
        .ok()
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
}
