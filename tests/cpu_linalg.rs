//! CPU dense linear algebra (`enkf_dnn::cpu::linalg`) against naive loops.

use enkf_dnn::backend::Trans;
use enkf_dnn::cpu::linalg;
use enkf_dnn::error::LinalgError;
use enkf_dnn::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// GEMM rounding: the classical bound |fl(C) − C| ≤ γ_k (|α||A||B| + |β||C|) with
/// γ_k ≈ k·eps; we allow (k + 2)·eps per element of that scale (the +2 covers the
/// α and β multiplications and the final add).
fn gemm_bound_factor(k: usize, eps: f64) -> f64 {
    (k as f64 + 2.0) * eps
}

/// Triangular solves on well-conditioned matrices (diagonally dominant SPD blocks,
/// unit triangles with entries ≤ 1/n): the residual of a backward-stable solve is
/// bounded by c·n·eps·(|x||A| + |b|) per element; c = 8 leaves margin for the
/// Cholesky factor's growth (|L||Lᵀ| vs |A|).
const SOLVE_C: f64 = 8.0;

/// Checks `|got − want| ≤ bound` element-wise; reports the worst element relative to
/// its bound.
fn assert_within(what: &str, got: &[f64], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for i in 0..got.len() {
        let err = (got[i] - want[i]).abs();
        let ratio = if err == 0.0 { 0.0 } else { err / bound[i] };
        assert!(
            err.is_finite() || got[i] == want[i],
            "{what}: element {i} is {} (want {})",
            got[i],
            want[i]
        );
        if ratio > worst.1 || ratio.is_nan() {
            worst = (i, ratio);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 1.0,
        "{what}: worst element {i}: got {}, want {}, |err| = {:e} > bound {:e}",
        got[i],
        want[i],
        (got[i] - want[i]).abs(),
        bound[i]
    );
}

fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// op(x)[i][p] for a row-major x stored rows × cols before op.
fn at(x: &[f64], t: Trans, i: usize, p: usize, m: usize, k: usize) -> f64 {
    match t {
        Trans::No => x[i * k + p],
        Trans::Yes => x[p * m + i],
    }
}

/// Naive f64 reference: returns (c, scale) with scale = |α||A||B| + |β||C|.
#[allow(clippy::too_many_arguments)]
fn naive_gemm(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f64],
    b: &[f64],
    beta: f64,
    c: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut sa) = (0.0, 0.0);
            for p in 0..k {
                let v = at(a, ta, i, p, m, k) * at(b, tb, p, j, k, n);
                s += v;
                sa += v.abs();
            }
            let c0 = if beta == 0.0 {
                0.0
            } else {
                beta * c[i * n + j]
            };
            out[i * n + j] = alpha * s + c0;
            scale[i * n + j] = alpha.abs() * sa + c0.abs() + f64::MIN_POSITIVE;
        }
    }
    (out, scale)
}

const TRANS: [(Trans, Trans); 4] = [
    (Trans::No, Trans::No),
    (Trans::No, Trans::Yes),
    (Trans::Yes, Trans::No),
    (Trans::Yes, Trans::Yes),
];

/// Sizes: a small odd one (single-threaded path) and one above the parallel threshold.
const GEMM_SIZES: [(usize, usize, usize); 2] = [(37, 29, 53), (70, 65, 80)];

#[test]
fn gemm_f64_matches_naive_all_transposes() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(m, n, k) in &GEMM_SIZES {
        for (ta, tb) in TRANS {
            for (alpha, beta) in [(1.0, 0.0), (0.7, -1.3), (-2.0, 1.0)] {
                let a = uniform(&mut rng, m * k);
                let b = uniform(&mut rng, k * n);
                let c0 = uniform(&mut rng, m * n);
                let (want, scale) = naive_gemm(ta, tb, m, n, k, alpha, &a, &b, beta, &c0);
                let mut c = c0.clone();
                linalg::gemm_f64(ta, tb, m, n, k, alpha, &a, &b, beta, &mut c).unwrap();
                let f = gemm_bound_factor(k, f64::EPSILON);
                let bound: Vec<f64> = scale.iter().map(|s| f * s).collect();
                let what = format!("gemm_f64 {ta:?}{tb:?} {m}x{n}x{k} a={alpha} b={beta}");
                assert_within(&what, &c, &want, &bound);
            }
        }
    }
}

#[test]
fn gemm_f32_matches_naive_all_transposes() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for &(m, n, k) in &GEMM_SIZES {
        for (ta, tb) in TRANS {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.7, -1.3), (-2.0, 1.0)] {
                // Inputs are exactly representable in f32, so the f64 loop is exact
                // reference arithmetic on the same numbers.
                let a: Vec<f32> = uniform(&mut rng, m * k).iter().map(|&v| v as f32).collect();
                let b: Vec<f32> = uniform(&mut rng, k * n).iter().map(|&v| v as f32).collect();
                let c0: Vec<f32> = uniform(&mut rng, m * n).iter().map(|&v| v as f32).collect();
                let up = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
                let (want, scale) = naive_gemm(
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha as f64,
                    &up(&a),
                    &up(&b),
                    beta as f64,
                    &up(&c0),
                );
                let mut c = c0.clone();
                linalg::gemm_f32(ta, tb, m, n, k, alpha, &a, &b, beta, &mut c).unwrap();
                let f = gemm_bound_factor(k, f32::EPSILON as f64);
                let bound: Vec<f64> = scale.iter().map(|s| f * s).collect();
                let what = format!("gemm_f32 {ta:?}{tb:?} {m}x{n}x{k} a={alpha} b={beta}");
                assert_within(&what, &up(&c), &want, &bound);
            }
        }
    }
}

#[test]
fn gemm_beta_zero_ignores_nan_in_c() {
    let (m, n, k) = (5, 4, 3);
    let a: Vec<f64> = (0..m * k).map(|i| i as f64).collect();
    let b: Vec<f64> = (0..k * n).map(|i| 1.0 - i as f64).collect();
    let (want, _) = naive_gemm(Trans::No, Trans::No, m, n, k, 1.5, &a, &b, 0.0, &[]);
    let mut c = vec![f64::NAN; m * n];
    linalg::gemm_f64(Trans::No, Trans::No, m, n, k, 1.5, &a, &b, 0.0, &mut c).unwrap();
    // Small integers: exact.
    assert_eq!(c, want);
    let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
    let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
    let mut c32 = vec![f32::NAN; m * n];
    linalg::gemm_f32(
        Trans::No,
        Trans::No,
        m,
        n,
        k,
        1.5,
        &a32,
        &b32,
        0.0,
        &mut c32,
    )
    .unwrap();
    let c32: Vec<f64> = c32.iter().map(|&v| v as f64).collect();
    assert_eq!(c32, want);
}

#[test]
fn gemm_shape_errors() {
    let (m, n, k) = (3, 4, 5);
    let a = vec![0.0f64; m * k];
    let b = vec![0.0f64; k * n];
    let mut c = vec![0.0f64; m * n];
    let shape = |r: enkf_dnn::Result<()>| matches!(r, Err(Error::Shape { .. }));
    assert!(shape(linalg::gemm_f64(
        Trans::No,
        Trans::No,
        m,
        n,
        k,
        1.0,
        &a[1..],
        &b,
        0.0,
        &mut c
    )));
    assert!(shape(linalg::gemm_f64(
        Trans::No,
        Trans::No,
        m,
        n,
        k,
        1.0,
        &a,
        &b[1..],
        0.0,
        &mut c
    )));
    assert!(shape(linalg::gemm_f64(
        Trans::No,
        Trans::No,
        m,
        n,
        k,
        1.0,
        &a,
        &b,
        0.0,
        &mut c[1..]
    )));
    assert!(linalg::gemm_f64(Trans::No, Trans::No, m, n, k, 1.0, &a, &b, 0.0, &mut c).is_ok());
}

/// An n × n matrix (n = blocks·bs) whose diagonal blocks are random SPD
/// (R Rᵀ/bs + I, entries of R in [−1, 1]) and whose other entries are NaN (never read).
fn block_spd(rng: &mut ChaCha8Rng, blocks: usize, bs: usize) -> Vec<f64> {
    let n = blocks * bs;
    let mut a = vec![f64::NAN; n * n];
    for d in 0..blocks {
        let r = uniform(rng, bs * bs);
        for i in 0..bs {
            for j in 0..bs {
                let s: f64 = (0..bs).map(|t| r[i * bs + t] * r[j * bs + t]).sum();
                let v = s / bs as f64 + if i == j { 1.0 } else { 0.0 };
                a[(d * bs + i) * n + d * bs + j] = v;
            }
        }
    }
    a
}

#[test]
fn block_cholesky_solve_reconstructs_rhs() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // (blocks, bs, nrhs): many tiny blocks, one dense block, rows not a multiple of 16.
    for &(blocks, bs, nrhs) in &[(6, 10, 37), (1, 64, 40), (2, 100, 17), (3, 1, 5)] {
        let n = blocks * bs;
        let a = block_spd(&mut rng, blocks, bs);
        let rhs = uniform(&mut rng, nrhs * n);
        let mut x = rhs.clone();
        let mut a_work = a.clone();
        linalg::block_cholesky_solve_f64(&mut a_work, blocks, bs, &mut x, nrhs).unwrap();
        // Reconstruct rhs[r, d] = x[r, d] · A_dd.
        let mut back = vec![0.0; nrhs * n];
        let mut bound = vec![0.0; nrhs * n];
        for r in 0..nrhs {
            for d in 0..blocks {
                for j in 0..bs {
                    let (mut s, mut sa) = (0.0, 0.0);
                    for i in 0..bs {
                        let v = x[r * n + d * bs + i] * a[(d * bs + i) * n + d * bs + j];
                        s += v;
                        sa += v.abs();
                    }
                    back[r * n + d * bs + j] = s;
                    bound[r * n + d * bs + j] =
                        SOLVE_C * bs as f64 * f64::EPSILON * (sa + rhs[r * n + d * bs + j].abs());
                }
            }
        }
        assert_within(
            &format!("block Cholesky {blocks}x{bs}, {nrhs} rows"),
            &back,
            &rhs,
            &bound,
        );
    }
}

/// Whitening x and y by the block factors (x̃ = x L_d⁻ᵀ, ỹ = y L_d⁻ᵀ) keeps every
/// product x A⁻¹ yᵀ (block by block): x̃ ỹᵀ equals x · (y A⁻¹)ᵀ from the solve, and
/// x̃ x̃ᵀ is x A⁻¹ xᵀ. Multiplying by L_d⁻¹ instead of L_d⁻ᵀ, or applying A_dd^(-1/2)
/// from the wrong side, changes these by O(1).
#[test]
fn block_cholesky_whitening_keeps_every_product_with_the_inverse() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for &(blocks, bs, nrhs) in &[(6, 10, 37), (1, 64, 40), (3, 1, 5)] {
        let n = blocks * bs;
        let a = block_spd(&mut rng, blocks, bs);
        let x = uniform(&mut rng, nrhs * n);
        let y = uniform(&mut rng, nrhs * n);
        let (mut xw, mut yw) = (x.clone(), y.clone());
        let mut a_work = a.clone();
        linalg::block_cholesky_whiten_f64(&mut a_work, blocks, bs, &mut xw, &mut yw, nrhs).unwrap();
        // (block_spd's off-diagonal blocks are NaN, to show they are never read.)
        assert!(
            a_work
                .iter()
                .zip(&a)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "a is left unchanged"
        );
        let mut ys = y.clone();
        linalg::block_cholesky_solve_f64(&mut a.clone(), blocks, bs, &mut ys, nrhs).unwrap();
        let block_dot = |p: &[f64], q: &[f64], r: usize, s: usize, d: usize| -> f64 {
            (0..bs)
                .map(|i| p[r * n + d * bs + i] * q[s * n + d * bs + i])
                .sum()
        };
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for r in 0..nrhs {
            for s in 0..nrhs {
                for d in 0..blocks {
                    got.push(block_dot(&xw, &yw, r, s, d));
                    want.push(block_dot(&x, &ys, r, s, d));
                }
            }
        }
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let bound = vec![SOLVE_C * (bs * bs) as f64 * f64::EPSILON * scale; want.len()];
        assert_within(
            &format!("whitened products {blocks}x{bs}, {nrhs} rows"),
            &got,
            &want,
            &bound,
        );
        // x̃ x̃ᵀ ≥ 0 on the diagonal and equal to x A⁻¹ xᵀ.
        let mut xs = x.clone();
        linalg::block_cholesky_solve_f64(&mut a.clone(), blocks, bs, &mut xs, nrhs).unwrap();
        for r in 0..nrhs {
            for d in 0..blocks {
                let (g, w) = (block_dot(&xw, &xw, r, r, d), block_dot(&x, &xs, r, r, d));
                assert!(
                    (g - w).abs() <= SOLVE_C * (bs * bs) as f64 * f64::EPSILON * w.abs().max(1.0),
                    "row {r} block {d}: |x̃|² {g} vs x A⁻¹ xᵀ {w}"
                );
            }
        }
    }
    // The whitening is the triangular L⁻ᵀ (L z = rowᵀ): e_0 becomes 1/√a_00 in its first
    // entry, and the last unit row keeps only its last entry; the symmetric A^(-1/2)
    // would give neither.
    let (bs, n) = (5, 5);
    let a = block_spd(&mut rng, 1, bs);
    let (mut x, mut y) = (vec![0.0; n], vec![0.0; n]);
    x[0] = 1.0;
    y[n - 1] = 1.0;
    linalg::block_cholesky_whiten_f64(&mut a.clone(), 1, bs, &mut x, &mut y, 1).unwrap();
    assert!((x[0] - 1.0 / a[0].sqrt()).abs() < 1e-14, "{x:?}");
    assert!(
        y[..n - 1].iter().all(|&v| v == 0.0) && y[n - 1] > 0.0,
        "{y:?}"
    );
}

#[test]
fn block_cholesky_reports_first_indefinite_block() {
    let (blocks, bs, nrhs) = (4, 5, 3);
    let n = blocks * bs;
    let mut a = vec![0.0; n * n];
    for i in 0..n {
        a[i * n + i] = 1.0;
    }
    // Block 2, pivot 3 is −1; block 3 is also indefinite, but block 2 must be reported.
    a[(2 * bs + 3) * n + 2 * bs + 3] = -1.0;
    a[(3 * bs + 1) * n + 3 * bs + 1] = -4.0;
    let rhs: Vec<f64> = (0..nrhs * n).map(|i| i as f64).collect();
    let mut x = rhs.clone();
    let err = linalg::block_cholesky_solve_f64(&mut a, blocks, bs, &mut x, nrhs).unwrap_err();
    match err {
        Error::Linalg(LinalgError::NotPositiveDefinite {
            block,
            size,
            pivot,
            value,
        }) => {
            assert_eq!((block, size, pivot), (2, bs, 3));
            assert_eq!(value, -1.0);
        }
        e => panic!("expected NotPositiveDefinite, got {e:?}"),
    }
    assert_eq!(x, rhs, "rhs must be untouched on error");
    let (mut xw, mut yw) = (rhs.clone(), rhs.clone());
    let err =
        linalg::block_cholesky_whiten_f64(&mut a, blocks, bs, &mut xw, &mut yw, nrhs).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Linalg(LinalgError::NotPositiveDefinite {
                block: 2,
                pivot: 3,
                ..
            })
        ),
        "whitening: {err:?}"
    );
    assert_eq!(
        (xw, yw),
        (rhs.clone(), rhs),
        "whitening leaves both untouched on error"
    );

    // A NaN entry is reported too, not propagated.
    let mut a = vec![0.0; 4];
    a[0] = f64::NAN;
    a[3] = 1.0;
    let mut x = vec![1.0; 2];
    let err = linalg::block_cholesky_solve_f64(&mut a, 1, 2, &mut x, 1).unwrap_err();
    assert!(matches!(
        err,
        Error::Linalg(LinalgError::NotPositiveDefinite {
            block: 0,
            pivot: 0,
            ..
        })
    ));
}

#[test]
fn unit_block_lower_keeps_strict_block_lower_part() {
    let (n, bs) = (6, 2);
    let mut a: Vec<f64> = (0..n * n).map(|i| i as f64 + 1.0).collect();
    let orig = a.clone();
    linalg::unit_block_lower_f64(&mut a, n, bs).unwrap();
    for i in 0..n {
        for j in 0..n {
            let want = if i == j {
                1.0
            } else if j / bs < i / bs {
                -orig[i * n + j]
            } else {
                0.0
            };
            assert_eq!(a[i * n + j], want, "entry ({i}, {j})");
        }
    }
    assert!(matches!(
        linalg::unit_block_lower_f64(&mut a, n, 4),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn solve_unit_lower_right_multiplies_back() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for &(n, rows) in &[(50, 33), (7, 1), (128, 16)] {
        // Strictly lower entries in [−1, 1]/n; diagonal and upper part are garbage that
        // must be ignored (diagonal taken as 1).
        let mut t = vec![f64::NAN; n * n];
        for i in 0..n {
            t[i * n + i] = 5.0;
            for k in 0..i {
                t[i * n + k] = rng.random_range(-1.0..1.0) / n as f64;
            }
        }
        let b = uniform(&mut rng, rows * n);
        let mut x = b.clone();
        linalg::solve_unit_lower_right_f64(&t, n, &mut x, rows).unwrap();
        let mut back = vec![0.0; rows * n];
        let mut bound = vec![0.0; rows * n];
        for r in 0..rows {
            for k in 0..n {
                let mut s = x[r * n + k];
                let mut sa = s.abs();
                for i in k + 1..n {
                    let v = x[r * n + i] * t[i * n + k];
                    s += v;
                    sa += v.abs();
                }
                back[r * n + k] = s;
                bound[r * n + k] = SOLVE_C * n as f64 * f64::EPSILON * (sa + b[r * n + k].abs());
            }
        }
        assert_within(&format!("x·T = b, n={n}, rows={rows}"), &back, &b, &bound);
    }
}

#[test]
fn solve_shape_errors() {
    let shape = |r: enkf_dnn::Result<()>| matches!(r, Err(Error::Shape { .. }));
    let mut a = vec![1.0f64; 16];
    let mut rhs = vec![1.0f64; 8];
    assert!(shape(linalg::block_cholesky_solve_f64(
        &mut a[1..],
        2,
        2,
        &mut rhs,
        2
    )));
    assert!(shape(linalg::block_cholesky_solve_f64(
        &mut a, 2, 2, &mut rhs, 3
    )));
    let t = vec![0.0f64; 16];
    assert!(shape(linalg::solve_unit_lower_right_f64(
        &t[1..],
        4,
        &mut rhs,
        2
    )));
    assert!(shape(linalg::solve_unit_lower_right_f64(
        &t, 4, &mut rhs, 3
    )));
    assert!(shape(linalg::add_diagonal_f64(&mut a, 3, 1.0)));
}

#[test]
fn add_diagonal_adds_only_the_diagonal() {
    let mut a = vec![2.0f64; 9];
    linalg::add_diagonal_f64(&mut a, 3, 0.5).unwrap();
    assert_eq!(a, vec![2.5, 2.0, 2.0, 2.0, 2.5, 2.0, 2.0, 2.0, 2.5]);
}
