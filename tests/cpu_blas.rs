//! The CPU GEMMs through a system BLAS (`enkf_dnn::cpu::blas`, `--blas`): this test
//! process selects OpenBLAS (else MKL) and checks `gemm_f32`/`gemm_f64` for every
//! transpose combination and edge shapes against naive f64 sums, and that β = 0
//! ignores C (NaN in C does not propagate). Skips with a printed
//! reason when neither library loads; fails instead when `REQUIRE_BLAS=1` (CI installs
//! Debian's OpenBLAS). The process keeps its selection, so nothing else runs here.
//!
//! Tolerance: f32 sums of k ≤ 300 products of values in [−1, 1] in the library's own
//! order: ≤ k·eps32 relative to Σ|a·b| (≈ 2e-5·k); 1e-4·k·max|term| leaves a margin,
//! against errors of order 1 for a wrong transpose or leading dimension. f64: 1e-12·k.

use enkf_dnn::backend::{Backend, Trans};
use enkf_dnn::cpu::blas::{select, BlasChoice};
use enkf_dnn::cpu::CpuBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Selects a system BLAS (`auto`: OpenBLAS, else MKL), or None (printed) when none
/// loads.
fn system_blas() -> Option<String> {
    let name = select(BlasChoice::Auto).expect("auto never fails");
    if name.contains("built-in") {
        assert!(
            std::env::var("REQUIRE_BLAS").as_deref() != Ok("1"),
            "REQUIRE_BLAS=1 but no system BLAS loads"
        );
        println!("skipped: neither OpenBLAS nor MKL loads");
        return None;
    }
    Some(name)
}

fn naive(ta: Trans, tb: Trans, m: usize, n: usize, k: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
    let at = |i: usize, p: usize| match ta {
        Trans::No => a[i * k + p],
        Trans::Yes => a[p * m + i],
    };
    let bt = |p: usize, j: usize| match tb {
        Trans::No => b[p * n + j],
        Trans::Yes => b[j * k + p],
    };
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
        }
    }
    c
}

#[test]
fn system_gemms_match_naive_sums_for_every_transpose() {
    let Some(name) = system_blas() else { return };
    println!("BLAS: {name}");
    assert!(enkf_dnn::cpu::blas::describe().contains(&name));
    let be = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (m, n, k) in [(7, 5, 3), (64, 300, 129), (1, 17, 300), (33, 1, 8)] {
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let a: Vec<f64> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let b: Vec<f64> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let want = naive(ta, tb, m, n, k, &a, &b);
                // f64, beta = 0 over a C of NaN: overwritten, not propagated.
                let mut c64 = vec![f64::NAN; m * n];
                be.gemm_f64(ta, tb, m, n, k, 2.0, &a, &b, 0.0, &mut c64)
                    .unwrap();
                for (g, w) in c64.iter().zip(&want) {
                    assert!(
                        (g - 2.0 * w).abs() <= 1e-12 * k as f64,
                        "f64 {ta:?}{tb:?} {m}×{n}×{k}: {g} vs {}",
                        2.0 * w
                    );
                }
                // f32 with beta = 1: c = a·b + c.
                let (a32, b32): (Vec<f32>, Vec<f32>) = (
                    a.iter().map(|&v| v as f32).collect(),
                    b.iter().map(|&v| v as f32).collect(),
                );
                let want32 = naive(
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    &a32.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                    &b32.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                );
                let mut c32 = vec![0.5f32; m * n];
                be.gemm_f32(ta, tb, m, n, k, 1.0, &a32, &b32, 1.0, &mut c32)
                    .unwrap();
                for (g, w) in c32.iter().zip(&want32) {
                    assert!(
                        (f64::from(*g) - (w + 0.5)).abs() <= 1e-4 * k as f64,
                        "f32 {ta:?}{tb:?} {m}×{n}×{k}: {g} vs {}",
                        w + 0.5
                    );
                }
            }
        }
    }
}

/// Another library than the process already uses is an error naming both.
#[test]
fn a_second_selection_must_agree_with_the_first() {
    let Some(name) = system_blas() else { return };
    let err = select(BlasChoice::Builtin).expect_err("builtin after a library");
    assert!(err.to_string().contains(&name), "{err}");
    assert_eq!(select(BlasChoice::Auto).unwrap(), name);
}

/// The symmetric eigendecomposition through the library's LAPACK (`Backend::
/// sym_eigen_f64` with a system BLAS selected): the second-difference matrix's known
/// eigenvalues 2 − 2cos(kπ/(n+1)) ascending, rows of Q orthonormal, and a random
/// symmetric matrix rebuilt as Qᵀ diag(λ) Q, each to 1e-10 of its scale (f64 solves of
/// size ≤ 300: n·eps64·‖a‖ ≈ 1e-13, with a margin).
#[test]
fn system_lapack_eigendecomposition_has_the_contract() {
    if system_blas().is_none() {
        return;
    }
    let be = CpuBackend::new();
    let n = 300;
    let mut t = vec![0.0f64; n * n];
    for i in 0..n {
        t[i * n + i] = 2.0;
        if i + 1 < n {
            t[i * n + i + 1] = -1.0;
            t[(i + 1) * n + i] = -1.0;
        }
    }
    let lam = be.sym_eigen_f64(&mut t, n).unwrap();
    for (k, l) in lam.iter().enumerate() {
        let want = 2.0 - 2.0 * (((k + 1) as f64) * std::f64::consts::PI / (n + 1) as f64).cos();
        assert!((l - want).abs() < 1e-10, "eigenvalue {k}: {l} vs {want}");
    }
    for a in 0..n {
        for b in 0..n {
            let dot: f64 = (0..n).map(|i| t[a * n + i] * t[b * n + i]).sum();
            let want = if a == b { 1.0 } else { 0.0 };
            assert!((dot - want).abs() < 1e-10, "rows {a}, {b}: {dot}");
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let m = 120;
    let mut a = vec![0.0f64; m * m];
    for i in 0..m {
        for j in 0..=i {
            let v: f64 = rng.random_range(-1.0..1.0);
            a[i * m + j] = v;
            a[j * m + i] = v;
        }
    }
    let mut q = a.clone();
    let lam = be.sym_eigen_f64(&mut q, m).unwrap();
    assert!(lam.windows(2).all(|w| w[0] <= w[1]), "ascending");
    for i in 0..m {
        for j in 0..m {
            let r: f64 = (0..m).map(|k| q[k * m + i] * lam[k] * q[k * m + j]).sum();
            assert!((r - a[i * m + j]).abs() < 1e-10, "({i}, {j}): {r}");
        }
    }
}

/// `plot` does no matrix products: a `--blas` given to it is refused, naming the flag,
/// rather than ignored (before any folder is read).
#[test]
fn plot_refuses_a_blas_choice() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_enkf-dnn"))
        .args(["plot", "--blas", "openblas", "/nonexistent-folder"])
        .output()
        .expect("run the binary");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--blas") && err.contains("plot"), "{err}");
    assert!(
        !err.contains("nonexistent"),
        "refused before the folder: {err}"
    );
}
