//! Host f64 reference implementations of the update rules, written the plain way
//! (explicit means and covariances, one Kalman step per loop iteration). They are the
//! test oracles of [`super::EnkfWorkspace::update`]; they share no code with it.

use crate::backend::check_len;
use crate::error::LinalgError;
use crate::model::CLASSES;
use crate::Result;

/// The authors' sequential rule, literally: B Kalman steps, one per image.
///
/// `u`: members × params (row j = member j), updated in place. `g`: members × batch ×
/// 10 outputs, computed once before the loop. `y`: batch · 10 one-hot targets. For
/// d = 0..batch, with g_j = g[j, d, :] and the *current* u:
/// C_pp = cov(g, g) + γI (10 × 10), C_up = cov(u, g) (params × 10), covariances
/// dividing by J, then u_j += C_up C_pp⁻¹ (y_d − g_j) for every j.
///
/// Errors: [`crate::Error::Shape`] on wrong lengths; [`LinalgError::NotPositiveDefinite`]
/// with `block = d` when C_pp + γI is not positive definite.
pub fn sequential_literal(
    u: &mut [f64],
    g: &[f64],
    y: &[f64],
    members: usize,
    params: usize,
    batch: usize,
    gamma: f64,
) -> Result<()> {
    let m = batch * CLASSES;
    check_len("sequential_literal u", u.len(), members * params)?;
    check_len("sequential_literal g", g.len(), members * m)?;
    check_len("sequential_literal y", y.len(), m)?;
    for d in 0..batch {
        let gd: Vec<f64> = (0..members)
            .flat_map(|j| {
                g[j * m + d * CLASSES..j * m + (d + 1) * CLASSES]
                    .iter()
                    .copied()
            })
            .collect();
        let yd = &y[d * CLASSES..(d + 1) * CLASSES];
        kalman_step(u, &gd, yd, members, params, CLASSES, gamma, d)?;
    }
    Ok(())
}

/// The batch rule (one ensemble Kalman inversion step), the plain way.
///
/// Shapes as [`sequential_literal`]; one step with all m = batch · 10 outputs at once:
/// C_pp = cov(G, G) + γI (m × m), C_up = cov(u, G) (params × m),
/// u_j += C_up C_pp⁻¹ (y − G_j).
///
/// Errors: [`crate::Error::Shape`] on wrong lengths; [`LinalgError::NotPositiveDefinite`]
/// (block 0) when C_pp + γI is not positive definite.
pub fn batch_reference(
    u: &mut [f64],
    g: &[f64],
    y: &[f64],
    members: usize,
    params: usize,
    batch: usize,
    gamma: f64,
) -> Result<()> {
    let m = batch * CLASSES;
    check_len("batch_reference u", u.len(), members * params)?;
    check_len("batch_reference g", g.len(), members * m)?;
    check_len("batch_reference y", y.len(), m)?;
    kalman_step(u, g, y, members, params, m, gamma, 0)
}

/// One Kalman step with q observations: `u` J × P, `g` J × q, `y` q.
#[allow(clippy::too_many_arguments)]
fn kalman_step(
    u: &mut [f64],
    g: &[f64],
    y: &[f64],
    members: usize,
    params: usize,
    q: usize,
    gamma: f64,
    block: usize,
) -> Result<()> {
    let jf = members as f64;
    let mut gbar = vec![0.0f64; q];
    let mut ubar = vec![0.0f64; params];
    for j in 0..members {
        for k in 0..q {
            gbar[k] += g[j * q + k] / jf;
        }
        for p in 0..params {
            ubar[p] += u[j * params + p] / jf;
        }
    }
    let mut cpp = vec![0.0f64; q * q];
    let mut cup = vec![0.0f64; params * q];
    for j in 0..members {
        for k in 0..q {
            let gk = g[j * q + k] - gbar[k];
            for l in 0..q {
                cpp[k * q + l] += gk * (g[j * q + l] - gbar[l]) / jf;
            }
            for p in 0..params {
                cup[p * q + k] += (u[j * params + p] - ubar[p]) * gk / jf;
            }
        }
    }
    for k in 0..q {
        cpp[k * q + k] += gamma;
    }
    let chol = cholesky(&cpp, q, block)?;
    for j in 0..members {
        let mut v: Vec<f64> = (0..q).map(|k| y[k] - g[j * q + k]).collect();
        chol_solve(&chol, q, &mut v);
        for p in 0..params {
            let du: f64 = (0..q).map(|k| cup[p * q + k] * v[k]).sum();
            u[j * params + p] += du;
        }
    }
    Ok(())
}

/// Lower Cholesky factor of the q × q SPD matrix `a`.
fn cholesky(a: &[f64], q: usize, block: usize) -> Result<Vec<f64>, LinalgError> {
    let mut l = vec![0.0f64; q * q];
    for i in 0..q {
        for j in 0..=i {
            let s = a[i * q + j] - (0..j).map(|t| l[i * q + t] * l[j * q + t]).sum::<f64>();
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return Err(LinalgError::NotPositiveDefinite {
                        block,
                        size: q,
                        pivot: i,
                        value: s,
                    });
                }
                l[i * q + i] = s.sqrt();
            } else {
                l[i * q + j] = s / l[j * q + j];
            }
        }
    }
    Ok(l)
}

/// Solves L Lᵀ x = v in place.
fn chol_solve(l: &[f64], q: usize, v: &mut [f64]) {
    for i in 0..q {
        let s: f64 = (0..i).map(|t| l[i * q + t] * v[t]).sum();
        v[i] = (v[i] - s) / l[i * q + i];
    }
    for i in (0..q).rev() {
        let s: f64 = (i + 1..q).map(|t| l[t * q + i] * v[t]).sum();
        v[i] = (v[i] - s) / l[i * q + i];
    }
}
