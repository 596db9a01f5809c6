//! The EKI variants of issue 13 beyond perturbed observations and multiplicative
//! inflation (those: tests/enkf_methods.rs), on problems whose answer is known:
//! Tikhonov-regularised EKI (one member-space step equals the explicit augmented update;
//! the mean converges to the regularised least-squares solution), the data-misfit
//! controller (each Δt is its formula on the ensemble of that iteration; the algorithm
//! time ends at exactly 1), Nesterov momentum (faster to the least-squares solution),
//! additive inflation (standard normal draws; out of the initial ensemble's subspace),
//! the transform update (the Kalman mean and the exact posterior covariance),
//! and a resumed run of each equal to the run in one go.

mod common;
use common::{linear_problem, tmpdir, write_npy};

use enkf_dnn::backend::{Backend, BackendKind};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::npy::{load, NPY_NAMES};
use enkf_dnn::data::DataSplit;
use enkf_dnn::enkf::{EnkfWorkspace, UpdateRule};
use enkf_dnn::model::spec::NetLayers;
use enkf_dnn::train::methods::dmc_step;
use enkf_dnn::train::{Accelerator, MetricsRow, PartialConfig, StepControl, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

const GAMMA: f64 = 0.05;

/// Solves the 2 × 2 system (HᵀH/γ + λI) w = Hᵀy/γ (λ = 0: least squares).
fn regularised(h: &[f64], y: &[f64], lambda: f64) -> [f64; 2] {
    let mut a = [lambda, 0.0, 0.0, lambda];
    let mut b = [0.0; 2];
    for (row, &yi) in h.chunks_exact(2).zip(y) {
        for r in 0..2 {
            b[r] += row[r] * yi / GAMMA;
            for c in 0..2 {
                a[r * 2 + c] += row[r] * row[c] / GAMMA;
            }
        }
    }
    let det = a[0] * a[3] - a[1] * a[2];
    [
        (a[3] * b[0] - a[1] * b[1]) / det,
        (a[0] * b[1] - a[2] * b[0]) / det,
    ]
}

fn config(dir: &Path, iterations: usize, repetitions: usize) -> PartialConfig {
    PartialConfig {
        members: Some(64),
        iterations: Some(iterations),
        eval_every: Some(1000),
        batch: Some(8),
        repetitions: Some(repetitions),
        update: Some(UpdateRule::Batch),
        gamma: Some(GAMMA),
        backend: Some(BackendKind::Cpu),
        data_npy: Some(vec![dir.to_path_buf()]),
        net: Some(NetLayers::parse("linear(1,bias=false)").expect("net")),
        ..Default::default()
    }
}

/// Runs `p` on `data`; returns the ensemble mean, the ensemble and the metrics rows.
fn run(p: &PartialConfig, data: &DataSplit) -> (Vec<f64>, Vec<f32>, Vec<MetricsRow>) {
    let cfg = p.resolve().expect("config");
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, &cfg, data).expect("trainer");
    let rows = t.run(&mut ()).expect("run");
    let mean = t.mean_host().expect("mean");
    let u = t.ensemble_host().expect("ensemble");
    (mean.iter().map(|&v| f64::from(v)).collect(), u, rows)
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Gaussian elimination with partial pivoting: solves A X = B for X (A n × n, B n × k,
/// row-major, f64).
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize, k: usize) -> Vec<f64> {
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .expect("rows");
        for c in 0..n {
            a.swap(col * n + c, piv * n + c);
        }
        for c in 0..k {
            b.swap(col * k + c, piv * k + c);
        }
        for r in col + 1..n {
            let f = a[r * n + col] / a[col * n + col];
            for c in col..n {
                a[r * n + c] -= f * a[col * n + c];
            }
            for c in 0..k {
                b[r * k + c] -= f * b[col * k + c];
            }
        }
    }
    for col in (0..n).rev() {
        for c in 0..k {
            let mut s = b[col * k + c];
            for j in col + 1..n {
                s -= a[col * n + j] * b[j * k + c];
            }
            b[col * k + c] = s / a[col * n + col];
        }
    }
    b
}

/// One member-space Tikhonov step equals the update with the prior formed explicitly as
/// P extra observations: Ĝ = [G, U], ŷ = [y, 0], Γ̂ = diag(γ/Δt, τ/Δt),
/// ΔU = D̂ (ÂᵀÂ/J + Γ̂)⁻¹ ÂᵀE/J, in f64 on the host. The member-space path rounds its J × P products
/// (E Eᵀ, the apply) in f32: 1e-4 of the largest change bounds that at these sizes.
#[test]
fn tikhonov_step_equals_the_augmented_update() {
    let be = CpuBackend::new();
    let (j, p, batch, outputs) = (12usize, 5usize, 2usize, 3usize);
    let m = batch * outputs;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut normal = |n: usize, s: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                (s * z) as f32
            })
            .collect()
    };
    let u0 = normal(j * p, 1.0);
    let g = normal(j * m, 0.5);
    let y = normal(m, 1.0);
    let (gamma, tau) = (0.3, 0.7);
    for dt in [1.0, 0.25] {
        let mut ws = EnkfWorkspace::with_tikhonov(&be, j, p, batch, outputs, tau).expect("ws");
        let mut u = u0.clone();
        ws.innovate(&be, &g, &y).expect("innovate");
        ws.solve(&be, UpdateRule::Batch, gamma, dt, None)
            .expect("solve");
        ws.apply(&be, &mut u).expect("apply");

        // The explicit augmented update.
        let q = m + p;
        let row = |i: usize| -> Vec<f64> {
            let mut r: Vec<f64> = g[i * m..(i + 1) * m]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            r.extend(u0[i * p..(i + 1) * p].iter().map(|&v| f64::from(v)));
            r
        };
        let ghat: Vec<Vec<f64>> = (0..j).map(row).collect();
        let mean: Vec<f64> = (0..q)
            .map(|c| ghat.iter().map(|r| r[c]).sum::<f64>() / j as f64)
            .collect();
        let a: Vec<Vec<f64>> = ghat
            .iter()
            .map(|r| r.iter().zip(&mean).map(|(v, mu)| v - mu).collect())
            .collect();
        let mut c = vec![0.0f64; q * q];
        for r in &a {
            for x in 0..q {
                for z in 0..q {
                    c[x * q + z] += r[x] * r[z] / j as f64;
                }
            }
        }
        for x in 0..q {
            c[x * q + x] += if x < m { gamma } else { tau } / dt;
        }
        // D̂ᵀ (q × J): data innovations y − g, prior innovations 0 − u.
        let mut dt_mat = vec![0.0f64; q * j];
        for (i, r) in ghat.iter().enumerate() {
            for x in 0..q {
                let target = if x < m { f64::from(y[x]) } else { 0.0 };
                dt_mat[x * j + i] = target - r[x];
            }
        }
        let xt = solve(c, dt_mat, q, j); // (Ĉ + Γ̂)⁻¹ D̂ᵀ, q × J
        for i in 0..j {
            for w in 0..p {
                // ΔU[i, w] = Σ_x X̂[i, x] (Σ_k Â[k, x] E[k, w]) / J, E = the prior block of Â.
                let mut d = 0.0;
                for x in 0..q {
                    let cov: f64 = a.iter().map(|r| r[x] * r[m + w]).sum::<f64>() / j as f64;
                    d += xt[x * j + i] * cov;
                }
                let want = f64::from(u0[i * p + w]) + d;
                let got = f64::from(u[i * p + w]);
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "dt {dt}, member {i}, weight {w}: {got} vs {want}"
                );
            }
        }
        // The update moved the members (a no-op would fail above, but say so).
        assert!(u != u0);
    }
}

/// Mean and population covariance (P × P) of a J × P ensemble, in f64.
fn moments(u: &[f32], p: usize) -> (Vec<f64>, Vec<f64>) {
    let j = (u.len() / p) as f64;
    let mean: Vec<f64> = (0..p)
        .map(|c| {
            u.iter()
                .skip(c)
                .step_by(p)
                .map(|&v| f64::from(v))
                .sum::<f64>()
                / j
        })
        .collect();
    let mut cov = vec![0.0f64; p * p];
    for row in u.chunks_exact(p) {
        for a in 0..p {
            for b in 0..p {
                cov[a * p + b] += (f64::from(row[a]) - mean[a]) * (f64::from(row[b]) - mean[b]) / j;
            }
        }
    }
    (mean, cov)
}

/// The transform update (ETKI) on a linear map G = U Hᵀ: its mean is the batch rule's
/// (the Kalman mean), and its ensemble covariance is exactly the Kalman posterior of the
/// ensemble's own prior covariance, C_f − C_f Hᵀ(H C_f Hᵀ + γI)⁻¹ H C_f (to 1e-5 of the
/// largest entry: f32 ensembles), where the deterministic batch update shrinks it more.
#[test]
fn transform_update_keeps_the_mean_and_gives_the_posterior_covariance() {
    let be = CpuBackend::new();
    let (j, p, m) = (40usize, 3usize, 4usize);
    let gamma = 0.2;
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let h: Vec<f64> = (0..m * p).map(|_| rng.random_range(-1.0..1.0)).collect();
    let u0: Vec<f32> = (0..j * p)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z as f32
        })
        .collect();
    let y: Vec<f32> = (0..m).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let g: Vec<f32> = (0..j)
        .flat_map(|i| {
            let (h, u0) = (&h, &u0);
            (0..m).map(move |o| {
                (0..p)
                    .map(|w| h[o * p + w] * f64::from(u0[i * p + w]))
                    .sum::<f64>() as f32
            })
        })
        .collect();
    let step = |rule: UpdateRule| {
        let mut ws = EnkfWorkspace::with_outputs(&be, j, p, m, 1).expect("ws");
        let mut u = u0.clone();
        ws.gain(&be, rule, gamma, &g, &y).expect("gain");
        ws.apply(&be, &mut u).expect("apply");
        u
    };
    let (mean_t, cov_t) = moments(&step(UpdateRule::Transform), p);
    let (mean_b, cov_b) = moments(&step(UpdateRule::Batch), p);
    for (a, b) in mean_t.iter().zip(&mean_b) {
        assert!((a - b).abs() < 1e-5, "means {mean_t:?} vs {mean_b:?}");
    }
    // The Kalman posterior of the prior sample covariance.
    let (_, cf) = moments(&u0, p);
    let hc: Vec<f64> = (0..m * p)
        .map(|i| (0..p).map(|k| h[(i / p) * p + k] * cf[k * p + i % p]).sum())
        .collect(); // H C_f, m × p
    let mut s: Vec<f64> = (0..m * m)
        .map(|i| {
            (0..p)
                .map(|k| hc[(i / m) * p + k] * h[(i % m) * p + k])
                .sum()
        })
        .collect(); // H C_f Hᵀ
    for o in 0..m {
        s[o * m + o] += gamma;
    }
    let sinv_hc = solve(s, hc.clone(), m, p); // (H C_f Hᵀ + γI)⁻¹ H C_f, m × p
    let ca: Vec<f64> = (0..p * p)
        .map(|i| {
            let (a, b) = (i / p, i % p);
            cf[i]
                - (0..m)
                    .map(|o| hc[o * p + a] * sinv_hc[o * p + b])
                    .sum::<f64>()
        })
        .collect();
    let scale = ca.iter().fold(0.0f64, |x, v| x.max(v.abs()));
    eprintln!("posterior {ca:?}\ntransform {cov_t:?}\nbatch {cov_b:?}");
    for (t, c) in cov_t.iter().zip(&ca) {
        assert!(
            (t - c).abs() < 1e-5 * scale,
            "transform {cov_t:?} vs {ca:?}"
        );
    }
    assert!(
        cov_b[0] < 0.9 * ca[0] && cov_b[4] < 0.9 * ca[4],
        "batch {cov_b:?} vs {ca:?}"
    );
}

/// A badly scaled ensemble, as a long run with spread-scaled additive noise grows one
/// (REPRODUCTION.md, the ETKI tail jump: |ū| ≈ 475,000, spread 435): a large mean, a
/// large spread, and outputs whose scales span five decades, so that C = AᵀA/J + γI spans
/// about fifteen. Every rule's mean must still be its f64 oracle's in either apply order
/// (the transform and batch rules: the Kalman mean of `batch_reference`; the sequential
/// rule: `sequential_literal`), to 1e-3 of the mean's step plus one f32 rounding of the
/// mean. Forming X and A in f32 as they are (the parameter order before the bounded
/// factors: `TransformBuffers::balanced_factors`, the whitened gain of `rule_gain`)
/// misses by 13 % of the step here (transform and batch rules; the sequential rule's
/// 10 × 10 blocks are better conditioned: 3.4e-6 unwhitened, 6e-7 whitened).
#[test]
fn a_badly_scaled_ensemble_gets_the_kalman_mean_in_every_rule_and_order() {
    use enkf_dnn::enkf::{batch_reference, sequential_literal, ApplyOrder};
    let (j, p, images, gamma) = (120usize, 40usize, 3usize, 0.01);
    let m = images * 10;
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let normal = |rng: &mut ChaCha8Rng, scale: f64| {
        let z: f64 = StandardNormal.sample(rng);
        scale * z
    };
    let mean: Vec<f64> = (0..p).map(|_| normal(&mut rng, 1000.0)).collect();
    let u0: Vec<f32> = (0..j * p)
        .map(|i| (mean[i % p] + normal(&mut rng, 100.0)) as f32)
        .collect();
    // Latent outputs of scales 1e-3 … 1e2, mixed by a dense m × m map so that every
    // output carries large and small directions alike (as a network's do).
    let w: Vec<f64> = (0..m * p).map(|_| normal(&mut rng, 1.0)).collect();
    let mix: Vec<f64> = (0..m * m).map(|_| normal(&mut rng, 1.0)).collect();
    let latent: Vec<f64> = (0..j * m)
        .map(|i| {
            let (row, l) = (i / m, i % m);
            let lin: f64 = (0..p)
                .map(|q| w[l * p + q] * (f64::from(u0[row * p + q]) - mean[q]))
                .sum();
            10f64.powi((l % 6) as i32 - 3) * lin
        })
        .collect();
    let g: Vec<f32> = (0..j * m)
        .map(|i| {
            let (row, k) = (i / m, i % m);
            let v: f64 = (0..m).map(|l| mix[k * m + l] * latent[row * m + l]).sum();
            (v + 0.5) as f32
        })
        .collect();
    let y: Vec<f32> = (0..m).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let up = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let col_mean = |v: &[f64]| {
        (0..p)
            .map(|q| (0..j).map(|r| v[r * p + q]).sum::<f64>() / j as f64)
            .collect::<Vec<f64>>()
    };
    let m0 = col_mean(&up(&u0));
    let big = m0.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let be = CpuBackend::new();
    let mut errors = Vec::new();
    for rule in [
        UpdateRule::Transform,
        UpdateRule::Batch,
        UpdateRule::Sequential,
    ] {
        let mut want = up(&u0);
        match rule {
            UpdateRule::Sequential => {
                sequential_literal(&mut want, &up(&g), &up(&y), j, p, images, gamma)
            }
            _ => batch_reference(&mut want, &up(&g), &up(&y), j, p, images, gamma),
        }
        .expect("oracle");
        let m_want = col_mean(&want);
        let step = m_want
            .iter()
            .zip(&m0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        assert!(
            step > 1.0,
            "{rule:?}: the update must move the mean: {step}"
        );
        // The member order's own distance from the oracle here is 3e-4 of the step (the
        // f32 rounding of G and U, amplified along C's small eigenvalues, shared by both
        // orders).
        let allow = 1e-3 * step + f64::from(f32::EPSILON) * big;
        for order in [ApplyOrder::Params, ApplyOrder::Members] {
            let mut ws = EnkfWorkspace::with_outputs_and_order(&be, j, p, images, 10, order)
                .expect("workspace");
            let mut u = u0.clone();
            ws.gain(&be, rule, gamma, &g, &y).expect("gain");
            ws.apply(&be, &mut u).expect("apply");
            let got = col_mean(&up(&u));
            let worst = got
                .iter()
                .zip(&m_want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f64, f64::max);
            println!(
                "{rule:?} {order:?}: mean off by {worst:e} = {:.1e} of the step \
                 (step {step:e}, allowance {allow:e})",
                worst / step
            );
            errors.push((rule, order, worst, allow));
        }
    }
    for (rule, order, worst, allow) in errors {
        assert!(
            worst < allow,
            "{rule:?} {order:?}: the mean is off by {worst:e} > {allow:e}"
        );
    }
}

/// Tikhonov-regularised EKI's mean converges to the regularised least-squares solution
/// (HᵀH/γ + λ/σ² I)⁻¹ Hᵀy/γ, the plain update's to least squares; λ = 20 puts the two
/// 30 % apart here, and 400 full-batch steps bring each mean within 1 % of its own.
#[test]
fn tikhonov_mean_converges_to_the_regularised_solution() {
    let dir = tmpdir("eki-tikhonov");
    let (h, y) = linear_problem(&dir);
    let data = load(std::slice::from_ref(&dir), None, None).expect("data");
    let lambda = 20.0;
    let reg = regularised(&h, &y, lambda);
    let ls = regularised(&h, &y, 0.0);
    assert!(distance(&reg, &ls) > 0.2 * distance(&reg, &[0.0, 0.0]));
    let plain = config(&dir, 400, 1);
    let tik = PartialConfig {
        tikhonov: Some(lambda),
        ..plain.clone()
    };
    let (m_tik, _, _) = run(&tik, &data);
    let (m_plain, _, _) = run(&plain, &data);
    eprintln!("tikhonov {m_tik:?} vs {reg:?}; plain {m_plain:?} vs {ls:?}");
    assert!(distance(&m_tik, &reg) < 0.01 * distance(&reg, &[0.0, 0.0]));
    assert!(distance(&m_plain, &ls) < 0.01 * distance(&ls, &[0.0, 0.0]));
}

/// The data-misfit controller: each iteration's Δt (metrics.csv's `dt`) is the
/// controller's formula on the ensemble that iteration started from (recomputed on the
/// host from runs stopped one iteration earlier), the algorithm time ends at exactly 1,
/// and the batch's later repetitions change nothing.
#[test]
fn dmc_steps_follow_the_controller_and_end_at_time_one() {
    let dir = tmpdir("eki-dmc");
    let (h, y) = linear_problem(&dir);
    let data = load(std::slice::from_ref(&dir), None, None).expect("data");
    let reps = 12;
    let base = PartialConfig {
        step: Some(StepControl::Dmc),
        ..config(&dir, reps, reps)
    };
    let (_, u_end, rows) = run(&base, &data);
    let dts: Vec<f64> = rows[1..].iter().map(|r| r.dt.expect("dt")).collect();
    eprintln!("dt per iteration: {dts:?}");
    let last = dts.iter().rposition(|&d| d > 0.0).expect("some step");
    assert!(
        last + 1 < reps,
        "the controller must reach t = 1 within {reps} steps"
    );
    assert_eq!(dts[..=last].iter().sum::<f64>(), 1.0);
    assert!(dts[last + 1..].iter().all(|&d| d == 0.0));
    // The ensemble after the last step is the final one.
    let (_, u_stop, _) = run(
        &PartialConfig {
            iterations: Some(last + 1),
            ..base.clone()
        },
        &data,
    );
    assert_eq!(u_stop, u_end);
    // Each Δt from the ensemble of the iteration before.
    let mut time = 0.0;
    for (k, &dt) in dts[..=last].iter().enumerate() {
        let u = if k == 0 {
            let cfg = base.resolve().expect("config");
            let be = CpuBackend::new();
            Trainer::new(&be, &cfg, &data)
                .expect("trainer")
                .ensemble_host()
                .expect("u")
        } else {
            run(
                &PartialConfig {
                    iterations: Some(k),
                    ..base.clone()
                },
                &data,
            )
            .1
        };
        let phi: Vec<f64> = u
            .chunks_exact(2)
            .map(|w| {
                h.chunks_exact(2)
                    .zip(&y)
                    .map(|(r, &yi)| {
                        let g = f64::from(w[0]) * r[0] + f64::from(w[1]) * r[1];
                        (yi - g).powi(2)
                    })
                    .sum::<f64>()
                    / (2.0 * GAMMA)
            })
            .collect();
        let want = dmc_step(&phi, y.len(), time, 1.0);
        assert!(
            (dt - want).abs() < 1e-5 * want,
            "step {k}: dt {dt}, the controller gives {want}"
        );
        time += dt;
    }
}

/// Additive inflation's draws are standard normals (mean within 5 standard errors of 0,
/// variance within 1 %, neighbours uncorrelated), a function of (key, step, index):
/// the same again, other values at another step.
#[test]
fn additive_noise_is_standard_normal_and_reproducible() {
    let be = CpuBackend::new();
    let (rows, cols) = (1000, 1001);
    let n = (rows * cols) as f64;
    let draw = |step: u32| {
        let mut u = vec![0.0f32; rows * cols];
        be.add_normal_f32(&mut u, 0, cols, &vec![1.0; cols], 1.0, [3, 4], step)
            .expect("noise");
        u
    };
    let z = draw(9);
    let mean = z.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = z
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let lag1 = z
        .windows(2)
        .map(|w| f64::from(w[0]) * f64::from(w[1]))
        .sum::<f64>()
        / n;
    assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
    assert!((var - 1.0).abs() < 0.01, "variance {var}");
    assert!(lag1.abs() < 5.0 / n.sqrt(), "lag-1 correlation {lag1}");
    assert_eq!(draw(9), z);
    assert_ne!(draw(10), z);

    // A rank's rows get the one-process draws of those rows, bit for bit, also where a
    // shard starts inside a group of 4 (cols = 1001 is odd) and in parallel chunks.
    for (first, count) in [(0, 3), (1, 2), (3, 500), (997, 3)] {
        let mut part = vec![0.0f32; count * cols];
        be.add_normal_f32(
            &mut part,
            first * cols,
            cols,
            &vec![1.0; cols],
            1.0,
            [3, 4],
            9,
        )
        .expect("noise");
        assert_eq!(
            part,
            z[first * cols..(first + count) * cols],
            "rows {first}.."
        );
    }
}

/// 16 random inputs of `features` values in [−1, 1) and random real targets, as the
/// training and the test split in `dir`, for a `linear(1,bias=false)` network.
fn random_linear_data(dir: &Path, seed: u64, features: usize) -> DataSplit {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = 16usize;
    let x: Vec<f32> = (0..n * features)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let y: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    std::fs::create_dir_all(dir).expect("dir");
    for (a, b) in [(0, 1), (2, 3)] {
        write_npy(&dir.join(NPY_NAMES[a]), &[n as u64, features as u64], &x);
        write_npy(&dir.join(NPY_NAMES[b]), &[n as u64], &y);
    }
    load(&[dir.to_path_buf()], None, None).expect("data")
}

/// √(mean over the weights of their population variance over the members), in f64.
fn host_spread(u: &[f32], p: usize) -> f64 {
    let (_, cov) = moments(u, p);
    ((0..p).map(|a| cov[a * p + a]).sum::<f64>() / p as f64).sqrt()
}

/// `metrics.csv`'s `spread` is the ensemble's root-mean-square standard deviation on
/// evaluated rows (the initial ensemble's at iteration 0, the trained one's at the end)
/// and empty on the others. A sample (÷ J − 1) std would be 7 % off at J = 8, a mean of
/// the stds instead of their root mean square 1e-3 and more once the weights differ.
#[test]
fn spread_column_is_the_ensembles_rms_std_on_evaluated_rows() {
    let dir = tmpdir("eki-spread");
    let f = 10;
    let data = random_linear_data(&dir, 5, f);
    let p = PartialConfig {
        members: Some(8),
        iterations: Some(6),
        eval_every: Some(3),
        batch: Some(16),
        repetitions: Some(1),
        gamma: Some(GAMMA),
        inflation: Some(1.2),
        backend: Some(BackendKind::Cpu),
        data_npy: Some(vec![dir.clone()]),
        net: Some(NetLayers::parse("linear(1,bias=false)").expect("net")),
        ..Default::default()
    };
    let cfg = p.resolve().expect("config");
    let be = CpuBackend::new();
    let u0 = Trainer::new(&be, &cfg, &data)
        .expect("trainer")
        .ensemble_host()
        .expect("u0");
    let (_, u, rows) = run(&p, &data);
    let spreads: Vec<(usize, Option<f64>)> = rows.iter().map(|r| (r.iteration, r.spread)).collect();
    for (i, s) in &spreads {
        assert_eq!(s.is_some(), i % 3 == 0, "{spreads:?}");
    }
    let (first, last) = (rows[0].spread.expect("0"), rows[6].spread.expect("6"));
    let (want0, want) = (host_spread(&u0, f), host_spread(&u, f));
    assert!((first - want0).abs() < 1e-6 * want0, "{first} vs {want0}");
    assert!((last - want).abs() < 1e-6 * want, "{last} vs {want}");
    // The updates contract the ensemble (λ = 1.2 before each does not undo it here).
    assert!(last < first, "{spreads:?}");
}

/// With J ≤ P the plain update keeps every member in the affine span of the initial
/// ensemble (J = 4 members, P = 10 weights: a 3-dimensional subspace); additive
/// inflation moves the ensemble out of it, as the paper's outlook proposes.
#[test]
fn additive_inflation_leaves_the_initial_subspace() {
    let dir = tmpdir("eki-subspace");
    let f = 10;
    let data = random_linear_data(&dir, 12, f);
    let base = PartialConfig {
        members: Some(4),
        iterations: Some(20),
        eval_every: Some(1000),
        batch: Some(16),
        repetitions: Some(1),
        gamma: Some(GAMMA),
        backend: Some(BackendKind::Cpu),
        data_npy: Some(vec![dir.clone()]),
        net: Some(NetLayers::parse("linear(1,bias=false)").expect("net")),
        ..Default::default()
    };
    let cfg = base.resolve().expect("config");
    let be = CpuBackend::new();
    let u0: Vec<f64> = Trainer::new(&be, &cfg, &data)
        .expect("trainer")
        .ensemble_host()
        .expect("u0")
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    // An orthonormal basis of the initial anomalies (Gram–Schmidt, 3 vectors).
    let mean0: Vec<f64> = (0..f)
        .map(|c| (0..4).map(|j| u0[j * f + c]).sum::<f64>() / 4.0)
        .collect();
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for j in 0..3 {
        let mut v: Vec<f64> = (0..f).map(|c| u0[j * f + c] - mean0[c]).collect();
        for b in &basis {
            let d: f64 = v.iter().zip(b).map(|(a, c)| a * c).sum();
            v.iter_mut().zip(b).for_each(|(a, c)| *a -= d * c);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        basis.push(v.iter().map(|a| a / norm).collect());
    }
    // The largest distance of a member from mean0 + span(basis).
    let off_span = |u: &[f32]| -> f64 {
        u.chunks_exact(f)
            .map(|m| {
                let mut v: Vec<f64> = m
                    .iter()
                    .zip(&mean0)
                    .map(|(&a, c)| f64::from(a) - c)
                    .collect();
                for b in &basis {
                    let d: f64 = v.iter().zip(b).map(|(a, c)| a * c).sum();
                    v.iter_mut().zip(b).for_each(|(a, c)| *a -= d * c);
                }
                v.iter().map(|a| a * a).sum::<f64>().sqrt()
            })
            .fold(0.0, f64::max)
    };
    let (_, plain, _) = run(&base, &data);
    let (_, noisy, _) = run(
        &PartialConfig {
            additive_inflation: Some(0.05),
            ..base.clone()
        },
        &data,
    );
    let (d_plain, d_noisy) = (off_span(&plain), off_span(&noisy));
    eprintln!("distance from the initial subspace: plain {d_plain:.2e}, additive {d_noisy:.2e}");
    assert!(d_plain < 1e-4, "plain {d_plain}");
    assert!(d_noisy > 1e-2, "additive {d_noisy}");
}

/// Nesterov momentum brings the deterministic EKI mean closer to the least-squares
/// solution in the same number of steps (30 full-batch steps, J = 64 > P = 2).
#[test]
fn nesterov_converges_faster_than_plain_eki() {
    let dir = tmpdir("eki-nesterov");
    let (h, y) = linear_problem(&dir);
    let data = load(std::slice::from_ref(&dir), None, None).expect("data");
    let ls = regularised(&h, &y, 0.0);
    let plain = config(&dir, 30, 1);
    let fast = PartialConfig {
        accelerator: Some(Accelerator::Nesterov),
        ..plain.clone()
    };
    let (m_plain, _, _) = run(&plain, &data);
    let (m_fast, _, _) = run(&fast, &data);
    let (e_plain, e_fast) = (distance(&m_plain, &ls), distance(&m_fast, &ls));
    eprintln!("|mean − LS| after 30 steps: plain {e_plain:.3e}, nesterov {e_fast:.3e}");
    assert!(e_fast < 0.5 * e_plain, "plain {e_plain}, nesterov {e_fast}");
}

/// Runs stopped at a checkpoint and resumed end with the same mean network, bit for bit,
/// as runs in one go: the perturbations (a function of the seed and the iteration), the
/// controller's algorithm time, the momentum's θ and previous
/// ensemble, and the Tikhonov update are all part of the state; and each variant changes
/// the result against the plain update.
#[test]
fn variant_runs_resume_exactly() {
    let dir = tmpdir("eki-variants-resume");
    let data = dir.join("data");
    linear_problem(&data);
    let bin = env!("CARGO_BIN_EXE_enkf-dnn");
    let train = |out: &Path, extra: &[&str]| {
        let o = std::process::Command::new(bin)
            .arg("train")
            .args(["--data-npy", data.to_str().expect("utf-8")])
            .args(["--net", "linear(1)", "-J", "16", "--backend", "cpu"])
            .args(["--batch", "4", "--repetitions", "4"])
            .args(["--out", out.to_str().expect("utf-8")])
            .args(extra)
            .output()
            .expect("run enkf-dnn");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out.join("mean.npy")).expect("mean.npy")
    };
    let plain = train(&dir.join("plain"), &["--iterations", "14"]);
    let variants: [&[&str]; 5] = [
        &["--observations", "perturbed", "--inflation", "1.02"],
        &["--step", "dmc", "--accelerator", "nesterov"],
        &["--update", "batch", "--tikhonov", "5", "--dt", "0.5"],
        &["--additive-inflation", "0.02", "--additive-from", "spread"],
        &["--update", "transform"],
    ];
    for (i, methods) in variants.iter().enumerate() {
        let whole = train(
            &dir.join(format!("whole{i}")),
            &[&["--iterations", "14"][..], methods].concat(),
        );
        let part = dir.join(format!("part{i}"));
        // Stopped inside a mini-batch (6 = one batch of 4 repetitions and 2 more); the
        // run's end writes a checkpoint although 6 is no multiple of 4.
        train(
            &part,
            &[
                &["--iterations", "6", "--checkpoint-every", "4"][..],
                methods,
            ]
            .concat(),
        );
        let (state, _) =
            enkf_dnn::train::checkpoint::read(&enkf_dnn::train::checkpoint::path_in(&part))
                .expect("checkpoint");
        assert_eq!(state.t, 6, "{methods:?}: the checkpoint of the run's end");
        let resumed = std::process::Command::new(bin)
            .args(["train", "--resume", part.to_str().expect("utf-8")])
            .args(["--iterations", "14"])
            .output()
            .expect("resume");
        assert!(
            resumed.status.success(),
            "{}",
            String::from_utf8_lossy(&resumed.stderr)
        );
        assert_eq!(
            std::fs::read(part.join("mean.npy")).expect("mean"),
            whole,
            "{methods:?}"
        );
        assert_ne!(plain, whole, "{methods:?} must change the run");
        let csv = std::fs::read_to_string(part.join("metrics.csv")).expect("metrics");
        assert!(
            csv.lines().next().expect("header").ends_with(",dt,spread"),
            "{csv}"
        );
    }
}
