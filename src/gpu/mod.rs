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
pub mod forward;
pub mod geometry;
pub mod linalg;
pub mod memory;
pub mod module;
pub mod reduce;
pub mod timing;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cusolver::DnHandle;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::backend::{check_len, check_rows, Backend, MathMode, Trans};
use crate::model::Net;
use crate::{Error, Result};

pub use memory::{MemoryEstimate, TrainShape};
pub use module::{KernelKind, KernelModule, Kernels, BUILT_WITH, MODULES};

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
    fp32_peak_gflops: Option<f64>,
    description: String,
}

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
            (
                "libnvrtc",
                !module::needs_nvrtc() || cudarc::nvrtc::sys::is_culib_present(),
            ),
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
    /// kernel module (compiling with NVRTC for the device's architecture when the build
    /// embedded sources). `math` selects TF32 tensor cores for `gemm_f32`.
    ///
    /// Errors: [`Error::Cuda`] when a library is missing, the device cannot be opened, or
    /// a module fails to load (the message names the module).
    pub fn new(ordinal: usize, math: MathMode) -> Result<Self> {
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
        let kernels = Kernels::load_all(&ctx, cc)?;
        forward::configure(&kernels)?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("querying the SM count"))?
            .max(1) as u32;
        let clock_khz = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
            .ok();
        let fp32_peak_gflops = fp32_peak(cc, sm_count, clock_khz);
        let name = ctx.name().unwrap_or_else(|_| "unknown device".into());
        let description = format!(
            "cuda ({name}, cc {}.{}, {sm_count} SMs, kernels: {BUILT_WITH}, math: {math:?})",
            cc.0, cc.1
        );
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            solver,
            kernels,
            math,
            sm_count,
            fp32_peak_gflops,
            description,
        })
    }

    /// Checks whether a usable GPU is present, for `--backend auto`.
    ///
    /// Returns a description (device, driver and library versions, library files
    /// loaded) or why the CUDA backend cannot be used. Opens device 0 and loads the
    /// kernels, so a success means [`CudaBackend::new`]`(0, …)` works.
    pub fn probe() -> std::result::Result<String, String> {
        check_libraries().map_err(|e| e.to_string())?;
        let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e:?}"))?;
        if count < 1 {
            return Err("no CUDA device found".into());
        }
        let be = CudaBackend::new(0, MathMode::Fp32).map_err(|e| e.to_string())?;
        let mut driver = 0i32;
        // SAFETY: writes one int; the driver library is loaded (checked above).
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        let (blas_v, solver_v) = linalg::library_versions(&be.blas);
        let mem = be.ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
        let libs = loaded_cuda_libraries();
        Ok(format!(
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
        ))
    }

    /// The math mode chosen at creation.
    pub fn math(&self) -> MathMode {
        self.math
    }

    /// Number of streaming multiprocessors of the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A zero-length buffer (the driver refuses zero-byte allocations).
    fn empty<T>(&self) -> Result<CudaSlice<T>> {
        self.stream
            .null()
            .map_err(cuda_err("creating an empty buffer"))
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }
}

impl Backend for CudaBackend {
    type F32 = CudaSlice<f32>;
    type F64 = CudaSlice<f64>;

    fn name(&self) -> String {
        self.description.clone()
    }

    fn zeros_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        if n == 0 {
            return self.empty();
        }
        self.stream
            .alloc_zeros(n)
            .map_err(cuda_err(&format!("allocating {n} f32")))
    }
    fn zeros_f64(&self, n: usize) -> Result<CudaSlice<f64>> {
        if n == 0 {
            return self.empty();
        }
        self.stream
            .alloc_zeros(n)
            .map_err(cuda_err(&format!("allocating {n} f64")))
    }
    fn upload_f32(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        if host.is_empty() {
            return self.empty();
        }
        self.stream
            .clone_htod(host)
            .map_err(cuda_err(&format!("uploading {} f32", host.len())))
    }
    fn write_f32(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        check_len("write_f32 destination", dst.len(), host.len())?;
        self.stream
            .memcpy_htod(host, dst)
            .map_err(cuda_err("write_f32"))
    }
    fn download_f32(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        let v = self
            .stream
            .clone_dtoh(buf)
            .map_err(cuda_err("download_f32"))?;
        self.synchronize()?;
        Ok(v)
    }
    fn download_f64(&self, buf: &CudaSlice<f64>) -> Result<Vec<f64>> {
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
        forward::ensemble_forward(self, net, weights, members, x, images, out)
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
        linalg::block_cholesky_solve_f64(self, &self.solver, a, blocks, bs, rhs, nrhs)
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

    fn copy_f32(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        check_len("copy_f32 destination", dst.len(), src.len())?;
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
