//! The CPU emulation of the CUDA kernels (`tests/emu/`) as the kernel tests load it: the
//! compiled library and its entry points, the launch orders, and guarded buffers
//! (shared by `tests/kernel_emu.rs` and `tests/kernel_emu_spec.rs`).
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use cudarc::driver::LaunchConfig;

// ---------------------------------------------------------------------------------------
// The emulation library

/// `emu::Launch` of cuda_emu.hpp.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
    pub reverse: i32,
}

/// The order in which the emulation schedules threads and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

pub const ORDERS: [Order; 2] = [Order::Ascending, Order::Descending];

pub fn launch(cfg: &LaunchConfig, order: Order) -> Launch {
    Launch {
        grid: [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2],
        block: [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2],
        shared_mem_bytes: cfg.shared_mem_bytes,
        reverse: i32::from(order == Order::Descending),
    }
}

pub struct Emu {
    lib: libloading::Library,
}

impl Emu {
    /// The entry point `emu_<kernel>`, typed by the caller.
    pub fn entry<T>(&self, kernel: &str) -> libloading::Symbol<'_, T> {
        let name = format!("emu_{kernel}\0");
        // SAFETY: every caller names an entry point of tests/emu/kernels_emu.cpp with the
        // C signature written there.
        unsafe { self.lib.get(name.as_bytes()) }.unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// 0 → Ok; otherwise the emulation's message (kept per thread, as the launch was).
    pub fn result(&self, rc: i32) -> Result<(), String> {
        if rc == 0 {
            return Ok(());
        }
        let f = self.entry::<unsafe extern "C" fn() -> *const std::ffi::c_char>("last_error");
        // SAFETY: emu_last_error returns the calling thread's NUL-terminated message,
        // valid until its next launch.
        let msg = unsafe { std::ffi::CStr::from_ptr(f()) };
        Err(msg.to_string_lossy().into_owned())
    }
}

/// The compiled emulation, or None (printed) when no C++ compiler is found; with
/// `REQUIRE_EMU=1` that fails instead. A compile error always fails.
pub fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
    match EMU.get_or_init(build) {
        Ok(e) => Some(e),
        Err(why) => {
            assert!(
                std::env::var("REQUIRE_EMU").as_deref() != Ok("1"),
                "REQUIRE_EMU=1 but the kernel emulation is unavailable: {why}"
            );
            println!("skipped: {why}");
            None
        }
    }
}

/// nvcc contracts a·b + c to an FMA; so does the emulation where the CPU has FMA
/// (`-mfma -ffp-contract=fast`), else it keeps separate roundings.
pub fn fp_contraction() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            return vec!["-mfma", "-ffp-contract=fast"];
        }
    }
    vec!["-ffp-contract=off"]
}

pub fn build() -> Result<Emu, String> {
    static BUILDS: AtomicUsize = AtomicUsize::new(0);
    let root = super::crate_root();
    let out = std::env::temp_dir().join(format!(
        "enkf-kernels-emu-{}-{}.so",
        std::process::id(),
        BUILDS.fetch_add(1, Ordering::Relaxed)
    ));
    let candidates: Vec<String> = match std::env::var("CXX") {
        Ok(c) if !c.is_empty() => vec![c],
        _ => ["c++", "g++", "clang++"].map(String::from).to_vec(),
    };
    let fp = fp_contraction();
    println!("kernel emulation: {}", fp.join(" "));
    for cxx in &candidates {
        let res = Command::new(cxx)
            .args(["-std=c++17", "-O2", "-fno-fast-math"])
            .args(&fp)
            .args(["-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas"])
            .arg("-I")
            .arg(root.join("kernels"))
            .arg("-I")
            .arg(root.join("tests/emu"))
            .arg(root.join("tests/emu/kernels_emu.cpp"))
            .arg("-o")
            .arg(&out)
            .output();
        match res {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("running {cxx}: {e}")),
            Ok(o) if !o.status.success() => panic!(
                "the kernels do not compile for the emulation ({cxx}):\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Ok(_) => {
                // SAFETY: the library was just built from tests/emu; its initialisers
                // only set up empty per-thread state.
                let lib = unsafe { libloading::Library::new(&out) }
                    .map_err(|e| format!("loading {}: {e}", out.display()))?;
                let _ = std::fs::remove_file(&out); // stays mapped
                return Ok(Emu { lib });
            }
        }
    }
    Err(format!(
        "no C++ compiler found (tried {}; set CXX)",
        candidates.join(", ")
    ))
}

// ---------------------------------------------------------------------------------------
// Guarded buffers

/// Guard elements on each side of every buffer handed to a kernel.
pub const GUARD: usize = 64;

/// A value a kernel never produces, recognisable by its bits: the guard and the fill of
/// outputs the kernel must overwrite (NaN with a payload for floats).
pub trait Sentinel: Copy + std::fmt::Debug {
    const MARK: Self;
    fn bits(self) -> u64;
}
impl Sentinel for f32 {
    const MARK: Self = f32::from_bits(0x7fc0_5eed);
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
}
impl Sentinel for f64 {
    const MARK: Self = f64::from_bits(0x7ff8_0000_0000_5eed);
    fn bits(self) -> u64 {
        self.to_bits()
    }
}
impl Sentinel for i32 {
    const MARK: Self = i32::MIN + 0x5eed;
    fn bits(self) -> u64 {
        u64::from(self as u32)
    }
}
impl Sentinel for u32 {
    const MARK: Self = 0xdead_5eed;
    fn bits(self) -> u64 {
        u64::from(self)
    }
}

/// `data` between two runs of [`GUARD`] sentinels.
pub struct Guarded<T: Sentinel> {
    v: Vec<T>,
    n: usize,
}

impl<T: Sentinel> Guarded<T> {
    pub fn new(data: &[T]) -> Self {
        let mut v = vec![T::MARK; GUARD];
        v.extend_from_slice(data);
        v.extend(std::iter::repeat_n(T::MARK, GUARD));
        Guarded { v, n: data.len() }
    }

    /// An output of `n` elements the kernel must overwrite, filled with the sentinel.
    pub fn output(n: usize) -> Self {
        Guarded {
            v: vec![T::MARK; n + 2 * GUARD],
            n,
        }
    }

    pub fn ptr(&self) -> *const T {
        self.v[GUARD..].as_ptr()
    }

    pub fn mut_ptr(&mut self) -> *mut T {
        self.v[GUARD..].as_mut_ptr()
    }

    /// The contents, after checking that the guards are intact.
    pub fn get(&self, what: &str) -> Vec<T> {
        let (lo, rest) = self.v.split_at(GUARD);
        let (data, hi) = rest.split_at(self.n);
        for (side, g) in [("before", lo), ("after", hi)] {
            if let Some(i) = g.iter().position(|x| x.bits() != T::MARK.bits()) {
                panic!("{what}: element {i} of the guard {side} the buffer was overwritten");
            }
        }
        data.to_vec()
    }

    /// [`Guarded::get`], also requiring that no element still holds the sentinel.
    pub fn written(&self, what: &str) -> Vec<T> {
        let d = self.get(what);
        if let Some(i) = d.iter().position(|x| x.bits() == T::MARK.bits()) {
            panic!("{what}: element {i} of {} was never written", d.len());
        }
        d
    }
}

/// Requires the results of the two schedules to be bit-identical; returns the first.
pub fn same_in_both_orders<T: Sentinel>(what: &str, runs: Vec<Vec<T>>) -> Vec<T> {
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x.bits() != y.bits()) {
        panic!(
            "{what}: element {i} depends on the schedule: {:?} (ascending) vs {:?} \
             (descending): a missing barrier or a race",
            a[i], b[i]
        );
    }
    runs.into_iter().next().unwrap_or_default()
}

pub fn to_i32(v: usize) -> i32 {
    i32::try_from(v).expect("test sizes fit an int")
}
