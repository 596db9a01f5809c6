//! The EnKF update rules through `CpuBackend` + `EnkfWorkspace`, against the host f64
//! oracles, on a linear inverse problem, and the ensemble helpers.

mod common;
use common::{assert_close, up};

use enkf_dnn::backend::{Backend, Trans};
use enkf_dnn::cpu::{linalg, CpuBackend};
use enkf_dnn::enkf::{
    batch_reference, init_ensemble, one_hot, sequential_literal, ApplyOrder, EnkfWorkspace,
    UpdateRule,
};
use enkf_dnn::error::LinalgError;
use enkf_dnn::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// The workspace stores U, X, A and the intermediate product in f32 (the gain itself is
/// f64); the oracle is exact f64 on the same f32-representable inputs. ΔU is a sum of
/// m (parameter order) or J (member order) rounded products whose errors have random
/// signs, so |ΔU_got − ΔU| ≈ eps32·√(J + m)·max|ΔU|, and the final U + ΔU rounds once
/// more (the rtol = 2·eps32 term). Allowance: `UPDATE_C · eps32 · √(J + m) · max|ΔU|`
/// with UPDATE_C = 4; the worst measured ratio to the allowance is 0.1 (printed).
/// A wrong block of L or a sign error moves U by O(max|ΔU|), 10⁵ times more.
const UPDATE_C: f64 = 4.0;

fn normals(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (scale * z) as f32
        })
        .collect()
}

/// Runs one update through the CPU workspace and the given oracle; compares.
#[allow(clippy::too_many_arguments)]
fn compare_rule(
    rule: UpdateRule,
    order: ApplyOrder,
    members: usize,
    params: usize,
    batch: usize,
    gamma: f64,
    g_scale: f64,
    seed: u64,
) {
    let m = batch * 10;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let u0 = normals(&mut rng, members * params, 1.0);
    let g = normals(&mut rng, members * m, g_scale);
    let labels: Vec<u8> = (0..batch).map(|_| rng.random_range(0..10u8)).collect();
    let y = one_hot(&labels, 10);

    let be = CpuBackend::new();
    let mut ws = EnkfWorkspace::with_order(&be, members, params, batch, order).unwrap();
    let mut u = u0.clone();
    ws.update(&be, rule, gamma, &mut u, &g, &y).unwrap();

    let mut want = up(&u0);
    match rule {
        UpdateRule::Sequential => {
            sequential_literal(&mut want, &up(&g), &up(&y), members, params, batch, gamma)
        }
        UpdateRule::Batch => {
            batch_reference(&mut want, &up(&g), &up(&y), members, params, batch, gamma)
        }
        UpdateRule::Transform => panic!("the transform update is checked in tests/eki_variants.rs"),
    }
    .unwrap();
    let du_max = want
        .iter()
        .zip(&u0)
        .map(|(w, &u)| (w - u as f64).abs())
        .fold(0.0f64, f64::max);
    assert!(du_max > 1e-3, "the update must move the ensemble");
    let eps = f32::EPSILON as f64;
    let atol = UPDATE_C * eps * ((members + m) as f64).sqrt() * du_max;
    let what = format!("{rule:?} {order:?} J={members} P={params} B={batch} gamma={gamma}");
    let ratio = assert_close(&what, &up(&u), &want, atol, 2.0 * eps);
    println!("{what}: worst error / allowance = {ratio:.3}");
}

#[test]
fn sequential_exact_form_equals_literal_loop() {
    // J > m and J < m (m = 50), both associations of the apply phase.
    for order in [ApplyOrder::Params, ApplyOrder::Members] {
        compare_rule(UpdateRule::Sequential, order, 40, 57, 5, 0.01, 3.0, 10);
        compare_rule(UpdateRule::Sequential, order, 60, 31, 3, 0.01, 3.0, 11);
        compare_rule(UpdateRule::Sequential, order, 12, 20, 4, 0.5, 1.0, 12);
    }
}

#[test]
fn batch_rule_equals_reference() {
    // J > m: both associations.
    for order in [ApplyOrder::Params, ApplyOrder::Members] {
        compare_rule(UpdateRule::Batch, order, 60, 31, 3, 0.01, 3.0, 20);
        compare_rule(UpdateRule::Batch, order, 45, 70, 4, 0.1, 1.0, 21);
    }
    // J < m: C + γI has m − J + 1 eigenvalues equal to γ, so X = D C⁻¹ is large and
    // cancels in X Aᵀ; only the member-space order forms X Aᵀ in f64 (and `Auto` picks
    // it whenever J ≤ m), so only that order is held to f32 rounding.
    compare_rule(
        UpdateRule::Batch,
        ApplyOrder::Members,
        40,
        57,
        5,
        0.01,
        3.0,
        22,
    );
    let ws = EnkfWorkspace::new(&CpuBackend::new(), 40, 57, 5).unwrap();
    assert_eq!(ws.order(), ApplyOrder::Members);
}

/// Mean of the ensemble (members × params) in f64.
fn mean(u: &[f32], members: usize, params: usize) -> Vec<f64> {
    let mut m = vec![0.0; params];
    for j in 0..members {
        for p in 0..params {
            m[p] += u[j * params + p] as f64 / members as f64;
        }
    }
    m
}

/// ‖y − A ū‖ with A (obs × params) row-major.
fn misfit(a: &[f64], y: &[f64], ubar: &[f64], obs: usize, params: usize) -> f64 {
    (0..obs)
        .map(|i| {
            let r = y[i]
                - (0..params)
                    .map(|p| a[i * params + p] * ubar[p])
                    .sum::<f64>();
            r * r
        })
        .sum::<f64>()
        .sqrt()
}

/// Iterates the batch rule on G(u) = A_op u and returns (final ensemble, misfits).
#[allow(clippy::too_many_arguments)]
fn run_linear_eki(
    a_op: &[f32],
    y: &[f32],
    u0: &[f32],
    members: usize,
    params: usize,
    batch: usize,
    gamma: f64,
    iters: usize,
) -> (Vec<f32>, Vec<f64>) {
    let obs = batch * 10;
    let be = CpuBackend::new();
    let mut ws = EnkfWorkspace::new(&be, members, params, batch).unwrap();
    let mut u = u0.to_vec();
    let mut g = vec![0.0f32; members * obs];
    let (a64, y64) = (up(a_op), up(y));
    let mut misfits = vec![misfit(&a64, &y64, &mean(&u, members, params), obs, params)];
    for _ in 0..iters {
        // G = U A_opᵀ (members × obs).
        be.gemm_f32(
            Trans::No,
            Trans::Yes,
            members,
            obs,
            params,
            1.0,
            &u,
            &a_op.to_vec(),
            0.0,
            &mut g,
        )
        .unwrap();
        ws.update(&be, UpdateRule::Batch, gamma, &mut u, &g, &y.to_vec())
            .unwrap();
        misfits.push(misfit(&a64, &y64, &mean(&u, members, params), obs, params));
    }
    (u, misfits)
}

/// Least-squares minimiser of ‖y − A(c₀ + E c)‖ over c, returned as c₀ + E c, with E
/// (params × k) given column-wise as `dirs` (k directions). Normal equations in f64.
fn ls_in_span(a: &[f64], y: &[f64], c0: &[f64], dirs: &[Vec<f64>], obs: usize) -> Vec<f64> {
    let params = c0.len();
    let k = dirs.len();
    // AE (obs × k) and the residual r = y − A c₀.
    let ae: Vec<Vec<f64>> = dirs
        .iter()
        .map(|e| {
            (0..obs)
                .map(|i| (0..params).map(|p| a[i * params + p] * e[p]).sum())
                .collect()
        })
        .collect();
    let r: Vec<f64> = (0..obs)
        .map(|i| y[i] - (0..params).map(|p| a[i * params + p] * c0[p]).sum::<f64>())
        .collect();
    let mut n = vec![0.0; k * k];
    let mut rhs = vec![0.0; k];
    for s in 0..k {
        for t in 0..k {
            n[s * k + t] = (0..obs).map(|i| ae[s][i] * ae[t][i]).sum();
        }
        rhs[s] = (0..obs).map(|i| ae[s][i] * r[i]).sum();
    }
    linalg::block_cholesky_solve_f64(&mut n, 1, k, &mut rhs, 1).unwrap();
    let mut out = c0.to_vec();
    for (s, e) in dirs.iter().enumerate() {
        for p in 0..params {
            out[p] += rhs[s] * e[p];
        }
    }
    out
}

/// Deterministic EKI on a linear problem collapses the ensemble like C_n ≈ γ(AᵀA)⁻¹/(2n)
/// (scalar case: c ← c·(γ/(a²c + γ))², then r ← r·γ/(a²c + γ)), so once a²c ≪ γ the
/// mean's error decays like n^(−1/2): 16 times the iterations should quarter it.
/// γ = 1 enters that regime after a few dozen steps (γ = 0.01 over-collapses the
/// ensemble in the first step and needs ~1000 steps to get there).
#[test]
fn batch_rule_solves_linear_inverse_problem() {
    let (params, batch, gamma) = (8, 2, 1.0);
    let obs = batch * 10;
    let mut rng = ChaCha8Rng::seed_from_u64(30);
    let a_op = normals(&mut rng, obs * params, 1.0);
    let u_star = normals(&mut rng, params, 1.0);
    let a64 = up(&a_op);
    let y: Vec<f32> = (0..obs)
        .map(|i| {
            (0..params)
                .map(|p| a64[i * params + p] * u_star[p] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    let y64 = up(&y);

    // J = 30 ≥ P + 1 spans R^P: u_LS is the full least-squares solution (= u*, the data
    // are exact). J = 5 spans a 4-dimensional affine subspace: u_LS is the minimiser
    // restricted to it. Bounds: measured ‖ū − u_LS‖/‖u_LS‖ after 1600 iterations was
    // 4.1e-3 (J = 30) and 3.3e-3 (J = 5); allowed 6e-3.
    const REL_BOUND: f64 = 6e-3;
    for members in [30usize, 5] {
        let u0 = normals(&mut rng, members * params, 1.0);
        let m0 = mean(&u0, members, params);
        let dirs: Vec<Vec<f64>> = (0..members.min(params + 1) - 1)
            .map(|j| {
                (0..params)
                    .map(|p| u0[j * params + p] as f64 - m0[p])
                    .collect()
            })
            .collect();
        let u_ls = ls_in_span(&a64, &y64, &m0, &dirs, obs);
        let norm: f64 = u_ls.iter().map(|v| v * v).sum::<f64>().sqrt();
        let rel_err = |u: &[f32]| {
            mean(u, members, params)
                .iter()
                .zip(&u_ls)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()
                / norm
        };
        let (u100, _) = run_linear_eki(&a_op, &y, &u0, members, params, batch, gamma, 100);
        let (u, misfits) = run_linear_eki(&a_op, &y, &u0, members, params, batch, gamma, 1600);
        for (n, w) in misfits.windows(2).enumerate() {
            // The mean of an f32 ensemble resolves the misfit only to a few eps32
            // relative (visible once it plateaus at the in-span minimum): allow 1e-6.
            assert!(
                w[1] <= w[0] * (1.0 + 1e-6),
                "J={members}: misfit rose at iteration {n}: {} -> {}",
                w[0],
                w[1]
            );
        }
        let (e100, e1600) = (rel_err(&u100), rel_err(&u));
        println!(
            "J={members}: misfit {:.3e} -> {:.3e}; ‖ū − u_LS‖/‖u_LS‖ {e100:.3e} (100 it.), \
             {e1600:.3e} (1600 it.)",
            misfits[0], misfits[1600]
        );
        assert!(
            e1600 <= REL_BOUND,
            "J={members}: ‖ū − u_LS‖/‖u_LS‖ = {e1600:e} > {REL_BOUND:e}"
        );
        // n^(−1/2) predicts a ratio of 0.25; 0.3 allows for the early transient.
        assert!(
            e1600 <= 0.3 * e100,
            "J={members}: error did not decay: {e100:e} -> {e1600:e}"
        );
        if members > params {
            let to_star: f64 = u_ls
                .iter()
                .zip(&u_star)
                .map(|(a, &b)| (a - b as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(to_star / norm <= 1e-5, "full span: u_LS must be u*");
        }
    }
}

#[test]
fn update_reports_errors_and_leaves_u_unchanged() {
    let be = CpuBackend::new();
    let (members, params, batch) = (6, 5, 2);
    let m = batch * 10;
    let mut ws = EnkfWorkspace::new(&be, members, params, batch).unwrap();
    let u0: Vec<f32> = (0..members * params).map(|i| i as f32 * 0.1).collect();
    let y = one_hot(&[1, 7], 10);
    // A NaN output makes every covariance entry of its column NaN: the factorisation
    // of the first block that meets it fails instead of producing a NaN ensemble.
    let mut g: Vec<f32> = (0..members * m).map(|i| (i % 7) as f32).collect();
    g[3 * m + 12] = f32::NAN; // image 1, class 2
    for (rule, block) in [(UpdateRule::Sequential, 1), (UpdateRule::Batch, 0)] {
        let mut u = u0.clone();
        let err = ws.update(&be, rule, 0.01, &mut u, &g, &y).unwrap_err();
        match err {
            Error::Linalg(LinalgError::NotPositiveDefinite { block: b, .. }) => {
                assert_eq!(b, block, "{rule:?}")
            }
            e => panic!("{rule:?}: expected NotPositiveDefinite, got {e:?}"),
        }
        assert_eq!(u, u0, "{rule:?}: u must be unchanged");
    }
    let g_ok: Vec<f32> = (0..members * m).map(|i| ((i * 7) % 11) as f32).collect();
    let mut u = u0.clone();
    assert!(matches!(
        ws.update(&be, UpdateRule::Sequential, -1.0, &mut u, &g_ok, &y),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        ws.update(&be, UpdateRule::Sequential, f64::NAN, &mut u, &g_ok, &y),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        ws.update(
            &be,
            UpdateRule::Batch,
            0.01,
            &mut u,
            &g_ok[1..].to_vec(),
            &y
        ),
        Err(Error::Shape { .. })
    ));
    let mut short = u0[1..].to_vec();
    assert!(matches!(
        ws.update(&be, UpdateRule::Batch, 0.01, &mut short, &g_ok, &y),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        EnkfWorkspace::new(&be, 1, params, batch),
        Err(Error::Config(_))
    ));
    assert_eq!(ws.members(), members);
}

#[test]
fn one_hot_sets_one_entry_per_image() {
    let y = one_hot(&[3, 0, 9], 10);
    let mut want = vec![0.0f32; 30];
    want[3] = 1.0;
    want[10] = 1.0;
    want[29] = 1.0;
    assert_eq!(y, want);
    assert!(one_hot(&[], 10).is_empty());
}

#[test]
fn init_ensemble_is_seeded_gaussian_in_row_major_order() {
    let (members, params, sigma) = (200, 500, 0.5);
    let n = (members * params) as f64;
    let u = init_ensemble(&mut ChaCha8Rng::seed_from_u64(7), members, params, sigma);
    assert_eq!(u.len(), members * params);
    let mu = u.iter().map(|&v| v as f64).sum::<f64>() / n;
    let sd = (u.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n).sqrt();
    // Five standard errors: SE(mean) = σ/√N, SE(std) ≈ σ/√(2N); a false failure has
    // probability below 1e-6.
    assert!(mu.abs() <= 5.0 * sigma / n.sqrt(), "mean {mu}");
    assert!(
        (sd - sigma).abs() <= 5.0 * sigma / (2.0 * n).sqrt(),
        "std {sd}"
    );

    let again = init_ensemble(&mut ChaCha8Rng::seed_from_u64(7), members, params, sigma);
    assert_eq!(u, again, "same seed, same ensemble");
    let other = init_ensemble(&mut ChaCha8Rng::seed_from_u64(8), members, params, sigma);
    assert_ne!(u, other);

    // Draw order: element (j, p) is the (j·P + p)-th standard normal of the stream.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let small = init_ensemble(&mut rng.clone(), 3, 4, 2.0);
    let manual: Vec<f32> = (0..12)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            (2.0 * z) as f32
        })
        .collect();
    assert_eq!(small, manual);
}

/// A trained ensemble: a large mean (|ū| ≈ 20) and a tiny spread (1e-3). The update
/// moves the members by a multiple of their anomalies E = U − 1ūᵀ, so the apply phase
/// must not form AᵀU from U itself: in f32 the rounding of Σ_j a_j u_j ≈ eps·J·|a|·|ū|
/// swamps the true Σ_j a_j e_j, and X (whose rows carry C⁻¹d̄, large at γ = 0.01) turns
/// it into a jump of every member. Both orders against the f64 oracle, at the allowance
/// of `compare_rule` relative to the step, plus one f32 rounding of U.
#[test]
fn a_large_mean_and_a_tiny_spread_update_in_either_order() {
    let (members, params, batch, gamma) = (100, 40, 3, 0.01);
    let m = batch * 10;
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let mean = normals(&mut rng, params, 20.0);
    let e = normals(&mut rng, members * params, 1e-3);
    let u0: Vec<f32> = e
        .iter()
        .enumerate()
        .map(|(i, &v)| mean[i % params] + v)
        .collect();
    // Outputs that depend on the anomalies (a linear map), plus a common offset.
    let w = normals(&mut rng, params * m, 1.0);
    let g: Vec<f32> = (0..members)
        .flat_map(|j| {
            let (e, w) = (&e, &w);
            (0..m).map(move |k| {
                0.1 + (0..params)
                    .map(|p| 300.0 * e[j * params + p] * w[p * m + k])
                    .sum::<f32>()
            })
        })
        .collect();
    let labels: Vec<u8> = (0..batch).map(|_| rng.random_range(0..10u8)).collect();
    let y = one_hot(&labels, 10);
    let mut want = up(&u0);
    batch_reference(&mut want, &up(&g), &up(&y), members, params, batch, gamma).unwrap();
    let du_max = want
        .iter()
        .zip(&u0)
        .map(|(w, &u)| (w - u as f64).abs())
        .fold(0.0f64, f64::max);
    assert!(du_max > 1e-5, "the update must move the ensemble: {du_max}");
    let be = CpuBackend::new();
    for order in [ApplyOrder::Params, ApplyOrder::Members] {
        let mut ws = EnkfWorkspace::with_order(&be, members, params, batch, order).unwrap();
        let mut u = u0.clone();
        ws.update(&be, UpdateRule::Batch, gamma, &mut u, &g, &y)
            .unwrap();
        let eps = f32::EPSILON as f64;
        let atol = UPDATE_C * eps * ((members + m) as f64).sqrt() * du_max;
        let what = format!("{order:?}, |ū| ≈ 20, spread 1e-3, max|ΔU| {du_max:e}");
        let ratio = assert_close(&what, &up(&u), &want, atol, 2.0 * eps);
        println!("{what}: worst error / allowance = {ratio:.3}");
    }
}
