//! The one seam between the CPU reference path and the CUDA path.
//!
//! The EnKF (`crate::enkf`) and the trainer (`crate::train`) are written once against
//! [`Backend`]. A backend owns its buffers ([`Backend::F32`], [`Backend::F64`]): host
//! vectors on the CPU, device allocations on CUDA. Every matrix is row-major and every
//! operation takes its shapes explicitly; implementations check buffer lengths and
//! return [`Error::Shape`](crate::Error::Shape) on a mismatch.
//!
//! Shapes used throughout: J members, P weights, B images, m = 10·B observations.
//! - ensemble U: J × P; outputs G: J × B × 10, i.e. J × m with column i = 10·d + k;
//! - targets y: m (one-hot per image).

use crate::cpu::backprop::ForwardCache;
use crate::model::Net;
use crate::train::optim::GradOptimizer;
use crate::Result;

/// Whether [`Backend::backprop`] hands back the forward intermediates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Return them on the host (the activation statistics need them).
    Keep,
    /// Drop them.
    Drop,
}

/// What [`Backend::backprop`] returns besides the gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct GradStep {
    /// Mean softmax cross-entropy over the batch (natural log).
    pub loss: f64,
    /// Images whose arg-max output (ties to the lowest class) equals the label.
    pub correct: usize,
    /// The forward intermediates on the host, with [`CacheMode::Keep`] on a fused
    /// network (`None` otherwise: a layer-spec network's statistics come from its own
    /// forward pass, `crate::train::stats::spec_stats`).
    pub cache: Option<ForwardCache<f32>>,
}

/// Transposition flag of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trans {
    /// Use the operand as stored.
    No,
    /// Use its transpose.
    Yes,
}

/// Floating-point policy for the large f32 products.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum MathMode {
    /// Strict IEEE FP32 (the default).
    #[default]
    Fp32,
    /// Allow TF32 tensor cores for the large products (CUDA only; the CPU ignores it).
    Tf32,
}

/// Which backend to run on.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The multithreaded CPU reference path.
    Cpu,
    /// The CUDA path (hand-written kernels, cuBLAS, cuSOLVER).
    Cuda,
    /// CUDA when a usable GPU is present, otherwise the CPU.
    #[default]
    Auto,
}

/// What a block Cholesky routine applies to each block of a right-hand-side row, with
/// the block A_dd = L Lᵀ: the CPU's and the GPU's solves share it (on the GPU it is the
/// small-block kernel's `mode` argument, its discriminant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Substitution {
    /// `row · A_dd⁻¹`: L w = rowᵀ, then Lᵀ z = w ([`Backend::block_cholesky_solve_f64`]).
    Inverse = 0,
    /// `row · L⁻ᵀ`: L w = rowᵀ only ([`Backend::block_cholesky_whiten_f64`]).
    Whiten = 1,
}

/// The operations the EnKF and the trainer need, on one kind of memory.
pub trait Backend {
    /// A buffer of f32 values owned by this backend.
    type F32;
    /// A buffer of f64 values owned by this backend.
    type F64;
    /// A gradient optimizer's state (SGD momentum buffer, Adam moments) on this backend.
    type Optim;

    /// Short name for logs and `config.json` ("cpu", "cuda").
    fn name(&self) -> String;

    /// A zero-filled f32 buffer of `n` elements.
    fn zeros_f32(&self, n: usize) -> Result<Self::F32>;
    /// A zero-filled f64 buffer of `n` elements.
    fn zeros_f64(&self, n: usize) -> Result<Self::F64>;
    /// Copies host values into a new buffer.
    fn upload_f32(&self, host: &[f32]) -> Result<Self::F32>;
    /// Copies host values into an existing buffer of the same length.
    fn write_f32(&self, host: &[f32], dst: &mut Self::F32) -> Result<()>;
    /// Copies host values into an existing f64 buffer of the same length.
    fn write_f64(&self, host: &[f64], dst: &mut Self::F64) -> Result<()>;
    /// Copies a buffer to a new host vector.
    fn download_f32(&self, buf: &Self::F32) -> Result<Vec<f32>>;
    /// Copies a buffer to a new host vector.
    fn download_f64(&self, buf: &Self::F64) -> Result<Vec<f64>>;
    /// Number of elements of a buffer.
    fn len_f32(&self, buf: &Self::F32) -> usize;

    /// Forward pass of `members` networks over `images` images.
    ///
    /// `weights`: members × P (P = `net.n_params()`), `x`: images × 784 pixels in
    /// [0, 1], `out`: members × images × 10 raw logits, overwritten.
    fn ensemble_forward(
        &self,
        net: &Net,
        weights: &Self::F32,
        members: usize,
        x: &Self::F32,
        images: usize,
        out: &mut Self::F32,
    ) -> Result<()>;

    /// Backpropagation through ONE network (`weights`: P) on a mini-batch (`x`:
    /// B × inputs, `labels`: B): the mean softmax cross-entropy (PyTorch's
    /// `CrossEntropyLoss`) and the correct count; d loss / d weights overwrites `grad`
    /// (P). Fused presets and layer-spec networks alike.
    fn backprop(
        &self,
        net: &Net,
        weights: &Self::F32,
        x: &Self::F32,
        labels: &[u8],
        grad: &mut Self::F32,
        cache: CacheMode,
    ) -> Result<GradStep>;

    /// As [`Backend::backprop`] for real targets (`targets`: batch × outputs): the mean
    /// squared error and its gradient into `grad`; `correct` is 0 and no cache is kept.
    /// Layer-spec networks only; the default (a backend without it) is an error.
    fn backprop_mse(
        &self,
        net: &Net,
        _weights: &Self::F32,
        _x: &Self::F32,
        _targets: &[f32],
        _grad: &mut Self::F32,
    ) -> Result<GradStep> {
        Err(crate::Error::Config(format!(
            "backpropagation of a squared error (real targets) runs on the CPU backend \
             only, for layer-spec networks; {} on {} has none",
            net.describe(),
            self.name()
        )))
    }

    /// `opt` (with its state as it is) on this backend.
    fn optimizer(&self, opt: &GradOptimizer) -> Result<Self::Optim>;

    /// One optimizer step of `params` (P) with `grad` (P), as [`GradOptimizer::step`].
    fn optimizer_step(
        &self,
        opt: &mut Self::Optim,
        params: &mut Self::F32,
        grad: &Self::F32,
    ) -> Result<()>;

    /// Mean over rows: `out[c] = (1/rows) Σ_r a[r, c]`; `a` is rows × cols.
    fn row_mean(&self, a: &Self::F32, rows: usize, cols: usize, out: &mut Self::F32) -> Result<()>;

    /// Centred outputs and innovations in f64, from `g` (rows × cols, f32) and `y` (cols):
    /// `centred[r, c] = g[r, c] − mean_r g[·, c]`, `innov[r, c] = y[c] − g[r, c]`.
    fn center_and_innovate(
        &self,
        g: &Self::F32,
        y: &Self::F32,
        rows: usize,
        cols: usize,
        centred: &mut Self::F64,
        innov: &mut Self::F64,
    ) -> Result<()>;

    /// Row-major f32 GEMM: `c = alpha · op(a) · op(b) + beta · c`, `op(a)` m × k,
    /// `op(b)` k × n, `c` m × n. `a` is stored m × k when `ta = No`, k × m when `Yes`;
    /// likewise `b`. Honours the backend's [`MathMode`].
    #[allow(clippy::too_many_arguments)]
    fn gemm_f32(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Self::F32,
        b: &Self::F32,
        beta: f32,
        c: &mut Self::F32,
    ) -> Result<()>;

    /// Row-major f64 GEMM with the same conventions as [`Backend::gemm_f32`].
    #[allow(clippy::too_many_arguments)]
    fn gemm_f64(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        a: &Self::F64,
        b: &Self::F64,
        beta: f64,
        c: &mut Self::F64,
    ) -> Result<()>;

    /// Adds `shift` to the diagonal of the n × n matrix `a`.
    fn add_diagonal_f64(&self, a: &mut Self::F64, n: usize, shift: f64) -> Result<()>;

    /// Block-diagonal symmetric positive-definite solve from the right.
    ///
    /// `a` is n × n with n = `blocks · bs`; only its `blocks` diagonal blocks of size
    /// `bs` are used (they must be symmetric). `rhs` is `nrhs` × n; for each block d it
    /// is overwritten with `rhs[:, d] · A_dd⁻¹` (A_dd symmetric, so this is also
    /// `(A_dd⁻¹ rhs[:, d]ᵀ)ᵀ`). `blocks = 1, bs = n` is one dense Cholesky solve.
    /// `a` may be overwritten with its factor.
    /// Errors: [`LinalgError::NotPositiveDefinite`](crate::error::LinalgError) with the block.
    fn block_cholesky_solve_f64(
        &self,
        a: &mut Self::F64,
        blocks: usize,
        bs: usize,
        rhs: &mut Self::F64,
        nrhs: usize,
    ) -> Result<()>;

    /// Whitening by the block Cholesky factors, from the right: with each diagonal block
    /// A_dd = L_d L_dᵀ (L_d lower triangular; `a` as in
    /// [`Backend::block_cholesky_solve_f64`]), every row of `x` and of `y` (`nrhs` × n
    /// each) is overwritten block by block with `row[d] · L_d⁻ᵀ` (a forward substitution
    /// with L_d). So `x A⁻¹ yᵀ` becomes `x yᵀ` over the whitened rows: the EnKF gain's
    /// bounded factors (`crate::enkf`). `a` may be overwritten with its factor.
    /// Errors: as [`Backend::block_cholesky_solve_f64`]; `x` and `y` then hold no
    /// valid result (the CPU leaves both unchanged; the GPU's small-block kernel leaves
    /// the failing block's columns unchanged and may have whitened the other blocks of
    /// `x`). The EnKF gain treats both as scratch, refilled by the next innovation.
    #[allow(clippy::too_many_arguments)]
    fn block_cholesky_whiten_f64(
        &self,
        a: &mut Self::F64,
        blocks: usize,
        bs: usize,
        x: &mut Self::F64,
        y: &mut Self::F64,
        nrhs: usize,
    ) -> Result<()>;

    /// Replaces the n × n matrix `a` by `I − S(a)`, where S keeps only the strictly
    /// block-lower part (entries in block row d, block column e with e < d, block size `bs`).
    fn unit_block_lower_f64(&self, a: &mut Self::F64, n: usize, bs: usize) -> Result<()>;

    /// Solves `x · T = b` in place for x (`b` is rows × n, overwritten with x), where
    /// `t` (n × n) is unit lower triangular (its diagonal is taken as 1, entries above it
    /// are ignored).
    fn solve_unit_lower_right_f64(
        &self,
        t: &Self::F64,
        n: usize,
        b: &mut Self::F64,
        rows: usize,
    ) -> Result<()>;

    /// Converts f64 to f32 (same length).
    fn f64_to_f32(&self, src: &Self::F64, dst: &mut Self::F32) -> Result<()>;

    /// Adds host values to a buffer: `dst[i] += host[i]` (same length).
    fn add_host_f64(&self, host: &[f64], dst: &mut Self::F64) -> Result<()>;

    /// Multiplicative inflation of the rows of `u` (rows × cols) about `mean` (cols):
    /// `u[r, c] = mean[c] + lambda · (u[r, c] − mean[c])`, one fused multiply-add.
    fn inflate_rows_f32(
        &self,
        u: &mut Self::F32,
        mean: &Self::F32,
        rows: usize,
        cols: usize,
        lambda: f32,
    ) -> Result<()>;

    /// Nesterov momentum: `x = u[i]; u[i] = x + beta · (x − prev[i])` (one fused
    /// multiply-add); `prev[i] = x` (same lengths).
    fn nesterov_f32(&self, u: &mut Self::F32, prev: &mut Self::F32, beta: f32) -> Result<()>;

    /// `y[i] += alpha · x[i]` in f64, `x` f32 (same lengths; one fused multiply-add).
    fn add_scaled_f32_f64(&self, x: &Self::F32, alpha: f64, y: &mut Self::F64) -> Result<()>;

    /// Column standard deviations of `a` (rows × cols) about `mean` (cols), population
    /// (divided by rows): `out[c] = √((1/rows) Σ_r (a[r, c] − mean[c])²)`.
    fn row_std_f32(
        &self,
        a: &Self::F32,
        mean: &Self::F32,
        rows: usize,
        cols: usize,
        out: &mut Self::F32,
    ) -> Result<()>;

    /// Additive inflation: `u[i] += mult · scale[(offset + i) mod cols] · z_{offset + i}`
    /// (u rows × cols, scale cols) with z standard normals from Philox4x32-10 under `key`
    /// at `step`, a function of (key, step, global index) only (`add_normal_f32` in
    /// `kernels/reduce.cu`); `offset` is the global index of `u[0]` (0 in one process, a
    /// rank's first member × cols on a sharded run, whose rows then get the one-process
    /// draws).
    #[allow(clippy::too_many_arguments)]
    fn add_normal_f32(
        &self,
        u: &mut Self::F32,
        offset: usize,
        cols: usize,
        scale: &Self::F32,
        mult: f32,
        key: [u32; 2],
        step: u32,
    ) -> Result<()>;

    /// `a[r, c] *= w[r]` over the rows × cols matrix `a` (`w` on the host, rows values).
    fn scale_rows_f64(&self, a: &mut Self::F64, rows: usize, cols: usize, w: &[f64]) -> Result<()>;

    /// Eigen-decomposes the symmetric n × n matrix `a` (row-major): returns the
    /// eigenvalues ascending (on the host) and overwrites `a` with Q, whose row k is the
    /// unit eigenvector of eigenvalue k (a = Qᵀ diag(λ) Q). CPU: Householder + QL
    /// (`crate::cpu::eigen`); CUDA: cuSOLVER `syevd`. Eigenvector signs may differ.
    fn sym_eigen_f64(&self, a: &mut Self::F64, n: usize) -> Result<Vec<f64>>;

    /// Row sums of squares of `a` (rows × cols, f64), copied to the host: `out[r] =
    /// Σ_c a[r, c]²`, in the fixed order of `row_sq_norms_f64` (`kernels/reduce.cu`).
    fn row_sq_norms_f64(&self, a: &Self::F64, rows: usize, cols: usize) -> Result<Vec<f64>>;

    /// Each layer's share of one forward pass of the layer-spec network `spec` over
    /// `members` × `images` (shares add up to 1; all 0 without work), for `bench --net`.
    /// CPU: the summed task time of each layer; CUDA: each launch timed with events.
    fn spec_layer_shares(
        &self,
        spec: &crate::model::spec::NetSpec,
        weights: &Self::F32,
        members: usize,
        x: &Self::F32,
        images: usize,
    ) -> Result<Vec<f64>>;

    /// Copies `src` into `dst` (same length).
    fn copy_f32(&self, src: &Self::F32, dst: &mut Self::F32) -> Result<()>;

    /// Copies `rows` rows of `cols` values from row `src_row` of `src` to row `dst_row`
    /// of `dst` (both row-major with `cols` columns). The default goes through the host;
    /// backends override it with a device copy.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows_f32(
        &self,
        src: &Self::F32,
        src_row: usize,
        dst: &mut Self::F32,
        dst_row: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let s = self.download_f32(src)?;
        let mut d = self.download_f32(dst)?;
        check_rows("copy_rows_f32 source", s.len(), src_row + rows, cols)?;
        check_rows("copy_rows_f32 destination", d.len(), dst_row + rows, cols)?;
        d[dst_row * cols..(dst_row + rows) * cols]
            .copy_from_slice(&s[src_row * cols..(src_row + rows) * cols]);
        self.write_f32(&d, dst)
    }

    /// Waits for queued work to finish (no-op on the CPU).
    fn synchronize(&self) -> Result<()>;

    /// Sums `buf` element-wise over the ranks of `comm`, in place (every rank calls it
    /// with a buffer of the same length; nothing to do on one rank): the sharded
    /// update's exchanges. The default stages through the host ([`host_allreduce_f64`]:
    /// download, `comm`'s sum, upload); the CUDA backend sums device to device through
    /// NCCL once [`crate::gpu::CudaBackend::attach_nccl`] joined the ranks.
    fn allreduce_sum_f64(&self, comm: &dyn crate::dist::Comm, buf: &mut Self::F64) -> Result<()>
    where
        Self: Sized,
    {
        host_allreduce_f64(self, comm, buf)
    }

    /// [`Backend::allreduce_sum_f64`] for f32 buffers.
    fn allreduce_sum_f32(&self, comm: &dyn crate::dist::Comm, buf: &mut Self::F32) -> Result<()>
    where
        Self: Sized,
    {
        host_allreduce_f32(self, comm, buf)
    }

    /// The device's FP32 FFMA peak in GFLOP/s, where it is known (CUDA: SMs × FP32 lanes
    /// × 2 × clock); `None` by default (the CPU backend does not claim one).
    fn fp32_peak_gflops(&self) -> Option<f64> {
        None
    }

    /// Milliseconds that the work `f` queues takes: by default host wall-clock time from a
    /// synchronised start to a synchronised end; the CUDA backend measures device time
    /// with events instead.
    ///
    /// Errors: those of `f` and of [`Backend::synchronize`].
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.synchronize()?;
        let t0 = std::time::Instant::now();
        f()?;
        self.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }
}

/// [`Backend::allreduce_sum_f64`] through the host: download, `comm`'s sum, upload
/// (nothing on one rank).
///
/// Errors: the backend's copies; the transport's.
pub fn host_allreduce_f64<B: Backend>(
    backend: &B,
    comm: &dyn crate::dist::Comm,
    buf: &mut B::F64,
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut host = backend.download_f64(buf)?;
    comm.allreduce_sum_f64(&mut host)?;
    backend.write_f64(&host, buf)
}

/// [`host_allreduce_f64`] for f32 buffers.
///
/// Errors: the backend's copies; the transport's.
pub fn host_allreduce_f32<B: Backend>(
    backend: &B,
    comm: &dyn crate::dist::Comm,
    buf: &mut B::F32,
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut host = backend.download_f32(buf)?;
    comm.allreduce_sum_f32(&mut host)?;
    backend.write_f32(&host, buf)
}

/// Checks that a buffer has the expected length.
pub fn check_len(what: &str, found: usize, expected: usize) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(crate::Error::Shape {
            what: what.to_string(),
            expected: format!("{expected} elements"),
            found: format!("{found} elements"),
        })
    }
}

/// Checks that a row-major buffer of `len` values holds at least `rows` rows of `cols`.
pub fn check_rows(what: &str, len: usize, rows: usize, cols: usize) -> Result<()> {
    if rows * cols <= len && cols > 0 && len.is_multiple_of(cols) {
        Ok(())
    } else {
        Err(crate::Error::Shape {
            what: what.to_string(),
            expected: format!("at least {rows} rows of {cols}"),
            found: format!("{len} elements"),
        })
    }
}
