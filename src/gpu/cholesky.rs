//! The block Cholesky routines of the GPU backend (twins of `src/cpu/linalg.rs`'s):
//! solve (x ← x A_dd⁻¹) and whitening (x ← x L_d⁻ᵀ) per diagonal block, with the typed
//! errors of a failed factor. Blocks ≤ [`SMALL_BLOCK_MAX`] run in the
//! `block_cholesky_solve_small_f64` kernel of `kernels/linalg.cu`; larger ones in
//! cuSOLVER potrf, then potrs or cuBLAS trsm (argument mappings in [`super::linalg`]).

use cudarc::cusolver::{sys as sol, DnHandle};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::geometry::{small_cholesky_launch, CHOL_MAX_ROW_GROUPS, CHOL_THREADS};
use super::linalg::{cholesky_block, col_major_whiten, sol_check, SMALL_BLOCK_MAX};
use super::{cuda_err, to_i32, CudaBackend};
use crate::backend::{check_len, Substitution};
use crate::error::LinalgError;
use crate::{Error, Result};

/// Block-diagonal SPD solve from the right, see
/// [`crate::backend::Backend::block_cholesky_solve_f64`]: for each diagonal block d of
/// `a` (n × n, n = blocks · bs), `rhs[:, d] ← rhs[:, d] · A_dd⁻¹`; `rhs` is nrhs × n.
///
/// bs ≤ 32: the `block_cholesky_solve_small_f64` kernel (factor in shared memory, one
/// thread per rhs row); larger blocks: cuSOLVER potrf + potrs per block. `a` is left
/// unchanged by the kernel and overwritten with the factors by cuSOLVER.
///
/// Errors: [`LinalgError::NotPositiveDefinite`] with the first failing block (pivot value
/// NaN on the cuSOLVER route, which does not report it); [`Error::Shape`] on lengths.
pub fn block_cholesky_solve_f64(
    be: &CudaBackend,
    solver: &DnHandle,
    a: &mut CudaSlice<f64>,
    blocks: usize,
    bs: usize,
    rhs: &mut CudaSlice<f64>,
    nrhs: usize,
) -> Result<()> {
    block_cholesky(
        be,
        solver,
        a,
        (blocks, bs),
        &mut [rhs],
        nrhs,
        Substitution::Inverse,
    )
}

/// Whitening by the block Cholesky factors, see
/// [`crate::backend::Backend::block_cholesky_whiten_f64`]: `x[:, d] ← x[:, d] · L_d⁻ᵀ`
/// and the same for `y` (nrhs × n each), A_dd = L_d L_dᵀ. Routes as
/// [`block_cholesky_solve_f64`]: the small-block kernel in mode 1 (once per matrix), or
/// cuSOLVER potrf then cuBLAS trsm per block and matrix ([`col_major_whiten`]).
///
/// Errors: as [`block_cholesky_solve_f64`]; on the cuSOLVER route `x` and `y` are then
/// unchanged (the factors are checked before any substitution), on the kernel route the
/// failing block's columns are (other blocks of `x` may have been whitened, `y` is
/// untouched).
#[allow(clippy::too_many_arguments)]
pub fn block_cholesky_whiten_f64(
    be: &CudaBackend,
    solver: &DnHandle,
    a: &mut CudaSlice<f64>,
    blocks: usize,
    bs: usize,
    x: &mut CudaSlice<f64>,
    y: &mut CudaSlice<f64>,
    nrhs: usize,
) -> Result<()> {
    block_cholesky(
        be,
        solver,
        a,
        (blocks, bs),
        &mut [x, y],
        nrhs,
        Substitution::Whiten,
    )
}

/// The two block Cholesky routines: `what` applied to every right-hand side in `rhs`
/// (nrhs × n each), with the factors of `a`'s diagonal blocks.
fn block_cholesky(
    be: &CudaBackend,
    solver: &DnHandle,
    a: &mut CudaSlice<f64>,
    (blocks, bs): (usize, usize),
    rhs: &mut [&mut CudaSlice<f64>],
    nrhs: usize,
    what: Substitution,
) -> Result<()> {
    let n = blocks * bs;
    check_len("block Cholesky matrix", a.len(), n * n)?;
    for r in rhs.iter() {
        check_len("block Cholesky right-hand sides", r.len(), nrhs * n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let n_i = to_i32("block Cholesky n", n)?;
    let nrhs_i = to_i32("block Cholesky nrhs", nrhs)?;
    let bs_i = to_i32("block Cholesky bs", bs)?;
    if bs <= SMALL_BLOCK_MAX {
        // The kernel leaves `a` unchanged (so each matrix refactors the same blocks) and
        // writes no row of a failing block; a failure stops before the next matrix.
        for r in rhs.iter_mut() {
            small_blocks(be, a, n_i, blocks, bs_i, r, nrhs_i, what)?;
        }
        Ok(())
    } else {
        // cuSOLVER's and cuBLAS's 32-bit entry points address a block (and the diagonal
        // copy the whole matrix) with int offsets up to n² − 1: J ≤ 46,340 for the
        // Tikhonov update's J × J system (the memory check refuses larger J first).
        to_i32("block Cholesky n² (cuSOLVER's 32-bit offsets)", n * n)?;
        cusolver_factor(be, solver, a, n_i, blocks, bs_i)?;
        for r in rhs.iter_mut() {
            cusolver_substitute(be, solver, a, n_i, blocks, bs_i, r, nrhs_i, what)?;
        }
        // One synchronization for every right-hand side: the stream orders them, and a
        // fault in any substitution surfaces here, before the caller reads a result.
        be.stream()
            .synchronize()
            .map_err(cuda_err("Cholesky substitution"))
    }
}

#[allow(clippy::too_many_arguments)]
fn small_blocks(
    be: &CudaBackend,
    a: &CudaSlice<f64>,
    n: i32,
    blocks: usize,
    bs: i32,
    rhs: &mut CudaSlice<f64>,
    nrhs: i32,
    what: Substitution,
) -> Result<()> {
    let cfg = small_cholesky_launch(blocks, nrhs as usize).ok_or_else(|| {
        Error::Config(format!(
            "block Cholesky: {nrhs} right-hand sides exceed the kernel's grid \
             (at most {})",
            CHOL_MAX_ROW_GROUPS * CHOL_THREADS
        ))
    })?;
    let stream = be.stream();
    let mut info = stream
        .alloc_zeros::<i32>(blocks)
        .map_err(cuda_err("allocating Cholesky info"))?;
    let mut bad = stream
        .alloc_zeros::<f64>(blocks)
        .map_err(cuda_err("allocating Cholesky pivots"))?;
    let mode = what as i32;
    let f = be.kernels().get("block_cholesky_solve_small_f64")?;
    let mut launch = stream.launch_builder(f);
    launch
        .arg(a)
        .arg(&n)
        .arg(&bs)
        .arg(rhs)
        .arg(&nrhs)
        .arg(&mut info)
        .arg(&mut bad)
        .arg(&mode);
    // SAFETY: the caller checked a = n² and rhs = nrhs·n elements with n = blocks·bs and
    // bs ≤ 32 (the kernel's shared tile); info and bad were allocated with `blocks`
    // entries, one per grid column; rows ≥ nrhs are skipped by the kernel; mode is 0 or 1.
    unsafe { launch.launch(cfg) }.map_err(cuda_err("launching block_cholesky_solve_small_f64"))?;
    let info_h = stream
        .clone_dtoh(&info)
        .map_err(cuda_err("reading Cholesky info"))?;
    let bad_h = stream
        .clone_dtoh(&bad)
        .map_err(cuda_err("reading Cholesky pivots"))?;
    stream.synchronize().map_err(cuda_err("Cholesky solve"))?;
    first_failure(&info_h, bs as usize, |d| bad_h[d])
}

/// The first block whose 1-based LAPACK-style `info` is non-zero, as an error.
fn first_failure(info: &[i32], bs: usize, value: impl Fn(usize) -> f64) -> Result<()> {
    match info.iter().position(|&i| i != 0) {
        None => Ok(()),
        Some(d) => Err(LinalgError::NotPositiveDefinite {
            block: d,
            size: bs,
            pivot: info[d].max(1) as usize - 1,
            value: value(d),
        }
        .into()),
    }
}

/// potrf on every diagonal block of `a` in place, then the failure checks: the first
/// block with `info ≠ 0`, or whose factor diagonal is not finite and positive
/// ([`first_bad_diagonal`]), as the typed error; no right-hand side is touched.
fn cusolver_factor(
    be: &CudaBackend,
    solver: &DnHandle,
    a: &mut CudaSlice<f64>,
    n: i32,
    blocks: usize,
    bs: i32,
) -> Result<()> {
    let stream = be.stream();
    let h = solver.cu();
    let mut info = stream
        .alloc_zeros::<i32>(blocks)
        .map_err(cuda_err("allocating cuSOLVER info"))?;
    let f8 = std::mem::size_of::<f64>() as u64;
    {
        let (a_ptr, _ga) = a.device_ptr_mut(stream);
        let mut lwork = 0i32;
        // SAFETY: a holds n² doubles (checked by the caller); the query reads no data.
        sol_check(
            unsafe {
                sol::cusolverDnDpotrf_bufferSize(
                    h,
                    cholesky_block(0, bs as usize, n as usize).uplo,
                    bs,
                    a_ptr as *mut f64,
                    n,
                    &mut lwork,
                )
            },
            "potrf_bufferSize",
        )?;
        let mut work = stream
            .alloc_zeros::<f64>(lwork.max(1) as usize)
            .map_err(cuda_err("allocating cuSOLVER workspace"))?;
        let (w_ptr, _gw) = work.device_ptr_mut(stream);
        let (i_ptr, _gi) = info.device_ptr_mut(stream);
        for d in 0..blocks {
            let c = cholesky_block(d, bs as usize, n as usize);
            let a_d = (a_ptr + c.a_offset as u64 * f8) as *mut f64;
            let info_d = (i_ptr + d as u64 * 4) as *mut i32;
            // SAFETY: block d lies inside a (d < blocks, n = blocks·bs, n² elements), the
            // workspace has the queried lwork doubles, info has `blocks` ints.
            sol_check(
                unsafe {
                    sol::cusolverDnDpotrf(h, c.uplo, bs, a_d, n, w_ptr as *mut f64, lwork, info_d)
                },
                "potrf",
            )?;
        }
    }
    let info_h = stream
        .clone_dtoh(&info)
        .map_err(cuda_err("reading cuSOLVER info"))?;
    let diag = factor_diagonal(be, a, n as usize)?;
    stream.synchronize().map_err(cuda_err("Cholesky factor"))?;
    first_failure(&info_h, bs as usize, |_| f64::NAN)?;
    first_bad_diagonal(&diag, bs as usize)
}

/// `what` with the factors [`cusolver_factor`] left in `a`, block by block: potrs
/// (inverse) or trsm with the arguments of [`col_major_whiten`] (whitening). Only
/// queues the work: the caller synchronizes once after the last right-hand side.
#[allow(clippy::too_many_arguments)]
fn cusolver_substitute(
    be: &CudaBackend,
    solver: &DnHandle,
    a: &CudaSlice<f64>,
    n: i32,
    blocks: usize,
    bs: i32,
    rhs: &mut CudaSlice<f64>,
    nrhs: i32,
    what: Substitution,
) -> Result<()> {
    if nrhs == 0 {
        return Ok(());
    }
    let stream = be.stream();
    let h = solver.cu();
    // potrs reports only invalid arguments in its info (never read: the arguments are
    // checked above); whitening needs none.
    let mut potrs_info = match what {
        Substitution::Inverse => Some(
            stream
                .alloc_zeros::<i32>(1)
                .map_err(cuda_err("allocating cuSOLVER info"))?,
        ),
        Substitution::Whiten => None,
    };
    let f8 = std::mem::size_of::<f64>() as u64;
    let one = 1.0f64;
    let t = col_major_whiten(bs as usize, n as usize, nrhs as usize);
    {
        let (a_ptr, _ga) = a.device_ptr(stream);
        let (pi_ptr, _gp) = match potrs_info.as_mut() {
            Some(info) => {
                let (p, g) = info.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (r_ptr, _gr) = rhs.device_ptr_mut(stream);
        for d in 0..blocks {
            let c = cholesky_block(d, bs as usize, n as usize);
            let a_d = (a_ptr + c.a_offset as u64 * f8) as *mut f64;
            let r_d = (r_ptr + c.b_offset as u64 * f8) as *mut f64;
            match what {
                // SAFETY: block d lies inside a; rhs holds nrhs·n doubles (checked), so
                // columns d·bs … d·bs+bs−1 of every row are inside it with ld n; in this
                // arm pi_ptr is the one-int info buffer allocated above.
                Substitution::Inverse => sol_check(
                    unsafe {
                        sol::cusolverDnDpotrs(
                            h,
                            c.uplo,
                            bs,
                            nrhs,
                            a_d,
                            n,
                            r_d,
                            n,
                            pi_ptr as *mut i32,
                        )
                    },
                    "potrs",
                )?,
                Substitution::Whiten => {
                    // SAFETY: as above, the extents trsm touches are M = bs rows of ld n
                    // from the block's offsets, N = nrhs columns; alpha is a host scalar.
                    unsafe {
                        cudarc::cublas::sys::cublasDtrsm_v2(
                            *be.blas.handle(),
                            t.side,
                            t.uplo,
                            t.trans,
                            t.diag,
                            t.m as i32,
                            t.n as i32,
                            &one,
                            a_d as *const f64,
                            t.lda as i32,
                            r_d,
                            t.ldb as i32,
                        )
                    }
                    .result()
                    .map_err(cuda_err("cublasDtrsm (whitening)"))?;
                }
            }
        }
    }
    Ok(())
}

/// The diagonal of the n × n matrix `a` (n doubles, to the host), copied by cuBLAS with
/// stride n + 1.
fn factor_diagonal(be: &CudaBackend, a: &CudaSlice<f64>, n: usize) -> Result<Vec<f64>> {
    let stream = be.stream();
    let mut diag = super::device_zeros::<f64>(stream, n)?;
    let n_i = to_i32("factor diagonal n", n)?;
    let stride = to_i32("factor diagonal stride", n + 1)?;
    {
        let (a_ptr, _ga) = a.device_ptr(stream);
        let (d_ptr, _gd) = diag.device_ptr_mut(stream);
        // SAFETY: a holds n² doubles, so the n entries at stride n + 1 (the last at
        // n² − 1) are inside it; diag holds n doubles; the handle is bound to `stream`.
        unsafe {
            cudarc::cublas::sys::cublasDcopy_v2(
                *be.blas.handle(),
                n_i,
                a_ptr as *const f64,
                stride,
                d_ptr as *mut f64,
                1,
            )
        }
        .result()
        .map_err(cuda_err("cublasDcopy (factor diagonal)"))?;
    }
    stream
        .clone_dtoh(&diag)
        .map_err(cuda_err("reading the factor diagonal"))
}

/// The first block of `bs` whose Cholesky factor diagonal (`diag`, all blocks in order)
/// holds a value that is not a finite positive number, as the typed error.
///
/// `cusolverDnDpotrf` documents `info > 0` only for a non-positive leading minor; a NaN
/// pivot (a NaN anywhere in the block's lower triangle reaches the diagonal through the
/// squares subtracted from it) may come back as success with NaN in the factor. The CPU
/// and the small-block kernel call that not positive definite, and so does this check,
/// before any solution is used.
pub fn first_bad_diagonal(diag: &[f64], bs: usize) -> Result<()> {
    match diag.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        None => Ok(()),
        Some(i) => Err(LinalgError::NotPositiveDefinite {
            block: i / bs.max(1),
            size: bs,
            pivot: i % bs.max(1),
            value: diag[i],
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of a `NotPositiveDefinite` error (block, size, pivot, value).
    fn npd(r: Result<()>) -> (usize, usize, usize, f64) {
        match r {
            Err(Error::Linalg(LinalgError::NotPositiveDefinite {
                block,
                size,
                pivot,
                value,
            })) => (block, size, pivot, value),
            other => panic!("expected NotPositiveDefinite, got {other:?}"),
        }
    }

    #[test]
    fn first_failure_reports_block_and_zero_based_pivot() {
        assert!(first_failure(&[0, 0, 0], 10, |_| 0.0).is_ok());
        assert_eq!(
            npd(first_failure(&[0, 3, 1], 10, |d| d as f64)),
            (1, 10, 2, 1.0)
        );
    }

    #[test]
    fn a_nan_or_non_positive_factor_diagonal_is_not_positive_definite() {
        assert!(first_bad_diagonal(&[1.0, 2.0, 0.5, 3.0], 2).is_ok());
        for (bad, at) in [(f64::NAN, 3), (f64::INFINITY, 2), (0.0, 1), (-1.0, 3)] {
            let mut d = vec![1.0, 2.0, 0.5, 3.0];
            d[at] = bad;
            let (block, size, pivot, value) = npd(first_bad_diagonal(&d, 2));
            assert_eq!((block, size, pivot), (at / 2, 2, at % 2), "{bad} at {at}");
            assert!(value.is_nan() == bad.is_nan() && (bad.is_nan() || value == bad));
        }
    }
}
