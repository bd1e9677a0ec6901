//! Matrix products into caller-owned buffers, on the `gemm` crate (the
//! kernels candle itself uses on CPU), without candle's per-call output
//! allocation and zero fill.

use gemm::Parallelism;

/// A read-only row-major matrix, or its transpose, over a slice.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// The `rows x cols` row-major matrix at the start of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(
            data.len() >= rows * cols,
            "matrix needs {rows}x{cols} values"
        );
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose (a view: nothing is copied).
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `dst = lhs · rhs`, where `dst` is row-major `lhs.rows x rhs.cols`;
/// `dst`'s previous contents are ignored. `threads > 1` splits the work over
/// the global rayon pool.
pub fn matmul(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, threads: usize) {
    gemm_strided(dst, (rhs.cols, 1), lhs, rhs, threads)
}

/// `dst = lhs · rhs` with `dst`'s (row, column) strides given.
fn gemm_strided(
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    threads: usize,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "inner dimensions differ");
    assert!(dst.len() >= m * n, "destination needs {m}x{n} values");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above (and in `MatRef::new`, whose strides are
    // those of a row-major matrix or its transpose) keep every index that
    // gemm touches, (rows - 1) * row_stride + (cols - 1) * col_stride, inside
    // its slice; `dst` is exclusively borrowed and does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            false,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn products_and_transposes_match_a_naive_f64_product() {
        let (m, k, n) = (37, 53, 29);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let a64: Vec<f64> = a.iter().map(|&v| v.into()).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v.into()).collect();
        let want = naive(&a64, &b64, m, k, n);
        // The same product through every combination of transposed storage.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        for threads in [1, 2] {
            for (lhs, rhs) in [
                (MatRef::new(&a, m, k), MatRef::new(&b, k, n)),
                (MatRef::new(&at, k, m).t(), MatRef::new(&b, k, n)),
                (MatRef::new(&a, m, k), MatRef::new(&bt, n, k).t()),
                (MatRef::new(&at, k, m).t(), MatRef::new(&bt, n, k).t()),
            ] {
                let mut dst = vec![f32::NAN; m * n];
                matmul(&mut dst, lhs, rhs, threads);
                for (g, w) in dst.iter().zip(&want) {
                    assert!((f64::from(*g) - w).abs() < 1e-4, "{g} vs {w}");
                }
            }
        }
    }
}
