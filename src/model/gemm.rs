//! Matrix products through the `gemm` crate on strided views, for the fused ops and the
//! inference fast path: one readable call instead of eighteen positional arguments.

use gemm::Parallelism;

/// A read-only matrix view: element (i, j) is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// Row-major rows of length >= n with stride `ld`.
    pub fn rows(ptr: *const f32, ld: usize) -> Self {
        Self {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }
    /// The transpose of row-major storage with stride `ld`: element (i, j) is stored at (j, i).
    pub fn transposed(ptr: *const f32, ld: usize) -> Self {
        Self {
            ptr,
            rs: 1,
            cs: ld as isize,
        }
    }
}

/// A writable row-major matrix view with row stride `ld`.
#[derive(Clone, Copy)]
pub struct MatMut {
    pub ptr: *mut f32,
    pub ld: usize,
}

// SAFETY: a `Mat` is a read-only view; it is only dereferenced inside `matmul`, whose
// callers guarantee that the memory outlives the call and is not written meanwhile.
unsafe impl Send for Mat {}
// SAFETY: as for Send: shared reads of memory nobody writes during the call.
unsafe impl Sync for Mat {}
// SAFETY: a `MatMut` is only dereferenced inside `matmul`; callers hand each thread a
// disjoint output region, so no two threads write the same element.
unsafe impl Send for MatMut {}
// SAFETY: as for Send: the regions written through shared copies are disjoint.
unsafe impl Sync for MatMut {}

/// Splits the product over rayon's threads when it is large enough to be worth it.
pub fn parallelism(flops: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && flops > (1 << 20) {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `dst (m x n) = [dst +] beta * lhs (m x k) * rhs (k x n)`; with `accumulate` the product
/// is added to what `dst` holds.
///
/// # Safety
/// Every view must cover the elements the shapes address, and `dst` must not overlap the
/// inputs or another thread's output.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        1,
        dst.ld as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        beta,
        false,
        false,
        false,
        par,
    )
}
