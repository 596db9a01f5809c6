//! The CUDA backend: hand-written kernels (`kernels/*.cu`), cuBLAS and cuSOLVER.
//!
//! Files mirror `src/cpu/`: `forward.rs` (the network), `backprop.rs` (gradients of one
//! network and the SGD/Adam steps), `reduce.rs` (ensemble
//! reductions), `linalg.rs` (GEMM and the solves; all cuBLAS/cuSOLVER FFI lives there),
//! plus `module.rs` (the kernel modules embedded by `build.rs` and their loading),
//! `memory.rs` (the device memory a run needs, checked before it starts) and `timing.rs`
//! (CUDA-event timing and NVTX ranges).
//!
//! All work of one [`CudaBackend`] is queued on one stream, so operations run in the
//! order they are called; downloads wait for it.

pub mod backprop;
pub mod cholesky;
pub mod forward;
pub mod geometry;
pub mod linalg;
pub mod memory;
pub mod module;
pub mod nccl;
pub mod reduce;
pub mod spec_backplan;
pub mod spec_backprop;
pub mod spec_forward;
pub mod spec_plan;
pub mod timing;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::cusolver::DnHandle;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::backend::{check_len, check_rows, Backend, CacheMode, GradStep, MathMode, Trans};
use crate::cpu::spec_backprop_kernels::SpecTargets;
use crate::model::Net;
use crate::train::optim::GradOptimizer;
use crate::{Error, Result};

pub use geometry::{ForwardGeometry, SharedMemoryLimits};
pub use memory::{MemoryEstimate, TrainShape};
pub use module::{KernelModule, KernelRoute, KernelSource, Kernels, BUILT_WITH, MODULES};

/// The CUDA backend: one device, one stream, a cuBLAS and a cuSOLVER handle, and the
/// kernels of [`MODULES`] loaded into the device's primary context.
#[derive(Debug)]
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    kernels: Kernels,
    math: MathMode,
    sm_count: u32,
    shared_memory: SharedMemoryLimits,
    forward: ForwardGeometry,
    fp32_peak_gflops: Option<f64>,
    description: String,
    /// The two scratch buffers of the layer-spec forward pass (`spec_forward.rs`),
    /// grown on demand and kept between calls.
    spec_scratch: Mutex<Vec<CudaSlice<f32>>>,
    /// The NCCL communicator of a sharded run's ranks ([`CudaBackend::attach_nccl`]).
    nccl: Mutex<Option<nccl::NcclGroup>>,
}

/// What [`CudaBackend::open`] found the first time in this process: the description, or
/// why no GPU is usable.
static PROBE: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// FP32 lanes per SM by compute capability (one FFMA per lane per clock), where known:
/// Volta, Turing and A100 (sm_70–80) have 64; sm_86 onwards, Hopper and Blackwell 128.
fn fp32_lanes_per_sm(cc: (i32, i32)) -> Option<u32> {
    match cc {
        (7, _) | (8, 0) => Some(64),
        (8, _) | (9, _) | (10, _) | (11, _) | (12, _) => Some(128),
        _ => None,
    }
}

/// FP32 FFMA peak in GFLOP/s: SMs × lanes × 2 FLOP × the boost clock (kHz attribute).
fn fp32_peak(cc: (i32, i32), sm_count: u32, clock_khz: Option<i32>) -> Option<f64> {
    let lanes = fp32_lanes_per_sm(cc)?;
    let khz = clock_khz.filter(|&k| k > 0)?;
    Some(f64::from(sm_count) * f64::from(lanes) * 2.0 * f64::from(khz) / 1e6)
}

/// Wraps a cudarc error (driver, cuBLAS, cuSOLVER, NVRTC) with what was being done.
pub(crate) fn cuda_err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// Checks that the shared libraries the backend needs can be opened, before cudarc is
/// touched (cudarc panics when a library is missing).
///
/// Errors: [`Error::Cuda`] naming the missing library and what to do.
pub fn check_libraries() -> Result<()> {
    // SAFETY: each is_culib_present only tries to dlopen the library's candidate names.
    let present = unsafe {
        [
            (
                "libcuda (the NVIDIA driver)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libcusolver", cudarc::cusolver::sys::is_culib_present()),
        ]
    };
    for (lib, ok) in present {
        if !ok {
            return Err(Error::Cuda(format!(
                "{lib} not found: install the NVIDIA driver and the CUDA 13 runtime libraries \
                 (or point LD_LIBRARY_PATH at them), or use --backend cpu"
            )));
        }
    }
    Ok(())
}

/// Paths of the CUDA libraries mapped into this process (Linux; empty elsewhere).
fn loaded_cuda_libraries() -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            let file = p.rsplit('/').next().unwrap_or(p);
            [
                "libcuda.",
                "libcublas",
                "libcusolver",
                "libnvrtc",
                "libnvJitLink",
            ]
            .iter()
            .any(|k| file.starts_with(k))
        })
        .map(str::to_string)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

impl CudaBackend {
    /// Opens device `ordinal`, creates the stream and library handles and loads every
    /// kernel module (the newest embedded PTX the device runs, else NVRTC for its own
    /// architecture; `ENKF_KERNELS` may force one, see [`module::KernelSource`]). `math`
    /// selects TF32 tensor cores for `gemm_f32`.
    ///
    /// Errors: [`Error::Config`] for a bad `ENKF_KERNELS`; [`Error::Cuda`] when a library
    /// is missing, the device cannot be opened, or a module fails to load (the message
    /// names the module).
    pub fn new(ordinal: usize, math: MathMode) -> Result<Self> {
        Self::with_kernels(ordinal, math, module::KernelSource::from_env()?)
    }

    /// [`Self::new`] with the kernel code chosen under `source` rather than
    /// `ENKF_KERNELS` (the tests compare the PTX and NVRTC routes on one device).
    ///
    /// Errors: as [`Self::new`].
    pub fn with_kernels(
        ordinal: usize,
        math: MathMode,
        source: module::KernelSource,
    ) -> Result<Self> {
        check_libraries()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(cuda_err(&format!("opening CUDA device {ordinal}")))?;
        let stream = ctx.new_stream().map_err(cuda_err("creating a stream"))?;
        // SAFETY: every buffer of this backend is used on `stream` only (kernels, copies,
        // cuBLAS and cuSOLVER are all bound to it), so cudarc's cross-stream events are not
        // needed.
        unsafe { ctx.disable_event_tracking() };
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err("creating a cuBLAS handle"))?;
        linalg::set_math_mode(&blas, math)?;
        let solver =
            DnHandle::new(stream.clone()).map_err(cuda_err("creating a cuSOLVER handle"))?;
        let cc = ctx
            .compute_capability()
            .map_err(cuda_err("querying the compute capability"))?;
        let kernels = Kernels::load_all(&ctx, cc, source)?;
        let attr = |a: CUdevice_attribute, what: &str| -> Result<u32> {
            ctx.attribute(a)
                .map(|v| v.max(0) as u32)
                .map_err(cuda_err(&format!("querying the {what}")))
        };
        let limits = SharedMemoryLimits {
            per_block_optin: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                "shared memory per block",
            )?,
            per_sm: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
                "shared memory per SM",
            )?,
            reserved_per_block: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK,
                "reserved shared memory per block",
            )?,
        };
        let forward = geometry::forward_geometry(limits).ok_or_else(|| {
            Error::Cuda(format!(
                "the forward kernel needs at least {} bytes of shared memory per block; the \
                 device allows {} ({limits:?})",
                geometry::forward_smem_bytes(1),
                limits.per_block_optin
            ))
        })?;
        forward::configure(&kernels, forward)?;
        let sm_count = attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "SM count",
        )?
        .max(1);
        let clock_khz = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
            .ok();
        let fp32_peak_gflops = fp32_peak(cc, sm_count, clock_khz);
        let name = ctx.name().unwrap_or_else(|_| "unknown device".into());
        let description = format!(
            "cuda ({name}, cc {}.{}, {sm_count} SMs, kernels: {}, forward: {forward}, math: \
             {math:?})",
            cc.0,
            cc.1,
            kernels.route()
        );
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            solver,
            kernels,
            math,
            sm_count,
            shared_memory: limits,
            forward,
            fp32_peak_gflops,
            description,
            spec_scratch: Mutex::new(Vec::new()),
            nccl: Mutex::new(None),
        })
    }

    /// Opens device 0 with `math` for `--backend cuda` / `auto` and the tests, and
    /// describes it (device, driver and library versions, kernel route and forward
    /// geometry, library files loaded): one context creation, one kernel load.
    ///
    /// The outcome is remembered for the process: after a failure every later call
    /// returns the same reason without touching the driver again, and [`Self::probe`]
    /// after a success returns the description without opening the device again.
    ///
    /// Errors: why the CUDA backend cannot be used, in words.
    pub fn open(math: MathMode) -> std::result::Result<(CudaBackend, String), String> {
        if let Some(Err(why)) = PROBE.get() {
            return Err(why.clone());
        }
        let opened = Self::open_uncached(math);
        let outcome = opened
            .as_ref()
            .map(|(_, d)| d.clone())
            .map_err(Clone::clone);
        let _ = PROBE.set(outcome);
        opened
    }

    fn open_uncached(math: MathMode) -> std::result::Result<(CudaBackend, String), String> {
        Self::open_device(0, math)
    }

    /// Joins the ranks of `comm` in one NCCL communicator on this backend's stream, so
    /// that [`Backend::allreduce_sum_f64`] / `_f32` sum device to device (a collective:
    /// every rank calls it, after every rank opened its GPU). Returns how the sums travel,
    /// in words: "NCCL", or "the host (reason)" when some rank cannot use NCCL (libnccl
    /// missing, `ENKF_NCCL=0`, or the communicator could not be made), the same on every
    /// rank (`gpu::nccl`).
    ///
    /// Errors: the transport's.
    pub fn attach_nccl(&self, comm: &dyn crate::dist::Comm) -> Result<String> {
        let pci = |a: CUdevice_attribute| self.ctx.attribute(a).map_or(0, |v| v.max(0) as u64);
        let key = nccl::device_key(
            &nccl::host_name(),
            [
                pci(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
                pci(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
                pci(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID),
            ],
        );
        match nccl::join(comm, &self.stream, key)? {
            Ok(group) => {
                let mut slot = self
                    .nccl
                    .lock()
                    .map_err(|_| Error::Cuda("the NCCL communicator's lock is poisoned".into()))?;
                *slot = Some(group);
                Ok("NCCL".into())
            }
            Err(why) => Ok(format!("the host ({why})")),
        }
    }

    /// The number of CUDA devices this process sees (after `CUDA_VISIBLE_DEVICES`).
    ///
    /// Errors: why the CUDA backend cannot be used, in words (no driver or libraries,
    /// no device).
    pub fn device_count() -> std::result::Result<usize, String> {
        check_libraries().map_err(|e| e.to_string())?;
        let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e:?}"))?;
        if count < 1 {
            return Err("no CUDA device found".into());
        }
        Ok(count as usize)
    }

    /// Opens device `ordinal` with `math` and describes it as [`Self::open`] does, without
    /// remembering the outcome (each rank of a sharded run opens its own device).
    ///
    /// Errors: why the device cannot be used, in words.
    pub fn open_device(
        ordinal: usize,
        math: MathMode,
    ) -> std::result::Result<(CudaBackend, String), String> {
        let count = Self::device_count()?;
        if ordinal >= count {
            return Err(format!(
                "CUDA device {ordinal} does not exist ({count} visible)"
            ));
        }
        let be = CudaBackend::new(ordinal, math).map_err(|e| e.to_string())?;
        let mut driver = 0i32;
        // SAFETY: writes one int; the driver library is loaded (checked above).
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        let (blas_v, solver_v) = linalg::library_versions(&be.blas);
        let mem = be.ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
        let libs = loaded_cuda_libraries();
        let desc = format!(
            "{}; {mem:.0} GiB; driver CUDA {}.{}; cuBLAS {blas_v}; cuSOLVER {solver_v}; \
             libraries: {}",
            be.description,
            driver / 1000,
            (driver % 1000) / 10,
            if libs.is_empty() {
                "(not listed)".to_string()
            } else {
                libs.join(", ")
            }
        );
        Ok((be, desc))
    }

    /// Whether a usable GPU is present, for `--backend auto`: the description of
    /// [`Self::open`], or why the CUDA backend cannot be used. Probes at most once per
    /// process (the answer is remembered); a success means [`Self::open`] works.
    pub fn probe() -> std::result::Result<String, String> {
        if let Some(known) = PROBE.get() {
            return known.clone();
        }
        Self::open(MathMode::Fp32).map(|(_, desc)| desc)
    }

    /// The math mode chosen at creation.
    pub fn math(&self) -> MathMode {
        self.math
    }

    /// Number of streaming multiprocessors of the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The device's shared-memory limits, as the driver reported them.
    pub fn shared_memory_limits(&self) -> SharedMemoryLimits {
        self.shared_memory
    }

    /// How the forward kernel is launched on this device.
    pub fn forward_geometry(&self) -> ForwardGeometry {
        self.forward
    }

    /// The code the kernels were loaded from (which PTX, or NVRTC).
    pub fn kernel_route(&self) -> KernelRoute {
        self.kernels.route()
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A zero-filled buffer of `n` elements, see [`device_zeros`].
    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        device_zeros(&self.stream, n)
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// The two scratch buffers of the layer-spec forward pass, each at least `len`
    /// values (reallocated when smaller; contents undefined).
    ///
    /// Errors: [`Error::Cuda`] when an allocation fails.
    pub(crate) fn spec_scratch(&self, len: usize) -> Result<MutexGuard<'_, Vec<CudaSlice<f32>>>> {
        let mut guard = self
            .spec_scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.len() != 2 || guard.iter().any(|b| b.len() < len) {
            guard.clear();
            for _ in 0..2 {
                guard.push(self.zeros::<f32>(len)?);
            }
        }
        Ok(guard)
    }
}

impl Backend for CudaBackend {
    type F32 = CudaSlice<f32>;
    type F64 = CudaSlice<f64>;
    type Optim = backprop::GpuOptimizer;

    fn name(&self) -> String {
        self.description.clone()
    }

    fn zeros_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.zeros(n)
    }
    fn zeros_f64(&self, n: usize) -> Result<CudaSlice<f64>> {
        self.zeros(n)
    }
    fn upload_f32(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        if host.is_empty() {
            return self.zeros(0);
        }
        self.stream
            .clone_htod(host)
            .map_err(cuda_err(&format!("uploading {} f32", host.len())))
    }
    fn write_f32(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        check_len("write_f32 destination", dst.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, dst)
            .map_err(cuda_err("write_f32"))
    }
    fn write_f64(&self, host: &[f64], dst: &mut CudaSlice<f64>) -> Result<()> {
        check_len("write_f64 destination", dst.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, dst)
            .map_err(cuda_err("write_f64"))
    }
    fn download_f32(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        let v = self
            .stream
            .clone_dtoh(buf)
            .map_err(cuda_err("download_f32"))?;
        self.synchronize()?;
        Ok(v)
    }
    fn download_f64(&self, buf: &CudaSlice<f64>) -> Result<Vec<f64>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        let v = self
            .stream
            .clone_dtoh(buf)
            .map_err(cuda_err("download_f64"))?;
        self.synchronize()?;
        Ok(v)
    }
    fn len_f32(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn ensemble_forward(
        &self,
        net: &Net,
        weights: &CudaSlice<f32>,
        members: usize,
        x: &CudaSlice<f32>,
        images: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if let Some(spec) = net.spec() {
            return spec_forward::spec_forward(self, spec, weights, members, x, images, out);
        }
        forward::ensemble_forward(self, net, weights, members, x, images, out)
    }

    fn backprop(
        &self,
        net: &Net,
        weights: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        labels: &[u8],
        grad: &mut CudaSlice<f32>,
        cache: CacheMode,
    ) -> Result<GradStep> {
        check_len("gpu backprop grad (P)", grad.len(), net.n_params())?;
        if let Some(spec) = net.spec() {
            let bp =
                spec_backprop::spec_backprop(self, spec, weights, x, SpecTargets::Labels(labels))?;
            *grad = bp.grad;
            return Ok(GradStep {
                loss: bp.loss,
                correct: bp.correct,
                cache: None,
            });
        }
        let bp = backprop::backprop(self, net, weights, x, labels)?;
        let kept = match cache {
            CacheMode::Keep => Some(bp.cache.download(self)?),
            CacheMode::Drop => None,
        };
        *grad = bp.grad;
        Ok(GradStep {
            loss: bp.loss,
            correct: bp.correct,
            cache: kept,
        })
    }

    fn backprop_mse(
        &self,
        net: &Net,
        weights: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        targets: &[f32],
        grad: &mut CudaSlice<f32>,
    ) -> Result<GradStep> {
        check_len("gpu backprop grad (P)", grad.len(), net.n_params())?;
        let spec = net.require_spec_for_real_targets()?;
        let bp = spec_backprop::spec_backprop(self, spec, weights, x, SpecTargets::Real(targets))?;
        *grad = bp.grad;
        Ok(GradStep {
            loss: bp.loss,
            correct: 0,
            cache: None,
        })
    }

    fn spec_layer_shares(
        &self,
        spec: &crate::model::spec::NetSpec,
        weights: &CudaSlice<f32>,
        members: usize,
        x: &CudaSlice<f32>,
        images: usize,
    ) -> Result<Vec<f64>> {
        let mut times = vec![0.0f64; spec.layers().len()];
        let mut out = self.zeros(members * images * spec.outputs())?;
        spec_forward::spec_forward_timed(
            self,
            spec,
            weights,
            members,
            x,
            images,
            &mut out,
            Some(&mut times),
        )?;
        let sum: f64 = times.iter().sum();
        Ok(times
            .into_iter()
            .map(|t| if sum > 0.0 { t / sum } else { 0.0 })
            .collect())
    }

    fn optimizer(&self, opt: &GradOptimizer) -> Result<backprop::GpuOptimizer> {
        backprop::GpuOptimizer::from_host(self, opt)
    }

    fn optimizer_step(
        &self,
        opt: &mut backprop::GpuOptimizer,
        params: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
    ) -> Result<()> {
        opt.step(self, params, grad)
    }

    fn row_mean(
        &self,
        a: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        reduce::row_mean(self, a, rows, cols, out)
    }

    fn center_and_innovate(
        &self,
        g: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        centred: &mut CudaSlice<f64>,
        innov: &mut CudaSlice<f64>,
    ) -> Result<()> {
        reduce::center_and_innovate(self, g, y, rows, cols, centred, innov)
    }

    fn gemm_f32(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        beta: f32,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        linalg::gemm(&self.blas, ta, tb, m, n, k, alpha, a, b, beta, c)
    }

    fn gemm_f64(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        a: &CudaSlice<f64>,
        b: &CudaSlice<f64>,
        beta: f64,
        c: &mut CudaSlice<f64>,
    ) -> Result<()> {
        linalg::gemm(&self.blas, ta, tb, m, n, k, alpha, a, b, beta, c)
    }

    fn add_diagonal_f64(&self, a: &mut CudaSlice<f64>, n: usize, shift: f64) -> Result<()> {
        linalg::add_diagonal_f64(self, a, n, shift)
    }

    fn block_cholesky_solve_f64(
        &self,
        a: &mut CudaSlice<f64>,
        blocks: usize,
        bs: usize,
        rhs: &mut CudaSlice<f64>,
        nrhs: usize,
    ) -> Result<()> {
        cholesky::block_cholesky_solve_f64(self, &self.solver, a, blocks, bs, rhs, nrhs)
    }

    fn block_cholesky_whiten_f64(
        &self,
        a: &mut CudaSlice<f64>,
        blocks: usize,
        bs: usize,
        x: &mut CudaSlice<f64>,
        y: &mut CudaSlice<f64>,
        nrhs: usize,
    ) -> Result<()> {
        cholesky::block_cholesky_whiten_f64(self, &self.solver, a, blocks, bs, x, y, nrhs)
    }

    fn unit_block_lower_f64(&self, a: &mut CudaSlice<f64>, n: usize, bs: usize) -> Result<()> {
        linalg::unit_block_lower_f64(self, a, n, bs)
    }

    fn solve_unit_lower_right_f64(
        &self,
        t: &CudaSlice<f64>,
        n: usize,
        b: &mut CudaSlice<f64>,
        rows: usize,
    ) -> Result<()> {
        linalg::solve_unit_lower_right_f64(self, t, n, b, rows)
    }

    fn f64_to_f32(&self, src: &CudaSlice<f64>, dst: &mut CudaSlice<f32>) -> Result<()> {
        reduce::f64_to_f32(self, src, dst)
    }

    fn add_host_f64(&self, host: &[f64], dst: &mut CudaSlice<f64>) -> Result<()> {
        reduce::add_host_f64(self, host, dst)
    }

    fn inflate_rows_f32(
        &self,
        u: &mut CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        lambda: f32,
    ) -> Result<()> {
        reduce::inflate_rows_f32(self, u, mean, rows, cols, lambda)
    }

    fn nesterov_f32(
        &self,
        u: &mut CudaSlice<f32>,
        prev: &mut CudaSlice<f32>,
        beta: f32,
    ) -> Result<()> {
        reduce::nesterov_f32(self, u, prev, beta)
    }

    fn add_scaled_f32_f64(
        &self,
        x: &CudaSlice<f32>,
        alpha: f64,
        y: &mut CudaSlice<f64>,
    ) -> Result<()> {
        reduce::add_scaled_f32_f64(self, x, alpha, y)
    }

    fn row_std_f32(
        &self,
        a: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        reduce::row_std_f32(self, a, mean, rows, cols, out)
    }

    fn add_normal_f32(
        &self,
        u: &mut CudaSlice<f32>,
        offset: usize,
        cols: usize,
        scale: &CudaSlice<f32>,
        mult: f32,
        key: [u32; 2],
        step: u32,
    ) -> Result<()> {
        reduce::add_normal_f32(self, u, offset, cols, scale, mult, key, step)
    }

    fn scale_rows_f64(
        &self,
        a: &mut CudaSlice<f64>,
        rows: usize,
        cols: usize,
        w: &[f64],
    ) -> Result<()> {
        reduce::scale_rows_f64(self, a, rows, cols, w)
    }

    fn sym_eigen_f64(&self, a: &mut CudaSlice<f64>, n: usize) -> Result<Vec<f64>> {
        linalg::sym_eigen_f64(self, &self.solver, a, n)
    }

    fn row_sq_norms_f64(&self, a: &CudaSlice<f64>, rows: usize, cols: usize) -> Result<Vec<f64>> {
        reduce::row_sq_norms_f64(self, a, rows, cols)
    }

    fn copy_f32(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        check_len("copy_f32 destination", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(src, dst)
            .map_err(cuda_err("copy_f32"))
    }

    fn copy_rows_f32(
        &self,
        src: &CudaSlice<f32>,
        src_row: usize,
        dst: &mut CudaSlice<f32>,
        dst_row: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        check_rows("copy_rows_f32 source", src.len(), src_row + rows, cols)?;
        check_rows("copy_rows_f32 destination", dst.len(), dst_row + rows, cols)?;
        if rows == 0 {
            return Ok(());
        }
        let s = src.slice(src_row * cols..(src_row + rows) * cols);
        let mut d = dst.slice_mut(dst_row * cols..(dst_row + rows) * cols);
        self.stream
            .memcpy_dtod(&s, &mut d)
            .map_err(cuda_err("copy_rows_f32"))
    }

    fn allreduce_sum_f64(
        &self,
        comm: &dyn crate::dist::Comm,
        buf: &mut CudaSlice<f64>,
    ) -> Result<()> {
        if nccl::all_reduce(&self.nccl, comm, buf)? {
            return Ok(());
        }
        crate::backend::host_allreduce_f64(self, comm, buf)
    }

    fn allreduce_sum_f32(
        &self,
        comm: &dyn crate::dist::Comm,
        buf: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if nccl::all_reduce(&self.nccl, comm, buf)? {
            return Ok(());
        }
        crate::backend::host_allreduce_f32(self, comm, buf)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("synchronizing the stream"))
    }

    fn fp32_peak_gflops(&self) -> Option<f64> {
        self.fp32_peak_gflops
    }

    /// Device time between two CUDA events around `f` ([`CudaBackend::time_ms`]).
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        CudaBackend::time_ms(self, f)
    }
}

/// A zero-filled device buffer of `n` elements on `stream`. For n = 0 it allocates one
/// element and keeps the logical length 0: `cuMemAllocAsync` is not defined to succeed
/// on 0 bytes, and an error there would be stored and returned by the next, unrelated
/// call. Dropping the buffer frees that one element.
///
/// Errors: [`Error::Cuda`] when the allocation fails.
pub(crate) fn device_zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    let buf = stream
        .alloc_zeros::<T>(n.max(1))
        .map_err(cuda_err(&format!("allocating {} elements", n.max(1))))?;
    if n > 0 {
        return Ok(buf);
    }
    let ptr = buf.leak();
    // SAFETY: `ptr` is the live one-element allocation just leaked from a slice of this
    // stream; the new slice owns it (its drop frees it) and claims 0 of its elements, so
    // nothing past the allocation is ever read or written through it. Event tracking is
    // off for every context of this crate (`CudaBackend::new`), so no event is created.
    Ok(unsafe { stream.upgrade_device_ptr(ptr, 0) })
}

/// Converts a dimension to the `int` the kernels and libraries take.
pub(crate) fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape {
        what: what.to_string(),
        expected: format!("at most {} (CUDA int)", i32::MAX),
        found: v.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp32_peak_follows_the_lane_count_and_clock() {
        // H200: 132 SMs × 128 lanes × 2 × 1.98 GHz = 66.9 TFLOP/s (the 67).
        let h200 = fp32_peak((9, 0), 132, Some(1_980_000)).expect("known");
        assert!((h200 - 66_908.16).abs() < 1e-6, "{h200}");
        // A100: 108 SMs × 64 lanes × 2 × 1.41 GHz = 19.5 TFLOP/s.
        let a100 = fp32_peak((8, 0), 108, Some(1_410_000)).expect("known");
        assert!((a100 - 19_491.84).abs() < 1e-6, "{a100}");
        assert_eq!(fp32_peak((6, 1), 20, Some(1_500_000)), None);
        assert_eq!(fp32_peak((9, 0), 132, None), None);
        assert_eq!(fp32_peak((9, 0), 132, Some(0)), None);
    }
}
