//! f32 matrix products through the `gemm` crate, on checked strided views of slices:
//! [`MatRef`] (any strides, so a transpose or one head's columns of a fused projection is a
//! view, not a copy) and [`MatMut`] (row-major rows at a stride).

use std::marker::PhantomData;

pub use gemm::Parallelism;

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// Panics unless every element the view addresses lies in `data`.
    fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let fits = rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len();
        assert!(
            fits,
            "matrix view of {rows} x {cols} (strides {rs}, {cs}) past a slice of {}",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// `rows` rows of `cols` values, row `i` from `data[i * ld]`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        Self::new(data, rows, cols, ld, 1)
    }

    /// The transpose of row-major storage: element (i, j) is `data[j * ld + i]` (so `data`
    /// holds `cols` rows of `rows` values at stride `ld`).
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        Self::new(data, rows, cols, 1, ld)
    }

    /// The transpose of this view.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// A writable row-major view: `rows` rows of `cols` values, row `i` from element `i * ld`.
/// Rows never overlap (`cols <= ld`).
pub struct MatMut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    ld: usize,
    _data: PhantomData<&'a mut [f32]>,
}

// SAFETY: a MatMut is a unique borrow of the elements it addresses (as `&mut [f32]` is).
unsafe impl Send for MatMut<'_> {}

impl<'a> MatMut<'a> {
    /// Panics unless the rows lie in `data` and do not overlap.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize, ld: usize) -> Self {
        let fits = rows == 0 || cols == 0 || (cols <= ld && (rows - 1) * ld + cols <= data.len());
        assert!(
            fits,
            "writable view of {rows} x {cols} (stride {ld}) past a slice of {}",
            data.len()
        );
        Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            ld,
            _data: PhantomData,
        }
    }

    /// A view of elements that a caller has proved this view may own alone.
    ///
    /// # Safety
    /// The `rows` rows of `cols` values at stride `ld` from `ptr` (`cols <= ld`) are valid
    /// for writes for `'a`, and nothing else reads or writes them meanwhile.
    pub(crate) unsafe fn from_raw(ptr: *mut f32, rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            ptr,
            rows,
            cols,
            ld,
            _data: PhantomData,
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Row `i`.
    pub fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows, "row {i} of {}", self.rows);
        // SAFETY: row i lies inside the view (checked at construction), which owns it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.ld), self.cols) }
    }
}

/// Splits a product over rayon's threads when it is large enough to be worth it.
pub fn parallelism(flops: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && flops > (1 << 20) {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `dst = [dst +] beta * lhs * rhs`: with `accumulate` the product is added to what `dst`
/// holds. Panics when the shapes do not match (`lhs` m x k, `rhs` k x n, `dst` m x n).
pub fn matmul(
    dst: &mut MatMut<'_>,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    beta: f32,
    par: Parallelism,
) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        lhs.rows == m && rhs.rows == k && rhs.cols == n,
        "matmul: [{m}, {n}] = [{}, {}] x [{}, {}]",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    // SAFETY: the views' constructors checked that every element they address lies in their
    // slices; `dst` borrows its elements uniquely, so it overlaps neither input nor another
    // thread's output.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.ld as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// As [`matmul`] (on one thread each), the columns cut into blocks that run as rayon tasks:
/// threads that fall behind (a core busy elsewhere) leave their blocks to the others, where
/// the gemm crate's own split hands each thread a fixed share and waits for the slowest.
/// Blocks are `block` columns wide, the last one taking the remainder (so `block` to
/// `2 * block - 1` wide). With `block` above 64 and `rhs` row-major (`[k, n]` at a row
/// stride, as the inference encoders store their weights), each element gets the bits
/// [`matmul`] gives it: the crate's k blocking depends on k, except for products at most
/// 64 wide and 64 tall, which no block is. (On a column-major `rhs`, two-row products came
/// out otherwise: `fetch_ml`'s checkpoint-layout path does not use this.)
pub fn matmul_column_tasks(
    dst: &mut MatMut<'_>,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    beta: f32,
    block: usize,
) {
    use rayon::prelude::*;
    let (m, n) = (dst.rows, dst.cols);
    assert!(
        lhs.rows == m && rhs.rows == lhs.cols && rhs.cols == n && block > 0,
        "matmul_column_tasks: [{m}, {n}] = [{}, {}] x [{}, {}] in blocks of {block}",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    let blocks = (n / block).max(1);
    let parts: Vec<(MatMut<'_>, MatRef<'_>)> = (0..blocks)
        .map(|b| {
            let c0 = b * block;
            let w = if b + 1 == blocks { n - c0 } else { block };
            // SAFETY: columns c0..c0 + w of dst's rows lie inside dst (c0 + w <= cols <= ld),
            // which this function borrows uniquely; the blocks' columns are disjoint.
            let d = unsafe { MatMut::from_raw(dst.ptr.add(c0), m, w, dst.ld) };
            let r = MatRef::new(&rhs.data[c0 * rhs.cs..], rhs.rows, w, rhs.rs, rhs.cs);
            (d, r)
        })
        .collect();
    parts
        .into_par_iter()
        .for_each(|(mut d, r)| matmul(&mut d, accumulate, lhs, r, beta, Parallelism::None));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Products on transposed and strided views against plain loops, with and without
    /// accumulation; views past their slices are refused.
    #[test]
    fn matmul_on_views_matches_loops() {
        let (m, n, k, ld) = (5, 7, 3, 9);
        let a: Vec<f32> = (0..m * ld).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * ld).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![1f32; m * ld];
        // c[:, 2..2+n] = 1 + 0.5 * a[:, ..k] * b[:, ..k]^T
        let mut dst = MatMut::rows(&mut c[2..], m, n, ld);
        let lhs = MatRef::rows(&a, m, k, ld);
        let rhs = MatRef::rows(&b, n, k, ld).t();
        matmul(&mut dst, true, lhs, rhs, 0.5, Parallelism::None);
        for i in 0..m {
            for j in 0..n {
                let want: f32 =
                    1.0 + 0.5 * (0..k).map(|t| a[i * ld + t] * b[j * ld + t]).sum::<f32>();
                assert!((c[i * ld + 2 + j] - want).abs() < 1e-6, "({i}, {j})");
            }
            assert_eq!(c[i * ld], 1.0, "columns outside the view untouched");
        }
        // The same product in column blocks of 3 (the last one 4 wide): the same bits.
        let mut c2 = vec![1f32; m * ld];
        let mut dst2 = MatMut::rows(&mut c2[2..], m, n, ld);
        matmul_column_tasks(&mut dst2, true, lhs, rhs, 0.5, 3);
        assert!(c.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()));
        let refused = std::panic::catch_unwind(|| MatRef::rows(&a, m + 1, k, ld));
        assert!(refused.is_err(), "a view past its slice");
    }
}
