//! Dense linear algebra on the CPU (twins of the cuBLAS/cuSOLVER calls in `src/gpu/linalg.rs`).
//! TODO(helper): implement.

use crate::backend::Trans;
use crate::Result;

/// Row-major f32 GEMM, see [`crate::backend::Backend::gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    _ta: Trans,
    _tb: Trans,
    _m: usize,
    _n: usize,
    _k: usize,
    _alpha: f32,
    _a: &[f32],
    _b: &[f32],
    _beta: f32,
    _c: &mut [f32],
) -> Result<()> {
    todo!()
}

/// Row-major f64 GEMM, see [`crate::backend::Backend::gemm_f64`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_f64(
    _ta: Trans,
    _tb: Trans,
    _m: usize,
    _n: usize,
    _k: usize,
    _alpha: f64,
    _a: &[f64],
    _b: &[f64],
    _beta: f64,
    _c: &mut [f64],
) -> Result<()> {
    todo!()
}

/// See [`crate::backend::Backend::add_diagonal_f64`].
pub fn add_diagonal_f64(_a: &mut [f64], _n: usize, _shift: f64) -> Result<()> {
    todo!()
}

/// See [`crate::backend::Backend::block_cholesky_solve_f64`].
pub fn block_cholesky_solve_f64(
    _a: &mut [f64],
    _blocks: usize,
    _bs: usize,
    _rhs: &mut [f64],
    _nrhs: usize,
) -> Result<()> {
    todo!()
}

/// See [`crate::backend::Backend::unit_block_lower_f64`].
pub fn unit_block_lower_f64(_a: &mut [f64], _n: usize, _bs: usize) -> Result<()> {
    todo!()
}

/// See [`crate::backend::Backend::solve_unit_lower_right_f64`].
pub fn solve_unit_lower_right_f64(
    _t: &[f64],
    _n: usize,
    _b: &mut [f64],
    _rows: usize,
) -> Result<()> {
    todo!()
}
