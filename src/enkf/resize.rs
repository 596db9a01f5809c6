//! Changing the ensemble: dropping members, adding members drawn from the ensemble's own
//! Gaussian, detecting members with non-finite outputs and redrawing them. Written over
//! [`Backend`]: the only device work is row copies and one GEMM with a host-drawn
//! coefficient matrix.
//!
//! A new member is `ū + Σ_k z_k (u_k − ū)/√n` with z ~ N(0, I_n) over n source members,
//! which has the sources' mean and (1/n-normalised, as the paper's Eq. 3) covariance in
//! expectation. Since `Σ_k z_k (u_k − ū) = Σ_k (z_k − z̄) u_k`, the new rows are `R U_s`
//! with `R_ik = 1/n + (z_ik − z̄_i)/√n`.

use crate::backend::{Backend, Trans};
use crate::{Error, Result};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// The `count × n` coefficient matrix R of `count` draws from the Gaussian of n members.
pub fn gaussian_draw_coefficients<R: Rng>(rng: &mut R, count: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(count * n);
    let scale = 1.0 / (n as f64).sqrt();
    for _ in 0..count {
        let z: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        let zbar = z.iter().sum::<f64>() / n as f64;
        out.extend(
            z.iter()
                .map(|&zk| (1.0 / n as f64 + (zk - zbar) * scale) as f32),
        );
    }
    out
}

/// Copies the rows of `u` (members × params) listed in `keep` (ascending) into a new buffer.
pub fn select_members<B: Backend>(
    be: &B,
    u: &B::F32,
    params: usize,
    keep: &[usize],
) -> Result<B::F32> {
    let mut out = be.zeros_f32(keep.len() * params)?;
    let mut i = 0;
    while i < keep.len() {
        // Copy runs of consecutive rows in one call.
        let mut run = 1;
        while i + run < keep.len() && keep[i + run] == keep[i] + run {
            run += 1;
        }
        be.copy_rows_f32(u, keep[i], &mut out, i, run, params)?;
        i += run;
    }
    Ok(out)
}

/// Removes `count` members chosen uniformly without replacement by `rng`; returns the
/// new ensemble ((members − count) × params) and the removed indices (ascending).
pub fn drop_members<B: Backend, R: Rng>(
    be: &B,
    u: &B::F32,
    members: usize,
    params: usize,
    count: usize,
    rng: &mut R,
) -> Result<(B::F32, Vec<usize>)> {
    if count + 2 > members {
        return Err(Error::Config(format!(
            "cannot drop {count} of {members} members: at least 2 must remain"
        )));
    }
    let mut dropped = rand::seq::index::sample(rng, members, count).into_vec();
    dropped.sort_unstable();
    let keep: Vec<usize> = (0..members)
        .filter(|j| dropped.binary_search(j).is_err())
        .collect();
    Ok((select_members(be, u, params, &keep)?, dropped))
}

/// Appends `count` members drawn from the ensemble's Gaussian; returns the
/// (members + count) × params ensemble.
pub fn add_members<B: Backend, R: Rng>(
    be: &B,
    u: &B::F32,
    members: usize,
    params: usize,
    count: usize,
    rng: &mut R,
) -> Result<B::F32> {
    let r = be.upload_f32(&gaussian_draw_coefficients(rng, count, members))?;
    let mut fresh = be.zeros_f32(count * params)?;
    be.gemm_f32(
        Trans::No,
        Trans::No,
        count,
        params,
        members,
        1.0,
        &r,
        u,
        0.0,
        &mut fresh,
    )?;
    let mut out = be.zeros_f32((members + count) * params)?;
    be.copy_rows_f32(u, 0, &mut out, 0, members, params)?;
    be.copy_rows_f32(&fresh, 0, &mut out, members, count, params)?;
    Ok(out)
}

/// Members whose row of `g` (members × cols) holds a non-finite value. Computed as the
/// row sums G·1 (a NaN or ±∞ anywhere in a row makes its sum non-finite), so only
/// `members` values come back to the host. `ones` (cols ones) and `sums` (members) are
/// caller-owned buffers so that nothing is allocated per iteration.
pub fn nonfinite_rows<B: Backend>(
    be: &B,
    g: &B::F32,
    members: usize,
    cols: usize,
    ones: &B::F32,
    sums: &mut B::F32,
) -> Result<Vec<usize>> {
    be.gemm_f32(
        Trans::No,
        Trans::No,
        members,
        1,
        cols,
        1.0,
        g,
        ones,
        0.0,
        sums,
    )?;
    let sums = be.download_f32(sums)?;
    Ok(sums
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_finite())
        .map(|(j, _)| j)
        .collect())
}

/// The members of `0..members` not in `failed` (ascending): the ones a resample draws
/// from (one process or sharded, `super::dist_resize`).
///
/// Errors: [`Error::TooFewToResample`] when fewer than two are left.
pub fn survivors(members: usize, failed: &[usize]) -> Result<Vec<usize>> {
    let ok: Vec<usize> = (0..members)
        .filter(|j| failed.binary_search(j).is_err())
        .collect();
    if ok.len() < 2 {
        return Err(Error::TooFewToResample {
            iteration: None,
            failed: failed.len(),
            members,
        });
    }
    Ok(ok)
}

/// Replaces the rows `failed` (ascending) of `u` by draws from the Gaussian of the other
/// members (as EnsembleKalmanProcesses.jl does). Errors when fewer than two succeed.
pub fn resample_members<B: Backend, R: Rng>(
    be: &B,
    u: &mut B::F32,
    members: usize,
    params: usize,
    failed: &[usize],
    rng: &mut R,
) -> Result<()> {
    let ok = survivors(members, failed)?;
    let good = select_members(be, u, params, &ok)?;
    let r = be.upload_f32(&gaussian_draw_coefficients(rng, failed.len(), ok.len()))?;
    let mut fresh = be.zeros_f32(failed.len() * params)?;
    be.gemm_f32(
        Trans::No,
        Trans::No,
        failed.len(),
        params,
        ok.len(),
        1.0,
        &r,
        &good,
        0.0,
        &mut fresh,
    )?;
    for (i, &j) in failed.iter().enumerate() {
        be.copy_rows_f32(&fresh, i, u, j, 1, params)?;
    }
    Ok(())
}
