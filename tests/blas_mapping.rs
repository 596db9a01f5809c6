//! The row-major → column-major argument mappings of the cuBLAS/cuSOLVER calls
//! (`gpu::linalg::{col_major_gemm, col_major_unit_lower_right, cholesky_block,
//! col_major_whiten}`), run
//! through plain column-major reference implementations of GEMM, TRSM, POTRF and POTRS
//! written from the BLAS/LAPACK definitions, against the CPU backend's row-major
//! operations. The libraries themselves need a GPU (`tests/gpu_twins.rs`); what is
//! checked here, everywhere, is that the arguments handed to them describe the
//! computation the `Backend` contract asks for.

mod common;
use common::assert_close;
use common::twins::{cholesky_inputs, normals, unit_lower_inputs};

use cudarc::cublas::sys::{
    cublasDiagType_t, cublasFillMode_t, cublasOperation_t, cublasSideMode_t,
};
use cudarc::cusolver::sys as sol;
use enkf_dnn::backend::{Backend, Trans};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::gpu::linalg::{
    cholesky_block, col_major_gemm, col_major_unit_lower_right, col_major_whiten,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Reference results and mapped results are both f64 evaluations of the same sums in
/// different orders: ≤ k·eps64 relative to the sum of |terms| (k ≤ 60 here), and the
/// solves are well conditioned (cond ≲ 10). 1e-12 leaves ≥ 10× margin; a wrong
/// transpose, leading dimension or triangle changes results by O(1).
const MAP_TOL: f64 = 1e-12;

/// Column-major `c = alpha·op(a)·op(b) + beta·c` (BLAS dgemm), with offsets into the
/// buffers for the operands.
#[allow(clippy::too_many_arguments)]
fn dgemm(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    beta: f64,
    c: &mut [f64],
    ldc: usize,
) {
    let at = |i: usize, l: usize| match ta {
        Trans::No => a[i + l * lda],
        Trans::Yes => a[l + i * lda],
    };
    let bt = |l: usize, j: usize| match tb {
        Trans::No => b[l + j * ldb],
        Trans::Yes => b[j + l * ldb],
    };
    for j in 0..n {
        for i in 0..m {
            let s: f64 = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            c[i + j * ldc] = alpha * s + beta * c[i + j * ldc];
        }
    }
}

/// Column-major `op(A)·X = B` for a triangular M × M matrix A from the left (BLAS dtrsm
/// with side LEFT and alpha 1): the combinations the backend uses, others panic.
#[allow(clippy::too_many_arguments)]
fn dtrsm_left(
    uplo: cublasFillMode_t,
    trans: cublasOperation_t,
    diag: cublasDiagType_t,
    m: usize,
    n: usize,
    a: &[f64],
    lda: usize,
    b: &mut [f64],
    ldb: usize,
) {
    assert_eq!(
        trans,
        cublasOperation_t::CUBLAS_OP_N,
        "only op N is modelled"
    );
    let d = |i: usize| match diag {
        cublasDiagType_t::CUBLAS_DIAG_UNIT => 1.0,
        _ => a[i + i * lda],
    };
    for j in 0..n {
        let col = &mut b[j * ldb..j * ldb + m];
        match uplo {
            cublasFillMode_t::CUBLAS_FILL_MODE_UPPER => {
                for i in (0..m).rev() {
                    let s: f64 = (i + 1..m).map(|l| a[i + l * lda] * col[l]).sum();
                    col[i] = (col[i] - s) / d(i);
                }
            }
            _ => {
                for i in 0..m {
                    let s: f64 = (0..i).map(|l| a[i + l * lda] * col[l]).sum();
                    col[i] = (col[i] - s) / d(i);
                }
            }
        }
    }
}

/// Column-major Cholesky of the n × n matrix at `a` (ld lda), in the triangle `uplo`
/// (LAPACK dpotrf): lower A = L·Lᵀ, upper A = Uᵀ·U. The other triangle is not read.
fn dpotrf(uplo: sol::cublasFillMode_t, n: usize, a: &mut [f64], lda: usize) {
    let lower = uplo == sol::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    // (i, j) with i ≥ j of the factor's triangle, as an index into a.
    let ix = |i: usize, j: usize| if lower { i + j * lda } else { j + i * lda };
    for j in 0..n {
        let s: f64 = (0..j).map(|l| a[ix(j, l)] * a[ix(j, l)]).sum();
        let p = a[ix(j, j)] - s;
        assert!(p > 0.0, "test matrices are SPD");
        a[ix(j, j)] = p.sqrt();
        for i in j + 1..n {
            let s: f64 = (0..j).map(|l| a[ix(i, l)] * a[ix(j, l)]).sum();
            a[ix(i, j)] = (a[ix(i, j)] - s) / a[ix(j, j)];
        }
    }
}

/// Column-major solve A·X = B from a [`dpotrf`] factor (LAPACK dpotrs), B n × nrhs.
#[allow(clippy::too_many_arguments)]
fn dpotrs(
    uplo: sol::cublasFillMode_t,
    n: usize,
    nrhs: usize,
    a: &[f64],
    lda: usize,
    b: &mut [f64],
    ldb: usize,
) {
    let lower = uplo == sol::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let f = |i: usize, j: usize| {
        if lower {
            a[i + j * lda]
        } else {
            a[j + i * lda]
        }
    };
    for j in 0..nrhs {
        let col = &mut b[j * ldb..j * ldb + n];
        for i in 0..n {
            let s: f64 = (0..i).map(|l| f(i, l) * col[l]).sum();
            col[i] = (col[i] - s) / f(i, i);
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|l| f(l, i) * col[l]).sum();
            col[i] = (col[i] - s) / f(i, i);
        }
    }
}

/// Runs [`dpotrf`]/[`dpotrs`] on every diagonal block at the offsets of
/// [`cholesky_block`] (right-hand-side leading dimension `ldb`), as `cusolver_blocks`
/// calls cuSOLVER; returns the solved right-hand sides.
fn mapped_cholesky(
    a: &[f64],
    rhs: &[f64],
    blocks: usize,
    bs: usize,
    nrhs: usize,
    ldb: usize,
) -> Vec<f64> {
    let n = blocks * bs;
    let (mut a, mut b) = (a.to_vec(), rhs.to_vec());
    for d in 0..blocks {
        let c = cholesky_block(d, bs, n);
        dpotrf(c.uplo, bs, &mut a[c.a_offset..], n);
        dpotrs(
            c.uplo,
            bs,
            nrhs,
            &a[c.a_offset..],
            n,
            &mut b[c.b_offset..],
            ldb,
        );
    }
    b
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn gemm_arguments_compute_the_row_major_product() {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (alpha, beta) = (0.7, -0.3);
    for (m, n, k) in [(7, 11, 13), (1, 9, 4), (12, 1, 60), (5, 6, 1)] {
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let a = normals(&mut rng, m * k, 1.0);
                let b = normals(&mut rng, k * n, 1.0);
                let c = normals(&mut rng, m * n, 1.0);
                let mut want = c.clone();
                cpu.gemm_f64(ta, tb, m, n, k, alpha, &a, &b, beta, &mut want)
                    .unwrap();
                let g = col_major_gemm(ta, tb, m, n, k);
                let mut got = c.clone();
                // cuBLAS's first operand is the row-major b, its second the row-major a.
                dgemm(
                    g.transa, g.transb, g.m, g.n, g.k, alpha, &b, g.lda, &a, g.ldb, beta, &mut got,
                    g.ldc,
                );
                let scale = k as f64 * max_abs(&a) * max_abs(&b) + max_abs(&c);
                assert_close(
                    &format!("gemm {ta:?}/{tb:?} m={m} n={n} k={k}"),
                    &got,
                    &want,
                    MAP_TOL * scale,
                    0.0,
                );
            }
        }
    }
}

#[test]
fn trsm_arguments_solve_the_row_major_unit_lower_system() {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (n, rows) = (30, 17);
    let (t, b) = unit_lower_inputs(&mut rng, n, rows);
    let mut want = b.clone();
    cpu.solve_unit_lower_right_f64(&t, n, &mut want, rows)
        .unwrap();
    let s = col_major_unit_lower_right(n, rows);
    assert_eq!(
        s.side,
        cublasSideMode_t::CUBLAS_SIDE_LEFT,
        "only LEFT is modelled"
    );
    let mut got = b.clone();
    dtrsm_left(
        s.uplo, s.trans, s.diag, s.m, s.n, &t, s.lda, &mut got, s.ldb,
    );
    assert_close("trsm", &got, &want, MAP_TOL * max_abs(&want), 0.0);
}

#[test]
fn cholesky_block_arguments_solve_each_diagonal_block() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (blocks, bs, nrhs) in [(3, 40, 20), (1, 50, 7), (4, 33, 1)] {
        let n = blocks * bs;
        let (a, rhs, want) = cholesky_inputs(&mut rng, blocks, bs, nrhs);
        let got = mapped_cholesky(&a, &rhs, blocks, bs, nrhs, n);
        assert_close(
            &format!("cholesky blocks={blocks} bs={bs} nrhs={nrhs}"),
            &got,
            &want,
            MAP_TOL * max_abs(&want),
            0.0,
        );
    }
}

/// The whitening route: potrf at [`cholesky_block`]'s offsets, then trsm per block with
/// [`col_major_whiten`]'s arguments, as `cusolver_substitute` calls them, against the
/// CPU backend's `rhs · L_d⁻ᵀ`.
#[test]
fn whitening_arguments_apply_each_blocks_inverse_transposed_factor() {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (blocks, bs, nrhs) in [(3, 40, 20), (1, 50, 7), (4, 33, 1)] {
        let n = blocks * bs;
        let (a, rhs, _) = cholesky_inputs(&mut rng, blocks, bs, nrhs);
        let (mut ac, mut want, mut other) = (a.clone(), rhs.clone(), rhs.clone());
        cpu.block_cholesky_whiten_f64(&mut ac, blocks, bs, &mut want, &mut other, nrhs)
            .unwrap();
        let (mut af, mut got) = (a.clone(), rhs.clone());
        for d in 0..blocks {
            let c = cholesky_block(d, bs, n);
            dpotrf(c.uplo, bs, &mut af[c.a_offset..], n);
            let t = col_major_whiten(bs, n, nrhs);
            assert_eq!(
                t.side,
                cublasSideMode_t::CUBLAS_SIDE_LEFT,
                "only LEFT is modelled"
            );
            dtrsm_left(
                t.uplo,
                t.trans,
                t.diag,
                t.m,
                t.n,
                &af[c.a_offset..],
                t.lda,
                &mut got[c.b_offset..],
                t.ldb,
            );
        }
        assert_close(
            &format!("whiten blocks={blocks} bs={bs} nrhs={nrhs}"),
            &got,
            &want,
            MAP_TOL * max_abs(&want),
            0.0,
        );
    }
}

/// The references themselves: a wrong mapping must fail (operands in row-major order;
/// a packed leading dimension for the right-hand sides), so the tests above can fail.
#[test]
fn reference_routines_reject_wrong_mappings() {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // Square, so that the wrong call stays inside the buffers.
    let (m, n, k) = (6, 6, 6);
    let a = normals(&mut rng, m * k, 1.0);
    let b = normals(&mut rng, k * n, 1.0);
    let mut want = vec![0.0; m * n];
    cpu.gemm_f64(Trans::No, Trans::No, m, n, k, 1.0, &a, &b, 0.0, &mut want)
        .unwrap();
    let g = col_major_gemm(Trans::No, Trans::No, m, n, k);
    let mut got = vec![0.0; m * n];
    dgemm(
        g.transa, g.transb, g.m, g.n, g.k, 1.0, &a, g.lda, &b, g.ldb, 0.0, &mut got, g.ldc,
    );
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |e, (x, y)| e.max((x - y).abs()));
    assert!(err > 0.1, "swapped operands went unnoticed (error {err})");

    let (blocks, bs, nrhs) = (2, 6, 3);
    let (a, rhs, want) = cholesky_inputs(&mut rng, blocks, bs, nrhs);
    // A packed leading dimension (bs) for the right-hand sides instead of n.
    let got = mapped_cholesky(&a, &rhs, blocks, bs, nrhs, bs);
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |e, (x, y)| e.max((x - y).abs()));
    assert!(
        err > 0.1,
        "a packed leading dimension went unnoticed (error {err})"
    );
}
