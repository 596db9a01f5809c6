//! Faults reported by their cause (issue 10): empty splits, data paths that are not
//! files, `--train-limit` reading only what is used, a full disk under the statistics
//! and the atomic writes, `plot` on a bad `summary.csv`, every member failing under
//! `--on-failure resample`, and a full or closed stdout.
//!
//! A full disk is `/dev/full` (every write fails with ENOSPC), reached through a
//! symbolic link where the program would create its file.

mod common;
use common::idx_bytes;

use enkf_dnn::backend::BackendKind;
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::{
    load_dir, load_dir_limited, read_images, DataError, DataSplit, Dataset, TEST_IMAGES,
    TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS,
};
use enkf_dnn::model::{Net, IMG_PIXELS};
use enkf_dnn::train::checkpoint::{self, CheckpointState, RngState};
use enkf_dnn::train::config::FailurePolicy;
use enkf_dnn::train::gradient::{GradConfig, GradientTrainer};
use enkf_dnn::train::optim::Optimizer;
use enkf_dnn::train::stats::{StatsSink, StatsWriter};
use enkf_dnn::train::{MetricsRow, PartialConfig, TrainConfig, Trainer};
use enkf_dnn::Error;
use rand::SeedableRng;
use std::io::Write;
use std::path::{Path, PathBuf};

/// ENOSPC on Linux: what every write to /dev/full fails with.
const ENOSPC: i32 = 28;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("enkf-faults-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// A folder of four raw IDX files: `n_train` and `n_test` 28 × 28 images with labels.
fn write_dir(dir: &Path, n_train: u32, n_test: u32) {
    for (images, labels, n) in [
        (TRAIN_IMAGES, TRAIN_LABELS, n_train),
        (TEST_IMAGES, TEST_LABELS, n_test),
    ] {
        let px: Vec<u8> = (0..n as usize * IMG_PIXELS)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(dir.join(images), idx_bytes(&[n, 28, 28], &px)).expect("images");
        let lb: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        std::fs::write(dir.join(labels), idx_bytes(&[n], &lb)).expect("labels");
    }
}

fn full_disk_available() -> bool {
    Path::new("/dev/full").exists()
}

fn assert_enospc(err: &Error, file: &str) {
    match err {
        Error::Io { path, source } => {
            assert!(path.ends_with(file), "{err}: names {}", path.display());
            assert_eq!(source.raw_os_error(), Some(ENOSPC), "{err}");
        }
        other => panic!("expected an I/O error naming {file}, got {other:?}: {other}"),
    }
    assert!(err.to_string().contains(file), "{err}");
}

// ---- item 7: --train-limit reads only what is used -------------------------------

/// A gzip whose header declares 5,000,000 images (3.9 GB) but whose stream holds 600:
/// with a limit of 500 it loads (nothing past the 500th image is decompressed); read
/// in full it is truncated. Before the fix every image was read, then cut.
#[test]
fn train_limit_reads_only_the_images_used() {
    let dir = tmp("limit");
    write_dir(&dir, 1, 3);
    let declared = 5_000_000u32;
    let present = 600usize;
    let px: Vec<u8> = (0..present * IMG_PIXELS).map(|i| (i % 253) as u8).collect();
    let mut images = idx_bytes(&[declared, 28, 28], &[]);
    images.extend_from_slice(&px);
    let labels = idx_bytes(&[declared], &vec![7u8; present]);
    std::fs::remove_file(dir.join(TRAIN_IMAGES)).expect("rm");
    std::fs::remove_file(dir.join(TRAIN_LABELS)).expect("rm");
    std::fs::write(dir.join(format!("{TRAIN_IMAGES}.gz")), gzip(&images)).expect("gz");
    std::fs::write(dir.join(format!("{TRAIN_LABELS}.gz")), gzip(&labels)).expect("gz");

    let split = load_dir_limited(&dir, Some(500), Some(2)).expect("limited load");
    assert_eq!(split.train.len(), 500);
    assert_eq!(split.train.images.len(), 500 * IMG_PIXELS);
    assert_eq!(split.train.labels, vec![7u8; 500]);
    assert_eq!(split.test.len(), 2);
    // The pixels are those of the file, in order.
    assert_eq!(
        split.train.images[IMG_PIXELS + 5],
        px[IMG_PIXELS + 5] as f32 / 255.0
    );

    // `train --train-limit 500 --test-limit 2` loads through the same limited reader
    // (a full read would fail: the file holds 600 of the 5,000,000 images it declares).
    let cfg = enkf_dnn::train::PartialConfig {
        data: Some(dir.clone()),
        train_limit: Some(500),
        test_limit: Some(2),
        ..Default::default()
    }
    .resolve()
    .expect("config");
    let via_train = enkf_dnn::app::load_data(&cfg).expect("train's loader honours the limits");
    assert_eq!((via_train.train.len(), via_train.test.len()), (500, 2));

    let err = load_dir(&dir).expect_err("the full file is truncated");
    assert!(matches!(err, DataError::Truncated { .. }), "{err:?}");
    assert!(err.to_string().contains(TRAIN_IMAGES), "{err}");
    // A limit beyond what is present reaches the truncation too.
    let err = load_dir_limited(&dir, Some(601), None).expect_err("601 > 600");
    assert!(matches!(err, DataError::Truncated { .. }), "{err:?}");
}

/// The headers' counts are compared even when a limit stops the read early.
#[test]
fn a_limit_does_not_hide_a_count_mismatch() {
    let dir = tmp("limit-count");
    write_dir(&dir, 40, 3);
    std::fs::write(dir.join(TRAIN_LABELS), idx_bytes(&[39], &[1u8; 39])).expect("labels");
    let err = load_dir_limited(&dir, Some(10), None).expect_err("40 images, 39 labels");
    match err {
        DataError::CountMismatch {
            n_images, n_labels, ..
        } => assert_eq!((n_images, n_labels), (40, 39)),
        other => panic!("expected CountMismatch, got {other:?}"),
    }
}

// ---- item 8: zero images -----------------------------------------------------------

#[test]
fn a_split_declaring_zero_images_is_an_error_naming_the_file() {
    for (split, n_train, n_test, file) in [
        ("training", 0, 3, TRAIN_IMAGES),
        ("test", 4, 0, TEST_IMAGES),
    ] {
        let dir = tmp(&format!("zero-{split}"));
        write_dir(&dir, n_train, n_test);
        let err = load_dir(&dir).expect_err(split);
        assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(file) && msg.contains(split), "{msg}");
    }
}

fn synthetic(n_train: usize, n_test: usize) -> DataSplit {
    let set = |n: usize| {
        Dataset::images(
            (0..n * IMG_PIXELS).map(|i| (i % 7) as f32 / 7.0).collect(),
            (0..n).map(|i| (i % 10) as u8).collect(),
            28,
            28,
        )
    };
    DataSplit {
        train: set(n_train),
        test: set(n_test),
        dir: PathBuf::from("synthetic"),
        task: Default::default(),
    }
}

fn small_config() -> TrainConfig {
    PartialConfig {
        members: Some(4),
        iterations: Some(2),
        batch: Some(4),
        backend: Some(BackendKind::Cpu),
        ..Default::default()
    }
    .resolve()
    .expect("config")
}

/// An empty training set used to panic on the first mini-batch (remainder by zero); an
/// empty test set gave a "successful" run with test error NaN.
#[test]
fn trainers_refuse_an_empty_split() {
    let be = CpuBackend::new();
    let cfg = small_config();
    for (data, split) in [(synthetic(0, 4), "training"), (synthetic(8, 0), "test")] {
        let err = Trainer::new(&be, &cfg, &data)
            .err()
            .unwrap_or_else(|| panic!("EnKF trainer accepted an empty {split} set"));
        let msg = err.to_string();
        assert!(msg.contains(split) && msg.contains("0 images"), "{msg}");
        let gcfg = GradConfig {
            iterations: Some(1),
            ..GradConfig::new(Optimizer::Sgd)
        };
        let err = GradientTrainer::new(&gcfg, &data)
            .err()
            .unwrap_or_else(|| panic!("gradient trainer accepted an empty {split} set"));
        assert!(err.to_string().contains(split), "{err}");
    }
    // A split of one image each is fine.
    let data = synthetic(1, 1);
    let rows = Trainer::new(&be, &cfg, &data)
        .expect("trainer")
        .run(&mut ())
        .expect("run");
    assert!(rows
        .last()
        .and_then(|r| r.test_error)
        .is_some_and(f64::is_finite));
}

// ---- item 10: messages ----------------------------------------------------------------

#[cfg(unix)]
#[test]
fn a_data_path_that_is_not_a_file_says_what_it_is() {
    let cases: [(&str, &str); 3] = [
        ("directory", "a directory"),
        ("dangling", "a dangling symbolic link"),
        ("fifo", "a FIFO"),
    ];
    for (kind, words) in cases {
        let dir = tmp(&format!("notafile-{kind}"));
        write_dir(&dir, 2, 2);
        let target = dir.join(TRAIN_IMAGES);
        std::fs::remove_file(&target).expect("rm");
        match kind {
            "directory" => std::fs::create_dir(&target).expect("mkdir"),
            "dangling" => {
                std::os::unix::fs::symlink(dir.join("no-such-file"), &target).expect("ln")
            }
            _ => {
                let ok = std::process::Command::new("mkfifo")
                    .arg(&target)
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    eprintln!("skipping the FIFO case: mkfifo is not available");
                    continue;
                }
            }
        }
        // Through the folder loader (which used to say "not found") and through the
        // file reader (which would block on a FIFO).
        for err in [
            load_dir(&dir).expect_err(kind),
            read_images(&target).expect_err(kind),
        ] {
            assert!(matches!(err, DataError::NotAFile { .. }), "{kind}: {err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains(TRAIN_IMAGES) && msg.contains(words) && !msg.contains("not found"),
                "{kind}: {msg}"
            );
        }
    }
}

/// Every member failing under `--on-failure resample` is not a configuration error:
/// the message says what happened, at which iteration, and what to do.
#[test]
fn all_members_failing_under_resample_names_the_cause() {
    let dir = tmp("all-fail");
    let net = Net::default();
    let members = 4;
    let init = dir.join("nan.npy");
    enkf_dnn::io::npy::write_f32(
        &init,
        &[members, net.n_params()],
        &vec![f32::NAN; members * net.n_params()],
    )
    .expect("write init");
    let mut cfg = small_config();
    cfg.init_ensemble = Some(init);
    cfg.on_failure = FailurePolicy::Resample;
    let data = synthetic(8, 4);
    let be = CpuBackend::new();
    let err = Trainer::new(&be, &cfg, &data)
        .expect("trainer")
        .run(&mut ())
        .expect_err("no member can be resampled");
    assert!(
        matches!(
            err,
            Error::TooFewToResample {
                iteration: Some(1),
                failed: 4,
                members: 4
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("iteration 1: 4 of 4 members") && !msg.contains("configuration"),
        "{msg}"
    );
}

// ---- item 9: a full disk, and what is left behind ---------------------------------------

/// The statistics worker hits ENOSPC: the trainer's next call to it returns that error
/// with the file, not "the statistics worker stopped".
#[cfg(unix)]
#[test]
fn a_full_disk_under_the_statistics_worker_is_reported_with_the_file() {
    if !full_disk_available() {
        eprintln!("skipping: /dev/full does not exist here");
        return;
    }
    let dir = tmp("stats-full");
    std::os::unix::fs::symlink("/dev/full", dir.join("stats.csv")).expect("ln");
    let net = Net::default();
    let writer = StatsWriter::create(&dir, 1).expect("create");
    let sink = StatsSink::spawn(writer, net.clone());
    let mut first_err = None;
    for t in 0..4 {
        let x = vec![0.5f32; IMG_PIXELS];
        let sent = sink
            .send(t, vec![0.01; net.n_params()], x, 1)
            .and_then(|()| sink.sync());
        if let Err(e) = sent {
            first_err = Some(e);
            break;
        }
    }
    let err = first_err.expect("writing to /dev/full must fail");
    assert_enospc(&err, "stats.csv");
    // The error was handed over once; finishing does not invent another.
    sink.finish().expect("finish after the error was returned");
}

/// The gradient runs write statistics directly: the same error, with the file.
#[cfg(unix)]
#[test]
fn a_full_disk_under_the_statistics_writer_is_reported_with_the_file() {
    if !full_disk_available() {
        eprintln!("skipping: /dev/full does not exist here");
        return;
    }
    let dir = tmp("stats-writer-full");
    std::os::unix::fs::symlink("/dev/full", dir.join("hist.csv")).expect("ln");
    let net = Net::default();
    let mut writer = StatsWriter::create(&dir, 1).expect("create");
    let x = vec![0.5f32; IMG_PIXELS];
    let stats =
        enkf_dnn::train::stats::activation_stats(&net, &vec![0.01; net.n_params()], &x, 1, true)
            .expect("stats");
    // The CSV writer buffers 8 KiB; a few iterations of histograms overflow it.
    let err = (0..100)
        .find_map(|t| writer.write(t, &stats).err())
        .or_else(|| writer.flush().err())
        .expect("writing to /dev/full must fail");
    assert_enospc(&err, "hist.csv");
}

fn checkpoint_state() -> CheckpointState {
    let rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    CheckpointState {
        config: TrainConfig::default(),
        params: 3,
        members: 2,
        repetitions: 1,
        t: 5,
        batch_global: 5,
        rep: 0,
        order: (0..10).collect(),
        shuffle_rng: RngState::of(&rng),
        adapt_rng: RngState::of(&rng),
        resample_rng: RngState::of(&rng),
        adapt_prev: None,
        rows: vec![MetricsRow::training(0, 0.0, 2, 1, 2.3, 0.1)],
        adaptive_log: Vec::new(),
        resampled: 0,
        algorithm_time: 0.0,
        nesterov_theta: None,
        shards: None,
    }
}

/// The three atomic writers (checkpoint.bin, model.safetensors, .npy) after a failed
/// write (ENOSPC) and after a failed rename: the error names the file, no `.tmp` is
/// left, and an existing file keeps its old content.
#[cfg(unix)]
#[test]
fn failed_atomic_writes_leave_no_tmp_file() {
    let net = Net::default();
    let weights = vec![0.25f32; net.n_params()];
    type Writer<'a> = Box<dyn Fn(&Path) -> enkf_dnn::Result<()> + 'a>;
    let writers: [(&str, Writer); 3] = [
        (
            "checkpoint.bin",
            Box::new(|p: &Path| checkpoint::write(p, &checkpoint_state(), &[1.0; 6])),
        ),
        (
            "model.safetensors",
            Box::new(|p: &Path| enkf_dnn::io::safetensors::write_net(p, &net, &weights)),
        ),
        (
            "ensemble.npy",
            Box::new(|p: &Path| enkf_dnn::io::npy::write_f32(p, &[2, 2], &[1.0; 4])),
        ),
    ];
    for (name, write) in &writers {
        let dir = tmp(&format!("atomic-{name}"));
        let path = dir.join(name);
        let tmp_file = enkf_dnn::io::tmp_path(&path);
        assert!(tmp_file.to_string_lossy().ends_with(&format!("{name}.tmp")));
        write(&path).expect("a normal write");
        let good = std::fs::read(&path).expect("read");

        if full_disk_available() {
            // The temporary file lands on a full disk.
            std::os::unix::fs::symlink("/dev/full", &tmp_file).expect("ln");
            let err = write(&path).expect_err("ENOSPC");
            assert_enospc(&err, name);
            assert!(
                std::fs::symlink_metadata(&tmp_file).is_err(),
                "{name}: {} left behind",
                tmp_file.display()
            );
            assert_eq!(std::fs::read(&path).expect("read"), good, "{name} changed");
        }

        // The rename fails: the target is a non-empty folder.
        let blocked = dir.join(format!("blocked-{name}"));
        std::fs::create_dir_all(blocked.join("inside")).expect("mkdir");
        let err = write(&blocked).expect_err("rename onto a folder");
        assert!(
            err.to_string().contains(&format!("blocked-{name}")),
            "{err}"
        );
        let blocked_tmp = enkf_dnn::io::tmp_path(&blocked);
        assert!(
            std::fs::symlink_metadata(&blocked_tmp).is_err(),
            "{name}: {} left behind",
            blocked_tmp.display()
        );
    }
}

// ---- item 9: plot on a bad summary.csv ----------------------------------------------------

const PLOT_JSON: &str = r#"{"experiment": "figx", "title": "T", "x": "iteration",
  "x_label": "iteration", "y_label": "test error (%)", "log_y": false,
  "runs": [{"name": "a", "label": "A"}], "stats": []}"#;
const SUMMARY_HEADER: &str = "run,label,iteration,epoch,test_error_mean,test_error_std,seeds\n";

#[test]
fn plot_names_the_summary_file_and_refuses_an_empty_one() {
    let cases = [
        ("empty", String::new(), "holds no rows"),
        ("header-only", SUMMARY_HEADER.to_string(), "holds no rows"),
        (
            "other-run",
            format!("{SUMMARY_HEADER}b,B,0,0.0,90.0,0.0,1\n"),
            "no rows for run 'a'",
        ),
        (
            "bad-float",
            format!("{SUMMARY_HEADER}a,A,0,0.0,ninety,0.0,1\n"),
            "test_error_mean",
        ),
        ("short-row", format!("{SUMMARY_HEADER}a,A,0\n"), "record"),
    ];
    for (name, text, why) in cases {
        let dir = tmp(&format!("plot-{name}"));
        std::fs::write(dir.join("plot.json"), PLOT_JSON).expect("spec");
        std::fs::write(dir.join("summary.csv"), &text).expect("summary");
        let err = enkf_dnn::reproduce::plot_dir(&dir).expect_err(name);
        let msg = err.to_string();
        assert!(
            msg.contains("summary.csv") && msg.contains(why) && !msg.contains("writing"),
            "{name}: {msg}"
        );
        assert!(
            !dir.join("test-error.png").exists(),
            "{name}: a chart was drawn"
        );
    }
    // A good one draws.
    let dir = tmp("plot-good");
    std::fs::write(dir.join("plot.json"), PLOT_JSON).expect("spec");
    std::fs::write(
        dir.join("summary.csv"),
        format!("{SUMMARY_HEADER}a,A,0,0.0,90.0,0.0,1\na,A,10,0.5,40.0,0.0,1\n"),
    )
    .expect("summary");
    enkf_dnn::reproduce::plot_dir(&dir).expect("plot");
    assert!(dir.join("test-error.png").is_file());
    // A bad plot.json is named too.
    std::fs::write(dir.join("plot.json"), "{\"experiment\": 3}").expect("spec");
    let err = enkf_dnn::reproduce::plot_dir(&dir).expect_err("bad spec");
    assert!(err.to_string().contains("plot.json"), "{err}");
}

// ---- item 10: stdout full or closed ---------------------------------------------------------

/// A tiny training run of the binary on a 4-image data folder.
fn train_command(data: &Path, out: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_enkf-dnn"));
    c.args([
        "train",
        "--backend",
        "cpu",
        "-J",
        "4",
        "--iterations",
        "1",
        "--batch",
        "2",
    ])
    .arg("--data")
    .arg(data)
    .arg("--out")
    .arg(out);
    c
}

/// `> /dev/full` used to panic in `println!` after the run; now it is an error with the
/// cause (exit status 1), and the run's files are all there.
#[cfg(unix)]
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    if !full_disk_available() {
        eprintln!("skipping: /dev/full does not exist here");
        return;
    }
    let data = tmp("stdout-data");
    write_dir(&data, 4, 2);
    let out = tmp("stdout-full").join("run");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let o = train_command(&data, &out)
        .stdout(full)
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("standard output") && stderr.contains("No space left"),
        "{stderr}"
    );
    for f in [
        "config.json",
        "metrics.csv",
        "model.safetensors",
        "mean.npy",
    ] {
        assert!(out.join(f).is_file(), "{f} missing: {stderr}");
    }
}

/// A closed stdout (`>&-`) is not an error: the run succeeds.
#[cfg(unix)]
#[test]
fn a_closed_stdout_does_not_fail_the_run() {
    let data = tmp("stdout-closed-data");
    write_dir(&data, 4, 2);
    let out = tmp("stdout-closed").join("run");
    let inner = train_command(&data, &out);
    let mut c = std::process::Command::new("sh");
    c.arg("-c")
        .arg("exec \"$0\" \"$@\" >&-")
        .arg(inner.get_program())
        .args(inner.get_args());
    let o = c.output().expect("run the binary");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{:?}: {stderr}", o.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.join("metrics.csv").is_file(), "{stderr}");
}

/// A pipe whose reader has gone (`| head` that exited): an error with the cause, not a
/// panic, and the run's files are there.
#[cfg(unix)]
#[test]
fn a_broken_stdout_pipe_is_an_error_not_a_panic() {
    let data = tmp("stdout-pipe-data");
    write_dir(&data, 4, 2);
    let out = tmp("stdout-pipe").join("run");
    let mut child = train_command(&data, &out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("standard output"), "{stderr}");
    assert!(out.join("model.safetensors").is_file(), "{stderr}");
}
