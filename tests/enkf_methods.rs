//! Ensemble Kalman variants beyond the authors' update (issue 13), on problems whose
//! answer is known: the stochastic EnKF (perturbed observations) samples the Gaussian
//! posterior of a linear-Gaussian problem, the deterministic update does not;
//! multiplicative inflation keeps the mean and scales the spread (their resumed runs:
//! tests/eki_variants.rs).

mod common;
use common::{linear_problem, tmpdir};

use enkf_dnn::backend::{Backend, BackendKind};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::npy::load;
use enkf_dnn::enkf::UpdateRule;
use enkf_dnn::model::spec::NetLayers;
use enkf_dnn::train::{Observations, PartialConfig, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// The configuration of the tests on the linear problem in `dir` (P = 2 weights, a
/// linear layer without bias, batches of 8, r = 1, γ = 0.05, scored every iteration).
fn linear_config(dir: &Path, members: usize, iterations: usize) -> PartialConfig {
    PartialConfig {
        members: Some(members),
        iterations: Some(iterations),
        eval_every: Some(1),
        batch: Some(8),
        repetitions: Some(1),
        gamma: Some(0.05),
        backend: Some(BackendKind::Cpu),
        data_npy: Some(vec![dir.to_path_buf()]),
        net: Some(NetLayers::parse("linear(1,bias=false)").expect("net")),
        ..Default::default()
    }
}

/// The ensemble (J × 2) after the run of `p` on `data`.
fn trained(p: PartialConfig, data: &enkf_dnn::data::DataSplit) -> Vec<f32> {
    let cfg = p.resolve().expect("config");
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, &cfg, data).expect("trainer");
    t.run(&mut ()).expect("run");
    t.ensemble_host().expect("ensemble")
}

/// The ensemble's 2 × 2 covariance (population, f64) after one full-batch update.
fn covariance_after_one_update(dir: &Path, observations: Observations, members: usize) -> [f64; 4] {
    let p = PartialConfig {
        update: Some(UpdateRule::Batch),
        observations: Some(observations),
        ..linear_config(dir, members, 1)
    };
    let data = load(&[dir.to_path_buf()], None, None).expect("data");
    let u = trained(p, &data);
    let j = members as f64;
    let mean = [0, 1].map(|c| {
        u.iter()
            .skip(c)
            .step_by(2)
            .map(|&v| f64::from(v))
            .sum::<f64>()
            / j
    });
    let mut cov = [0.0f64; 4];
    for row in u.chunks_exact(2) {
        for a in 0..2 {
            for b in 0..2 {
                cov[a * 2 + b] += (f64::from(row[a]) - mean[a]) * (f64::from(row[b]) - mean[b]) / j;
            }
        }
    }
    cov
}

/// Prior N(0, I) (σ = 1), Γ = γI with γ = 0.05: the posterior covariance is
/// (HᵀH/γ + I)⁻¹. The stochastic EnKF's analysis ensemble has that covariance in
/// expectation; with J = 4000 each entry's sampling error is about √(2/J) ≈ 2 % of the
/// variances, plus the prior sample covariance's own error of the same size, so 10 % of
/// the largest posterior variance bounds it. The deterministic update shrinks the spread
/// by (I − KH) twice: its variances come out far below the posterior's (here under 40 %).
#[test]
fn perturbed_observations_sample_the_gaussian_posterior() {
    let dir = tmpdir("enkf-posterior");
    let (h, _) = linear_problem(&dir);
    let gamma = 0.05;
    let mut prec = [1.0, 0.0, 0.0, 1.0];
    for row in h.chunks_exact(2) {
        for a in 0..2 {
            for b in 0..2 {
                prec[a * 2 + b] += row[a] * row[b] / gamma;
            }
        }
    }
    let det = prec[0] * prec[3] - prec[1] * prec[2];
    let post = [prec[3] / det, -prec[1] / det, -prec[2] / det, prec[0] / det];
    let scale = post[0].max(post[3]);

    let stochastic = covariance_after_one_update(&dir, Observations::Perturbed, 4000);
    eprintln!("posterior {post:?}, stochastic EnKF {stochastic:?}");
    for (s, p) in stochastic.iter().zip(&post) {
        assert!(
            (s - p).abs() < 0.1 * scale,
            "stochastic {stochastic:?} vs posterior {post:?}"
        );
    }
    let deterministic = covariance_after_one_update(&dir, Observations::Exact, 4000);
    eprintln!("deterministic {deterministic:?}");
    assert!(
        deterministic[0] < 0.4 * post[0] && deterministic[3] < 0.4 * post[3],
        "deterministic {deterministic:?} vs posterior {post:?}"
    );
}

/// Multiplicative inflation keeps each column's mean (to f32 rounding) and scales the
/// members' deviations from it by λ.
#[test]
fn inflation_keeps_the_mean_and_scales_the_spread() {
    let be = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (rows, cols) = (64, 7);
    let mut u: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-2.0f32..3.0))
        .collect();
    let before = u.clone();
    let mut mean = vec![0.0f32; cols];
    be.row_mean(&u, rows, cols, &mut mean).expect("mean");
    be.inflate_rows_f32(&mut u, &mean, rows, cols, 1.5)
        .expect("inflate");
    let mut after = vec![0.0f32; cols];
    be.row_mean(&u, rows, cols, &mut after).expect("mean");
    for c in 0..cols {
        assert!(
            (after[c] - mean[c]).abs() < 1e-5,
            "column {c}: {} → {}",
            mean[c],
            after[c]
        );
        for r in 0..rows {
            let (d0, d1) = (before[r * cols + c] - mean[c], u[r * cols + c] - mean[c]);
            assert!(
                (d1 - 1.5 * d0).abs() < 1e-5,
                "row {r}, column {c}: {d0} → {d1}"
            );
        }
    }
    assert!(be
        .inflate_rows_f32(&mut u, &mean[1..].to_vec(), rows, cols, 1.5)
        .is_err());
}

/// An inflation schedule acts on the updates it says: with `linear` and horizon 1 the
/// first update is inflated by λ and every later one not at all, so the run equals one
/// inflated update followed by uninflated updates from that ensemble (bit for bit); the
/// constant schedule inflates every update and differs; `delayed` with horizon 1 is one
/// plain update followed by inflated ones.
#[test]
fn an_inflation_schedule_inflates_the_updates_it_says() {
    use enkf_dnn::train::config::InflationSchedule;
    let dir = tmpdir("inflation-schedule");
    let _ = std::fs::remove_dir_all(&dir);
    linear_problem(&dir);
    let data = load(std::slice::from_ref(&dir), None, None).expect("data");
    let run = |iterations: usize,
               inflation: f64,
               schedule: Option<(InflationSchedule, usize)>,
               init: Option<std::path::PathBuf>| {
        let p = PartialConfig {
            inflation: Some(inflation),
            inflation_schedule: schedule.map(|s| s.0),
            inflation_horizon: schedule.map(|s| s.1),
            init_ensemble: init,
            ..linear_config(&dir, 16, iterations)
        };
        trained(p, &data)
    };
    let first = run(1, 1.5, None, None);
    let saved = dir.join("after-one.npy");
    enkf_dnn::io::npy::write_f32(&saved, &[16, 2], &first).expect("save");
    let then_plain = run(2, 1.0, None, Some(saved));
    let scheduled = run(3, 1.5, Some((InflationSchedule::Linear, 1)), None);
    assert_eq!(scheduled, then_plain, "inflated once, then not");
    let constant = run(3, 1.5, None, None);
    assert_ne!(
        scheduled, constant,
        "the constant schedule inflates every update"
    );
    // `delayed` with horizon 1: one plain update, then inflated ones from its ensemble.
    let plain = run(1, 1.0, None, None);
    let saved = dir.join("after-plain.npy");
    enkf_dnn::io::npy::write_f32(&saved, &[16, 2], &plain).expect("save");
    let then_inflated = run(2, 1.5, None, Some(saved));
    let delayed = run(3, 1.5, Some((InflationSchedule::Delayed, 1)), None);
    assert_eq!(delayed, then_inflated, "not inflated once, then inflated");
    assert_ne!(delayed, constant, "the first update is not inflated");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `apply_order` reaches the update: on the linear problem (P = 2, m = 8 per batch)
/// `auto` is the parameter order for J = 16 > m and the member order for J = 4 ≤ m, bit
/// for bit, and the other order gives the same update to rounding (f32 of O(1) weights
/// after 3 updates: 1e-4) but not the same bits.
#[test]
fn the_apply_order_setting_is_the_update_it_names() {
    use enkf_dnn::enkf::ApplyOrder;
    let dir = tmpdir("apply-order");
    let _ = std::fs::remove_dir_all(&dir);
    linear_problem(&dir);
    let data = load(std::slice::from_ref(&dir), None, None).expect("data");
    let run = |members: usize, order: ApplyOrder| {
        let p = PartialConfig {
            update: Some(UpdateRule::Batch),
            apply_order: Some(order),
            ..linear_config(&dir, members, 3)
        };
        trained(p, &data)
    };
    for (members, auto_is) in [(16, ApplyOrder::Params), (4, ApplyOrder::Members)] {
        assert_eq!(ApplyOrder::cheapest(members, 2, 8), auto_is);
        let other = match auto_is {
            ApplyOrder::Params => ApplyOrder::Members,
            _ => ApplyOrder::Params,
        };
        let (auto, same, forced) = (
            run(members, ApplyOrder::Auto),
            run(members, auto_is),
            run(members, other),
        );
        assert_eq!(auto, same, "J = {members}: auto is {auto_is:?}");
        assert_ne!(
            auto, forced,
            "J = {members}: {other:?} is another association"
        );
        let worst = auto
            .iter()
            .zip(&forced)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "J = {members}: {other:?} differs by {worst}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
