//! A growable buffer of plain values whose start is 64-byte aligned: AMX tile loads and stores
//! run several times slower on addresses that are not (measured: 5 ns against 30-48 ns per
//! 16-row load).

use std::marker::PhantomData;

/// One 64-byte line, the unit of storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Plain values that any bit pattern makes valid (so zeroed lines are valid values).
pub trait Plain: Copy + Default + 'static {}
impl Plain for u8 {}
impl Plain for i8 {}
impl Plain for u16 {}

/// `len` values of `T` stored in 64-byte-aligned lines; derefs to `[T]`.
#[derive(Clone, Default)]
pub struct AlignedVec<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Plain> AlignedVec<T> {
    /// `len` zero values.
    pub fn zeroed(len: usize) -> Self {
        let mut v = Self::default();
        v.resize(len);
        v
    }

    /// Grows or shrinks to `len` values; new values are zero.
    pub fn resize(&mut self, len: usize) {
        let bytes = len * std::mem::size_of::<T>();
        self.lines.resize(bytes.div_ceil(64), Line([0; 64]));
        if len > self.len {
            // Lines kept from a longer past may hold old values: zero the new range.
            let old = self.len;
            self.len = len;
            self[old..].fill(T::default());
        } else {
            self.len = len;
        }
    }
}

impl<T: Plain> std::ops::Deref for AlignedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least len * size_of::<T>() initialized bytes, aligned to
        // 64 (>= align_of::<T>() for the Plain types), and any bit pattern is a valid T.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for AlignedVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}
