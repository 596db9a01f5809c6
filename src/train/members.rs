//! The trainer's changes of the ensemble itself: Algorithm 1's decisions (J and r),
//! dropping and adding members, and redrawing failed ones, alone or over ranks.

use super::adaptive::{AdaptiveLogRow, AdaptiveRule};
use super::{ranks, Observer, Trainer};
use crate::backend::Backend;
use crate::enkf::resize;
use crate::Result;
use std::time::Instant;

impl<B: Backend> Trainer<'_, B> {
    /// Algorithm 1 at a comparison point with the current test error `current`.
    pub(super) fn adapt(&mut self, current: f64, observer: &mut dyn Observer) -> Result<()> {
        let t0 = Instant::now();
        let previous = self.adapt_prev.unwrap_or(f64::INFINITY);
        let rule = AdaptiveRule {
            min_members: self.cfg.adapt_min_members,
            max_members: self.cfg.adapt_max_members,
            step: self.cfg.adapt_step,
            kappa: self.cfg.adapt_kappa,
            epsilon: self.cfg.adapt_epsilon,
            rule: self.cfg.adapt_rule,
            max_repetitions: self.cfg.repetitions,
        };
        let now = self.members();
        let (j, r) = rule.decide(now, self.repetitions, previous, current);
        self.adapt_prev = Some(current);
        if (j, r) == (now, self.repetitions) {
            return Ok(());
        }
        if j != now {
            self.resize_to(j)?;
            self.workspaces.clear();
            self.loaded = None;
        }
        // The new r applies at once: a mini-batch already shown r times is done.
        self.repetitions = r;
        if self.rep >= r {
            self.next_batch();
        }
        let row = AdaptiveLogRow {
            iteration: self.t,
            previous_error: previous,
            error: current,
            members: j,
            repetitions: r,
            remaining_iterations: self.remaining_iterations(),
        };
        observer.on_adapt(&row)?;
        self.adaptive_log.push(row);
        self.times.other += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Drops or adds members (Algorithm 1's draws from `adapt_rng`) to reach `j` in all;
    /// on ranks the shards are rebalanced to the new J ([`crate::enkf::dist_resize`]).
    pub(super) fn resize_to(&mut self, j: usize) -> Result<()> {
        let be = self.backend;
        let now = self.members();
        let rng = &mut self.adapt_rng;
        if let Some(r) = self.ranks {
            use crate::enkf::dist_resize;
            let (u, shard) = if j < now {
                dist_resize::drop_members(be, r.comm, &self.u, r.shard, self.params, now - j, rng)?
            } else {
                dist_resize::add_members(be, r.comm, &self.u, r.shard, self.params, j - now, rng)?
            };
            self.u = u;
            self.members = shard.count;
            self.ranks = Some(ranks::Ranks { shard, ..r });
            return Ok(());
        }
        self.u = if j < now {
            resize::drop_members(be, &self.u, now, self.params, now - j, rng)?.0
        } else {
            resize::add_members(be, &self.u, now, self.params, j - now, rng)?
        };
        self.members = j;
        Ok(())
    }

    /// Redraws the members `failed` (global indices, ascending) from the Gaussian of the
    /// others (`resample_rng`).
    pub(super) fn resample(&mut self, failed: &[usize]) -> Result<()> {
        let be = self.backend;
        let rng = &mut self.resample_rng;
        match self.ranks {
            None => {
                resize::resample_members(be, &mut self.u, self.members, self.params, failed, rng)
            }
            Some(r) => crate::enkf::dist_resize::resample_members(
                be,
                r.comm,
                &mut self.u,
                r.shard,
                self.params,
                failed,
                rng,
            ),
        }
    }

    /// The failed rows of this process, as global indices: on ranks every rank's
    /// (one sum), so every rank takes the same decision.
    pub(super) fn agree_rows(&self, local: Vec<usize>) -> Result<Vec<usize>> {
        match self.ranks {
            None => Ok(local),
            Some(r) => crate::enkf::dist_resize::global_rows(r.comm, r.shard, &local),
        }
    }
}
