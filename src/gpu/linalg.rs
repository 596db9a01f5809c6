//! Dense linear algebra on the GPU (twin of `src/cpu/linalg.rs`): the one row-major GEMM
//! helper over cuBLAS, the Cholesky solves (cuSOLVER for large blocks, a kernel of
//! `kernels/linalg.cu` for blocks ≤ 32), the unit-lower solve (cuBLAS trsm) and the small
//! element-wise kernels. All raw cuBLAS/cuSOLVER FFI of the crate is in this file.
//!
//! Row-major vs column-major, once: a row-major r × c matrix with leading dimension c is,
//! read by a column-major library, the c × r matrix of its transpose (leading dimension c).

use cudarc::cublas::sys::{
    cublasDiagType_t, cublasFillMode_t, cublasMath_t, cublasOperation_t, cublasSideMode_t,
};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::cusolver::{sys as sol, DnHandle};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::geometry::{
    add_diagonal_launch, elementwise_stride_launch, small_cholesky_launch, CHOL_MAX_ROW_GROUPS,
    CHOL_THREADS,
};
use super::{cuda_err, to_i32, CudaBackend};
use crate::backend::{check_len, MathMode, Substitution, Trans};
use crate::error::LinalgError;
use crate::{Error, Result};

/// Largest block size handled by `block_cholesky_solve_small_f64` (its shared tile).
pub const SMALL_BLOCK_MAX: usize = 32;

/// Sets the cuBLAS math mode: TF32 tensor cores for SGEMM under [`MathMode::Tf32`], the
/// default (strict FP32; DGEMM is unaffected either way) under [`MathMode::Fp32`].
///
/// Errors: [`Error::Cuda`] when cuBLAS refuses.
pub(crate) fn set_math_mode(blas: &CudaBlas, math: MathMode) -> Result<()> {
    let mode = match math {
        MathMode::Fp32 => cublasMath_t::CUBLAS_DEFAULT_MATH,
        MathMode::Tf32 => cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
    };
    // SAFETY: the handle is valid for the life of `blas`; the call only sets a flag.
    unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }
        .result()
        .map_err(cuda_err("cublasSetMathMode"))
}

/// cuBLAS and cuSOLVER versions (e.g. 130001, 12000), 0 where the query fails.
pub(crate) fn library_versions(blas: &CudaBlas) -> (i32, i32) {
    let (mut b, mut s) = (0i32, 0i32);
    // SAFETY: each call writes one int; the libraries are loaded (the handles exist).
    unsafe {
        let _ = cudarc::cublas::sys::cublasGetVersion_v2(*blas.handle(), &mut b);
        let _ = sol::cusolverGetVersion(&mut s);
    }
    (b, s)
}

fn op(t: Trans) -> cublasOperation_t {
    match t {
        Trans::No => cublasOperation_t::CUBLAS_OP_N,
        Trans::Yes => cublasOperation_t::CUBLAS_OP_T,
    }
}

/// The column-major (cuBLAS) arguments of a row-major GEMM, see [`col_major_gemm`].
/// cuBLAS's first operand is the row-major `b`, its second the row-major `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColMajorGemm {
    /// Operation on cuBLAS's first operand (the row-major `b`).
    pub transa: Trans,
    /// Operation on cuBLAS's second operand (the row-major `a`).
    pub transb: Trans,
    /// cuBLAS M, N, K.
    pub m: usize,
    /// cuBLAS N.
    pub n: usize,
    /// cuBLAS K.
    pub k: usize,
    /// Leading dimension of cuBLAS's first operand (`b`).
    pub lda: usize,
    /// Leading dimension of cuBLAS's second operand (`a`).
    pub ldb: usize,
    /// Leading dimension of c.
    pub ldc: usize,
}

/// Maps the row-major GEMM `c (m × n) = op(a) (m × k) · op(b) (k × n)` to cuBLAS.
///
/// Row-major c (m × n) is column-major cᵀ (n × m, ldc = n), and cᵀ = op(b)ᵀ · op(a)ᵀ.
/// Row-major b stored k × n (`No`) is column-major n × k = op(b)ᵀ with ld n, so cuBLAS
/// gets `b` first with its own flag and ld = n (`No`) or k (`Yes`, stored n × k);
/// likewise `a` second with ld = k (`No`, stored m × k) or m (`Yes`, stored k × m);
/// cuBLAS dimensions (M, N, K) = (n, m, k). Leading dimensions are at least 1, as cuBLAS
/// requires even for empty operands.
pub fn col_major_gemm(ta: Trans, tb: Trans, m: usize, n: usize, k: usize) -> ColMajorGemm {
    let ld = |v: usize| v.max(1);
    ColMajorGemm {
        transa: tb,
        transb: ta,
        m: n,
        n: m,
        k,
        lda: ld(if tb == Trans::No { n } else { k }),
        ldb: ld(if ta == Trans::No { k } else { m }),
        ldc: ld(n),
    }
}

/// Row-major GEMM `c = alpha · op(a) · op(b) + beta · c` (f32 or f64), see
/// [`crate::backend::Backend::gemm_f32`]: `op(a)` m × k, `op(b)` k × n, `c` m × n.
///
/// The one place where row-major meets cuBLAS, through [`col_major_gemm`].
///
/// `a`, `b`, `c` are whole buffers or views of one (a block of a longer buffer).
///
/// Errors: [`Error::Shape`] on a length mismatch or a dimension beyond `int`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T, A, B, C>(
    blas: &CudaBlas,
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: &A,
    b: &B,
    beta: T,
    c: &mut C,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
    A: DevicePtr<T> + ViewLen,
    B: DevicePtr<T> + ViewLen,
    C: DevicePtrMut<T> + ViewLen,
{
    check_len("gemm a", a.view_len(), m * k)?;
    check_len("gemm b", b.view_len(), k * n)?;
    check_len("gemm c", c.view_len(), m * n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Every dimension and leading dimension below is one of m, n, k (or 1).
    to_i32("gemm m", m)?;
    to_i32("gemm n", n)?;
    to_i32("gemm k", k)?;
    let g = col_major_gemm(ta, tb, m, n, k);
    let cfg = GemmConfig {
        transa: op(g.transa),
        transb: op(g.transb),
        m: g.m as i32,
        n: g.n as i32,
        k: g.k as i32,
        alpha,
        lda: g.lda as i32,
        ldb: g.ldb as i32,
        beta,
        ldc: g.ldc as i32,
    };
    // SAFETY: check_len proved b = k·n, a = m·k, c = m·n elements, which are exactly the
    // extents cuBLAS reads/writes with these dimensions and leading dimensions.
    unsafe { blas.gemm(cfg, b, a, c) }.map_err(cuda_err("cuBLAS gemm"))
}

/// The linear layers of a spec network, one member per batch entry: for r < `members`,
/// `out_r` (images × n) = `input_r` (images × f, at r·`in_mstride`; 0 shares one input)
/// · W_rᵀ, W_r the row-major n × f weight at r·`w_stride` in `w` (a view starting at
/// member 0's weight). One `cublasSgemmStridedBatched` (TF32 under
/// [`MathMode::Tf32`]) through [`col_major_gemm`] (row-major a = input, b = W stored
/// n × f, `Trans::Yes`).
///
/// Errors: [`Error::Shape`] when a view is shorter than the extents read or written, or
/// a dimension or stride is beyond cuBLAS's `int` / `long long`.
#[allow(clippy::too_many_arguments)]
pub fn linear_strided_batched_f32<A, W, C>(
    blas: &CudaBlas,
    input: &A,
    in_mstride: usize,
    w: &W,
    w_stride: usize,
    out: &mut C,
    (members, images): (usize, usize),
    (f, n): (usize, usize),
) -> Result<()>
where
    A: DevicePtr<f32> + ViewLen,
    W: DevicePtr<f32> + ViewLen,
    C: DevicePtrMut<f32> + ViewLen,
{
    if members == 0 || images == 0 || n == 0 {
        return Ok(());
    }
    let last = members - 1;
    let at_least = |what: &str, found: usize, needed: usize| {
        if found >= needed {
            Ok(())
        } else {
            Err(Error::Shape {
                what: what.to_string(),
                expected: format!("at least {needed}"),
                found: found.to_string(),
            })
        }
    };
    at_least(
        "linear input",
        input.view_len(),
        last * in_mstride + images * f,
    )?;
    at_least("linear weights", w.view_len(), last * w_stride + n * f)?;
    check_len("linear output", out.view_len(), members * images * n)?;
    let g = col_major_gemm(Trans::No, Trans::Yes, images, n, f);
    let stride = |what: &str, v: usize| {
        i64::try_from(v).map_err(|_| Error::Shape {
            what: what.to_string(),
            expected: "at most 2^63 − 1".into(),
            found: v.to_string(),
        })
    };
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(g.transa),
            transb: op(g.transb),
            m: to_i32("linear n", g.m)?,
            n: to_i32("linear images", g.n)?,
            k: to_i32("linear f", g.k)?,
            alpha: 1.0f32,
            lda: to_i32("linear lda", g.lda)?,
            ldb: to_i32("linear ldb", g.ldb)?,
            beta: 0.0f32,
            ldc: to_i32("linear ldc", g.ldc)?,
        },
        batch_size: to_i32("linear members", members)?,
        stride_a: stride("linear weight stride", w_stride)?,
        stride_b: stride("linear input stride", in_mstride)?,
        stride_c: stride("linear output stride", images * n)?,
    };
    // SAFETY: batch r reads W at r·w_stride (n × f), the input at r·in_mstride
    // (images × f) and writes images × n at r·images·n: the checks above proved every
    // view long enough for the last batch entry.
    unsafe { blas.gemm_strided_batched(cfg, w, input, out) }
        .map_err(cuda_err("cuBLAS sgemm strided batched (linear layers)"))
}

/// The element count of a device buffer or view (for the bounds checks above).
pub trait ViewLen {
    /// Elements.
    fn view_len(&self) -> usize;
}

impl<T> ViewLen for CudaSlice<T> {
    fn view_len(&self) -> usize {
        self.len()
    }
}

impl<T> ViewLen for cudarc::driver::CudaView<'_, T> {
    fn view_len(&self) -> usize {
        self.len()
    }
}

impl<T> ViewLen for cudarc::driver::CudaViewMut<'_, T> {
    fn view_len(&self) -> usize {
        self.len()
    }
}

/// Adds `shift` to the diagonal of the n × n matrix `a`.
///
/// Errors: [`Error::Shape`] when `a` is not n × n.
pub fn add_diagonal_f64(
    be: &CudaBackend,
    a: &mut CudaSlice<f64>,
    n: usize,
    shift: f64,
) -> Result<()> {
    check_len("add_diagonal_f64 matrix", a.len(), n * n)?;
    if n == 0 {
        return Ok(());
    }
    let n_i = to_i32("add_diagonal_f64 n", n)?;
    let f = be.kernels().get("add_diagonal_f64")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(a).arg(&n_i).arg(&shift);
    // SAFETY: check_len proved a = n² elements; thread i < n writes a[i·n + i] only.
    unsafe { launch.launch(add_diagonal_launch(n)) }
        .map(|_| ())
        .map_err(cuda_err("launching add_diagonal_f64"))
}

/// Replaces the n × n matrix `a` by `I − S(a)`, S the strictly block-lower part.
///
/// Errors: [`Error::Shape`] when `a` is not n × n; [`Error::Config`] when bs is 0.
pub fn unit_block_lower_f64(
    be: &CudaBackend,
    a: &mut CudaSlice<f64>,
    n: usize,
    bs: usize,
) -> Result<()> {
    check_len("unit_block_lower_f64 matrix", a.len(), n * n)?;
    if bs == 0 {
        return Err(Error::Config("unit_block_lower_f64: block size 0".into()));
    }
    if n == 0 {
        return Ok(());
    }
    let n_i = to_i32("unit_block_lower_f64 n", n)?;
    let bs_i = to_i32("unit_block_lower_f64 bs", bs)?;
    let f = be.kernels().get("unit_block_lower_f64")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(a).arg(&n_i).arg(&bs_i);
    // SAFETY: check_len proved a = n² elements; the grid-stride loop stops at n².
    unsafe { launch.launch(elementwise_stride_launch(n * n)) }
        .map(|_| ())
        .map_err(cuda_err("launching unit_block_lower_f64"))
}

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

fn sol_check(status: sol::cusolverStatus_t, what: &str) -> Result<()> {
    if status == sol::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("cuSOLVER {what}: {status:?}")))
    }
}

/// Where cuSOLVER finds diagonal block d (bs × bs) of the row-major n × n matrix `a` and
/// the matching block column of the row-major right-hand sides (nrhs × n).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CholeskyBlock {
    /// Element offset of the block in `a`; its leading dimension is n.
    pub a_offset: usize,
    /// Element offset of the block column in the right-hand sides (leading dimension n).
    pub b_offset: usize,
    /// The triangle potrf factors and potrs reads.
    pub uplo: sol::cublasFillMode_t,
}

/// Block d of row-major a starts at element d·bs·n + d·bs with leading dimension n; it
/// is symmetric, so the column-major view (its transpose) is the same matrix and the
/// LOWER triangle of that view is used. Block column d of row-major rhs (nrhs × n), read
/// column-major from element d·bs with ld n, is the bs × nrhs matrix rhs_dᵀ, and potrs
/// overwrites it with A_dd⁻¹ rhs_dᵀ = (rhs_d A_dd⁻¹)ᵀ.
pub fn cholesky_block(d: usize, bs: usize, n: usize) -> CholeskyBlock {
    CholeskyBlock {
        a_offset: d * bs * n + d * bs,
        b_offset: d * bs,
        uplo: sol::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
    }
}

/// The column-major (cuBLAS) arguments of [`solve_unit_lower_right_f64`]:
/// `trsm(side, uplo, trans, diag, m, n, 1, T, lda, b, ldb)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColMajorTrsm {
    /// Side of the triangular matrix.
    pub side: cublasSideMode_t,
    /// Triangle read.
    pub uplo: cublasFillMode_t,
    /// Operation on the triangular matrix.
    pub trans: cublasOperation_t,
    /// Unit or stored diagonal.
    pub diag: cublasDiagType_t,
    /// cuBLAS M (rows of the column-major right-hand side).
    pub m: usize,
    /// cuBLAS N.
    pub n: usize,
    /// Leading dimension of T.
    pub lda: usize,
    /// Leading dimension of b.
    pub ldb: usize,
}

/// `x · T = b` (row-major b: rows × n, T: n × n unit lower) as a cuBLAS trsm. Row-major
/// b is Bᶜ = bᵀ (n × rows, ld n) and row-major T is Tᶜ = Tᵀ (ld n), upper unit
/// triangular. x T = b ⇔ Tᵀ xᵀ = bᵀ ⇔ Tᶜ Xᶜ = Bᶜ: side LEFT, uplo UPPER (Tᶜ's upper
/// triangle is T's lower one, so entries above T's diagonal, Tᶜ's lower triangle, are
/// never read), no transpose, unit diagonal, (M, N) = (n, rows).
pub fn col_major_unit_lower_right(n: usize, rows: usize) -> ColMajorTrsm {
    ColMajorTrsm {
        side: cublasSideMode_t::CUBLAS_SIDE_LEFT,
        uplo: cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
        trans: cublasOperation_t::CUBLAS_OP_N,
        diag: cublasDiagType_t::CUBLAS_DIAG_UNIT,
        m: n,
        n: rows,
        lda: n.max(1),
        ldb: n.max(1),
    }
}

/// `whiten` on the cuSOLVER route: with block d of `a` factored in place by potrf
/// (column-major view, LOWER: the factor L_d of A_dd, [`cholesky_block`]), the block
/// column d of row-major rhs (nrhs × n), read column-major from element d·bs with ld n,
/// is rhs_dᵀ (bs × nrhs); `rhs_d · L_d⁻ᵀ` is (L_d⁻¹ rhs_dᵀ)ᵀ, a trsm from the LEFT with
/// the LOWER factor, no transpose, stored diagonal, (M, N) = (bs, nrhs), lda = ldb = n.
pub fn col_major_whiten(bs: usize, n: usize, nrhs: usize) -> ColMajorTrsm {
    ColMajorTrsm {
        side: cublasSideMode_t::CUBLAS_SIDE_LEFT,
        uplo: cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
        trans: cublasOperation_t::CUBLAS_OP_N,
        diag: cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
        m: bs,
        n: nrhs,
        lda: n.max(1),
        ldb: n.max(1),
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

/// Solves `x · T = b` in place (`b`: rows × n, overwritten by x), T (n × n) unit lower
/// triangular (diagonal taken as 1, entries above it ignored), by cuBLAS trsm with the
/// arguments of [`col_major_unit_lower_right`].
///
/// Errors: [`Error::Shape`] on a length mismatch.
pub fn solve_unit_lower_right_f64(
    be: &CudaBackend,
    t: &CudaSlice<f64>,
    n: usize,
    b: &mut CudaSlice<f64>,
    rows: usize,
) -> Result<()> {
    check_len("solve_unit_lower_right_f64 t", t.len(), n * n)?;
    check_len("solve_unit_lower_right_f64 b", b.len(), rows * n)?;
    if n == 0 || rows == 0 {
        return Ok(());
    }
    to_i32("solve_unit_lower_right_f64 n", n)?;
    to_i32("solve_unit_lower_right_f64 rows", rows)?;
    let t_args = col_major_unit_lower_right(n, rows);
    let stream = be.stream();
    let (t_ptr, _gt) = t.device_ptr(stream);
    let (b_ptr, _gb) = b.device_ptr_mut(stream);
    let one = 1.0f64;
    // SAFETY: t holds n² and b rows·n doubles (checked), the extents trsm touches with
    // M = n, N = rows, lda = ldb = n; alpha is a host scalar (default pointer mode).
    unsafe {
        cudarc::cublas::sys::cublasDtrsm_v2(
            *be.blas.handle(),
            t_args.side,
            t_args.uplo,
            t_args.trans,
            t_args.diag,
            t_args.m as i32,
            t_args.n as i32,
            &one,
            t_ptr as *const f64,
            t_args.lda as i32,
            b_ptr as *mut f64,
            t_args.ldb as i32,
        )
    }
    .result()
    .map_err(cuda_err("cublasDtrsm"))
}

/// Symmetric eigendecomposition by cuSOLVER `syevd` (eigenvectors, lower triangle): the
/// row-major symmetric `a` is its own column-major transpose, and syevd's column-major
/// eigenvector columns read row-major as rows, so on return row k of `a` is the
/// eigenvector of eigenvalue k (ascending, returned on the host).
///
/// Errors: [`Error::Shape`] on the length; [`Error::Cuda`] for a cuSOLVER failure or
/// `info ≠ 0` (no convergence, or an invalid argument).
pub fn sym_eigen_f64(
    be: &CudaBackend,
    solver: &DnHandle,
    a: &mut CudaSlice<f64>,
    n: usize,
) -> Result<Vec<f64>> {
    check_len("sym_eigen_f64 matrix", a.len(), n * n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let n_i = to_i32("sym_eigen_f64 n", n)?;
    let stream = be.stream();
    let h = solver.cu();
    let mut w = super::device_zeros::<f64>(stream, n)?;
    let mut info = super::device_zeros::<i32>(stream, 1)?;
    let jobz = sol::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
    let uplo = sol::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    {
        let (a_ptr, _ga) = a.device_ptr_mut(stream);
        let (w_ptr, _gw) = w.device_ptr_mut(stream);
        let mut lwork = 0i32;
        // SAFETY: a holds n² doubles and w n (checked and allocated above); the query
        // reads no data.
        sol_check(
            unsafe {
                sol::cusolverDnDsyevd_bufferSize(
                    h,
                    jobz,
                    uplo,
                    n_i,
                    a_ptr as *const f64,
                    n_i,
                    w_ptr as *const f64,
                    &mut lwork,
                )
            },
            "syevd_bufferSize",
        )?;
        let mut work = super::device_zeros::<f64>(stream, lwork.max(1) as usize)?;
        let (work_ptr, _gk) = work.device_ptr_mut(stream);
        let (i_ptr, _gi) = info.device_ptr_mut(stream);
        // SAFETY: as above, with the queried lwork doubles of workspace and one int of
        // info.
        sol_check(
            unsafe {
                sol::cusolverDnDsyevd(
                    h,
                    jobz,
                    uplo,
                    n_i,
                    a_ptr as *mut f64,
                    n_i,
                    w_ptr as *mut f64,
                    work_ptr as *mut f64,
                    lwork,
                    i_ptr as *mut i32,
                )
            },
            "syevd",
        )?;
    }
    let info_h = stream
        .clone_dtoh(&info)
        .map_err(cuda_err("reading cuSOLVER info"))?;
    if info_h.first().copied().unwrap_or(0) != 0 {
        return Err(Error::Cuda(format!(
            "cuSOLVER syevd: info = {} on a {n} × {n} matrix (no convergence or a bad \
             argument)",
            info_h[0]
        )));
    }
    stream
        .clone_dtoh(&w)
        .map_err(cuda_err("downloading the eigenvalues"))
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
