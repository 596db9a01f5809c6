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

use cudarc::driver::sys::CUevent_flags;

use super::{cuda_err, CudaBackend};
use crate::Result;

impl CudaBackend {
    /// Runs `f` (which queues work on this backend's stream) between two CUDA timing
    /// events and returns the device milliseconds between them; waits for the end event.
    ///
    /// Errors: those of `f`; [`crate::Error::Cuda`] when an event cannot be created,
    /// recorded or read.
    pub fn time_ms<F: FnOnce() -> Result<()>>(&self, f: F) -> Result<f64> {
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
        let ms = start
            .elapsed_ms(&end)
            .map_err(cuda_err("reading the elapsed time between events"))?;
        Ok(ms as f64)
    }
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
