//! Nothing a user types, and no signal, loses a run or silently changes it: the output
//! folder guard (an earlier run refused unless --overwrite, one run at a time), the
//! resume check (only some settings may change), signals (SIGTERM/SIGUSR1 checkpoint and
//! exit 128 + n), and checks made before any work (output paths, memory, every run of
//! `reproduce`). Most tests run the `enkf-dnn` binary on a few bundled MNIST images.

mod common;

use enkf_dnn::run_dir::{check_output_file, Existing, RunDir, LOCK_FILE};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_enkf-dnn"));
    c.env(
        "ENKF_DATA_DIR",
        common::crate_root()
            .join("data")
            .to_str()
            .expect("utf-8 path"),
    );
    c
}

/// A tiny EnKF run: 4 members, 128 training and 100 test images, on the CPU.
const TINY: &[&str] = &[
    "train",
    "--backend",
    "cpu",
    "--members",
    "4",
    "--train-limit",
    "128",
    "--test-limit",
    "100",
    "--threads",
    "1",
];

fn train(out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(TINY)
        .args(["--out", out.to_str().expect("utf-8")])
        .args(extra)
        .output()
        .expect("run enkf-dnn")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fresh(name: &str) -> PathBuf {
    let d = common::tmpdir(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn an_earlier_run_is_refused_and_overwrite_clears_only_its_files() {
    let dir = fresh("guard-existing");
    let first = train(&dir, &["--iterations", "3"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let metrics = std::fs::read(dir.join("metrics.csv")).expect("metrics");

    // A second run on the same folder: refused, nothing touched.
    std::fs::write(
        dir.join("checkpoint.bin"),
        b"stale checkpoint of the other run",
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let second = train(&dir, &["--iterations", "2"]);
    assert!(!second.status.success());
    let e = stderr(&second);
    assert!(
        e.contains("already holds a run") && e.contains("--overwrite") && e.contains("--resume"),
        "{e}"
    );
    assert_eq!(std::fs::read(dir.join("metrics.csv")).unwrap(), metrics);

    // --overwrite without --out has nothing to replace: an error, not ignored.
    let o = bin()
        .args(TINY)
        .args(["--iterations", "2", "--overwrite"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no --out was given"), "{}", stderr(&o));

    // --overwrite: the old run's files go (the stale checkpoint too), others stay.
    let third = train(&dir, &["--iterations", "2", "--overwrite"]);
    assert!(third.status.success(), "{}", stderr(&third));
    assert!(
        !dir.join("checkpoint.bin").exists(),
        "stale checkpoint kept"
    );
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
    let rows = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(
        rows.lines().count(),
        1 + 3,
        "header + iterations 0..=2: {rows}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_locked_folder_is_refused_with_the_owners_process_id() {
    let dir = fresh("guard-lock");
    let held = RunDir::open(&dir, Existing::Refuse).expect("first lock");
    let err = RunDir::open(&dir, Existing::Refuse).expect_err("second lock");
    let msg = err.to_string();
    assert!(
        msg.contains("in use by another enkf-dnn run")
            && msg.contains(&format!("process {}", std::process::id())),
        "{msg}"
    );
    drop(held);
    RunDir::open(&dir, Existing::Refuse).expect("free again once the first is dropped");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn output_files_are_checked_before_any_work() {
    let dir = fresh("guard-paths");
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no-such-folder").join("u.npy");
    let e = check_output_file("--save-ensemble", &missing).expect_err("missing folder");
    assert!(e.to_string().contains("no-such-folder"), "{e}");
    let e = check_output_file("--save-ensemble", &dir).expect_err("a folder");
    assert!(e.to_string().contains("is a folder"), "{e}");
    check_output_file("--save-ensemble", &dir.join("u.npy")).expect("writable");
    assert!(
        !dir.join("u.npy").exists(),
        "the check must not leave the file behind"
    );

    // The program: a bad --save-ensemble fails before training (no metrics rows written).
    let out = dir.join("run");
    let o = train(
        &out,
        &[
            "--iterations",
            "2",
            "--save-ensemble",
            missing.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-folder"), "{}", stderr(&o));
    assert!(!out.join("metrics.csv").exists(), "training started anyway");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_ensemble_too_large_for_the_machine_is_refused_before_the_data_is_read() {
    // The data folder does not exist: the memory error must come first.
    let o = bin()
        .args([
            "train",
            "--backend",
            "cpu",
            "--members",
            "1000000000",
            "--data",
            "/nonexistent-enkf-data",
        ])
        .output()
        .expect("run");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("J = 1000000000 members need at least") && e.contains("available"),
        "{e}"
    );
    assert!(e.contains("--members"), "no advice: {e}");
    assert!(!e.contains("nonexistent-enkf-data"), "data read first: {e}");
}

#[test]
fn reproduce_checks_every_run_before_the_first() {
    let dir = fresh("guard-reproduce");
    let o = bin()
        .args(["reproduce", "all", "--quick", "--backend", "cpu", "-J", "1"])
        .args(["--out", dir.to_str().unwrap()])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("members"), "{}", stderr(&o));
    // No experiment started: no experiment folder was written.
    let written: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "runs started: {written:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts a long run, waits until it trains (metrics rows on disk), returns it.
fn start_long_run(dir: &Path) -> std::process::Child {
    let mut child = bin()
        .args(TINY)
        .args(["--out", dir.to_str().unwrap(), "--iterations", "1000000"])
        .args(["--eval-every", "1000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Poll (not a timing assertion: only a bound on waiting) until rows appear.
    for _ in 0..600 {
        let rows = std::fs::read_to_string(dir.join("metrics.csv")).unwrap_or_default();
        if rows.lines().count() > 3 {
            return child;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the run did not start training within a minute");
}

fn signal(child: &std::process::Child, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

#[test]
fn sigterm_and_sigusr1_checkpoint_and_a_resume_may_only_extend_the_run() {
    let dir = fresh("guard-signals");
    let child = start_long_run(&dir);
    let lock = std::fs::read_to_string(dir.join(LOCK_FILE)).expect("lock file");
    assert_eq!(lock.trim(), child.id().to_string());

    // A second run on the folder while the first holds it: refused with its PID.
    let second = train(&dir, &["--iterations", "2", "--overwrite"]);
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains(&format!("process {}", child.id())),
        "{}",
        stderr(&second)
    );

    // SIGTERM (what Slurm sends): checkpoint at the iteration boundary, exit 143.
    signal(&child, "TERM");
    let out = child.wait_with_output().expect("wait");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(143), "{e}");
    assert!(e.contains("SIGTERM") && e.contains("--resume"), "{e}");
    let ckpt = enkf_dnn::train::checkpoint::path_in(&dir);
    let (state, _) = enkf_dnn::train::checkpoint::read(&ckpt).expect("checkpoint");
    let done = state.t;
    assert!(done >= 3, "stopped at {done}");
    let metrics = std::fs::read(dir.join("metrics.csv")).unwrap();

    // Settings that would change the run are refused, naming the setting and both values;
    // nothing in the folder changes.
    let resume = |extra: &[&str]| {
        bin()
            .args(["train", "--resume", dir.to_str().unwrap()])
            .args(extra)
            .output()
            .expect("resume")
    };
    for (flags, want) in [
        (
            &["--optimizer", "sgd"][..],
            "optimizer: the checkpoint's run has enkf, this one sgd",
        ),
        (
            &["-r", "4"][..],
            "repetitions: the checkpoint's run has 8, this one 4",
        ),
        (
            &["--gamma", "0.5"][..],
            "gamma: the checkpoint's run has 0.01",
        ),
        (&["--data", "/tmp"][..], "data: the checkpoint's run has"),
        (&["--iterations", "2"][..], "nothing to resume"),
    ] {
        let o = resume(flags);
        assert!(!o.status.success(), "{flags:?} accepted");
        assert!(stderr(&o).contains(want), "{flags:?}: {}", stderr(&o));
        assert_eq!(
            std::fs::read(dir.join("metrics.csv")).unwrap(),
            metrics,
            "{flags:?} touched metrics.csv"
        );
    }

    // A longer run is allowed: it continues to the new end, then SIGUSR1 is exercised on
    // a second long continuation (exit 138 on Linux).
    let target = done + 3;
    let o = resume(&["--iterations", &target.to_string(), "--threads", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(rows.lines().count(), 1 + target + 1, "rows 0..={target}");

    let child = bin()
        .args(["train", "--resume", dir.to_str().unwrap()])
        .args(["--iterations", "1000000", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    for _ in 0..600 {
        let n = std::fs::read_to_string(dir.join("metrics.csv"))
            .unwrap_or_default()
            .lines()
            .count();
        if n > target + 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&child, "USR1");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(enkf_dnn::signals::StopSignal::User1.exit_code()),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("SIGUSR1"), "{}", stderr(&out));
    let (state, _) = enkf_dnn::train::checkpoint::read(&ckpt).expect("checkpoint");
    assert!(state.t > target, "no progress saved: {}", state.t);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `reproduce` keeps an EnKF run that a signal stops: SIGTERM checkpoints it and exits
/// 143 naming the command to rerun; the same command continues it from the checkpoint
/// (not from iteration 0) and a second SIGTERM checkpoints it again further on.
#[test]
fn reproduce_checkpoints_on_sigterm_and_the_same_command_continues() {
    use std::io::{BufRead, BufReader};
    let out = fresh("guard-reproduce-sigterm");
    let run_dir = out.join("methods").join("authors").join("seed-0");
    let start = || {
        bin()
            .args(["reproduce", "methods", "--out", out.to_str().unwrap()])
            .args(["--only", "authors", "--seeds", "1", "-J", "4"])
            .args(["--backend", "cpu", "--threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    // Waits (a bound, not a timing assertion) until metrics.csv has more than `rows`
    // lines, then stops the child with SIGTERM; returns its stderr and exit code.
    let stop_after = |mut child: std::process::Child, rows: usize| {
        let err = child.stderr.take().expect("stderr");
        let reader = std::thread::spawn(move || {
            BufReader::new(err)
                .lines()
                .map_while(|l| l.ok())
                .collect::<Vec<_>>()
                .join("\n")
        });
        let mut seen = 0;
        for _ in 0..1200 {
            seen = std::fs::read_to_string(run_dir.join("metrics.csv"))
                .unwrap_or_default()
                .lines()
                .count();
            if seen > rows {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            seen > rows,
            "the run did not get past {rows} rows in two minutes"
        );
        signal(&child, "TERM");
        let status = child.wait().expect("wait");
        (reader.join().expect("stderr reader"), status.code())
    };
    let (e, code) = stop_after(start(), 3);
    assert_eq!(code, Some(143), "{e}");
    assert!(e.contains("SIGTERM") && e.contains("reproduce"), "{e}");
    let ckpt = enkf_dnn::train::checkpoint::path_in(&run_dir);
    let (first, _) = enkf_dnn::train::checkpoint::read(&ckpt).expect("a checkpoint");
    assert!(first.t >= 3, "stopped at {}", first.t);
    assert!(
        !run_dir.join("done.json").exists(),
        "an unfinished run marked done"
    );

    let (e, code) = stop_after(start(), first.t + 3);
    assert_eq!(code, Some(143), "{e}");
    assert!(
        e.contains(&format!(
            "resuming from its checkpoint at iteration {}",
            first.t
        )),
        "{e}"
    );
    let (second, _) = enkf_dnn::train::checkpoint::read(&ckpt).expect("a checkpoint");
    assert!(second.t > first.t + 1, "{} after {}", second.t, first.t);
    let rows = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let iterations: Vec<usize> = rows
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        iterations,
        (0..=second.t).collect::<Vec<_>>(),
        "every iteration once, in order"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `--blas mkl` (or openblas) where that library does not load is an error before any
/// work, naming the files looked for; `--blas builtin` is recorded in the description.
#[test]
fn a_required_blas_that_does_not_load_is_an_error() {
    let o = bin()
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .args(["--blas", "mkl", "plot", "/nonexistent-folder"])
        .output()
        .expect("run");
    let e = stderr(&o);
    if e.contains("--blas mkl") {
        assert!(!o.status.success());
        assert!(e.contains("libmkl_rt"), "{e}");
    } else {
        println!("MKL loads on this machine: {e}");
    }
    let dir = fresh("guard-blas");
    let o = bin()
        .args(["--blas", "builtin"])
        .args(TINY)
        .args(["--iterations", "1", "--out", dir.to_str().unwrap()])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
    assert!(out.contains("GEMM: the built-in gemm crate"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench --sharded` in a build without MPI says how to get one, before any work.
#[cfg(not(feature = "mpi"))]
#[test]
fn bench_sharded_without_the_mpi_build_says_how_to_build_it() {
    let o = bin()
        .args(["bench", "--sharded", "-J", "10"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--features mpi"), "{}", stderr(&o));
}
