//! The EnKF update with the ensemble sharded over ranks (issue 14).
//!
//! Rank r holds J_r of the J members: U_r (J_r × P), its outputs G_r (J_r × m) and the
//! rows A_r, D_r, X_r of A, D, X. Every quantity of the update in `mod.rs` that mixes
//! members is a sum over members, so the ranks exchange, per update:
//!
//! ```text
//! s = Σ_r 1ᵀ D_r              (m f64)      the mean innovation D̄ = s / J, hence the
//!                                          global centring A_r = A_r^loc + 1 (D̄ − D̄_r)ᵀ
//! C = Σ_r A_rᵀ A_r / J        (m × m f64)  then + γI and its Cholesky factor, the same
//!                                          on every rank
//! Lfull = Σ_r A_rᵀ Bm_r / J   (m × m f64)  the sequential rule only
//! T = Σ_r A_rᵀ U_r / J        (m × P f32)  the apply in parameter-space order
//! ```
//!
//! and then each updates its own rows: X_r = D_r C⁻¹ (batch) or Bm_r (I − L)⁻¹
//! (sequential), U_r += X_r T. (A_r^loc = G_r − Ḡ_r is what `center_and_innovate`
//! gives on the rank's rows; with G = y − D, G_r − Ḡ = A_r^loc + (Ḡ_r − Ḡ) =
//! A_r^loc + (D̄ − D̄_r).) The member-space order (S = X Aᵀ, J × J) would need every
//! rank's A: the sharded update always applies through parameter space. Bytes per rank
//! and update, m = 640, P = 18,050: 5 KB + 3.3 MB (+ 3.3 MB sequential) + 46.2 MB.
//!
//! With one rank every correction is exactly zero and every sum has one term: the
//! result is bit for bit that of [`super::EnkfWorkspace`] with
//! [`super::ApplyOrder::Params`].
//!
//! The transform rule (ETKI, `super::transform`) needs nothing more: its X_r = 1 (C⁻¹
//! d̄)ᵀ + A_r Qᵀ diag(φ) Q takes the global d̄ = s / J and C (each rank decomposes the
//! same C), and it applies as the batch rule does.
//!
//! The data-misfit step controller needs every member's misfit Φ_j: each rank's
//! ([`ShardedWorkspace::misfits`]) travel as its rows of one J-vector, summed with zeros
//! (exact), so every rank takes the one-process step Δt and updates with γ/Δt.
//!
//! The trainer on ranks is `crate::train::ranks`. Not sharded yet: the Tikhonov
//! update.

use super::UpdateRule;
use crate::backend::{check_len, Backend, Trans};
use crate::dist::{Comm, Shard};
use crate::{Error, Result};

/// Buffers of one rank's sharded update for (J_r, P, B), see the module docs.
pub struct ShardedWorkspace<B: Backend> {
    shard: Shard,
    params: usize,
    batch: usize,
    outputs: usize,
    /// A_r (globally centred), J_r × m.
    a64: B::F64,
    /// D_r, then Bm_r / X_r, J_r × m.
    x64: B::F64,
    /// C, m × m (replicated).
    c64: B::F64,
    /// Lfull, then I − L, m × m (replicated, sequential rule).
    l64: B::F64,
    /// Ones, J_r (column sums and the centring correction).
    ones: B::F64,
    /// The centring correction D̄ − D̄_r, 1 × m.
    shift: B::F64,
    /// The sums of D_r's columns, 1 × m.
    sums: B::F64,
    x32: B::F32,
    a32: B::F32,
    t32: B::F32,
    /// The transform rule's buffers for this rank's rows (made on its first update).
    transform: Option<super::transform::TransformBuffers<B>>,
    /// The apply's centring about the mean of every rank's members (`super::Centring`).
    centre: super::Centring<B>,
}

impl<B: Backend> ShardedWorkspace<B> {
    /// Buffers for `shard` of an ensemble of `params` weights and mini-batches of
    /// `batch` images with `outputs` values each.
    ///
    /// Errors: [`Error::Config`] for a global J < 2 or an empty size; allocation
    /// failures of the backend.
    pub fn new(
        backend: &B,
        shard: Shard,
        params: usize,
        batch: usize,
        outputs: usize,
    ) -> Result<Self> {
        if shard.members < 2 || shard.count == 0 || params == 0 || batch == 0 || outputs == 0 {
            return Err(Error::Config(format!(
                "a sharded EnKF update needs J ≥ 2 with members on every rank, and P, B and \
                 the outputs ≥ 1; got {shard:?}, P = {params}, B = {batch}, {outputs} outputs"
            )));
        }
        let (j, m) = (shard.count, batch * outputs);
        let mut ones = backend.zeros_f64(j)?;
        backend.write_f64(&vec![1.0; j], &mut ones)?;
        Ok(ShardedWorkspace {
            shard,
            params,
            batch,
            outputs,
            a64: backend.zeros_f64(j * m)?,
            x64: backend.zeros_f64(j * m)?,
            c64: backend.zeros_f64(m * m)?,
            l64: backend.zeros_f64(m * m)?,
            ones,
            shift: backend.zeros_f64(m)?,
            sums: backend.zeros_f64(m)?,
            x32: backend.zeros_f32(j * m)?,
            a32: backend.zeros_f32(j * m)?,
            t32: backend.zeros_f32(m * params)?,
            transform: None,
            centre: super::Centring::new(backend, j, params)?,
        })
    }

    /// One update of this rank's members `u` (J_r × P) from their outputs `g`
    /// (J_r × m) and the targets `y` (m), exchanging the sums of the module docs over
    /// `comm` (whose size and rank must be those of the shard).
    ///
    /// Errors: [`Error::Shape`] on buffer lengths; [`Error::Config`] for a bad γ, or a
    /// `comm` of another size than the shards';
    /// the solves' errors (the same on every rank, as C is); the transport's errors.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        backend: &B,
        comm: &dyn Comm,
        rule: UpdateRule,
        gamma: f64,
        u: &mut B::F32,
        g: &B::F32,
        y: &B::F32,
    ) -> Result<()> {
        self.update_perturbed(backend, comm, rule, gamma, (u, g, y), None)
    }

    /// As [`ShardedWorkspace::update`], with the stochastic EnKF's observation
    /// perturbations of this rank's members (`noise`: J_r × m, the rows
    /// `shard.range()` of the one-process run's J × m) added to the innovations after the
    /// global centring, as the one-process `solve` adds them.
    ///
    /// Errors: as [`ShardedWorkspace::update`]; [`Error::Shape`] for `noise`.
    pub fn update_perturbed(
        &mut self,
        backend: &B,
        comm: &dyn Comm,
        rule: UpdateRule,
        gamma: f64,
        (u, g, y): (&mut B::F32, &B::F32, &B::F32),
        noise: Option<&[f64]>,
    ) -> Result<()> {
        let (jr, p, m) = (self.shard.count, self.params, self.batch * self.outputs);
        // Every rank checks its inputs, then the ranks agree: one failing rank must not
        // leave the others waiting in a collective.
        let checked = self
            .check(backend, comm, gamma, (u, g, y))
            .and_then(|()| super::no_perturbed_transform(rule, noise))
            .and_then(|()| match noise {
                Some(eta) => check_len("sharded EnKF observation perturbations", eta.len(), jr * m),
                None => Ok(()),
            });
        agree(comm, checked)?;
        let inv_j = 1.0 / self.shard.members as f64;
        // Local centring and innovations, then the global mean innovation.
        backend.center_and_innovate(g, y, jr, m, &mut self.a64, &mut self.x64)?;
        backend.gemm_f64(
            Trans::No,
            Trans::No,
            1,
            m,
            jr,
            1.0,
            &self.ones,
            &self.x64,
            0.0,
            &mut self.sums,
        )?;
        let local = backend.download_f64(&self.sums)?;
        let mut total = local.clone();
        comm.allreduce_sum_f64(&mut total)?;
        let (jf, jrf) = (self.shard.members as f64, jr as f64);
        let shift: Vec<f64> = total
            .iter()
            .zip(&local)
            .map(|(&s, &l)| s / jf - l / jrf)
            .collect();
        if shift.iter().any(|&d| d != 0.0) {
            backend.write_f64(&shift, &mut self.shift)?;
            // A_r += 1 (D̄ − D̄_r)ᵀ.
            backend.gemm_f64(
                Trans::No,
                Trans::No,
                jr,
                m,
                1,
                1.0,
                &self.ones,
                &self.shift,
                1.0,
                &mut self.a64,
            )?;
        }
        if let Some(eta) = noise {
            backend.add_host_f64(eta, &mut self.x64)?;
        }
        // C = Σ_r A_rᵀA_r / J + γI, and the sequential rule's L summed the same way.
        let bufs = super::GainBufs {
            a64: &mut self.a64,
            x64: &mut self.x64,
            c64: &mut self.c64,
            l64: &mut self.l64,
        };
        let dims = (jr, self.batch, self.outputs);
        super::rule_gain(backend, rule, bufs, dims, inv_j, gamma, &mut |buf| {
            backend.allreduce_sum_f64(comm, buf)
        })?;
        if rule == UpdateRule::Transform {
            // X_r = 1 (C⁻¹ d̄)ᵀ + A_r Qᵀ diag(φ) Q from the global d̄ and C (on one rank
            // the one-process d̄, from these rows).
            let dbar: Option<Vec<f64>> =
                (comm.size() > 1).then(|| total.iter().map(|&s| s * inv_j).collect());
            if self.transform.is_none() {
                self.transform = Some(super::transform::TransformBuffers::new(backend, jr, m)?);
            }
            if let Some(t) = &mut self.transform {
                t.gain(
                    backend,
                    &self.a64,
                    &mut self.x64,
                    &mut self.c64,
                    (jr, m),
                    gamma,
                    dbar.as_deref(),
                )?;
            }
        }
        // T = Σ_r A_rᵀ E_r / J (m × P), then E_r += X_r T, E_r = U_r − 1ūᵀ with the mean
        // over every rank (one common vector: Σ_r A_rᵀ1 = 0 only summed over the ranks).
        // The transform rule's factors in the eigenbasis of the global C, as one process
        // forms them (`TransformBuffers::balanced_factors`; m × J_r, transposed).
        let balanced = if rule == UpdateRule::Transform {
            self.transform.as_mut()
        } else {
            None
        };
        let (ta, tx) = super::transform::apply_factors(
            backend,
            balanced,
            &self.a64,
            &self.x64,
            &self.c64,
            (jr, m),
            &mut self.a32,
            &mut self.x32,
        )?;
        sharded_mean(backend, comm, self.shard, u, p, self.centre.mean_mut())?;
        self.centre.shift(backend, u, (jr, p), -1.0)?;
        backend.gemm_f32(
            ta,
            Trans::No,
            m,
            p,
            jr,
            inv_j as f32,
            &self.a32,
            u,
            0.0,
            &mut self.t32,
        )?;
        backend.allreduce_sum_f32(comm, &mut self.t32)?;
        backend.gemm_f32(tx, Trans::No, jr, p, m, 1.0, &self.x32, &self.t32, 1.0, u)?;
        self.centre.shift(backend, u, (jr, p), 1.0)
    }
}

impl<B: Backend> ShardedWorkspace<B> {
    /// This rank's members' data misfits Φ_j = |y − g_j|² / 2γ from their outputs `g`
    /// (J_r × m) and the targets `y` (m): the one-process
    /// [`super::EnkfWorkspace::misfits`] of these rows, bit for bit (each row's own
    /// sum). For the data-misfit step controller, which needs every rank's.
    ///
    /// Errors: [`Error::Shape`] on lengths; the backend's.
    pub fn misfits(&mut self, backend: &B, g: &B::F32, y: &B::F32, gamma: f64) -> Result<Vec<f64>> {
        let (jr, m) = (self.shard.count, self.batch * self.outputs);
        check_len("sharded EnKF outputs g", backend.len_f32(g), jr * m)?;
        check_len("sharded EnKF targets y", backend.len_f32(y), m)?;
        backend.center_and_innovate(g, y, jr, m, &mut self.a64, &mut self.x64)?;
        super::misfits_of(backend, &self.x64, jr, m, gamma)
    }

    /// The checks of [`ShardedWorkspace::update`] on this rank's inputs.
    fn check(
        &self,
        backend: &B,
        comm: &dyn Comm,
        gamma: f64,
        (u, g, y): (&B::F32, &B::F32, &B::F32),
    ) -> Result<()> {
        let (jr, p, m) = (self.shard.count, self.params, self.batch * self.outputs);
        let expected = Shard::of(self.shard.members, comm.rank(), comm.size())?;
        if expected != self.shard {
            return Err(Error::Config(format!(
                "the workspace holds {:?}, but this rank ({} of {}) holds {expected:?}",
                self.shard,
                comm.rank(),
                comm.size()
            )));
        }
        if !(gamma.is_finite() && gamma >= 0.0) {
            return Err(Error::Config(format!(
                "gamma must be finite and non-negative, got {gamma}"
            )));
        }
        check_len("sharded EnKF ensemble u", backend.len_f32(u), jr * p)?;
        check_len("sharded EnKF outputs g", backend.len_f32(g), jr * m)?;
        check_len("sharded EnKF targets y", backend.len_f32(y), m)
    }
}

/// Every rank's `local` outcome of a step, agreed over the ranks (one count of
/// failures): `Ok` when every rank succeeded; this rank's error, or an error naming the
/// failed ranks' count when this one succeeded. The count travels in the same
/// collective on every rank, so none waits for a rank that gave up.
fn agree(comm: &dyn Comm, local: Result<()>) -> Result<()> {
    let mut failed = [f64::from(u8::from(local.is_err()))];
    comm.allreduce_sum_f64(&mut failed)?;
    match local {
        Err(e) => Err(e),
        Ok(()) if failed[0] > 0.0 => Err(Error::Config(format!(
            "{} of {} ranks refused this update (see their errors); nothing was updated",
            failed[0] as usize,
            comm.size()
        ))),
        Ok(()) => Ok(()),
    }
}

/// Bytes one rank contributes to the sums of one update (module docs): what an
/// allreduce moves per rank, before the transport's own factor (a ring allreduce sends
/// about 2·(N − 1)/N times this).
pub fn exchanged_bytes(rule: UpdateRule, params: usize, obs: usize) -> u64 {
    let (p, m) = (params as u64, obs as u64);
    let sequential = u64::from(rule == UpdateRule::Sequential);
    8 * m + 8 * m * m * (1 + sequential) + 4 * m * p
}

/// Times the sharded update of this rank's share of `members` (the paper's P = 18,050
/// and m = 640 by default) on the CPU backend: `warmup` untimed then `iters` timed
/// updates of random members and outputs; returns the milliseconds of each timed one
/// (every rank takes part; the allreduce waits are part of the time). For
/// `bench --sharded` under `mpirun`.
///
/// Errors: as [`Shard::of`] and [`ShardedWorkspace::update`].
pub fn bench_sharded(
    comm: &dyn Comm,
    members: usize,
    params: usize,
    rule: UpdateRule,
    (warmup, iters): (usize, usize),
) -> Result<Vec<f64>> {
    use rand::SeedableRng;
    let be = crate::cpu::CpuBackend::new();
    let shard = Shard::of(members, comm.rank(), comm.size())?;
    let (batch, outputs) = (64, crate::model::CLASSES);
    let m = batch * outputs;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(comm.rank() as u64);
    let mut u = super::init_ensemble(&mut rng, shard.count, params, 1.0);
    let g: Vec<f32> = super::init_ensemble(&mut rng, shard.count, m, 0.3);
    let labels: Vec<u8> = (0..batch).map(|i| (i % outputs) as u8).collect();
    let y = super::one_hot(&labels, outputs);
    let mut ws = ShardedWorkspace::new(&be, shard, params, batch, outputs)?;
    let mut times = Vec::with_capacity(iters);
    for it in 0..warmup + iters {
        let t0 = std::time::Instant::now();
        ws.update(&be, comm, rule, 0.01, &mut u, &g, &y)?;
        if it >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// Rows `shard.range()` of [`super::init_ensemble`]`(rng, shard.members, params, sigma)`:
/// member j's initial weights depend only on the generator's seed and j, never on how
/// many ranks share the ensemble. The normals of the members before the shard are drawn
/// and dropped (P·first of them: the generator's stream has no cheaper skip for
/// rejection-sampled normals).
pub fn init_shard<R: rand::Rng>(rng: &mut R, shard: Shard, params: usize, sigma: f64) -> Vec<f32> {
    use rand_distr::{Distribution, StandardNormal};
    for _ in 0..shard.first * params {
        let _: f64 = StandardNormal.sample(rng);
    }
    super::init_ensemble(rng, shard.count, params, sigma)
}

/// The column standard deviations over every rank's rows of `u` (this rank's J_r × P)
/// about the global mean `mean` (P, from [`sharded_mean`]) into `out` (P), population (÷
/// J): each rank's sum of squares (J_r · its rows' std², in f64), added over the ranks.
/// On one rank exactly `row_std_f32` (additive inflation's "spread" scale).
///
/// Errors: [`Error::Shape`] on lengths; the transport's errors.
pub fn sharded_std<B: Backend>(
    backend: &B,
    comm: &dyn Comm,
    shard: Shard,
    (u, mean): (&B::F32, &B::F32),
    params: usize,
    out: &mut B::F32,
) -> Result<()> {
    backend.row_std_f32(u, mean, shard.count, params, out)?;
    if comm.size() == 1 {
        return Ok(());
    }
    let local = backend.download_f32(out)?;
    let jr = shard.count as f64;
    let mut sums: Vec<f64> = local.iter().map(|&s| f64::from(s).powi(2) * jr).collect();
    comm.allreduce_sum_f64(&mut sums)?;
    let global: Vec<f32> = sums
        .iter()
        .map(|&s| (s / shard.members as f64).sqrt() as f32)
        .collect();
    backend.write_f32(&global, out)
}

/// The ensemble mean over every rank's rows of `u` (this rank's J_r × P) into `mean`
/// (P): each rank's column sums in f64, added over the ranks, divided by J.
///
/// Errors: [`Error::Shape`] on lengths; the transport's errors.
pub fn sharded_mean<B: Backend>(
    backend: &B,
    comm: &dyn Comm,
    shard: Shard,
    u: &B::F32,
    params: usize,
    mean: &mut B::F32,
) -> Result<()> {
    backend.row_mean(u, shard.count, params, mean)?;
    if comm.size() == 1 {
        return Ok(());
    }
    let local = backend.download_f32(mean)?;
    let mut sums: Vec<f64> = local
        .iter()
        .map(|&v| f64::from(v) * shard.count as f64)
        .collect();
    comm.allreduce_sum_f64(&mut sums)?;
    let global: Vec<f32> = sums
        .iter()
        .map(|&s| (s / shard.members as f64) as f32)
        .collect();
    backend.write_f32(&global, mean)
}
