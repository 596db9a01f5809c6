//! Checkpoints: an interrupted and resumed run ends with exactly the same ensemble as an
//! uninterrupted one; corrupt and mismatched checkpoints are clear errors.
//!
//! One test function on purpose: the interrupt flag is process-global, and no other
//! trainer may run while it is set.

use enkf_dnn::backend::BackendKind;
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::{default_mnist_dir, load_dir, DataSplit};
use enkf_dnn::train::checkpoint;
use enkf_dnn::train::{
    Adaptation, BatchOrder, MetricsRow, Observer, PartialConfig, TrainConfig, Trainer, INTERRUPT,
};
use enkf_dnn::Error;
use std::sync::atomic::Ordering;

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
    let d = load_dir(&default_mnist_dir()).expect("MNIST");
    // 192 images = 3 batches of 64, r = 2: several epochs and reshuffles in 45 iterations.
    let data = DataSplit {
        train: d.train.subset(192),
        test: d.test.subset(300),
        dir: d.dir.clone(),
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
        Error::Interrupted { iteration, resume } => {
            assert_eq!(*iteration, 23);
            assert!(resume.contains("--resume"), "{resume}");
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
        assert!(e.contains("another run"), "{what}: {e}");
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
