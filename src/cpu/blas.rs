//! The CPU backend's GEMMs through a system BLAS, loaded at run time.
//!
//! The two big products of every EnKF update are GEMMs. The `gemm` crate (built in,
//! always there) reached 195 GFLOP/s at the update's shape (1000 × 18,050 × 640) on the
//! 2-core AVX-512 Xeon where OpenBLAS 0.3.21 (Debian) reached 331 and MKL 2026.2.1 (PyPI)
//! 321 (README, "The CPU products"). Like cudarc with the CUDA libraries, the library
//! is opened with `dlopen` when the program starts, so the build needs none of them and
//! a machine without one runs the built-in GEMM.
//!
//! `--blas auto` (the default) takes OpenBLAS (`libopenblas.so.0`, Debian's
//! `libopenblas0`) when it loads, else MKL (`libmkl_rt.so.3`/`.2`, e.g. PyPI's `mkl` on
//! `LD_LIBRARY_PATH`), else the built-in GEMM; `--blas openblas|mkl` requires that one
//! (an error naming what was looked for when it is missing), `--blas builtin` never
//! loads one. The library's threads are set to rayon's pool size (`--threads`) at the
//! first product. Row-major CBLAS takes our layout as it is (no transposes).
//!
//! Numbers: a system BLAS sums in its own order, so results differ from the built-in
//! GEMM's in the last bits (the EnKF's tolerances are written for that, as between CPU
//! and GPU); both OpenBLAS and MKL split the products over rows and columns, not over
//! the summed dimension, so a run is repeatable on one machine and library.

use std::sync::{Once, OnceLock};

use crate::{Error, Result};

/// Which GEMM the CPU backend uses (`--blas`).
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
pub enum BlasChoice {
    /// OpenBLAS, else MKL, else the built-in GEMM.
    #[default]
    Auto,
    /// The `gemm` crate, compiled in.
    Builtin,
    /// OpenBLAS (`libopenblas.so.0`), required.
    Openblas,
    /// Intel MKL (`libmkl_rt`), required.
    Mkl,
}

/// File names tried for each library (the dynamic loader's search path applies).
const OPENBLAS_NAMES: &[&str] = &["libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so"];
const MKL_NAMES: &[&str] = &["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"];

type Sgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);
type Dgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f64,
    *const f64,
    i32,
    *const f64,
    i32,
    f64,
    *mut f64,
    i32,
);
type SetThreads = unsafe extern "C" fn(i32);
/// LAPACK's Fortran `dsyevd_` (jobz, uplo, n, a, lda, w, work, lwork, iwork, liwork,
/// info, and gfortran's hidden lengths of the two character arguments).
type Dsyevd = unsafe extern "C" fn(
    *const u8,
    *const u8,
    *const i32,
    *mut f64,
    *const i32,
    *mut f64,
    *mut f64,
    *const i32,
    *mut i32,
    *const i32,
    *mut i32,
    usize,
    usize,
);

/// CBLAS enumerations.
const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// A loaded CBLAS library.
pub struct Cblas {
    /// What was loaded, for logs and `config.json`.
    pub name: String,
    sgemm: Sgemm,
    dgemm: Dgemm,
    set_threads: Option<SetThreads>,
    /// The library's LAPACK eigensolver, where it has one (OpenBLAS and MKL do).
    dsyevd: Option<Dsyevd>,
    threads: Once,
    // Keeps the library mapped for the process's life (the pointers above point into it).
    _lib: libloading::Library,
}

impl std::fmt::Debug for Cblas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cblas({})", self.name)
    }
}

/// The selection, made once per process.
static SELECTED: OnceLock<Option<Cblas>> = OnceLock::new();

impl Cblas {
    /// Opens the first of `names` that loads and has `cblas_sgemm` and `cblas_dgemm`.
    /// Errors: a description of every attempt.
    fn open(label: &str, names: &[&str], set_threads: &str) -> std::result::Result<Cblas, String> {
        let mut why = Vec::new();
        for file in names {
            // SAFETY: loading a BLAS runs its initialisers (thread pools, CPU detection),
            // which is what these libraries are made for; nothing else is called yet.
            let lib = match unsafe { libloading::Library::new(*file) } {
                Ok(l) => l,
                Err(e) => {
                    why.push(format!("{file}: {e}"));
                    continue;
                }
            };
            // SAFETY: the symbols are the CBLAS functions with the C signatures above
            // (the reference CBLAS header: enums as int, LP64 integers).
            let syms = unsafe {
                (
                    lib.get::<Sgemm>(b"cblas_sgemm\0").map(|s| *s),
                    lib.get::<Dgemm>(b"cblas_dgemm\0").map(|s| *s),
                    lib.get::<SetThreads>(format!("{set_threads}\0").as_bytes())
                        .map(|s| *s)
                        .ok(),
                    lib.get::<Dsyevd>(b"dsyevd_\0").map(|s| *s).ok(),
                )
            };
            match syms {
                (Ok(sgemm), Ok(dgemm), set, dsyevd) => {
                    return Ok(Cblas {
                        name: format!("{label} ({file})"),
                        sgemm,
                        dgemm,
                        set_threads: set,
                        dsyevd,
                        threads: Once::new(),
                        _lib: lib,
                    })
                }
                (Err(_), ..) => why.push(format!("{file}: no cblas_sgemm")),
                (_, Err(_), ..) => why.push(format!("{file}: no cblas_dgemm")),
            }
        }
        Err(why.join("; "))
    }

    /// Sets the library's threads to rayon's pool size, once.
    fn ensure_threads(&self) {
        self.threads.call_once(|| {
            if let Some(set) = self.set_threads {
                let n = i32::try_from(rayon::current_num_threads()).unwrap_or(i32::MAX);
                // SAFETY: the library's own thread-count setter, called before any
                // product of ours runs on it.
                unsafe { set(n) };
            }
        });
    }
}

/// Selects the CPU GEMM for this process (the first call decides; later calls return
/// the first call's result); returns what is used, in words.
///
/// Errors: [`Error::Config`] when `choice` names a library that does not load, with
/// every file tried; or when a later call asks for another library than the first got.
pub fn select(choice: BlasChoice) -> Result<String> {
    let mut failure = None;
    let chosen = SELECTED.get_or_init(|| {
        let open_blas = || Cblas::open("OpenBLAS", OPENBLAS_NAMES, "openblas_set_num_threads");
        let mkl = || Cblas::open("MKL", MKL_NAMES, "MKL_Set_Num_Threads");
        match choice {
            BlasChoice::Builtin => None,
            BlasChoice::Auto => open_blas().or_else(|_| mkl()).ok(),
            BlasChoice::Openblas => open_blas().map_err(|e| failure = Some(e)).ok(),
            BlasChoice::Mkl => mkl().map_err(|e| failure = Some(e)).ok(),
        }
    });
    if let Some(why) = failure {
        return Err(Error::Config(format!(
            "--blas {}: the library does not load ({why}); install it (Debian: \
             libopenblas0; MKL: `pip install mkl` and its lib folder on LD_LIBRARY_PATH), or \
             use --blas builtin",
            choice_name(choice)
        )));
    }
    let got = describe_selected(chosen.as_ref());
    let consistent = match choice {
        BlasChoice::Auto => true,
        BlasChoice::Builtin => chosen.is_none(),
        BlasChoice::Openblas => chosen
            .as_ref()
            .is_some_and(|c| c.name.starts_with("OpenBLAS")),
        BlasChoice::Mkl => chosen.as_ref().is_some_and(|c| c.name.starts_with("MKL")),
    };
    if !consistent {
        return Err(Error::Config(format!(
            "--blas {}: this process already uses {got}",
            choice_name(choice)
        )));
    }
    Ok(got)
}

fn choice_name(c: BlasChoice) -> &'static str {
    match c {
        BlasChoice::Auto => "auto",
        BlasChoice::Builtin => "builtin",
        BlasChoice::Openblas => "openblas",
        BlasChoice::Mkl => "mkl",
    }
}

fn describe_selected(c: Option<&Cblas>) -> String {
    match c {
        Some(c) => c.name.clone(),
        None => "the built-in gemm crate".into(),
    }
}

/// What the CPU GEMMs use now (the built-in GEMM until [`select`] chose a library).
pub fn describe() -> String {
    describe_selected(SELECTED.get().and_then(Option::as_ref))
}

/// The selected library, if any.
fn selected() -> Option<&'static Cblas> {
    SELECTED.get().and_then(Option::as_ref)
}

/// The CBLAS GEMM of one precision: `$name(ta, tb, (m, n, k), alpha, a, b, beta, c)`
/// computes `c = alpha · op(a) · op(b) + beta · c` (row-major, as `linalg::gemm_f32`)
/// through the selected library's `$field` and returns true; false (nothing done) when
/// no library is selected or a dimension is beyond its 32-bit integers. The caller has
/// checked the lengths.
macro_rules! cblas_gemm {
    ($name:ident, $t:ty, $field:ident) => {
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name(
            ta: crate::backend::Trans,
            tb: crate::backend::Trans,
            (m, n, k): (usize, usize, usize),
            alpha: $t,
            a: &[$t],
            b: &[$t],
            beta: $t,
            c: &mut [$t],
        ) -> bool {
            let Some(lib) = selected() else {
                return false;
            };
            let Some(d) = dims(ta, tb, m, n, k) else {
                return false;
            };
            lib.ensure_threads();
            // SAFETY: the caller checked a = m·k, b = k·n, c = m·n elements; with these
            // leading dimensions row-major CBLAS reads and writes exactly those extents;
            // c is a unique borrow.
            unsafe {
                (lib.$field)(
                    ROW_MAJOR,
                    d.ta,
                    d.tb,
                    d.m,
                    d.n,
                    d.k,
                    alpha,
                    a.as_ptr(),
                    d.lda,
                    b.as_ptr(),
                    d.ldb,
                    beta,
                    c.as_mut_ptr(),
                    d.ldc,
                )
            };
            true
        }
    };
}

cblas_gemm!(sgemm, f32, sgemm);
cblas_gemm!(dgemm, f64, dgemm);

/// The symmetric eigendecomposition of the row-major n × n matrix `a` through the
/// selected library's LAPACK `dsyevd` (divide and conquer, blocked): the eigenvalues
/// ascending, `a` overwritten so that row k is the unit eigenvector of eigenvalue k (a
/// symmetric row-major matrix is its own column-major transpose, and LAPACK's columns of
/// eigenvectors read row-major are rows). `None` when no library with LAPACK is selected
/// or n is beyond its integers; `Some(Err)` when LAPACK reports a failure.
pub(crate) fn dsyevd(a: &mut [f64], n: usize) -> Option<Result<Vec<f64>>> {
    let lib = selected()?;
    let f = lib.dsyevd?;
    let ni = i32::try_from(n).ok()?;
    if n == 0 {
        return Some(Ok(Vec::new()));
    }
    lib.ensure_threads();
    let (jobz, uplo) = (b'V', b'L');
    let mut w = vec![0.0f64; n];
    let mut info = 0i32;
    let (mut wq, mut iwq) = (0.0f64, 0i32);
    let query = -1i32;
    // SAFETY: a workspace query (lwork = liwork = −1) reads n and writes only the two
    // sizes and info; a holds n² values and w n.
    unsafe {
        f(
            &jobz,
            &uplo,
            &ni,
            a.as_mut_ptr(),
            &ni,
            w.as_mut_ptr(),
            &mut wq,
            &query,
            &mut iwq,
            &query,
            &mut info,
            1,
            1,
        )
    };
    if info != 0 {
        return Some(Err(Error::Config(format!(
            "LAPACK dsyevd's workspace query failed (info {info})"
        ))));
    }
    let lwork = wq as i32;
    let mut work = vec![0.0f64; lwork.max(1) as usize];
    let mut iwork = vec![0i32; iwq.max(1) as usize];
    // SAFETY: a is n × n (lda = n), w has n entries, work and iwork the sizes LAPACK
    // asked for.
    unsafe {
        f(
            &jobz,
            &uplo,
            &ni,
            a.as_mut_ptr(),
            &ni,
            w.as_mut_ptr(),
            work.as_mut_ptr(),
            &lwork,
            iwork.as_mut_ptr(),
            &iwq,
            &mut info,
            1,
            1,
        )
    };
    Some(if info == 0 {
        Ok(w)
    } else {
        Err(Error::Config(format!(
            "LAPACK dsyevd did not converge on the {n} × {n} matrix (info {info})"
        )))
    })
}

/// Row-major CBLAS arguments of `op(a)` m × k times `op(b)` k × n.
struct Dims {
    ta: i32,
    tb: i32,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
}

fn dims(
    ta: crate::backend::Trans,
    tb: crate::backend::Trans,
    m: usize,
    n: usize,
    k: usize,
) -> Option<Dims> {
    use crate::backend::Trans;
    let int = |v: usize| i32::try_from(v.max(1)).ok();
    // Stored columns: a is m × k (No) or k × m (Yes); b is k × n (No) or n × k (Yes).
    let lda = if ta == Trans::No { k } else { m };
    let ldb = if tb == Trans::No { n } else { k };
    let op = |t: Trans| if t == Trans::No { NO_TRANS } else { TRANS };
    Some(Dims {
        ta: op(ta),
        tb: op(tb),
        m: i32::try_from(m).ok()?,
        n: i32::try_from(n).ok()?,
        k: i32::try_from(k).ok()?,
        lda: int(lda)?,
        ldb: int(ldb)?,
        ldc: int(n)?,
    })
}
