//! Every embedded kernel module compiles with NVRTC (no GPU needed) and defines every kernel
//! the build listed; PTX embedded by nvcc defines them too and is loadable by a CUDA 13.0
//! driver (PTX ISA ≤ 9.0).
//!
//! Needs libnvrtc.so.13 (e.g. `LD_LIBRARY_PATH=$CU/lib`); without it the test prints
//! "skipped: libnvrtc not found" and passes, unless `REQUIRE_NVRTC=1`.

use enkf_dnn::gpu::module::{nvrtc_options, BUILT_WITH, MODULES};
use enkf_dnn::gpu::KernelKind;

/// Newest PTX ISA the CUDA 13.0 driver accepts.
const MAX_PTX_ISA: (u32, u32) = (9, 0);

fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen libnvrtc under cudarc's candidate names.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !present {
        if std::env::var("REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("REQUIRE_NVRTC=1 but libnvrtc could not be loaded (set LD_LIBRARY_PATH)");
        }
        println!("skipped: libnvrtc not found");
    }
    present
}

fn has_entry(ptx: &str, name: &str) -> bool {
    ptx.contains(&format!(".entry {name}("))
}

fn ptx_isa(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx
        .lines()
        .find(|l| l.trim_start().starts_with(".version"))?;
    let v = line.split_whitespace().nth(1)?;
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[test]
fn module_table_lists_the_kernel_families() {
    let names: Vec<_> = MODULES.iter().map(|m| m.name).collect();
    for family in ["forward", "linalg", "reduce"] {
        assert!(
            names.contains(&family),
            "module {family} missing: {names:?}"
        );
    }
    for m in MODULES {
        assert!(!m.kernels.is_empty(), "module {} lists no kernel", m.name);
        assert!(
            !m.source.contains("#include"),
            "module {}: common.cuh was not inlined",
            m.name
        );
    }
    println!("kernels built with: {BUILT_WITH}");
}

#[test]
fn every_source_compiles_with_nvrtc_for_sm90() {
    if !nvrtc_present() {
        return;
    }
    for m in MODULES {
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(m.source, nvrtc_options("compute_90"))
            .unwrap_or_else(|e| panic!("NVRTC failed on module {}: {e}", m.name))
            .to_src();
        for k in m.kernels {
            assert!(
                has_entry(&ptx, k),
                "module {}: kernel {k} missing from the NVRTC PTX",
                m.name
            );
        }
        let isa = ptx_isa(&ptx).expect("NVRTC PTX has a .version line");
        assert!(
            isa <= MAX_PTX_ISA,
            "module {}: NVRTC emitted PTX ISA {isa:?}",
            m.name
        );
    }
}

#[test]
fn embedded_ptx_defines_every_kernel_and_suits_the_driver() {
    let ptx_modules: Vec<_> = MODULES
        .iter()
        .filter(|m| m.kind == KernelKind::Ptx)
        .collect();
    if ptx_modules.is_empty() {
        println!("skipped: the build embedded sources (no nvcc), nothing to check");
        return;
    }
    for m in ptx_modules {
        for k in m.kernels {
            assert!(
                has_entry(m.text, k),
                "module {}: kernel {k} not in its PTX",
                m.name
            );
        }
        let isa = ptx_isa(m.text).expect("embedded PTX has a .version line");
        assert!(
            isa <= MAX_PTX_ISA,
            "module {}: PTX ISA {}.{} is newer than the CUDA 13.0 driver accepts ({}.{})",
            m.name,
            isa.0,
            isa.1,
            MAX_PTX_ISA.0,
            MAX_PTX_ISA.1
        );
    }
}
