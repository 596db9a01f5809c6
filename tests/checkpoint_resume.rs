//! Checkpoints: an interrupted and resumed run ends with exactly the same ensemble as an
//! uninterrupted one; corrupt and mismatched checkpoints are clear errors; a run killed
//! after a checkpoint resumes into output files equal to those of an uninterrupted run.
//!
//! The tests take [`serial`] first: the interrupt flag is process-global, and no other
//! trainer may run while it is set.

use enkf_dnn::backend::BackendKind;
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::{default_mnist_dir, load_dir, DataSplit};
use enkf_dnn::train::checkpoint;
use enkf_dnn::train::stats::{StatsSink, StatsWriter};
use enkf_dnn::train::{
    Adaptation, BatchOrder, MetricsRow, Observer, PartialConfig, TrainConfig, Trainer, INTERRUPT,
};
use enkf_dnn::Error;
use std::cmp::Ordering as Cmp;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

/// One trainer at a time in this binary (see the module docs).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the others still run.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises the interrupt flag once iteration `at` has been reported.
struct InterruptAt(usize);

impl Observer for InterruptAt {
    fn on_row(&mut self, row: &MetricsRow, _: usize) -> enkf_dnn::Result<()> {
        if row.iteration == self.0 {
            INTERRUPT.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn config(out: &std::path::Path) -> TrainConfig {
    let mut cfg = PartialConfig {
        members: Some(16),
        iterations: Some(45),
        repetitions: Some(2),
        eval_every: Some(10),
        backend: Some(BackendKind::Cpu),
        order: Some(BatchOrder::Shuffle),
        seed: Some(11),
        ..Default::default()
    }
    .resolve()
    .expect("config");
    cfg.out = Some(out.to_path_buf());
    // Algorithm 1 with bounds that make it act in this short run (error < ε = 100 %).
    cfg.adaptation = Adaptation::Adaptive;
    cfg.adapt_every = 10;
    cfg.adapt_min_members = 8;
    cfg.adapt_max_members = 24;
    cfg.adapt_step = 4;
    cfg.adapt_kappa = 0.5;
    cfg.adapt_epsilon = 100.0;
    cfg
}

#[test]
fn resume_is_bit_identical_and_bad_checkpoints_are_refused() {
    let _serial = serial();
    let d = load_dir(&default_mnist_dir()).expect("MNIST");
    // 192 images = 3 batches of 64, r = 2: several epochs and reshuffles in 45 iterations.
    let data = DataSplit {
        train: d.train.subset(192),
        test: d.test.subset(300),
        dir: d.dir.clone(),
        task: Default::default(),
    };
    let root = std::env::temp_dir().join(format!("enkf-ckpt-{}", std::process::id()));
    let (dir_a, dir_b) = (root.join("a"), root.join("b"));
    std::fs::create_dir_all(&dir_a).expect("dir");
    std::fs::create_dir_all(&dir_b).expect("dir");
    let be = CpuBackend::new();

    // Uninterrupted run.
    let cfg_a = config(&dir_a);
    let mut a = Trainer::new(&be, &cfg_a, &data).expect("trainer a");
    let rows_a = a.run(&mut ()).expect("run a");
    let u_a = a.ensemble_host().expect("u a");
    assert!(
        !a.adaptive_log().is_empty(),
        "Algorithm 1 should have acted in this run"
    );

    // Interrupted after iteration 23 (Ctrl-C path), then resumed.
    let cfg_b = config(&dir_b);
    let mut b = Trainer::new(&be, &cfg_b, &data).expect("trainer b");
    let err = b.run(&mut InterruptAt(23)).expect_err("interrupted");
    INTERRUPT.store(false, Ordering::SeqCst);
    match &err {
        Error::Interrupted {
            iteration,
            resume,
            exit_code,
            ..
        } => {
            assert_eq!(*iteration, 23);
            assert!(resume.contains("--resume"), "{resume}");
            assert_eq!(*exit_code, 130, "no signal recorded: reported as Ctrl-C");
        }
        other => panic!("expected Interrupted, got {other}"),
    }
    drop(b);
    let ckpt = checkpoint::path_in(&dir_b);
    let mut b2 = Trainer::resume(&be, &cfg_b, &data, &ckpt).expect("resume");
    assert_eq!(b2.iteration(), 23);
    let rows_b = b2.run(&mut ()).expect("run b");
    let u_b = b2.ensemble_host().expect("u b");
    assert_eq!(
        u_a.len(),
        u_b.len(),
        "ensemble sizes differ after adaptation"
    );
    let differing = u_a
        .iter()
        .zip(&u_b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(
        differing, 0,
        "resumed ensemble differs in {differing} values"
    );
    assert_eq!(rows_a.len(), rows_b.len());
    for (ra, rb) in rows_a.iter().zip(&rows_b) {
        assert_eq!(
            (ra.iteration, ra.members, ra.repetitions),
            (rb.iteration, rb.members, rb.repetitions)
        );
        assert_eq!(
            ra.train_loss.to_bits(),
            rb.train_loss.to_bits(),
            "iteration {}",
            ra.iteration
        );
        assert_eq!(ra.test_error, rb.test_error, "iteration {}", ra.iteration);
    }
    assert_eq!(a.adaptive_log(), b2.adaptive_log());

    // Mismatched run: another J, another network, another seed.
    for (what, change) in [
        (
            "members",
            Box::new(|c: &mut TrainConfig| c.members = 17) as Box<dyn Fn(&mut TrainConfig)>,
        ),
        (
            "arch",
            Box::new(|c: &mut TrainConfig| c.arch = enkf_dnn::model::Arch::Pooled),
        ),
        ("seed", Box::new(|c: &mut TrainConfig| c.seed = 12)),
    ] {
        let mut other = cfg_b.clone();
        change(&mut other);
        let e = Trainer::resume(&be, &other, &data, &ckpt)
            .err()
            .expect(what)
            .to_string();
        // The setting is named with the checkpoint's value and the new one.
        assert!(
            e.contains(&format!("{what}: the checkpoint's run has")),
            "{what}: {e}"
        );
    }

    // Truncated and corrupted files.
    let bytes = std::fs::read(&ckpt).expect("read");
    let cut = root.join("cut.bin");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let e = Trainer::resume(&be, &cfg_b, &data, &cut)
        .err()
        .expect("truncated")
        .to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
    let mut flipped = bytes.clone();
    let mid = flipped.len() - 100;
    flipped[mid] ^= 0x40;
    let bad = root.join("flipped.bin");
    std::fs::write(&bad, &flipped).expect("write");
    let e = Trainer::resume(&be, &cfg_b, &data, &bad)
        .err()
        .expect("corrupt")
        .to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
    std::fs::write(&bad, b"hello").expect("write");
    let e = Trainer::resume(&be, &cfg_b, &data, &bad)
        .err()
        .expect("not a checkpoint")
        .to_string();
    assert!(e.contains("not an enkf-dnn checkpoint"), "{e}");
    assert!(
        !dir_b.join("checkpoint.bin.tmp").exists(),
        "the temporary file must be renamed away"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Stops the run with an error once iteration `at` is reported, without a checkpoint, as
/// a killed process would.
struct CrashAt(usize);

impl Observer for CrashAt {
    fn on_row(&mut self, row: &MetricsRow, _: usize) -> enkf_dnn::Result<()> {
        if row.iteration == self.0 {
            return Err(Error::Config("simulated crash".into()));
        }
        Ok(())
    }
}

/// The run of [`config`] through `train_command`: 192 / 300 images, a checkpoint every
/// 15 iterations, statistics every iteration and histograms every 10.
fn output_config(out: &Path) -> TrainConfig {
    let mut cfg = config(out);
    cfg.train_limit = Some(192);
    cfg.test_limit = Some(300);
    cfg.checkpoint_every = Some(15);
    cfg.stats_every = 1;
    cfg.hist_every = 10;
    cfg
}

/// The CSV files of a run with the key columns of each row (they must strictly increase
/// down the file) and the wall-clock columns to leave out of comparisons.
const OUTPUTS: [(&str, &[&str], &[&str]); 4] = [
    ("metrics.csv", &["iteration"], &["elapsed_s"]),
    ("adaptive.csv", &["iteration"], &[]),
    ("stats.csv", &["iteration", "layer", "quantity"], &[]),
    (
        "hist.csv",
        &["iteration", "layer", "quantity", "bin_lo"],
        &[],
    ),
];

/// Compares two fields as numbers when both are (`-inf` included), else as text.
fn cmp_field(a: &str, b: &str) -> Cmp {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(Cmp::Equal),
        _ => a.cmp(b),
    }
}

/// Rows of `path` without the `skip` columns, after checking that the `keys` columns
/// strictly increase from row to row.
fn checked_rows(path: &Path, keys: &[&str], skip: &[&str]) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.ends_with('\n'),
        "{}: last row unterminated",
        path.display()
    );
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("{}: no column {name}", path.display()))
    };
    let key_cols: Vec<usize> = keys.iter().map(|k| col(k)).collect();
    let skip_cols: Vec<usize> = skip.iter().map(|k| col(k)).collect();
    let mut rows = vec![header.join(",")];
    let mut previous: Option<Vec<String>> = None;
    for (i, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        assert!(
            fields != header,
            "{}: the header is repeated as row {i}",
            path.display()
        );
        assert_eq!(
            fields.len(),
            header.len(),
            "{}: row {i}: {line}",
            path.display()
        );
        let key: Vec<String> = key_cols.iter().map(|&c| fields[c].to_string()).collect();
        if let Some(p) = &previous {
            let order = p
                .iter()
                .zip(&key)
                .map(|(a, b)| cmp_field(a, b))
                .find(|o| *o != Cmp::Equal)
                .unwrap_or(Cmp::Equal);
            assert_eq!(
                order,
                Cmp::Less,
                "{}: row {i} key {key:?} does not follow {p:?}",
                path.display()
            );
        }
        previous = Some(key);
        let kept: Vec<&str> = fields
            .iter()
            .enumerate()
            .filter(|(c, _)| !skip_cols.contains(c))
            .map(|(_, f)| *f)
            .collect();
        rows.push(kept.join(","));
    }
    rows
}

/// Largest iteration in the first column of a CSV file.
fn last_iteration(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).expect("read");
    text.lines()
        .skip(1)
        .filter_map(|l| l.split(',').next()?.parse().ok())
        .max()
        .expect("rows")
}

#[test]
fn resume_after_a_crash_rewinds_the_output_files() {
    let _serial = serial();
    let root = std::env::temp_dir().join(format!("enkf-crash-{}", std::process::id()));
    let (dir_a, dir_b) = (root.join("a"), root.join("b"));
    let _ = std::fs::remove_dir_all(&root);

    // Uninterrupted run: checkpoints at 15, 30 and 45 (Algorithm 1 acts at 10 and 20).
    let cfg_a = output_config(&dir_a);
    enkf_dnn::app::train_command(&cfg_a, None, enkf_dnn::run_dir::Existing::Refuse).expect("run a");

    // The same run killed at iteration 27: the last checkpoint is at 15, the statistics
    // files hold rows to 27 and a torn row, metrics.csv and adaptive.csv rows past 15.
    let cfg_b = output_config(&dir_b);
    std::fs::create_dir_all(&dir_b).expect("dir");
    let data = enkf_dnn::app::load_data(&cfg_b).expect("MNIST");
    let be = CpuBackend::new();
    let mut b = Trainer::new(&be, &cfg_b, &data).expect("trainer b");
    let writer = StatsWriter::create(&dir_b, cfg_b.hist_every).expect("stats writer");
    b.set_stats(StatsSink::spawn(writer, cfg_b.net()));
    let err = b.run(&mut CrashAt(27)).expect_err("crash");
    assert!(err.to_string().contains("simulated crash"), "{err}");
    b.take_stats().expect("sink").finish().expect("stats");
    drop(b);
    for name in ["metrics.csv", "adaptive.csv"] {
        std::fs::copy(dir_a.join(name), dir_b.join(name)).expect("copy");
    }
    for (name, ..) in OUTPUTS {
        let path = dir_b.join(name);
        assert!(
            last_iteration(&path) > 15,
            "{name}: no rows past the checkpoint to drop"
        );
        let mut torn = std::fs::read(&path).expect("read");
        torn.extend_from_slice(b"28,1,activ");
        std::fs::write(&path, torn).expect("write");
    }
    let ckpt = checkpoint::path_in(&dir_b);
    assert_eq!(checkpoint::read(&ckpt).expect("checkpoint").0.t, 15);

    enkf_dnn::app::train_command(&cfg_b, Some(&ckpt), enkf_dnn::run_dir::Existing::Resume)
        .expect("resume b");
    for (name, keys, skip) in OUTPUTS {
        let a = checked_rows(&dir_a.join(name), keys, skip);
        let b = checked_rows(&dir_b.join(name), keys, skip);
        assert!(a.len() > 1, "{name}: no rows to compare");
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(
            (a.len(), first),
            (b.len(), None),
            "{name}: resumed rows differ from the uninterrupted run's (rows, first difference)"
        );
    }
    let mean = |d: &Path| std::fs::read(d.join("mean.npy")).expect("mean.npy");
    assert!(mean(&dir_a) == mean(&dir_b), "final mean networks differ");
    let _ = std::fs::remove_dir_all(&root);
}
