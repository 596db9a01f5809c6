//! Every embedded kernel module compiles with NVRTC (no GPU needed) and defines every kernel
//! the build listed; PTX embedded by nvcc, one per architecture (compute_75 for every
//! sm_75+ device, compute_90 for Hopper), defines them too and is loadable by a CUDA 13.0
//! driver (PTX ISA ≤ 9.0).
//!
//! Needs libnvrtc.so.13 (e.g. `LD_LIBRARY_PATH=$CU/lib`); without it the test prints
//! "skipped: libnvrtc not found" and passes, unless `REQUIRE_NVRTC=1`.

use enkf_dnn::gpu::module::{
    embedded_ptx_archs, nvrtc_options, BUILT_WITH, MIN_COMPUTE_CAPABILITY, MODULES,
};

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

use enkf_dnn::gpu::timing::ptx_isa;

/// The `.target sm_NN` of a PTX text, as NN.
fn ptx_target(ptx: &str) -> Option<u32> {
    let line = ptx
        .lines()
        .find(|l| l.trim_start().starts_with(".target"))?;
    let t = line.split_whitespace().nth(1)?.trim_end_matches(',');
    t.strip_prefix("sm_")?.parse().ok()
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
fn every_source_compiles_with_nvrtc_for_every_architecture_family() {
    if !nvrtc_present() {
        return;
    }
    // What start-up compiles for the device's own architecture where no PTX suits.
    for (m, arch) in MODULES
        .iter()
        .flat_map(|m| ["compute_75", "compute_89", "compute_90"].map(|a| (m, a)))
    {
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(m.source, nvrtc_options(arch))
            .unwrap_or_else(|e| panic!("NVRTC failed on module {} for {arch}: {e}", m.name))
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
    let archs = embedded_ptx_archs();
    if archs.is_empty() {
        println!("skipped: the build embedded sources (no nvcc), nothing to check");
        return;
    }
    // Every sm_75+ device must find PTX it runs: the oldest embedded architecture is the
    // oldest CUDA 13 supports (unless ENKF_CUDA_ARCH narrowed the build on purpose).
    if std::env::var_os("ENKF_CUDA_ARCH").is_none() {
        assert_eq!(archs[0], MIN_COMPUTE_CAPABILITY, "embedded: {archs:?}");
        assert!(archs.contains(&90), "Hopper PTX missing: {archs:?}");
    }
    for m in MODULES {
        let got: Vec<u32> = m.ptx.iter().map(|&(cc, _)| cc).collect();
        assert_eq!(got, archs, "module {}: architectures", m.name);
        for &(cc, text) in m.ptx {
            assert_eq!(
                ptx_target(text),
                Some(cc),
                "module {} compute_{cc}: .target",
                m.name
            );
            for k in m.kernels {
                assert!(
                    has_entry(text, k),
                    "module {} compute_{cc}: kernel {k} not in its PTX",
                    m.name
                );
            }
            let isa = ptx_isa(text).expect("embedded PTX has a .version line");
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
}
