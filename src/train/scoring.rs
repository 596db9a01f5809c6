//! The trainer's scoring: the evaluated networks (ensemble mean, last member, the
//! ensemble's averaged prediction) on the test set and the mean on the mini-batch, and
//! the metrics row they fill.

use super::config::{Adaptation, EvalMode};
use super::{metrics, MetricsRow, Trainer};
use crate::backend::Backend;
use crate::data::Task;
use crate::Result;
use std::time::Instant;

impl<B: Backend> Trainer<'_, B> {
    /// The last member's weights into `self.weights` (`eval = last`); on ranks the last
    /// rank's row, summed with the others' zeros (a collective).
    pub(super) fn last_member_weights(&mut self) -> Result<()> {
        let be = self.backend;
        let p = self.params;
        match self.ranks {
            None => be.copy_rows_f32(&self.u, self.members - 1, &mut self.weights, 0, 1, p),
            Some(r) => {
                let mut row = vec![0.0f32; p];
                if r.comm.rank() + 1 == r.comm.size() {
                    be.copy_rows_f32(&self.u, self.members - 1, &mut self.weights, 0, 1, p)?;
                    row = be.download_f32(&self.weights)?;
                }
                r.comm.allreduce_sum_f32(&mut row)?;
                be.write_f32(&row, &mut self.weights)
            }
        }
    }

    /// The ensemble mean into `self.weights`: over this process's members, or over every
    /// rank's (a collective).
    pub(super) fn mean_weights(&mut self) -> Result<()> {
        let be = self.backend;
        match self.ranks {
            None => be.row_mean(&self.u, self.members, self.params, &mut self.weights),
            Some(r) => crate::enkf::dist::sharded_mean(
                be,
                r.comm,
                r.shard,
                &self.u,
                self.params,
                &mut self.weights,
            ),
        }
    }

    /// The metrics row of the current state: mini-batch scores of the mean network on
    /// the batch in `slot`, and test scores when `evaluate` is set.
    pub(super) fn make_row(
        &mut self,
        slot: usize,
        evaluate: bool,
        start: (Instant, f64),
    ) -> Result<MetricsRow> {
        let (labels, targets) = self
            .loaded
            .as_ref()
            .map(|l| (l.labels.clone(), l.targets.clone()))
            .unwrap_or_default();
        let (train_loss, train_accuracy) = self.score_batch(slot, &labels, &targets)?;
        let batches = self.batches_per_epoch() as f64;
        // Position just after the last update (the current batch may already be the next).
        let done_batches = self.batch_global as f64 + self.rep as f64 / self.repetitions as f64;
        let mut row = MetricsRow::training(
            self.t,
            done_batches / batches,
            self.members(),
            self.repetitions,
            train_loss,
            train_accuracy,
        );
        if evaluate {
            let t0 = Instant::now();
            // score_batch above left the mean in `self.weights`.
            row.spread = Some(self.spread_about_mean()?);
            let mut modes = self.cfg.eval.clone();
            if self.cfg.adaptation == Adaptation::Adaptive && !modes.contains(&EvalMode::Mean) {
                modes.push(EvalMode::Mean);
            }
            for (i, mode) in modes.into_iter().enumerate() {
                let (err, loss) = self.evaluate(mode)?;
                if i == 0 {
                    row.test_error = Some(err);
                    row.test_loss = Some(loss);
                }
                match mode {
                    EvalMode::Mean => {
                        (row.test_error_mean, row.test_loss_mean) = (Some(err), Some(loss))
                    }
                    EvalMode::Last => {
                        (row.test_error_last, row.test_loss_last) = (Some(err), Some(loss))
                    }
                    EvalMode::Ensemble => {
                        (row.test_error_ensemble, row.test_loss_ensemble) = (Some(err), Some(loss))
                    }
                }
            }
            self.times.eval += t0.elapsed().as_secs_f64();
        }
        row.elapsed_s = start.1 + start.0.elapsed().as_secs_f64();
        Ok(row)
    }

    /// Loss and accuracy of the mean network on the mini-batch in workspace `slot`
    /// (regression: the mean squared error against `targets`, accuracy NaN).
    pub(super) fn score_batch(
        &mut self,
        slot: usize,
        labels: &[u8],
        targets: &[f32],
    ) -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let be = self.backend;
        self.mean_weights()?;
        let s = &mut self.workspaces[slot];
        be.ensemble_forward(&self.net, &self.weights, 1, &s.x, s.batch, &mut s.logits)?;
        let out = be.download_f32(&s.logits)?;
        let scores = match self.task {
            Task::Classify { .. } => {
                let (loss, correct) = metrics::score_logits(&out, labels);
                (loss, correct as f64 / labels.len().max(1) as f64)
            }
            Task::Regress { .. } => (metrics::mean_squared_error(&out, targets), f64::NAN),
        };
        self.times.train_score += t0.elapsed().as_secs_f64();
        Ok(scores)
    }

    /// Test error (%) and cross-entropy of one evaluated network on the whole test set;
    /// for real targets (regression) the test mean squared error twice.
    pub fn evaluate(&mut self, mode: EvalMode) -> Result<(f64, f64)> {
        let be = self.backend;
        let (n, k) = (self.test.len(), self.outputs);
        let out: Vec<f32> = match mode {
            EvalMode::Mean | EvalMode::Last => {
                if mode == EvalMode::Mean {
                    self.mean_weights()?;
                } else {
                    self.last_member_weights()?;
                }
                be.ensemble_forward(
                    &self.net,
                    &self.weights,
                    1,
                    &self.test_x,
                    n,
                    &mut self.test_out,
                )?;
                be.download_f32(&self.test_out)?
            }
            EvalMode::Ensemble => {
                // Chunks of test images so that the J × chunk × k outputs stay ≤ 16 Mi floats.
                let chunk = ((16usize << 20) / (self.members * k)).clamp(1, n);
                let px = self.test.pixels();
                // The averaged prediction: softmax probabilities (classes) or outputs.
                let mut acc = vec![0.0f64; n * k];
                let mut lo = 0;
                while lo < n {
                    let hi = (lo + chunk).min(n);
                    let x = be.upload_f32(&self.test.images[lo * px..hi * px])?;
                    let mut out = be.zeros_f32(self.members * (hi - lo) * k)?;
                    be.ensemble_forward(&self.net, &self.u, self.members, &x, hi - lo, &mut out)?;
                    let g = be.download_f32(&out)?;
                    for j in 0..self.members {
                        for i in lo..hi {
                            let row = &g[(j * (hi - lo) + (i - lo)) * k..][..k];
                            let dst = &mut acc[i * k..(i + 1) * k];
                            match self.task {
                                Task::Classify { .. } => metrics::add_softmax(row, dst),
                                Task::Regress { .. } => dst
                                    .iter_mut()
                                    .zip(row)
                                    .for_each(|(a, &v)| *a += f64::from(v)),
                            }
                        }
                    }
                    lo = hi;
                }
                if let Some(r) = self.ranks {
                    // Every rank's members' predictions.
                    r.comm.allreduce_sum_f64(&mut acc)?;
                }
                let members = self.members() as f64;
                for p in &mut acc {
                    *p /= members;
                }
                if let Task::Classify { .. } = self.task {
                    let (loss, correct) = metrics::score_probabilities(&acc, &self.test.labels);
                    return Ok((100.0 * (1.0 - correct as f64 / n as f64), loss));
                }
                acc.iter().map(|&v| v as f32).collect()
            }
        };
        Ok(match self.task {
            Task::Classify { .. } => {
                let (loss, correct) = metrics::score_logits(&out, &self.test.labels);
                (100.0 * (1.0 - correct as f64 / n as f64), loss)
            }
            Task::Regress { .. } => {
                let mse = metrics::mean_squared_error(&out, &self.test.values);
                (mse, mse)
            }
        })
    }
}
