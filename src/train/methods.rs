//! The step-size controller and the momentum schedule of the EnKF variants (issue 13),
//! as pure functions of their inputs so that a resumed run recomputes them exactly, and
//! the trainer's inflation step before each update.

use super::config::NoiseScale;
use super::{additive_key, Trainer};
use crate::backend::Backend;
use crate::{Error, Result};

/// The algorithm time after a step `dt` from `time`: exactly `end` once the controller
/// capped the step at the time left (so the end is reached without rounding short).
pub fn advance_time(time: f64, dt: f64, end: f64) -> f64 {
    if dt >= end - time {
        end
    } else {
        time + dt
    }
}

impl<B: Backend> Trainer<'_, B> {
    /// Multiplicative, then additive inflation of the members before an update, each
    /// scaled by the inflation schedule's factor at this update (none when it is 0).
    pub(super) fn inflate(&mut self) -> Result<()> {
        let be = self.backend;
        // The inflation schedule's factor at this update (1 when constant).
        let f = self
            .cfg
            .inflation_schedule
            .factor(self.t, self.cfg.inflation_horizon.unwrap_or(1));
        if self.cfg.inflation != 1.0 && f > 0.0 {
            // Prior inflation: the spread about the mean grows by λ before the forward pass
            // (the mean over every rank's members on a sharded run).
            self.mean_weights()?;
            let lambda = if f == 1.0 {
                self.cfg.inflation
            } else {
                1.0 + (self.cfg.inflation - 1.0) * f
            } as f32;
            be.inflate_rows_f32(
                &mut self.u,
                &self.weights,
                self.members,
                self.params,
                lambda,
            )?;
        }
        if f > 0.0 {
            if let Some(mut scale) = self.noise_scale.take() {
                // Additive inflation, after the multiplicative one.
                let done = self.add_noise(&mut scale, f);
                self.noise_scale = Some(scale);
                done?;
            }
        }
        Ok(())
    }

    /// Additive inflation with the schedule's factor `f`: N(0, (s·f·scale_p)²) added to
    /// weight p of every member, `scale` first set to the ensemble's spread when
    /// `additive_from = spread`.
    fn add_noise(&mut self, scale: &mut B::F32, f: f64) -> Result<()> {
        if self.cfg.additive_from == NoiseScale::Spread {
            self.mean_weights()?;
            self.std_about_mean(scale)?;
        }
        let step = u32::try_from(self.t).map_err(|_| {
            Error::Config(format!(
                "additive inflation counts iterations in 32 bits; iteration {} is past it",
                self.t
            ))
        })?;
        let s = (self.cfg.additive_inflation * f) as f32;
        let key = additive_key(self.cfg.seed);
        // Member j's noise depends on (seed, iteration, j) only, not on the ranks.
        let offset = self.ranks.map_or(0, |r| r.shard.first * self.params);
        self.backend
            .add_normal_f32(&mut self.u, offset, self.params, scale, s, key, step)
    }

    /// Each weight's standard deviation over the members (population, ÷ J) about the
    /// mean in `self.weights` (from `mean_weights`) into `out` (P), over every rank's
    /// members on a sharded run (a collective).
    fn std_about_mean(&self, out: &mut B::F32) -> Result<()> {
        let be = self.backend;
        match self.ranks {
            None => be.row_std_f32(&self.u, &self.weights, self.members, self.params, out),
            Some(r) => {
                let bufs = (&self.u, &self.weights);
                crate::enkf::dist::sharded_std(be, r.comm, r.shard, bufs, self.params, out)
            }
        }
    }

    /// The ensemble's spread, √(mean over the weights of their variance over the
    /// members): the `spread` column of `metrics.csv` (a collective on ranks). Uses the
    /// mean left in `self.weights` by the mini-batch scoring of the same row.
    pub(super) fn spread_about_mean(&self) -> Result<f64> {
        let mut sd = self.backend.zeros_f32(self.params)?;
        self.std_about_mean(&mut sd)?;
        Ok(rms(&self.backend.download_f32(&sd)?))
    }
}

/// The root mean square of `v` in f64 (NaN when empty).
fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// The data-misfit controller of Iglesias and Yang (2021), as EnsembleKalmanProcesses'
/// `DataMisfitController` computes it: with Φ_j the members' misfits
/// (|Γ^{-1/2}(y − g_j)|² / 2) and m the number of observations,
/// q = max(m / (2 Φ̄), √(m / (2 var Φ))) (var with J − 1), and Δt = min(q, T − t) for the
/// algorithm time `time` reached so far and the end `terminate_at` = T. Returns 0 once
/// `time` ≥ T (the controller stops updating there).
pub fn dmc_step(misfits: &[f64], observations: usize, time: f64, terminate_at: f64) -> f64 {
    let left = terminate_at - time;
    if left <= 0.0 || misfits.is_empty() {
        return 0.0;
    }
    let j = misfits.len() as f64;
    let mean = misfits.iter().sum::<f64>() / j;
    let var = if misfits.len() > 1 {
        misfits.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / (j - 1.0)
    } else {
        0.0
    };
    let m = observations as f64;
    // A zero mean or variance gives +inf, and the step is the time left.
    let q = (m / (2.0 * mean)).max((m / (2.0 * var)).sqrt());
    if q.is_nan() {
        return left;
    }
    q.min(left)
}

/// One step of the Nesterov schedule of EnsembleKalmanProcesses' `NesterovAccelerator`
/// (Su, Boyd, Candès 2014): from θ_{k−1} (θ_0 = 1), θ_k = (−θ² + √(θ⁴ + 4θ²)) / 2 with
/// θ = θ_{k−1}, and the momentum coefficient β_k = θ_k (1/θ_{k−1} − 1). Returns (θ_k, β_k).
pub fn nesterov_next(theta_prev: f64) -> (f64, f64) {
    let b = theta_prev * theta_prev;
    let theta = (-b + (b * b + 4.0 * b).sqrt()) / 2.0;
    (theta, theta * (1.0 / theta_prev - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmc_follows_its_formula_and_stops_at_t() {
        // Φ = 1, 2, 3: mean 2, var 1; m = 8: q = max(8/4, √(8/2)) = 2, capped at 1 − 0.
        assert_eq!(dmc_step(&[1.0, 2.0, 3.0], 8, 0.0, 1.0), 1.0);
        // Large misfits: q = max(8/400, √(8/2/10⁴)) = max(0.02, 0.02) = 0.02.
        let phi = [100.0, 200.0, 300.0];
        assert!((dmc_step(&phi, 8, 0.0, 1.0) - 0.02).abs() < 1e-12);
        // Capped by the time left, and 0 once T is reached.
        assert!((dmc_step(&phi, 8, 0.99, 1.0) - 0.01).abs() < 1e-12);
        assert_eq!(dmc_step(&phi, 8, 1.0, 1.0), 0.0);
        // Equal misfits (variance 0): the square-root term is infinite, the step the
        // time left (the larger of the two terms wins, as in EnsembleKalmanProcesses).
        assert_eq!(dmc_step(&[400.0; 4], 8, 0.25, 1.0), 0.75);
    }

    #[test]
    fn nesterov_schedule_matches_the_recurrence() {
        let (t1, b1) = nesterov_next(1.0);
        assert!((t1 - (5f64.sqrt() - 1.0) / 2.0).abs() < 1e-15);
        assert_eq!(b1, 0.0, "no momentum at the first step");
        let (t2, b2) = nesterov_next(t1);
        let b = t1 * t1;
        assert!((t2 - (-b + (b * b + 4.0 * b).sqrt()) / 2.0).abs() < 1e-15);
        assert!((b2 - t2 * (1.0 / t1 - 1.0)).abs() < 1e-15);
        // β_k → 1 as 1 − 3/k (Su, Boyd, Candès): after 1000 steps β ≈ 0.997.
        let mut theta = 1.0;
        let mut beta = 0.0;
        for _ in 0..1000 {
            (theta, beta) = nesterov_next(theta);
        }
        assert!((beta - (1.0 - 3.0 / 1000.0)).abs() < 2e-3, "{beta}");
    }
}
