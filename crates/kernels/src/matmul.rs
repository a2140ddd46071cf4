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

/// (m, n, k) of `dst = lhs x rhs`; panics when the shapes do not match.
fn check_shapes(
    what: &str,
    dst: &MatMut<'_>,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
) -> (usize, usize, usize) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        lhs.rows == m && rhs.rows == k && rhs.cols == n,
        "{what}: [{m}, {n}] = [{}, {}] x [{}, {}]",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    (m, n, k)
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
    let (m, n, k) = check_shapes("matmul", dst, lhs, rhs);
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

/// As [`matmul`] (on one thread each), the columns cut into about `tasks` blocks that run as
/// rayon tasks: threads that fall behind (a core busy elsewhere) leave their blocks to the
/// others, where the gemm crate's own split hands each thread a fixed share and waits for the
/// slowest. Blocks are `ceil(n / tasks)` columns wide but at least [`MIN_BLOCK`], the last
/// one taking the remainder.
///
/// Each element gets the bits [`matmul`] gives it when `rhs` is row-major (`[k, n]` at a row
/// stride, as the inference encoders store their weights) and there are two rows or more
/// (one row takes the crate's matrix-vector path): the crate sums an element in k order, in
/// k blocks that depend on k alone, except in products at most 64 wide and 64 tall (which no
/// block is). On another layout, for an empty product, or when `n` makes fewer than two
/// blocks, this is plain [`matmul`], split over threads as [`parallelism`] says (on a
/// column-major `rhs` the crate takes other kernels for small products, and blocks would
/// change the bits).
pub fn matmul_column_tasks(
    dst: &mut MatMut<'_>,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    beta: f32,
    tasks: usize,
) {
    use rayon::prelude::*;
    let (m, n, k) = check_shapes("matmul_column_tasks", dst, lhs, rhs);
    let block = n.div_ceil(tasks.max(1)).max(MIN_BLOCK);
    if m == 0 || k == 0 || n < 2 * block || rhs.cs != 1 {
        let par = parallelism(m * n * k);
        return matmul(dst, accumulate, lhs, rhs, beta, par);
    }
    let blocks = n / block;
    let parts: Vec<(MatMut<'_>, MatRef<'_>)> = (0..blocks)
        .map(|b| {
            let c0 = b * block;
            let w = if b + 1 == blocks { n - c0 } else { block };
            // SAFETY: m > 0 and c0 + w <= n = cols <= ld, so columns c0..c0 + w of dst's m
            // rows lie inside the slice dst was made from (checked by its constructor); this
            // function borrows dst uniquely and the blocks' columns are disjoint.
            let d = unsafe { MatMut::from_raw(dst.ptr.add(c0), m, w, dst.ld) };
            // rhs has k > 0 rows and cs == 1: column c0 of row 0 is element c0 < n.
            let r = MatRef::new(&rhs.data[c0..], k, w, rhs.rs, 1);
            (d, r)
        })
        .collect();
    parts
        .into_par_iter()
        .for_each(|(mut d, r)| matmul(&mut d, accumulate, lhs, r, beta, Parallelism::None));
}

/// The narrowest block of [`matmul_column_tasks`]: above the 64 columns under which the gemm
/// crate blocks k by another rule.
pub const MIN_BLOCK: usize = 80;

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
        let refused = std::panic::catch_unwind(|| MatRef::rows(&a, m + 1, k, ld));
        assert!(refused.is_err(), "a view past its slice");
    }

    /// Column tasks on row-major weights against one product, at the shapes of real layers
    /// and at widths that are no multiple of a block, for row counts around the gemm crate's
    /// tile sizes, on a pool of two threads: the same bits.
    #[test]
    fn column_tasks_keep_the_bits_of_one_product() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let shapes = [
            (384, 384),
            (768, 3072),
            (3072, 768),
            (768, 6144),
            (768, 1000),
            (1000, 200),
        ];
        for (k, n) in shapes {
            let rows = 300;
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| (((i * 104729) % 977) as f32 / 488.0 - 1.0) * 0.05)
                .collect();
            for m in [2, 3, 7, 39, 64, 65, 200, 300] {
                let lhs = MatRef::rows(&x, m, k, k);
                let rhs = MatRef::rows(&w, k, n, n);
                let mut one = vec![0.5f32; m * n];
                matmul(
                    &mut MatMut::rows(&mut one, m, n, n),
                    true,
                    lhs,
                    rhs,
                    1.0,
                    Parallelism::Rayon(2),
                );
                for tasks in [1, 2, 4, 7] {
                    let mut split = vec![0.5f32; m * n];
                    pool.install(|| {
                        let mut d = MatMut::rows(&mut split, m, n, n);
                        matmul_column_tasks(&mut d, true, lhs, rhs, 1.0, tasks)
                    });
                    let same = one
                        .iter()
                        .zip(&split)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "k {k}, n {n}, {m} rows in {tasks} tasks: other bits");
                }
            }
        }
    }

    /// Column-major weights and empty products fall back to one `matmul`.
    #[test]
    fn column_tasks_fall_back_to_one_product() {
        let (m, k, n) = (5, 4, 300);
        let x: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.25).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32).collect();
        let (lhs, rhs) = (MatRef::rows(&x, m, k, k), MatRef::rows(&w, n, k, k).t());
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        matmul(
            &mut MatMut::rows(&mut a, m, n, n),
            false,
            lhs,
            rhs,
            1.0,
            Parallelism::None,
        );
        matmul_column_tasks(&mut MatMut::rows(&mut b, m, n, n), false, lhs, rhs, 1.0, 4);
        assert_eq!(a, b);
        let mut none: Vec<f32> = Vec::new();
        let empty = MatRef::rows(&x, 0, k, k);
        matmul_column_tasks(
            &mut MatMut::rows(&mut none, 0, n, n),
            false,
            empty,
            rhs,
            1.0,
            4,
        );
        let mut zero_k = vec![3f32; m * n];
        let (lhs0, rhs0) = (MatRef::rows(&x, m, 0, k), MatRef::rows(&w, 0, n, n));
        matmul_column_tasks(
            &mut MatMut::rows(&mut zero_k, m, n, n),
            true,
            lhs0,
            rhs0,
            1.0,
            4,
        );
        assert!(zero_k.iter().all(|&v| v == 3.0), "k = 0 adds nothing");
    }
}
