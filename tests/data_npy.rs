//! NumPy data sets (`--data-npy`): the same numbers as the IDX files they were written
//! from, any sample shape and class count with layer-spec networks, regression fitted by
//! the EnKF, and every fault an error naming the file before any work.

mod common;
use common::{limited, tmpdir, write_npy};

use enkf_dnn::backend::BackendKind;
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::npy::{load, NPY_NAMES};
use enkf_dnn::data::{DataSplit, Task};
use enkf_dnn::model::spec::NetLayers;
use enkf_dnn::train::{PartialConfig, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// MNIST pixels back to the bytes they were read from (`u8 / 255` is exact to invert).
fn bytes(images: &[f32]) -> Vec<u8> {
    images.iter().map(|&v| (v * 255.0).round() as u8).collect()
}

/// Writes the first `n_train` / `n_test` MNIST images as a NumPy folder: X `uint8`
/// N × 1 × 28 × 28, Y `int64`.
fn mnist_as_npy(dir: &Path, n_train: usize, n_test: usize) -> DataSplit {
    let data = limited(n_train, n_test);
    for (set, (x, y)) in [(&data.train, (0, 1)), (&data.test, (2, 3))] {
        let n = set.len() as u64;
        write_npy(
            &dir.join(NPY_NAMES[x]),
            &[n, 1, 28, 28],
            &bytes(&set.images),
        );
        let labels: Vec<i64> = set.labels.iter().map(|&l| i64::from(l)).collect();
        write_npy(&dir.join(NPY_NAMES[y]), &[n], &labels);
    }
    data
}

fn partial(members: usize, iterations: usize) -> PartialConfig {
    PartialConfig {
        members: Some(members),
        iterations: Some(iterations),
        eval_every: Some(iterations),
        backend: Some(BackendKind::Cpu),
        ..Default::default()
    }
}

fn err_text<T>(r: enkf_dnn::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// The folder form reads the same pixels and labels as the IDX files, and the paper's
/// fused network trains on it to the same metrics, bit for bit.
#[test]
fn mnist_as_npy_trains_exactly_as_idx() {
    let dir = tmpdir("npy-mnist");
    let idx = mnist_as_npy(&dir, 256, 100);
    let npy = load(std::slice::from_ref(&dir), None, None).expect("load npy");
    assert_eq!(npy.task, Task::Classify { classes: 10 });
    assert_eq!(npy.train.images, idx.train.images);
    assert_eq!(npy.train.labels, idx.train.labels);
    assert_eq!(npy.test.images, idx.test.images);
    assert_eq!(
        (npy.train.channels, npy.train.rows, npy.train.cols),
        (1, 28, 28)
    );

    let be = CpuBackend::new();
    let run = |data: &DataSplit, p: PartialConfig| {
        let cfg = p.resolve().expect("config");
        Trainer::new(&be, &cfg, data)
            .expect("trainer")
            .run(&mut ())
            .expect("run")
    };
    let mut p = partial(16, 12);
    let a = run(&idx, p.clone());
    p.data_npy = Some(vec![dir.clone()]);
    let b = run(&npy, p);
    let strip = |rows: Vec<enkf_dnn::train::MetricsRow>| {
        rows.into_iter()
            .map(|mut r| {
                r.elapsed_s = 0.0;
                r
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(a), strip(b));
}

/// The four-path form, N × F float32 vectors and three classes: the classes come from
/// the labels, a network must end in that many outputs, and a conv layer on vectors or
/// the fused network on non-MNIST data is an error naming what does not fit.
#[test]
fn vectors_and_class_count_come_from_the_files() {
    let dir = tmpdir("npy-vectors");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (f, n) = (6usize, 90usize);
    // Three clusters in 6 dimensions: class c has mean 2·e_c.
    let mut x = Vec::new();
    let mut y = Vec::new();
    for i in 0..n {
        let c = i % 3;
        for d in 0..f {
            x.push(if d == c { 2.0f32 } else { 0.0 } + rng.random_range(-0.5f32..0.5));
        }
        y.push(c as u8);
    }
    let paths: Vec<PathBuf> = ["tx.npy", "ty.npy", "vx.npy", "vy.npy"]
        .iter()
        .map(|p| dir.join(p))
        .collect();
    write_npy(&paths[0], &[60, f as u64], &x[..60 * f]);
    write_npy(&paths[1], &[60], &y[..60]);
    write_npy(&paths[2], &[30, f as u64], &x[60 * f..]);
    write_npy(&paths[3], &[30], &y[60..]);
    let data = load(&paths, None, None).expect("load");
    assert_eq!(data.task, Task::Classify { classes: 3 });
    assert_eq!(data.train.len(), 60);
    assert_eq!(
        data.train.input_shape(),
        enkf_dnn::model::spec::Shape::Vector(6)
    );

    let mut p = partial(60, 40);
    p.data_npy = Some(paths.clone());
    p.net = Some(NetLayers::parse("linear(3)").expect("net"));
    let cfg = p.clone().resolve().expect("config");
    assert_eq!(cfg.net().n_params(), 3 * 6 + 3);
    let rows = Trainer::new(&CpuBackend::new(), &cfg, &data)
        .expect("trainer")
        .run(&mut ())
        .expect("run");
    let last = rows.last().and_then(|r| r.test_error).expect("test error");
    // Well separated clusters: a linear classifier gets them all, chance is 66.7 %.
    assert!(last < 10.0, "test error {last} %");

    p.net = Some(NetLayers::parse("linear(10)").expect("net"));
    let e = err_text(p.clone().resolve());
    assert!(e.contains("needs 3") && e.contains("3 classes"), "{e}");
    p.net = Some(NetLayers::parse("conv2d(4,3) flatten linear(3)").expect("net"));
    let e = err_text(p.clone().resolve());
    assert!(e.contains("net[0]") && e.contains("flat vector"), "{e}");
    p.net = None;
    let e = err_text(p.clone().resolve());
    assert!(e.contains("--net") && e.contains("3 classes"), "{e}");
}

/// Regression: y = A x with a known A, the network one linear layer without bias and
/// J > P members. The EnKF on a linear map moves the ensemble mean to the least-squares
/// fit; the test MSE (the test_error column for real targets) falls by orders of magnitude.
#[test]
fn regression_targets_are_fitted_by_the_enkf() {
    let dir = tmpdir("npy-regression");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (f, k, n) = (4usize, 2usize, 256usize);
    let a: Vec<f32> = (0..k * f).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let x: Vec<f32> = (0..n * f).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut y = vec![0.0f32; n * k];
    for i in 0..n {
        for o in 0..k {
            y[i * k + o] = (0..f).map(|d| a[o * f + d] * x[i * f + d]).sum();
        }
    }
    let half = n / 2;
    write_npy(
        &dir.join(NPY_NAMES[0]),
        &[half as u64, f as u64],
        &x[..half * f],
    );
    write_npy(
        &dir.join(NPY_NAMES[1]),
        &[half as u64, k as u64],
        &y[..half * k],
    );
    write_npy(
        &dir.join(NPY_NAMES[2]),
        &[half as u64, f as u64],
        &x[half * f..],
    );
    write_npy(
        &dir.join(NPY_NAMES[3]),
        &[half as u64, k as u64],
        &y[half * k..],
    );
    let data = load(std::slice::from_ref(&dir), None, None).expect("load");
    assert_eq!(data.task, Task::Regress { outputs: 2 });

    let mut p = partial(50, 64);
    p.data_npy = Some(vec![dir.clone()]);
    p.net = Some(NetLayers::parse("linear(2,bias=false)").expect("net"));
    p.batch = Some(16);
    p.repetitions = Some(1);
    p.eval_every = Some(16);
    let cfg = p.clone().resolve().expect("config");
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, &cfg, &data).expect("trainer");
    let rows = t.run(&mut ()).expect("run");
    let evals: Vec<f64> = rows.iter().filter_map(|r| r.test_error).collect();
    let (first, last) = (evals[0], *evals.last().expect("evals"));
    eprintln!("test MSE: {evals:?}");
    assert!(first > 0.3, "the N(0, 1) start is far off: {first}");
    assert!(last < 1e-4 * first, "test MSE {first} → {last}");
    assert_eq!(rows[0].test_loss, rows[0].test_error, "both hold the MSE");
    assert!(
        rows[1].train_accuracy.is_nan(),
        "no accuracy for real targets"
    );
    // The mean weights are A (row-major out × in, as torch.nn.Linear).
    let mean = t.mean_host().expect("mean");
    for (m, a) in mean.iter().zip(&a) {
        assert!((m - a).abs() < 1e-2, "mean {mean:?} vs A {a:?}");
    }

    // SGD minimises the mean squared error on the same problem (the 256 samples at
    // lr 0.1 for 640 steps: a linear least-squares problem, convex).
    use enkf_dnn::train::gradient::{GradConfig, GradientTrainer};
    use enkf_dnn::train::optim::Optimizer;
    let mut gcfg = GradConfig::from_train(&cfg, Optimizer::Sgd, Some(0.1), 0.9, 10);
    gcfg.iterations = Some(640);
    let rows = GradientTrainer::new(&gcfg, &data)
        .expect("sgd")
        .run(&mut (), None)
        .expect("run");
    let evals: Vec<f64> = rows.iter().filter_map(|r| r.test_error).collect();
    let (first, last) = (evals[0], *evals.last().expect("evals"));
    eprintln!("SGD test MSE {first} → {last}");
    assert!(last < 1e-4 * first, "SGD test MSE {first} → {last}");
    assert!(rows[1].train_accuracy.is_nan());
    // The fused network has no squared-error path.
    let mut fused = gcfg.clone();
    fused.net = enkf_dnn::model::Net::new(Default::default(), Default::default());
    assert!(GradientTrainer::new(&fused, &data).is_err());
}

/// One update of the batch rule on the whole training set of a noisy linear problem
/// (J > P) moves the ensemble mean to the least-squares fit: the Kalman update with a
/// prior whose precision (≈ 1) is negligible beside the data's (XᵀX/γ ≈ 6,700), so the
/// mean may differ from least squares by about 1/6,700 of the weights (tolerance 2e-3).
#[test]
fn one_full_batch_update_is_least_squares() {
    let dir = tmpdir("npy-lsq");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (f, n) = (3usize, 200usize);
    let w_true = [0.7f64, -1.2, 0.4];
    let x: Vec<f32> = (0..n * f).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let y: Vec<f32> = (0..n)
        .map(|i| {
            let clean: f64 = (0..f).map(|d| w_true[d] * f64::from(x[i * f + d])).sum();
            (clean + rng.random_range(-0.5..0.5)) as f32
        })
        .collect();
    write_npy(&dir.join(NPY_NAMES[0]), &[n as u64, f as u64], &x);
    write_npy(&dir.join(NPY_NAMES[1]), &[n as u64], &y);
    write_npy(&dir.join(NPY_NAMES[2]), &[n as u64, f as u64], &x);
    write_npy(&dir.join(NPY_NAMES[3]), &[n as u64], &y);
    // Least squares by the normal equations (3 × 3, Cramer's rule), in f64.
    let mut xtx = [[0.0f64; 3]; 3];
    let mut xty = [0.0f64; 3];
    for i in 0..n {
        for a in 0..f {
            xty[a] += f64::from(x[i * f + a]) * f64::from(y[i]);
            for b in 0..f {
                xtx[a][b] += f64::from(x[i * f + a]) * f64::from(x[i * f + b]);
            }
        }
    }
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let lsq: Vec<f64> = (0..f)
        .map(|c| {
            let mut m = xtx;
            for (r, row) in m.iter_mut().enumerate() {
                row[c] = xty[r];
            }
            det(&m) / det(&xtx)
        })
        .collect();

    let mut p = partial(400, 1);
    p.data_npy = Some(vec![dir.clone()]);
    p.net = Some(NetLayers::parse("linear(1,bias=false)").expect("net"));
    p.batch = Some(n);
    p.repetitions = Some(1);
    p.update = Some(enkf_dnn::enkf::UpdateRule::Batch);
    let cfg = p.resolve().expect("config");
    let data = load(std::slice::from_ref(&dir), None, None).expect("load");
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, &cfg, &data).expect("trainer");
    t.run(&mut ()).expect("run");
    let mean = t.mean_host().expect("mean");
    for (m, l) in mean.iter().zip(&lsq) {
        assert!(
            (f64::from(*m) - l).abs() < 2e-3,
            "mean {mean:?} vs least squares {lsq:?}"
        );
    }
}

/// Every fault of a file or between files is an error naming the file.
#[test]
fn faults_name_the_file() {
    let base = tmpdir("npy-faults");
    let fresh = |name: &str| {
        let d = base.join(name);
        std::fs::create_dir_all(&d).expect("dir");
        write_npy(&d.join(NPY_NAMES[0]), &[4, 3], &[0.5f32; 12]);
        write_npy(&d.join(NPY_NAMES[1]), &[4], &[0u8, 1, 1, 0]);
        write_npy(&d.join(NPY_NAMES[2]), &[2, 3], &[0.5f32; 6]);
        write_npy(&d.join(NPY_NAMES[3]), &[2], &[1u8, 0]);
        d
    };
    let check = |d: &Path, file: usize, needle: &str| {
        let e = err_text(load(&[d.to_path_buf()], None, None));
        assert!(e.contains(NPY_NAMES[file]) && e.contains(needle), "{e}");
    };
    let ok = fresh("ok");
    assert_eq!(
        load(std::slice::from_ref(&ok), None, None)
            .expect("valid")
            .task,
        Task::Classify { classes: 2 }
    );

    let d = fresh("f64");
    write_npy(&d.join(NPY_NAMES[0]), &[4, 3], &[0.5f64; 12]);
    check(&d, 0, "float32");
    let d = fresh("count");
    write_npy(&d.join(NPY_NAMES[1]), &[3], &[0u8, 1, 1]);
    check(&d, 1, "holds 3 targets");
    let d = fresh("shape");
    write_npy(&d.join(NPY_NAMES[2]), &[2, 4], &[0.5f32; 8]);
    check(&d, 2, "differ");
    let d = fresh("mixed");
    write_npy(&d.join(NPY_NAMES[3]), &[2, 1], &[0.5f32; 2]);
    check(&d, 3, "both splits");
    let d = fresh("negative");
    write_npy(&d.join(NPY_NAMES[1]), &[4], &[0i32, 1, -1, 0]);
    check(&d, 1, "label -1 at index 2");
    let d = fresh("nan");
    let mut x = [0.5f32; 12];
    x[7] = f32::NAN;
    write_npy(&d.join(NPY_NAMES[0]), &[4, 3], &x);
    check(&d, 0, "index 7 is not finite");
    let d = fresh("rank5");
    write_npy(&d.join(NPY_NAMES[0]), &[4, 1, 1, 1, 3], &[0.5f32; 12]);
    check(&d, 0, "N × C × H × W");
    let d = fresh("missing");
    std::fs::remove_file(d.join(NPY_NAMES[2])).expect("rm");
    let e = err_text(load(std::slice::from_ref(&d), None, None));
    assert!(e.contains("test_x.npy is missing"), "{e}");
    let e = err_text(load(
        &[ok.join(NPY_NAMES[0]), ok.join(NPY_NAMES[1])],
        None,
        None,
    ));
    assert!(
        e.contains("2 path(s)") && e.contains("TRAIN_X,TRAIN_Y,TEST_X,TEST_Y"),
        "{e}"
    );

    // The configuration: --data beside --data-npy, and a fault found at resolve time.
    let mut p = partial(4, 1);
    p.data_npy = Some(vec![ok.clone()]);
    p.data = Some(ok.clone());
    assert!(err_text(p.clone().resolve()).contains("data and data_npy are both set"));
    p.data = None;
    p.data_npy = Some(vec![d]);
    assert!(err_text(p.resolve()).contains("test_x.npy is missing"));
}

/// The command line: `--data-npy` with a spec; config.json records data_npy (not data)
/// and the run resumes from its checkpoint.
#[test]
fn cli_records_and_resumes_a_numpy_run() {
    let dir = tmpdir("npy-cli");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("dir");
    mnist_as_npy(&data, 128, 64);
    let out = dir.join("run");
    let bin = env!("CARGO_BIN_EXE_enkf-dnn");
    let train = |extra: &[&str]| {
        let o = std::process::Command::new(bin)
            .arg("train")
            .args(["--data-npy", data.to_str().expect("utf-8")])
            .args(["--net", "flatten linear(10)", "-J", "8", "--backend", "cpu"])
            .args(["--eval-every", "4", "--checkpoint-every", "4"])
            .args(extra)
            .output()
            .expect("run enkf-dnn");
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        (o.status.success(), text)
    };
    let (ok, err) = train(&["--iterations", "4", "--out", out.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(cfg["data_npy"][0], data.to_str().expect("utf-8"));
    assert!(cfg.get("data").is_none(), "{cfg}");
    let (ok, err) = train(&[
        "--iterations",
        "8",
        "--resume",
        out.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{err}");
    assert!(
        !err.contains("warning"),
        "nothing of the checkpoint is dropped: {err}"
    );
    // Without --data-npy on the command line, the checkpoint's data set is used.
    let o = std::process::Command::new(bin)
        .args([
            "train",
            "--iterations",
            "12",
            "--resume",
            out.to_str().expect("utf-8"),
        ])
        .output()
        .expect("resume");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains("warning"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics");
    assert_eq!(metrics.lines().count(), 1 + 13, "{metrics}");
}
