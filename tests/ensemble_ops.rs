//! Resizing the ensemble (Algorithm 1) and handling failed members.

use enkf_dnn::backend::{Backend, BackendKind};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::{default_mnist_dir, load_dir, DataSplit};
use enkf_dnn::enkf::resize;
use enkf_dnn::train::{FailurePolicy, MetricsRow, Observer, PartialConfig, Trainer};
use enkf_dnn::Error;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// New members drawn from the ensemble's Gaussian have, over many draws, the ensemble's
/// mean and its 1/J-normalised covariance. With 20,000 draws the standard error of a mean
/// entry is σ/√20000 ≈ 0.007σ and of a covariance entry ≈ √2·σ²/√20000 ≈ 0.01σ²; the
/// bounds (0.05σ and 0.08σ²) are over 5 standard errors, and a draw without the
/// centring, or with 1/(J−1), misses them (the latter by 20 %).
#[test]
fn added_members_preserve_mean_and_covariance() {
    let be = CpuBackend::new();
    let (j, p) = (5usize, 3usize);
    let u: Vec<f32> = vec![
        1.0, 2.0, 0.0, 3.0, -1.0, 1.0, 0.0, 0.5, 2.0, 2.0, 1.0, -1.0, -1.0, 0.0, 3.0,
    ];
    let count = 20_000;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let out = resize::add_members(&be, &u, j, p, count, &mut rng).expect("add");
    assert_eq!(out.len(), (j + count) * p);
    assert_eq!(&out[..j * p], &u[..], "existing members are kept unchanged");
    let mean: Vec<f64> = (0..p)
        .map(|c| (0..j).map(|r| u[r * p + c] as f64).sum::<f64>() / j as f64)
        .collect();
    let cov = |rows: &[f32], n: usize, m: &[f64], a: usize, b: usize| -> f64 {
        (0..n)
            .map(|r| (rows[r * p + a] as f64 - m[a]) * (rows[r * p + b] as f64 - m[b]))
            .sum::<f64>()
            / n as f64
    };
    let fresh = &out[j * p..];
    let fmean: Vec<f64> = (0..p)
        .map(|c| (0..count).map(|r| fresh[r * p + c] as f64).sum::<f64>() / count as f64)
        .collect();
    for c in 0..p {
        let sigma = cov(&u, j, &mean, c, c).sqrt();
        assert!(
            (fmean[c] - mean[c]).abs() < 0.05 * sigma,
            "mean[{c}]: {} vs {}",
            fmean[c],
            mean[c]
        );
        for d in 0..p {
            let (want, got) = (cov(&u, j, &mean, c, d), cov(fresh, count, &mean, c, d));
            let scale = (cov(&u, j, &mean, c, c) * cov(&u, j, &mean, d, d)).sqrt();
            assert!(
                (got - want).abs() < 0.08 * scale,
                "cov[{c},{d}]: {got} vs {want}"
            );
        }
    }
}

#[test]
fn dropped_members_leave_the_others_unchanged() {
    let be = CpuBackend::new();
    let (j, p) = (10usize, 4usize);
    let u: Vec<f32> = (0..j * p).map(|i| i as f32).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (out, dropped) = resize::drop_members(&be, &u, j, p, 3, &mut rng).expect("drop");
    assert_eq!(dropped.len(), 3);
    assert!(dropped.windows(2).all(|w| w[0] < w[1]));
    let kept: Vec<usize> = (0..j).filter(|r| !dropped.contains(r)).collect();
    let want: Vec<f32> = kept
        .iter()
        .flat_map(|&r| u[r * p..(r + 1) * p].to_vec())
        .collect();
    assert_eq!(out, want);
    let (_, again) =
        resize::drop_members(&be, &u, j, p, 3, &mut ChaCha8Rng::seed_from_u64(3)).expect("drop");
    assert_eq!(again, dropped, "the same seed drops the same members");
    assert!(
        resize::drop_members(&be, &u, j, p, 9, &mut rng).is_err(),
        "at least two must remain"
    );
}

#[test]
fn nonfinite_rows_are_found() {
    let be = CpuBackend::new();
    let mut g = vec![0.5f32; 6 * 4];
    g[4 + 2] = f32::NAN;
    g[3 * 4] = f32::INFINITY;
    g[5 * 4 + 3] = f32::NEG_INFINITY;
    let (ones, mut sums) = (vec![1.0f32; 4], vec![0.0f32; 6]);
    let rows = resize::nonfinite_rows(&be, &g, 6, 4, &ones, &mut sums).expect("rows");
    assert_eq!(rows, vec![1, 3, 5]);
}

struct CountResamples(usize);
impl Observer for CountResamples {
    fn on_row(&mut self, _: &MetricsRow, _: usize) -> enkf_dnn::Result<()> {
        Ok(())
    }
    fn on_resample(&mut self, _: usize, count: usize) -> enkf_dnn::Result<()> {
        self.0 += count;
        Ok(())
    }
}

/// Members with NaN weights: `error` stops at iteration 1 naming the count; `resample`
/// redraws them and the run goes on with a finite ensemble.
#[test]
fn failed_members_stop_or_are_resampled() {
    let d = load_dir(&default_mnist_dir()).expect("MNIST");
    let data = DataSplit {
        train: d.train.subset(128),
        test: d.test.subset(100),
        dir: d.dir.clone(),
        task: Default::default(),
    };
    let be = CpuBackend::new();
    let (j, p) = (12usize, 18_050usize);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut u = enkf_dnn::enkf::init_ensemble(&mut rng, j, p, 1.0);
    for member in [3usize, 7] {
        u[member * p + 100] = f32::NAN;
    }
    let dir = std::env::temp_dir().join(format!("enkf-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("u.npy");
    enkf_dnn::io::npy::write_f32(&file, &[j, p], &u).expect("write");
    let mut cfg = PartialConfig {
        members: Some(j),
        iterations: Some(4),
        backend: Some(BackendKind::Cpu),
        init_ensemble: Some(file),
        ..Default::default()
    }
    .resolve()
    .expect("config");

    let mut t = Trainer::new(&be, &cfg, &data).expect("trainer");
    match t.run(&mut ()) {
        Err(Error::MembersFailed {
            iteration,
            failed,
            members,
        }) => assert_eq!((iteration, failed, members), (1, 2, j)),
        other => panic!("expected MembersFailed, got {other:?}"),
    }

    cfg.on_failure = FailurePolicy::Resample;
    let mut t = Trainer::new(&be, &cfg, &data).expect("trainer");
    let mut seen = CountResamples(0);
    let rows = t.run(&mut seen).expect("resampled run");
    assert_eq!(seen.0, 2, "two members resampled once");
    assert_eq!(rows.len(), 5);
    let u = t.ensemble_host().expect("u");
    assert!(u.iter().all(|v| v.is_finite()));
    assert!(be.name().starts_with("cpu"));
}
