//! Timing with CUDA events, and NVTX ranges for profilers.
//!
//! [`CudaBackend::time_ms`] brackets queued work with two timing events on the backend's
//! stream: the result is device time between them, without the host's launch latency
//! before the first kernel.
//!
//! [`range`] pushes an NVTX range (`nvtxRangePushA`/`nvtxRangePop` of
//! `libnvToolsExt.so.1`, opened once with `dlopen`) so that `nsys profile --trace
//! cuda,nvtx` shows the phases by name. When the library is absent every call is a
//! no-op: NVTX is an aid, never a requirement. `ENKF_NVTX_LIBRARY=/path/to/libnvToolsExt.so.1`
//! names the library explicitly (CUDA 13 toolkits no longer ship it; the `nvidia-nvtx`
//! Python wheel, e.g. PyTorch's, does). The symbols are looked up by hand
//! (`dlopen`/`dlsym` of the C library) because `libloading` is not a direct dependency;
//! cudarc's own `nvtx` feature would do the same once enabled in Cargo.toml.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use cudarc::driver::sys::{CUevent, CUevent_flags, CUresult};

use super::{cuda_err, CudaBackend};
use crate::Result;

impl CudaBackend {
    /// Runs `f` (which queues work on this backend's stream) between two CUDA timing
    /// events and returns the device milliseconds between them; waits for the end event.
    ///
    /// Errors: those of `f`; [`crate::Error::Cuda`] when an event cannot be created,
    /// recorded or read, or the driver has no elapsed-time entry point.
    pub fn time_ms<F: FnOnce() -> Result<()>>(&self, f: F) -> Result<f64> {
        let elapsed = event_elapsed_fn()?;
        let start = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("creating a timing event"))?;
        let end = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("creating a timing event"))?;
        start
            .record(&self.stream)
            .map_err(cuda_err("recording the start event"))?;
        f()?;
        end.record(&self.stream)
            .map_err(cuda_err("recording the end event"))?;
        end.synchronize()
            .map_err(cuda_err("waiting for the end event"))?;
        let mut ms = 0f32;
        // SAFETY: both events were created in this backend's context and recorded on its
        // stream, the end event has completed (so has the start, recorded before it on
        // the same stream), and both live until the end of this function.
        unsafe { elapsed(&mut ms, start.cu_event(), end.cu_event()) }
            .result()
            .map_err(cuda_err("reading the elapsed time between events"))?;
        Ok(f64::from(ms))
    }
}

/// `cuEventElapsedTime` and `cuEventElapsedTime_v2` have this signature.
type ElapsedFn = unsafe extern "C" fn(*mut f32, CUevent, CUevent) -> CUresult;

/// The driver's elapsed-time entry point: `cuEventElapsedTime_v2` (driver 12.8 and
/// newer; what cudarc's CUDA 13 bindings call, panicking where it is absent) or else the
/// original `cuEventElapsedTime` (every driver, same semantics), looked up once.
///
/// Errors: [`crate::Error::Cuda`] when the driver library exports neither.
fn event_elapsed_fn() -> Result<ElapsedFn> {
    static ELAPSED: OnceLock<Option<ElapsedFn>> = OnceLock::new();
    let found = *ELAPSED.get_or_init(|| {
        // SAFETY: the driver library was found by `check_libraries` before any backend
        // exists; `get` only looks a symbol up, and both names have type `ElapsedFn`
        // in the CUDA driver API.
        unsafe {
            let lib = cudarc::driver::sys::culib();
            [
                &b"cuEventElapsedTime_v2\0"[..],
                &b"cuEventElapsedTime\0"[..],
            ]
            .iter()
            .find_map(|&name| lib.get::<ElapsedFn>(name).ok().map(|f| *f))
        }
    });
    found.ok_or_else(|| {
        crate::Error::Cuda(
            "the NVIDIA driver exports neither cuEventElapsedTime_v2 nor cuEventElapsedTime".into(),
        )
    })
}

/// The CUDA version (major, minor) a driver must support to load PTX of ISA `isa`
/// (the `.version` line nvcc and NVRTC write): ISA 8.x came with CUDA 12.x (8.5 with
/// 12.5 and 12.6, 8.6 with 12.7 …), ISA 9.0 with CUDA 13.0. `None` for an ISA older than
/// 8.0 (CUDA 11, which CUDA 13 drivers load anyway) or unknown.
pub fn driver_needed_for_ptx(isa: (u32, u32)) -> Option<(u32, u32)> {
    match isa {
        (8, minor @ 0..=5) => Some((12, minor)),
        (8, minor @ 6..=8) => Some((12, minor + 1)),
        (9, 0) => Some((13, 0)),
        _ => None,
    }
}

/// The PTX ISA of a PTX text (its `.version X.Y` line).
pub fn ptx_isa(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx
        .lines()
        .find(|l| l.trim_start().starts_with(".version"))?;
    let v = line.split_whitespace().nth(1)?;
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The driver's CUDA version as (major, minor) from `cuDriverGetVersion`'s 1000·major +
/// 10·minor.
pub fn split_driver_version(v: i32) -> (u32, u32) {
    let v = v.max(0) as u32;
    (v / 1000, (v % 1000) / 10)
}

type PushFn = unsafe extern "C" fn(*const c_char) -> c_int;
type PopFn = unsafe extern "C" fn() -> c_int;

/// The two NVTX entry points, when the library was found.
#[derive(Clone, Copy)]
struct Nvtx {
    push: PushFn,
    pop: PopFn,
}

/// Library names tried in order (the CUDA toolkit and the `nvidia-nvtx` wheels ship the
/// versioned name; some installs only the plain one).
const NVTX_LIBRARIES: [&CStr; 2] = [c"libnvToolsExt.so.1", c"libnvToolsExt.so"];

#[cfg(target_os = "linux")]
mod dl {
    use std::ffi::{c_char, c_int, c_void};
    pub const RTLD_NOW: c_int = 2;
    extern "C" {
        pub fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
        pub fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
}

#[cfg(target_os = "linux")]
fn load_nvtx() -> Option<Nvtx> {
    let explicit = std::env::var("ENKF_NVTX_LIBRARY")
        .ok()
        .and_then(|p| CString::new(p).ok());
    let names = explicit
        .iter()
        .map(CString::as_c_str)
        .chain(NVTX_LIBRARIES.iter().copied());
    for name in names {
        // SAFETY: dlopen with a NUL-terminated name; a null handle means "not found".
        // The handle is never closed, so the symbols stay valid for the process.
        let handle = unsafe { dl::dlopen(name.as_ptr(), dl::RTLD_NOW) };
        if handle.is_null() {
            continue;
        }
        // SAFETY: dlsym on a live handle with NUL-terminated names.
        let (push, pop): (*mut c_void, *mut c_void) = unsafe {
            (
                dl::dlsym(handle, c"nvtxRangePushA".as_ptr()),
                dl::dlsym(handle, c"nvtxRangePop".as_ptr()),
            )
        };
        if push.is_null() || pop.is_null() {
            continue;
        }
        // SAFETY: the NVTX C API declares `int nvtxRangePushA(const char*)` and
        // `int nvtxRangePop(void)`; these are those symbols.
        return Some(unsafe {
            Nvtx {
                push: std::mem::transmute::<*mut c_void, PushFn>(push),
                pop: std::mem::transmute::<*mut c_void, PopFn>(pop),
            }
        });
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn load_nvtx() -> Option<Nvtx> {
    None
}

fn nvtx() -> Option<Nvtx> {
    static NVTX: OnceLock<Option<Nvtx>> = OnceLock::new();
    *NVTX.get_or_init(load_nvtx)
}

/// Whether NVTX ranges are recorded (`libnvToolsExt` was found).
pub fn nvtx_available() -> bool {
    nvtx().is_some()
}

/// An open NVTX range; closed when dropped. Ranges nest (push/pop per thread).
#[must_use = "the range closes when this guard is dropped"]
pub struct Range {
    open: Option<Nvtx>,
}

/// Opens an NVTX range named `name` (e.g. "forward", "update"), closed when the returned
/// guard is dropped. A no-op without `libnvToolsExt` or when `name` holds a NUL byte.
pub fn range(name: &str) -> Range {
    let open = nvtx().and_then(|n| {
        let name = CString::new(name).ok()?;
        // SAFETY: `push` is nvtxRangePushA; NVTX copies the message before returning.
        unsafe { (n.push)(name.as_ptr()) };
        Some(n)
    });
    Range { open }
}

impl Drop for Range {
    fn drop(&mut self) {
        if let Some(n) = self.open {
            // SAFETY: `pop` is nvtxRangePop, closing the range this guard pushed.
            unsafe { (n.pop)() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_isa_maps_to_the_driver_it_needs() {
        assert_eq!(driver_needed_for_ptx((9, 0)), Some((13, 0)));
        assert_eq!(driver_needed_for_ptx((8, 7)), Some((12, 8)));
        assert_eq!(driver_needed_for_ptx((8, 5)), Some((12, 5)));
        assert_eq!(driver_needed_for_ptx((8, 0)), Some((12, 0)));
        assert_eq!(driver_needed_for_ptx((7, 8)), None);
        assert_eq!(driver_needed_for_ptx((9, 9)), None);
        assert_eq!(ptx_isa("//\n.version 9.0\n.target sm_75\n"), Some((9, 0)));
        assert_eq!(ptx_isa(".target sm_75"), None);
        assert_eq!(split_driver_version(13000), (13, 0));
        assert_eq!(split_driver_version(12080), (12, 8));
    }

    #[test]
    fn ranges_without_the_library_are_harmless() {
        // With or without libnvToolsExt, opening and closing (nested) ranges must not
        // fail; a name with a NUL byte is skipped rather than truncated.
        let outer = range("outer");
        {
            let _inner = range("inner");
            let bad = range("bad\0name");
            assert!(bad.open.is_none());
        }
        assert_eq!(outer.open.is_some(), nvtx_available());
    }
}
