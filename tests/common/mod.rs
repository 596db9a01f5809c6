//! Helpers shared by the integration tests: the two-sided closeness check that every
//! tolerance goes through, the GPU skip rule, and the bundled data.
//!
//! Each test file states its tolerances (with their reasons) next to the tests that use
//! them; this file only applies them.
#![allow(dead_code)]

pub mod emu;
pub mod sharded;
pub mod twins;

use enkf_dnn::backend::MathMode;
use enkf_dnn::data::{default_mnist_dir, load_dir, DataSplit};
use enkf_dnn::gpu::CudaBackend;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Asserts `|got − want| ≤ atol + rtol·|want|` element-wise, reporting the worst element;
/// returns the worst ratio of error to allowance. A NaN anywhere fails.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) -> f64 {
    assert_close_scaled(what, got, want, want, atol, rtol)
}

/// Asserts `|got − want| ≤ atol + rtol·|scale|` element-wise (`scale` sets the size of
/// the relative part per element), reporting the worst element; returns the worst ratio
/// of error to allowance. A NaN anywhere fails.
pub fn assert_close_scaled(
    what: &str,
    got: &[f64],
    want: &[f64],
    scale: &[f64],
    atol: f64,
    rtol: f64,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert_eq!(scale.len(), want.len(), "{what}: length of the scale");
    let mut worst = (0usize, -1.0f64);
    for (i, ((&g, &w), &r)) in got.iter().zip(want).zip(scale).enumerate() {
        let allow = atol + rtol * r.abs();
        let err = (g - w).abs();
        let ratio = if allow > 0.0 {
            err / allow
        } else if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        if ratio.is_nan() || ratio > worst.1 {
            worst = (i, ratio);
        }
    }
    if got.is_empty() {
        return 0.0;
    }
    let i = worst.0;
    assert!(
        worst.1 <= 1.0,
        "{what}: worst element {i}: got {}, want {}, |err| = {:e} > {:e} (atol {atol:e}, rtol {rtol:e})",
        got[i],
        want[i],
        (got[i] - want[i]).abs(),
        atol + rtol * scale[i].abs()
    );
    println!("{what}: worst error / allowance = {:.3}", worst.1);
    worst.1
}

/// f32 values as f64.
pub fn up(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Largest absolute value.
pub fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// The GPU backend, or None (printing why) when there is no usable GPU; with
/// `REQUIRE_GPU=1` a missing GPU fails the test instead. One context creation per call
/// (no separate probe); after a failure the process does not try the device again.
pub fn gpu(math: MathMode) -> Option<CudaBackend> {
    match CudaBackend::open(math) {
        Ok((be, desc)) => {
            println!("GPU: {desc}");
            Some(be)
        }
        Err(why) => {
            if std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_GPU=1 but no usable GPU: {why}");
            }
            println!("skipped: no usable GPU: {why}");
            None
        }
    }
}

/// The bundled MNIST (or `$ENKF_DATA_DIR/mnist`), loaded once per test binary.
pub fn mnist() -> &'static DataSplit {
    static DATA: OnceLock<DataSplit> = OnceLock::new();
    DATA.get_or_init(|| {
        load_dir(&default_mnist_dir())
            .expect("bundled MNIST (set ENKF_DATA_DIR on another machine)")
    })
}

/// The first `train` training and `test` test images of MNIST.
pub fn limited(train: usize, test: usize) -> DataSplit {
    let d = mnist();
    DataSplit {
        train: d.train.subset(train),
        test: d.test.subset(test),
        dir: d.dir.clone(),
        task: Default::default(),
    }
}

/// The crate root: the source folder this test was built from when it still exists,
/// else the current directory (a test executable carried to another machine is run from
/// the project root there, see `../shared/device/bundle.sh`).
pub fn crate_root() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("kernels").is_dir() {
        built
    } else {
        std::env::current_dir().expect("current directory")
    }
}

/// A fresh temporary folder for this test process.
pub fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("enkf-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Writes `data` as an `.npy` file of `shape` (NumPy's dtype for `T`, C order).
pub fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
    use npyz::WriterBuilder;
    let mut bytes = Vec::new();
    let mut w = npyz::WriteOptions::<T>::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut bytes)
        .begin_nd()
        .expect("npy writer");
    w.extend(data.iter().copied()).expect("npy data");
    w.finish().expect("npy finish");
    std::fs::write(path, bytes).expect("write npy");
}

/// A linear problem y = H w + noise with P = 2 weights and n = 8 observations, as a
/// NumPy folder (the same samples for training and test); returns H (n × 2, row-major)
/// and y in f64 (tests/enkf_methods.rs, tests/eki_variants.rs).
pub fn linear_problem(dir: &Path) -> (Vec<f64>, Vec<f64>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let n = 8;
    let h: Vec<f32> = (0..n * 2).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let y: Vec<f32> = (0..n)
        .map(|i| 0.8 * h[2 * i] - 0.3 * h[2 * i + 1] + rng.random_range(-0.1f32..0.1))
        .collect();
    std::fs::create_dir_all(dir).expect("dir");
    for (x, t) in [(0, 1), (2, 3)] {
        write_npy(
            &dir.join(enkf_dnn::data::npy::NPY_NAMES[x]),
            &[n as u64, 2],
            &h,
        );
        write_npy(
            &dir.join(enkf_dnn::data::npy::NPY_NAMES[t]),
            &[n as u64],
            &y,
        );
    }
    let up = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect();
    (up(&h), up(&y))
}

/// IDX bytes: magic 00 00 08 rank, dims big-endian, then `data`.
pub fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// Writes an IDX data folder `dir` (the four files, raw): `train` and `test` images of
/// `rows × cols` with pixel values from a fixed pattern and labels i mod 10.
pub fn write_idx_dir(dir: &Path, train: u32, test: u32, rows: u32, cols: u32) {
    std::fs::create_dir_all(dir).expect("create the data folder");
    for (images, labels, n) in [
        (
            enkf_dnn::data::TRAIN_IMAGES,
            enkf_dnn::data::TRAIN_LABELS,
            train,
        ),
        (
            enkf_dnn::data::TEST_IMAGES,
            enkf_dnn::data::TEST_LABELS,
            test,
        ),
    ] {
        let px: Vec<u8> = (0..(n * rows * cols) as usize)
            .map(|j| ((j * 37 + j / 11) % 256) as u8)
            .collect();
        std::fs::write(dir.join(images), idx_bytes(&[n, rows, cols], &px)).expect("images");
        let l: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        std::fs::write(dir.join(labels), idx_bytes(&[n], &l)).expect("labels");
    }
}
