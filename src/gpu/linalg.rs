//! Dense linear algebra on the GPU (twin of `src/cpu/linalg.rs`): the one row-major GEMM
//! helper over cuBLAS, the argument mappings of the Cholesky routines (which live in
//! [`super::cholesky`]: cuSOLVER for large blocks, a kernel of `kernels/linalg.cu` for
//! blocks ≤ 32), the unit-lower solve (cuBLAS trsm), the symmetric eigendecomposition and
//! the small element-wise kernels. All raw cuBLAS/cuSOLVER FFI of the crate is in this
//! file and `cholesky.rs`.
//!
//! Row-major vs column-major, once: a row-major r × c matrix with leading dimension c is,
//! read by a column-major library, the c × r matrix of its transpose (leading dimension c).

use cudarc::cublas::sys::{
    cublasDiagType_t, cublasFillMode_t, cublasMath_t, cublasOperation_t, cublasSideMode_t,
};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::cusolver::{sys as sol, DnHandle};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::geometry::{add_diagonal_launch, elementwise_stride_launch};
use super::{cuda_err, to_i32, CudaBackend};
use crate::backend::{check_len, MathMode, Trans};
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

pub(super) fn sol_check(status: sol::cusolverStatus_t, what: &str) -> Result<()> {
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
