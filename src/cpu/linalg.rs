//! Dense linear algebra on the CPU (twins of the cuBLAS/cuSOLVER calls in
//! `src/gpu/linalg.rs` and `src/gpu/cholesky.rs`).
//!
//! Every matrix is row-major. The GEMMs go to a system BLAS when one is selected
//! (`cpu::blas`, `--blas`), else to the `gemm` crate, which takes arbitrary
//! row and column strides, so a transposed operand is the same buffer read with its
//! strides swapped (no copy). The small solves are written here in f64:
//!
//! - [`block_cholesky_solve_f64`]: Cholesky factor of each diagonal block (one thread
//!   per block), then the right-hand sides are solved in panels of [`PANEL`] rows: a
//!   panel is transposed into an n × [`PANEL`] scratch so that every factor row is read
//!   once per panel and the inner loop runs over [`PANEL`] independent rows (vectorises).
//!   Panels are spread over rayon threads.
//! - [`solve_unit_lower_right_f64`]: the same panel scheme on `x · T = b`.

use crate::backend::{check_len, Substitution, Trans};
use crate::error::LinalgError;
use crate::Result;
use rayon::prelude::*;

/// Right-hand-side rows solved together by one task of the triangular solves.
const PANEL: usize = 16;

/// Products with fewer multiply-adds than this run on the calling thread.
const GEMM_PARALLEL_MIN: usize = 1 << 18;

/// Row and column strides of `op(x)` for a row-major operand stored `rows × cols`
/// before `op` is applied: returns `(col_stride, row_stride)` of `op(x)`.
fn op_strides(t: Trans, stored_cols: usize) -> (isize, isize) {
    match t {
        // op(x) = x, stored row-major: next column +1, next row +stored_cols.
        Trans::No => (1, stored_cols as isize),
        // op(x) = xᵀ: op(x)[i][p] = x[p][i], next column +stored_cols, next row +1.
        Trans::Yes => (stored_cols as isize, 1),
    }
}

macro_rules! gemm_impl {
    ($name:ident, $t:ty, $blas:path, $doc:literal) => {
        #[doc = $doc]
        ///
        /// `c = alpha · op(a) · op(b) + beta · c` with `op(a)` m × k, `op(b)` k × n, `c`
        /// m × n, all row-major; `a` has m·k elements, `b` k·n, `c` m·n (any other length
        /// is [`crate::Error::Shape`]). With `beta = 0` the old `c` is never read (NaNs in
        /// it do not propagate).
        #[allow(clippy::too_many_arguments)]
        pub fn $name(
            ta: Trans,
            tb: Trans,
            m: usize,
            n: usize,
            k: usize,
            alpha: $t,
            a: &[$t],
            b: &[$t],
            beta: $t,
            c: &mut [$t],
        ) -> Result<()> {
            check_len(concat!(stringify!($name), " a"), a.len(), m * k)?;
            check_len(concat!(stringify!($name), " b"), b.len(), k * n)?;
            check_len(concat!(stringify!($name), " c"), c.len(), m * n)?;
            if m == 0 || n == 0 {
                return Ok(());
            }
            // A system BLAS when one is selected (`cpu::blas`).
            if $blas(ta, tb, (m, n, k), alpha, a, b, beta, c) {
                return Ok(());
            }
            // Stored column counts: a is m × k (No) or k × m (Yes); b is k × n or n × k.
            let (a_cs, a_rs) = op_strides(ta, if ta == Trans::No { k } else { m });
            let (b_cs, b_rs) = op_strides(tb, if tb == Trans::No { n } else { k });
            let par = if m.saturating_mul(n).saturating_mul(k) >= GEMM_PARALLEL_MIN {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: the lengths were checked above, so every index the strides can
            // produce (i < m, j < n, p < k) lies inside a, b and c; c is a unique borrow,
            // so it aliases neither a nor b. The crate computes
            // dst = alpha' · dst + beta' · lhs · rhs, hence alpha' = our beta and
            // beta' = our alpha; read_dst = false makes it ignore dst entirely.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    beta != 0.0,
                    a.as_ptr(),
                    a_cs,
                    a_rs,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    beta,
                    alpha,
                    false,
                    false,
                    false,
                    par,
                );
            }
            Ok(())
        }
    };
}

gemm_impl!(
    gemm_f32,
    f32,
    crate::cpu::blas::sgemm,
    "Row-major f32 GEMM, see [`crate::backend::Backend::gemm_f32`]."
);
gemm_impl!(
    gemm_f64,
    f64,
    crate::cpu::blas::dgemm,
    "Row-major f64 GEMM, see [`crate::backend::Backend::gemm_f64`]."
);

/// Adds `shift` to the diagonal of the n × n matrix `a` (`a` must have n² elements).
pub fn add_diagonal_f64(a: &mut [f64], n: usize, shift: f64) -> Result<()> {
    check_len("add_diagonal_f64 a", a.len(), n * n)?;
    for i in 0..n {
        a[i * n + i] += shift;
    }
    Ok(())
}

/// A Cholesky factor L and its transpose Lᵀ (bs × bs each, row-major).
type Factor = (Vec<f64>, Vec<f64>);

/// Cholesky factor of one bs × bs block, read from rows `r0..r0+bs`, columns
/// `r0..r0+bs` of the n × n matrix `a` (lower triangle only).
///
/// Returns `(l, lt)`: L and Lᵀ, both bs × bs row-major with zeros outside their
/// triangles, so that both substitutions read contiguous rows.
fn cholesky_block(
    a: &[f64],
    n: usize,
    r0: usize,
    bs: usize,
    block: usize,
) -> Result<Factor, LinalgError> {
    let mut l = vec![0.0f64; bs * bs];
    for i in 0..bs {
        for j in 0..=i {
            let (li, lj) = (&l[i * bs..i * bs + j], &l[j * bs..j * bs + j]);
            let s = a[(r0 + i) * n + r0 + j] - dot(li, lj);
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return Err(LinalgError::NotPositiveDefinite {
                        block,
                        size: bs,
                        pivot: i,
                        value: s,
                    });
                }
                l[i * bs + i] = s.sqrt();
            } else {
                l[i * bs + j] = s / l[j * bs + j];
            }
        }
    }
    let mut lt = vec![0.0f64; bs * bs];
    for i in 0..bs {
        for j in 0..=i {
            lt[j * bs + i] = l[i * bs + j];
        }
    }
    Ok((l, lt))
}

/// Dot product with four independent accumulators (lets the compiler vectorise).
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (xc, yc) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail: f64 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for q in 0..4 {
            acc[q] += a[q] * b[q];
        }
    }
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

/// Forward substitution on a panel: solves `L z = x` in place, where `l` is
/// n × n lower triangular (row-major) and `x` holds n rows of [`PANEL`] independent
/// right-hand sides. `unit` takes the diagonal as 1.
fn panel_forward(l: &[f64], n: usize, x: &mut [[f64; PANEL]], unit: bool) {
    for i in 0..n {
        let (done, rest) = x.split_at_mut(i);
        let mut acc = rest[0];
        let row = &l[i * n..i * n + i];
        for (&lij, xj) in row.iter().zip(done.iter()) {
            for r in 0..PANEL {
                acc[r] -= lij * xj[r];
            }
        }
        if !unit {
            let d = l[i * n + i];
            for v in &mut acc {
                *v /= d;
            }
        }
        rest[0] = acc;
    }
}

/// Back substitution on a panel: solves `U z = x` in place, where `u` is n × n upper
/// triangular (row-major); otherwise as [`panel_forward`].
fn panel_backward(u: &[f64], n: usize, x: &mut [[f64; PANEL]], unit: bool) {
    for i in (0..n).rev() {
        let (head, done) = x.split_at_mut(i + 1);
        let mut acc = head[i];
        let row = &u[i * n + i + 1..(i + 1) * n];
        for (&uij, xj) in row.iter().zip(done.iter()) {
            for r in 0..PANEL {
                acc[r] -= uij * xj[r];
            }
        }
        if !unit {
            let d = u[i * n + i];
            for v in &mut acc {
                *v /= d;
            }
        }
        head[i] = acc;
    }
}

/// Copies columns `c0..c0+w` of the rows of `chunk` (each `stride` long) into the
/// transposed panel `x` (w × [`PANEL`]); missing rows are zero.
fn gather(chunk: &[f64], stride: usize, c0: usize, x: &mut [[f64; PANEL]]) {
    for v in x.iter_mut() {
        *v = [0.0; PANEL];
    }
    for (r, row) in chunk.chunks_exact(stride).enumerate() {
        for (xi, &v) in x.iter_mut().zip(&row[c0..]) {
            xi[r] = v;
        }
    }
}

/// Inverse of [`gather`].
fn scatter(x: &[[f64; PANEL]], chunk: &mut [f64], stride: usize, c0: usize) {
    let w = x.len();
    for (r, row) in chunk.chunks_exact_mut(stride).enumerate() {
        for (dst, xi) in row[c0..c0 + w].iter_mut().zip(x) {
            *dst = xi[r];
        }
    }
}

/// Block-diagonal SPD solve from the right, see
/// [`crate::backend::Backend::block_cholesky_solve_f64`].
///
/// `a`: n × n with n = `blocks · bs`, only the lower triangles of its diagonal blocks
/// are read (it is left unchanged). `rhs`: `nrhs` × n, row r block d overwritten with
/// `rhs[r, d] · A_dd⁻¹`. Cost: bs³/3 per block for the factors, 2·bs²·nrhs per block
/// for the solves (the latter dominates for bs = 640, nrhs = 1000).
///
/// Errors: [`crate::Error::Shape`] on wrong lengths or `bs = 0` with `blocks > 0`;
/// [`LinalgError::NotPositiveDefinite`] with the lowest failing block (a NaN pivot
/// counts as failing). `rhs` is untouched when an error is returned.
pub fn block_cholesky_solve_f64(
    a: &mut [f64],
    blocks: usize,
    bs: usize,
    rhs: &mut [f64],
    nrhs: usize,
) -> Result<()> {
    check_len(
        "block_cholesky_solve_f64 a",
        a.len(),
        blocks * bs * blocks * bs,
    )?;
    check_len(
        "block_cholesky_solve_f64 rhs",
        rhs.len(),
        nrhs * blocks * bs,
    )?;
    let fac = block_factors(a, blocks, bs)?;
    substitute(&fac, blocks * bs, rhs, Substitution::Inverse);
    Ok(())
}

/// Whitening by the block Cholesky factors, see
/// [`crate::backend::Backend::block_cholesky_whiten_f64`]: with A_dd = L_d L_dᵀ, every
/// row of `x` and of `y` (`nrhs` × n each) becomes `row[d] · L_d⁻ᵀ` block by block (the
/// forward half of [`block_cholesky_solve_f64`]; `a` is read as there and left
/// unchanged). Cost: bs²·nrhs per block and matrix.
///
/// Errors: as [`block_cholesky_solve_f64`]; `x` and `y` are untouched then.
pub fn block_cholesky_whiten_f64(
    a: &mut [f64],
    blocks: usize,
    bs: usize,
    x: &mut [f64],
    y: &mut [f64],
    nrhs: usize,
) -> Result<()> {
    let n = blocks * bs;
    check_len("block_cholesky_whiten_f64 a", a.len(), n * n)?;
    check_len("block_cholesky_whiten_f64 x", x.len(), nrhs * n)?;
    check_len("block_cholesky_whiten_f64 y", y.len(), nrhs * n)?;
    let fac = block_factors(a, blocks, bs)?;
    substitute(&fac, n, x, Substitution::Whiten);
    substitute(&fac, n, y, Substitution::Whiten);
    Ok(())
}

/// The block Cholesky factors of the n × n matrix `a` (n = `blocks · bs`, its diagonal
/// blocks' lower triangles), one rayon task per block. Errors: the lowest failing block.
fn block_factors(a: &[f64], blocks: usize, bs: usize) -> Result<Vec<Factor>> {
    let n = blocks * bs;
    let factors: Vec<Result<Factor, LinalgError>> = (0..blocks)
        .into_par_iter()
        .map(|d| cholesky_block(a, n, d * bs, bs, d))
        .collect();
    let mut fac = Vec::with_capacity(blocks);
    for f in factors {
        fac.push(f?);
    }
    Ok(fac)
}

/// Applies `what` to every block of every row of `rhs` (rows of n), in panels of
/// [`PANEL`] rows spread over rayon threads.
fn substitute(fac: &[Factor], n: usize, rhs: &mut [f64], what: Substitution) {
    if n == 0 || rhs.is_empty() {
        return;
    }
    let bs = n / fac.len().max(1);
    rhs.par_chunks_mut(PANEL * n).for_each(|chunk| {
        let mut x = vec![[0.0f64; PANEL]; bs];
        for (d, (l, lt)) in fac.iter().enumerate() {
            gather(chunk, n, d * bs, &mut x);
            panel_forward(l, bs, &mut x, false);
            if what == Substitution::Inverse {
                panel_backward(lt, bs, &mut x, false);
            }
            scatter(&x, chunk, n, d * bs);
        }
    });
}

/// Replaces the n × n matrix `a` by `I − S(a)`, S keeping only the strictly
/// block-lower part (block row d, block column e, e < d, block size `bs`). See
/// [`crate::backend::Backend::unit_block_lower_f64`].
///
/// Errors: [`crate::Error::Shape`] on a wrong length, or if `bs` is 0 or does not divide n.
pub fn unit_block_lower_f64(a: &mut [f64], n: usize, bs: usize) -> Result<()> {
    check_len("unit_block_lower_f64 a", a.len(), n * n)?;
    if n > 0 && (bs == 0 || !n.is_multiple_of(bs)) {
        return Err(crate::Error::Shape {
            what: "unit_block_lower_f64 block size".into(),
            expected: format!("a positive divisor of n = {n}"),
            found: format!("{bs}"),
        });
    }
    a.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        // Columns before this row's block start stay (negated); the rest become I.
        let start = (i / bs.max(1)) * bs;
        for v in &mut row[..start] {
            *v = -*v;
        }
        for v in &mut row[start..] {
            *v = 0.0;
        }
        row[i] = 1.0;
    });
    Ok(())
}

/// Solves `x · T = b` in place (`b`: rows × n, overwritten with x; `t`: n × n unit lower
/// triangular, its diagonal taken as 1, entries above it ignored). See
/// [`crate::backend::Backend::solve_unit_lower_right_f64`].
///
/// Column k of `x · T = b` reads `x_k + Σ_{i>k} x_i T_ik = b_k`, so x is found from the
/// last column down; that is `Tᵀ xᵀ = bᵀ`, a back substitution with Tᵀ, which is formed
/// once (n² copies) so that its rows are contiguous. Cost n²·rows multiply-adds.
///
/// Errors: [`crate::Error::Shape`] on wrong lengths.
pub fn solve_unit_lower_right_f64(t: &[f64], n: usize, b: &mut [f64], rows: usize) -> Result<()> {
    check_len("solve_unit_lower_right_f64 t", t.len(), n * n)?;
    check_len("solve_unit_lower_right_f64 b", b.len(), rows * n)?;
    if n == 0 || rows == 0 {
        return Ok(());
    }
    // tt = Tᵀ restricted to its strict upper part (the diagonal is implicit).
    let mut tt = vec![0.0f64; n * n];
    for i in 0..n {
        for k in 0..i {
            tt[k * n + i] = t[i * n + k];
        }
    }
    b.par_chunks_mut(PANEL * n).for_each(|chunk| {
        let mut x = vec![[0.0f64; PANEL]; n];
        gather(chunk, n, 0, &mut x);
        panel_backward(&tt, n, &mut x, true);
        scatter(&x, chunk, n, 0);
    });
    Ok(())
}
