//! The EnKF training loop, written once over [`Backend`].
//!
//! Each mini-batch of the current epoch's order is shown for r consecutive iterations
//! (r may change under Algorithm 1, see [`adaptive`]), and the targets always
//! belong to the images the outputs were computed on (the authors' driver paired the
//! previous batch's outputs with the new batch's labels once every r iterations; we do
//! not). The last mini-batch of an epoch holds N mod B images when B does not divide N.
//! After every update the mean network is scored on that mini-batch; at iteration 0,
//! every `eval_every` iterations and at the end, the `eval` networks are scored on the
//! whole test set.

pub mod adaptive;
pub mod checkpoint;
pub mod config;
pub mod gradient;
mod members;
pub mod methods;
pub mod metrics;
pub mod optim;
mod partial;
pub mod ranks;
pub mod resume;
mod scoring;
pub mod stats;
mod validate;

use crate::backend::Backend;
use crate::data::Task;
use crate::data::{DataSplit, Dataset};
use crate::enkf::dist::ShardedWorkspace;
use crate::enkf::{init_ensemble, resize, EnkfWorkspace};
use crate::model::Net;
use crate::{Error, Result};
use adaptive::AdaptiveLogRow;
use checkpoint::{CheckpointState, RngState};
pub use config::{
    Accelerator, AdaptRule, Adaptation, BatchOrder, BiasInit, EvalMode, FailurePolicy,
    InflationSchedule, LabelPairing, NoiseScale, Observations, PartialConfig, StepControl,
    TrainConfig,
};
pub use metrics::MetricsRow;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set (by a Ctrl-C handler) to ask a running [`Trainer`] to checkpoint and stop after
/// the current iteration.
pub static INTERRUPT: AtomicBool = AtomicBool::new(false);

/// Random stream ids derived from the one seed (ChaCha streams of the same key).
const STREAM_INIT: u64 = 0;
const STREAM_SHUFFLE: u64 = 1;
const STREAM_ADAPT: u64 = 2;
const STREAM_RESAMPLE: u64 = 3;
/// Perturbed observations: update t reads this stream from word t · 2^40 on, so the
/// draws are a function of (seed, t) and need no state in the checkpoint.
const STREAM_PERTURB: u64 = 4;

/// Additive inflation: the Philox key is the seed with this stream id in its low word,
/// the counter's third word the iteration (see `add_normal_f32` in `kernels/reduce.cu`).
const STREAM_ADDITIVE: u32 = 5;

/// The Philox key of additive inflation for `seed`.
pub fn additive_key(seed: u64) -> [u32; 2] {
    [
        (seed as u32) ^ STREAM_ADDITIVE.rotate_left(28),
        (seed >> 32) as u32,
    ]
}

/// The algorithm time at which the data-misfit controller ends a mini-batch's inversion
/// (EnsembleKalmanProcesses' `terminate_at`, the posterior in the linear-Gaussian case).
const DMC_END: f64 = 1.0;

/// The observation perturbations of update `t` (0-based): `n` draws of N(0, γ), a pure
/// function of (`seed`, `t`) (see [`STREAM_PERTURB`]).
pub fn perturbations(seed: u64, t: usize, n: usize, gamma: f64) -> Vec<f64> {
    use rand_distr::{Distribution, StandardNormal};
    let mut r = rng(seed, STREAM_PERTURB);
    r.set_word_pos((t as u128) << 40);
    let sd = gamma.sqrt();
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut r);
            sd * z
        })
        .collect()
}

/// Seconds spent in each phase, with the device synchronised at phase boundaries.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PhaseTimes {
    /// Failure checks, resizing, checkpoints.
    pub other: f64,
    /// Ensemble forward passes.
    pub forward: f64,
    /// EnKF updates.
    pub update: f64,
    /// Mini-batch scoring of the mean network.
    pub train_score: f64,
    /// Test-set evaluations.
    pub eval: f64,
}

/// Receives each metrics row as it is produced (progress bars, CSV writers).
pub trait Observer {
    /// Called once per iteration (and once for iteration 0), in order. `total` is the
    /// current projection of the run's last iteration (it moves when r adapts).
    fn on_row(&mut self, row: &MetricsRow, total: usize) -> Result<()>;
    /// Called for each Algorithm 1 decision that changed J or r.
    fn on_adapt(&mut self, _row: &AdaptiveLogRow) -> Result<()> {
        Ok(())
    }
    /// Called when members were resampled after non-finite outputs.
    fn on_resample(&mut self, _iteration: usize, _count: usize) -> Result<()> {
        Ok(())
    }
}

impl Observer for () {
    fn on_row(&mut self, _: &MetricsRow, _: usize) -> Result<()> {
        Ok(())
    }
}

/// The update's buffers of one mini-batch size: this process's whole ensemble, or this
/// rank's shard of one sharded over ranks.
enum SlotWorkspace<B: Backend> {
    One(EnkfWorkspace<B>),
    Ranks(ShardedWorkspace<B>),
}

/// Device buffers for mini-batches of one size.
struct BatchSlot<B: Backend> {
    /// Images in the mini-batch.
    batch: usize,
    ws: SlotWorkspace<B>,
    /// Outputs G, members × batch × 10.
    g: B::F32,
    /// Images, batch × 784.
    x: B::F32,
    /// One-hot targets, batch × 10.
    y: B::F32,
    /// Logits of the mean network on the mini-batch, batch × 10.
    logits: B::F32,
    /// Row sums of G (members), to find members with non-finite outputs.
    row_sums: B::F32,
    /// Ones (batch × 10), the right operand of those row sums.
    ones: B::F32,
}

/// The uploaded mini-batch: its global index, workspace slot, labels and host images.
struct LoadedBatch {
    global: usize,
    slot: usize,
    labels: Vec<u8>,
    /// The targets as uploaded: one-hot rows, or the real targets (batch × outputs).
    targets: Vec<f32>,
    x: Vec<f32>,
}

/// An EnKF training run on one backend.
///
/// The position in the schedule is (`batch_global`, `rep`): the index of the current
/// mini-batch counted over all epochs and the repetitions already done on it. The run
/// ends after `iterations` updates when that is set, else after `epochs · ⌈N/B⌉`
/// mini-batches.
pub struct Trainer<'a, B: Backend> {
    backend: &'a B,
    cfg: TrainConfig,
    net: Net,
    train: &'a Dataset,
    test: &'a Dataset,
    /// Classes or real targets of the data.
    task: Task,
    /// Values the network gives per image (`task.outputs()`).
    outputs: usize,
    members: usize,
    repetitions: usize,
    params: usize,
    /// Ensemble U, members × params.
    u: B::F32,
    /// Buffers per mini-batch size (the full batch and the epoch's tail).
    workspaces: Vec<BatchSlot<B>>,
    /// Mean (or selected) weights, params.
    weights: B::F32,
    test_x: B::F32,
    test_out: B::F32,
    t: usize,
    batch_global: usize,
    rep: usize,
    /// `--pairing authors`: the previous mini-batch's images (device) and their count.
    prev_x: Option<(B::F32, usize)>,
    order: Vec<usize>,
    /// The mini-batch whose images are in the slots.
    loaded: Option<LoadedBatch>,
    /// Writes activation statistics of the mean network, when set.
    stats: Option<stats::StatsSink>,
    shuffle_rng: ChaCha8Rng,
    adapt_rng: ChaCha8Rng,
    resample_rng: ChaCha8Rng,
    adapt_prev: Option<f64>,
    rows: Vec<MetricsRow>,
    adaptive_log: Vec<AdaptiveLogRow>,
    resampled: usize,
    /// `step = dmc`: the algorithm time reached on the current mini-batch.
    algorithm_time: f64,
    /// The step Δt of the last iteration (0: it did not update).
    last_dt: f64,
    /// `accelerator = nesterov`: the members before the last momentum step and θ.
    momentum: Option<Momentum<B>>,
    /// Additive inflation's per-weight scale (σ, or the spread computed each update).
    noise_scale: Option<B::F32>,
    /// A run sharded over ranks: the communicator and this rank's members (`members`
    /// is then the shard's count, `u` its rows).
    ranks: Option<ranks::Ranks<'a>>,
    /// Seconds per phase so far.
    pub times: PhaseTimes,
}

/// The state of Nesterov momentum: the un-accelerated ensemble of the last update and
/// the schedule's θ (see [`methods::nesterov_next`]).
struct Momentum<B: Backend> {
    prev: B::F32,
    theta: f64,
}

fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Prepares a run: validates the data against the network, draws (or loads) the
    /// initial ensemble and uploads the test set.
    pub fn new(backend: &'a B, cfg: &TrainConfig, data: &'a DataSplit) -> Result<Self> {
        cfg.validate()?;
        let params = cfg.net().n_params();
        let host_u = match &cfg.init_ensemble {
            Some(path) => load_ensemble(path, cfg.members, params)?,
            None => {
                let mut u = init_ensemble(
                    &mut rng(cfg.seed, STREAM_INIT),
                    cfg.members,
                    params,
                    cfg.sigma,
                );
                if cfg.bias_init == BiasInit::Zero {
                    cfg.net().zero_biases(&mut u);
                }
                u
            }
        };
        let mut t = Self::build(backend, cfg, data, &host_u, cfg.members)?;
        t.order = (0..data.train.len()).collect();
        if cfg.order == BatchOrder::Shuffle {
            t.order.shuffle(&mut t.shuffle_rng);
        }
        Ok(t)
    }

    /// Continues the run saved in `path` (see [`checkpoint`]). `cfg` is the configuration
    /// to continue with; it must describe the same run (network, update rule, seed, data
    /// limits, initial J); the length of the run, evaluation and output settings may differ.
    /// The metrics rows and Algorithm 1 decisions are those stored in the checkpoint (up
    /// to its iteration c); the appended outputs in `cfg.out` (stats.csv, hist.csv) are
    /// cut back to iteration c, dropping the rows a run killed after the checkpoint wrote
    /// (see [`checkpoint::rewind_outputs`]).
    ///
    /// Errors: [`Error::Checkpoint`] for a corrupt or foreign checkpoint, [`Error::Io`]
    /// for output files that cannot be cut back.
    pub fn resume(
        backend: &'a B,
        cfg: &TrainConfig,
        data: &'a DataSplit,
        path: &Path,
    ) -> Result<Self> {
        cfg.validate()?;
        let (state, host_u) = checkpoint::read(path)?;
        resume::check_resume_config(&state.config, cfg).map_err(|e| Error::Checkpoint {
            path: path.into(),
            msg: e.to_string(),
        })?;
        if state.params != cfg.net().n_params() {
            return Err(Error::Checkpoint {
                path: path.into(),
                msg: format!(
                    "it holds networks of P = {} weights, this run's {:?} network has {}",
                    state.params,
                    cfg.arch,
                    cfg.net().n_params()
                ),
            });
        }
        if state.order.len() != data.train.len() {
            return Err(Error::Checkpoint {
                path: path.into(),
                msg: format!(
                    "it was trained on {} images, this data has {}",
                    state.order.len(),
                    data.train.len()
                ),
            });
        }
        if let Some(shards) = &state.shards {
            return Err(Error::Checkpoint {
                path: path.into(),
                msg: format!(
                    "it is the manifest of a run sharded over {} ranks: resume it with \
                     mpirun -np {} (a build with --features mpi)",
                    shards.len(),
                    shards.len()
                ),
            });
        }
        let n = state.members * state.params;
        let t = Self::build(backend, cfg, data, &host_u[..n], state.members)?;
        t.restore(cfg, path, state, &host_u[n..])
    }

    /// The rest of a resume once the ensemble rows are in `self.u`: the position, the
    /// random streams, the rows and the momentum (`momentum_rows`: its previous
    /// ensemble, the rows after the ensemble's in the checkpoint), then the output files
    /// cut back to the checkpoint.
    fn restore(
        self,
        cfg: &TrainConfig,
        path: &Path,
        state: CheckpointState,
        momentum_rows: &[f32],
    ) -> Result<Self> {
        let backend = self.backend;
        let mut t = self;
        t.repetitions = state.repetitions;
        t.t = state.t;
        t.batch_global = state.batch_global;
        t.rep = state.rep;
        t.order = state.order;
        t.shuffle_rng = state.shuffle_rng.restore(cfg.seed, path)?;
        t.adapt_rng = state.adapt_rng.restore(cfg.seed, path)?;
        t.resample_rng = state.resample_rng.restore(cfg.seed, path)?;
        t.adapt_prev = state.adapt_prev;
        t.rows = state.rows;
        t.adaptive_log = state.adaptive_log;
        t.resampled = state.resampled;
        t.algorithm_time = state.algorithm_time;
        match (&mut t.momentum, state.nesterov_theta) {
            (Some(m), Some(theta)) => {
                backend.write_f32(momentum_rows, &mut m.prev)?;
                m.theta = theta;
            }
            (None, None) => {}
            _ => {
                return Err(Error::Checkpoint {
                    path: path.into(),
                    msg: "its momentum state does not match accelerator".into(),
                })
            }
        }
        if t.remaining_iterations() == 0 {
            return Err(Error::Config(format!(
                "nothing to resume from {}: the run is at iteration {} and this configuration \
                 (iterations {}, epochs {}) ends there or before: pass --iterations N with \
                 N > {} (or more --epochs) to continue it",
                path.display(),
                t.t,
                cfg.iterations
                    .map_or_else(|| "not set".to_string(), |n| n.to_string()),
                cfg.epochs,
                t.t
            )));
        }
        // Only now, with every check passed, are the output files touched (by rank 0 of
        // a sharded run).
        let writes_outputs = t.ranks.is_none_or(|r| r.comm.rank() == 0);
        if let (Some(dir), true) = (&cfg.out, writes_outputs) {
            checkpoint::rewind_outputs(dir, t.t)?;
        }
        Ok(t)
    }

    fn build(
        backend: &'a B,
        cfg: &TrainConfig,
        data: &'a DataSplit,
        host_u: &[f32],
        members: usize,
    ) -> Result<Self> {
        let net = cfg.net();
        check_splits(data, &net)?;
        let params = net.n_params();
        let outputs = net.outputs();
        Ok(Trainer {
            backend,
            cfg: cfg.clone(),
            net,
            train: &data.train,
            test: &data.test,
            task: data.task,
            outputs,
            test_out: backend.zeros_f32(data.test.len() * outputs)?,
            members,
            repetitions: cfg.repetitions,
            params,
            u: backend.upload_f32(host_u)?,
            workspaces: Vec::new(),
            weights: backend.zeros_f32(params)?,
            test_x: backend.upload_f32(&data.test.images)?,
            t: 0,
            batch_global: 0,
            rep: 0,
            prev_x: None,
            order: Vec::new(),
            loaded: None,
            stats: None,
            shuffle_rng: rng(cfg.seed, STREAM_SHUFFLE),
            adapt_rng: rng(cfg.seed, STREAM_ADAPT),
            resample_rng: rng(cfg.seed, STREAM_RESAMPLE),
            adapt_prev: None,
            rows: Vec::new(),
            adaptive_log: Vec::new(),
            resampled: 0,
            algorithm_time: 0.0,
            last_dt: 0.0,
            noise_scale: match (cfg.additive_inflation > 0.0, cfg.additive_from) {
                (false, _) => None,
                (true, NoiseScale::Prior) => {
                    Some(backend.upload_f32(&vec![cfg.sigma as f32; params])?)
                }
                (true, NoiseScale::Spread) => Some(backend.zeros_f32(params)?),
            },
            momentum: match cfg.accelerator {
                Accelerator::None => None,
                Accelerator::Nesterov => Some(Momentum {
                    prev: backend.upload_f32(host_u)?,
                    theta: 1.0,
                }),
            },
            ranks: None,
            times: PhaseTimes::default(),
        })
    }

    fn batches_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch)
    }

    /// Iterations left from the current position with the current r.
    pub fn remaining_iterations(&self) -> usize {
        match self.cfg.iterations {
            Some(cap) => cap.saturating_sub(self.t),
            None => {
                let total = self.cfg.epochs.saturating_mul(self.batches_per_epoch());
                (total.saturating_sub(self.batch_global))
                    .saturating_mul(self.repetitions)
                    .saturating_sub(self.rep)
            }
        }
    }

    /// Projected total iterations of this run (exact unless r adapts later).
    pub fn total_iterations(&self) -> usize {
        self.t + self.remaining_iterations()
    }

    /// Updates done so far.
    pub fn iteration(&self) -> usize {
        self.t
    }

    /// Current ensemble size (of the whole ensemble when it is sharded over ranks).
    pub fn members(&self) -> usize {
        self.ranks.map_or(self.members, |r| r.shard.members)
    }

    /// The ensemble, members × params, copied to the host.
    ///
    /// Errors: [`Error::Config`] for a run sharded over ranks (each holds only its rows).
    pub fn ensemble_host(&self) -> Result<Vec<f32>> {
        if let Some(r) = self.ranks {
            return Err(Error::Config(format!(
                "the ensemble is sharded over {} ranks; no rank holds it whole",
                r.comm.size()
            )));
        }
        self.backend.download_f32(&self.u)
    }

    /// Writes the ensemble (J × P, float32 `.npy`) to `path`, atomically: in one process
    /// from the host copy; on ranks every rank writes its rows into one file
    /// ([`ranks::save_sharded_ensemble`], a collective: every rank calls it).
    ///
    /// Errors: I/O naming the file; the backend's.
    pub fn save_ensemble(&self, path: &std::path::Path) -> Result<()> {
        let u = self.backend.download_f32(&self.u)?;
        match self.ranks {
            None => crate::io::npy::write_f32(path, &[self.members, self.params], &u),
            Some(r) => ranks::save_sharded_ensemble(r.comm, r.shard, &u, self.params, path),
        }
    }

    /// The ensemble-mean weights, copied to the host (sharded: a collective, every rank
    /// calls it).
    pub fn mean_host(&mut self) -> Result<Vec<f32>> {
        self.mean_weights()?;
        self.backend.download_f32(&self.weights)
    }

    /// Sends the activation statistics of the mean network to `sink` every
    /// `stats_every` iterations (computed off the training thread).
    pub fn set_stats(&mut self, sink: stats::StatsSink) {
        self.stats = Some(sink);
    }

    /// Takes the statistics sink back (to [`stats::StatsSink::finish`] it).
    pub fn take_stats(&mut self) -> Option<stats::StatsSink> {
        self.stats.take()
    }

    /// Queues the statistics of iteration `t` when due. Uses the mean weights left in
    /// `self.weights` by the mini-batch scoring of the same iteration.
    fn send_stats(&mut self) -> Result<()> {
        let (Some(sink), Some(batch)) = (&self.stats, &self.loaded) else {
            return Ok(());
        };
        if !self.t.is_multiple_of(self.cfg.stats_every) {
            return Ok(());
        }
        let t0 = Instant::now();
        let w = self.backend.download_f32(&self.weights)?;
        sink.send(
            self.t,
            w,
            batch.x.clone(),
            batch.x.len() / self.train.pixels(),
        )?;
        self.times.other += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Metrics rows so far (including those of a resumed run's first part).
    pub fn rows(&self) -> &[MetricsRow] {
        &self.rows
    }

    /// Algorithm 1 decisions so far.
    pub fn adaptive_log(&self) -> &[AdaptiveLogRow] {
        &self.adaptive_log
    }

    /// Index into `workspaces` for a mini-batch of `b` images (allocated on first use).
    fn workspace_for(&mut self, b: usize) -> Result<usize> {
        if let Some(i) = self.workspaces.iter().position(|w| w.batch == b) {
            return Ok(i);
        }
        let be = self.backend;
        let k = self.outputs;
        let ws = if let Some(r) = self.ranks {
            SlotWorkspace::Ranks(ShardedWorkspace::new(be, r.shard, self.params, b, k)?)
        } else if self.cfg.tikhonov > 0.0 {
            let tau = self.cfg.sigma * self.cfg.sigma / self.cfg.tikhonov;
            SlotWorkspace::One(EnkfWorkspace::with_tikhonov(
                be,
                self.members,
                self.params,
                b,
                k,
                tau,
            )?)
        } else {
            SlotWorkspace::One(EnkfWorkspace::with_outputs_and_order(
                be,
                self.members,
                self.params,
                b,
                k,
                self.cfg.apply_order,
            )?)
        };
        let g = be.zeros_f32(self.members * b * k)?;
        let x = be.zeros_f32(b * self.train.pixels())?;
        let y = be.zeros_f32(b * k)?;
        let logits = be.zeros_f32(b * k)?;
        let row_sums = be.zeros_f32(self.members)?;
        let ones = be.upload_f32(&vec![1.0; b * k])?;
        self.workspaces.push(BatchSlot {
            batch: b,
            ws,
            g,
            x,
            y,
            logits,
            row_sums,
            ones,
        });
        Ok(self.workspaces.len() - 1)
    }

    /// Makes sure the current mini-batch is uploaded; returns its slot.
    fn load_batch(&mut self) -> Result<usize> {
        let batches = self.batches_per_epoch();
        let bi = self.batch_global % batches;
        let lo = bi * self.cfg.batch;
        let hi = (lo + self.cfg.batch).min(self.train.len());
        if let Some(l) = &self.loaded {
            if l.global == self.batch_global
                && self
                    .workspaces
                    .get(l.slot)
                    .is_some_and(|s| s.batch == hi - lo)
            {
                return Ok(l.slot);
            }
        }
        let mut host_x = Vec::new();
        let labels = self.train.gather(&self.order[lo..hi], &mut host_x);
        let targets = self.train.targets(&self.order[lo..hi], self.task);
        let slot = self.workspace_for(hi - lo)?;
        let be = self.backend;
        let s = &mut self.workspaces[slot];
        be.write_f32(&host_x, &mut s.x)?;
        be.write_f32(&targets, &mut s.y)?;
        self.loaded = Some(LoadedBatch {
            global: self.batch_global,
            slot,
            labels,
            targets,
            x: host_x,
        });
        Ok(slot)
    }

    /// Moves the position past one update; draws the next epoch's order when an epoch ends.
    fn advance(&mut self) {
        self.t += 1;
        self.rep += 1;
        if self.rep >= self.repetitions {
            self.next_batch();
        }
    }

    /// Moves to the next mini-batch, drawing a new order at an epoch boundary.
    fn next_batch(&mut self) {
        self.rep = 0;
        self.algorithm_time = 0.0;
        self.batch_global += 1;
        if self.batch_global.is_multiple_of(self.batches_per_epoch())
            && self.cfg.order == BatchOrder::Shuffle
        {
            self.order.shuffle(&mut self.shuffle_rng);
        }
    }

    /// Runs until the end (or an interruption), reporting each metrics row to
    /// `observer`. A fresh run reports iteration 0 first; a resumed run continues after
    /// its last row. Returns every row of the run.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Vec<MetricsRow>> {
        // Elapsed time continues from a resumed run's last row.
        let start = (
            Instant::now(),
            self.rows.last().map_or(0.0, |r| r.elapsed_s),
        );
        if self.rows.is_empty() {
            let slot = self.load_batch()?;
            let row = self.make_row(slot, true, start)?;
            observer.on_row(&row, self.total_iterations())?;
            self.adapt_prev = row.test_error_mean.or(row.test_error);
            self.rows.push(row);
            self.send_stats()?;
        }
        while self.remaining_iterations() > 0 {
            let slot = self.load_batch()?;
            self.step(slot, observer)?;
            self.advance();
            let due_eval =
                self.t.is_multiple_of(self.cfg.eval_every) || self.remaining_iterations() == 0;
            let due_adapt = self.cfg.adaptation == Adaptation::Adaptive
                && self.t.is_multiple_of(self.cfg.adapt_every);
            let mut row = self.make_row(slot, due_eval || due_adapt, start)?;
            row.dt = Some(self.last_dt);
            self.send_stats()?;
            if due_adapt {
                self.adapt(
                    row.test_error_mean.or(row.test_error).unwrap_or(f64::NAN),
                    observer,
                )?;
            }
            observer.on_row(&row, self.total_iterations())?;
            self.rows.push(row);
            // Every N iterations and at the end, so that a finished run can be extended.
            let due_ckpt = self
                .cfg
                .checkpoint_every
                .is_some_and(|n| self.t.is_multiple_of(n) || self.remaining_iterations() == 0);
            let interrupted = self.agree_interrupt(INTERRUPT.load(Ordering::SeqCst))?;
            if (due_ckpt || interrupted) && self.cfg.out.is_some() {
                self.save_checkpoint()?;
            }
            if interrupted && self.remaining_iterations() > 0 {
                let resume = match &self.cfg.out {
                    Some(dir) => format!(
                        "a checkpoint was written; continue with: enkf-dnn train --resume {}",
                        dir.display()
                    ),
                    None => "no --out folder was given, so nothing was saved to resume from".into(),
                };
                let sig =
                    crate::signals::received().unwrap_or(crate::signals::StopSignal::Interrupt);
                return Err(Error::Interrupted {
                    iteration: self.t,
                    signal: sig.name(),
                    exit_code: sig.exit_code(),
                    resume,
                });
            }
        }
        Ok(self.rows.clone())
    }

    /// Writes the full state to `out`/checkpoint.bin, after the statistics queued so far
    /// are written and synced.
    pub fn save_checkpoint(&mut self) -> Result<()> {
        if self.ranks.is_some() {
            return self.save_sharded_checkpoint();
        }
        let Some(dir) = self.cfg.out.clone() else {
            return Err(Error::Config(
                "checkpoints need an output folder (--out)".into(),
            ));
        };
        let t0 = Instant::now();
        // The statistics rows up to this iteration must be on disk before the checkpoint.
        if let Some(sink) = &self.stats {
            sink.sync()?;
        }
        let state = self.checkpoint_state();
        let mut u = self.backend.download_f32(&self.u)?;
        if let Some(m) = &self.momentum {
            u.extend(self.backend.download_f32(&m.prev)?);
        }
        checkpoint::write(&checkpoint::path_in(&dir), &state, &u)?;
        self.times.other += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Everything of the run's state but the ensemble (members: the whole ensemble's).
    fn checkpoint_state(&self) -> CheckpointState {
        CheckpointState {
            config: self.cfg.clone(),
            params: self.params,
            members: self.members(),
            repetitions: self.repetitions,
            t: self.t,
            batch_global: self.batch_global,
            rep: self.rep,
            order: self.order.clone(),
            shuffle_rng: RngState::of(&self.shuffle_rng),
            adapt_rng: RngState::of(&self.adapt_rng),
            resample_rng: RngState::of(&self.resample_rng),
            adapt_prev: self.adapt_prev,
            rows: self.rows.clone(),
            adaptive_log: self.adaptive_log.clone(),
            resampled: self.resampled,
            algorithm_time: self.algorithm_time,
            nesterov_theta: self.momentum.as_ref().map(|m| m.theta),
            shards: None,
        }
    }

    /// Under `--pairing authors`, on the first repetition of every mini-batch after the
    /// first: uploads the previous mini-batch's images into `prev_x` and returns true
    /// (the forward pass then runs on them, paired with the new labels, as the authors'
    /// driver does). False, and nothing staged, otherwise or when the two batches differ
    /// in size (the epoch's tail).
    fn stage_previous_batch(&mut self, slot: usize) -> Result<bool> {
        if self.cfg.pairing != LabelPairing::Authors || self.rep != 0 || self.batch_global == 0 {
            return Ok(false);
        }
        let prev = (self.batch_global - 1) % self.batches_per_epoch();
        let lo = prev * self.cfg.batch;
        let hi = (lo + self.cfg.batch).min(self.train.len());
        let n = self.workspaces[slot].batch;
        if hi - lo != n {
            return Ok(false);
        }
        let mut host = Vec::new();
        self.train.gather(&self.order[lo..hi], &mut host);
        let be = self.backend;
        match &mut self.prev_x {
            Some((buf, m)) if *m == n => be.write_f32(&host, buf)?,
            _ => self.prev_x = Some((be.upload_f32(&host)?, n)),
        }
        Ok(true)
    }

    /// One EnKF iteration on the uploaded mini-batch in workspace `slot`.
    fn step(&mut self, slot: usize, observer: &mut dyn Observer) -> Result<()> {
        let be = self.backend;
        let t0 = Instant::now();
        self.last_dt = 0.0;
        if self.cfg.step == StepControl::Dmc && self.algorithm_time >= DMC_END {
            // The controller reached the end of this mini-batch's inversion.
            return Ok(());
        }
        self.inflate()?;
        let previous = self.stage_previous_batch(slot)?;
        {
            let _r = crate::gpu::timing::range("forward");
            let s = &mut self.workspaces[slot];
            let x = match (&self.prev_x, previous) {
                (Some((p, _)), true) => p,
                _ => &s.x,
            };
            be.ensemble_forward(&self.net, &self.u, self.members, x, s.batch, &mut s.g)?;
        }
        be.synchronize()?;
        let t1 = Instant::now();
        self.times.forward += (t1 - t0).as_secs_f64();
        let cols = self.workspaces[slot].batch * self.outputs;
        let failed = {
            let s = &mut self.workspaces[slot];
            resize::nonfinite_rows(be, &s.g, self.members, cols, &s.ones, &mut s.row_sums)?
        };
        // On ranks: every rank's failures, so that all take the same decision.
        let failed = self.agree_rows(failed)?;
        if !failed.is_empty() {
            if self.cfg.on_failure == FailurePolicy::Error {
                return Err(Error::MembersFailed {
                    iteration: self.t + 1,
                    failed: failed.len(),
                    members: self.members(),
                });
            }
            self.resample(&failed).map_err(|e| match e {
                Error::TooFewToResample {
                    failed, members, ..
                } => Error::TooFewToResample {
                    iteration: Some(self.t + 1),
                    failed,
                    members,
                },
                other => other,
            })?;
            self.resampled += failed.len();
            observer.on_resample(self.t + 1, failed.len())?;
            let s = &mut self.workspaces[slot];
            let x = match (&self.prev_x, previous) {
                (Some((p, _)), true) => p,
                _ => &s.x,
            };
            be.ensemble_forward(&self.net, &self.u, self.members, x, s.batch, &mut s.g)?;
            let still =
                resize::nonfinite_rows(be, &s.g, self.members, cols, &s.ones, &mut s.row_sums)?;
            let still = self.agree_rows(still)?;
            if !still.is_empty() {
                return Err(Error::MembersFailed {
                    iteration: self.t + 1,
                    failed: still.len(),
                    members: self.members(),
                });
            }
            // Fresh members have no history: the momentum restarts from here.
            if let Some(m) = &mut self.momentum {
                be.copy_f32(&self.u, &mut m.prev)?;
                m.theta = 1.0;
            }
        }
        let t2 = Instant::now();
        self.times.other += (t2 - t1).as_secs_f64();
        let _r = crate::gpu::timing::range("update");
        let s = &mut self.workspaces[slot];
        let (rule, gamma) = (self.cfg.update, self.cfg.gamma);
        let dt = match (&mut s.ws, self.ranks) {
            (SlotWorkspace::One(ws), _) => {
                ws.innovate(be, &s.g, &s.y)?;
                let dt = match self.cfg.step {
                    StepControl::Fixed => self.cfg.dt,
                    StepControl::Dmc => {
                        let phi = ws.misfits(be, gamma)?;
                        let m = ws.innovation_len() / self.members;
                        methods::dmc_step(&phi, m, self.algorithm_time, DMC_END)
                    }
                };
                let noise = match self.cfg.observations {
                    Observations::Exact => None,
                    Observations::Perturbed => Some(perturbations(
                        self.cfg.seed,
                        self.t,
                        ws.innovation_len(),
                        gamma / dt,
                    )),
                };
                ws.solve(be, rule, gamma, dt, noise.as_deref())?;
                ws.apply(be, &mut self.u)?;
                dt
            }
            (SlotWorkspace::Ranks(ws), Some(r)) => {
                let m = s.batch * self.outputs;
                let dt = match self.cfg.step {
                    StepControl::Fixed => self.cfg.dt,
                    StepControl::Dmc => {
                        // Every member's misfit (each rank's rows of one J-vector, summed
                        // with zeros: exact), so every rank takes the one-process step.
                        let local = ws.misfits(be, &s.g, &s.y, gamma)?;
                        let mut phi = vec![0.0f64; r.shard.members];
                        phi[r.shard.range()].copy_from_slice(&local);
                        r.comm.allreduce_sum_f64(&mut phi)?;
                        methods::dmc_step(&phi, m, self.algorithm_time, DMC_END)
                    }
                };
                // The perturbations are the one-process run's rows of this rank's
                // members, with variance γ/Δt as there.
                let noise = match self.cfg.observations {
                    Observations::Exact => None,
                    Observations::Perturbed => {
                        let n = r.shard.members * m;
                        let all = perturbations(self.cfg.seed, self.t, n, gamma / dt);
                        Some(all[r.shard.first * m..r.shard.range().end * m].to_vec())
                    }
                };
                let bufs = (&mut self.u, &s.g, &s.y);
                ws.update_perturbed(be, r.comm, rule, gamma / dt, bufs, noise.as_deref())?;
                dt
            }
            (SlotWorkspace::Ranks(_), None) => {
                return Err(Error::Config(
                    "internal: a sharded workspace in a one-process run".into(),
                ))
            }
        };
        // Nesterov momentum acts on each member's own rows (the same on ranks).
        if let Some(m) = &mut self.momentum {
            let (theta, beta) = methods::nesterov_next(m.theta);
            be.nesterov_f32(&mut self.u, &mut m.prev, beta as f32)?;
            m.theta = theta;
        }
        if self.cfg.step == StepControl::Dmc {
            self.algorithm_time = methods::advance_time(self.algorithm_time, dt, DMC_END);
        }
        self.last_dt = dt;
        be.synchronize()?;
        self.times.update += t2.elapsed().as_secs_f64();
        Ok(())
    }
}

/// Checks that both splits of `data` hold at least one sample of the network's input
/// shape (an empty training set has no mini-batch; an empty test set no test error) and
/// that the network gives one output per class or real target.
///
/// Errors: [`Error::Shape`] naming the split and the folder.
pub fn check_splits(data: &DataSplit, net: &Net) -> Result<()> {
    let input = net.input_shape();
    for (name, set) in [("training", &data.train), ("test", &data.test)] {
        if set.input_shape() != input {
            return Err(Error::Shape {
                what: format!("{name} samples in {}", data.dir.display()),
                expected: format!("{input} values per sample (the network's input)"),
                found: set.shape_text(),
            });
        }
        if set.is_empty() {
            return Err(Error::Shape {
                what: format!("{name} set in {}", data.dir.display()),
                expected: "at least one image".into(),
                found: "0 images".into(),
            });
        }
    }
    if net.outputs() != data.task.outputs() {
        return Err(Error::Shape {
            what: format!("network outputs for the data in {}", data.dir.display()),
            expected: format!("{} outputs ({})", data.task.outputs(), data.task.describe()),
            found: format!("{} ({})", net.outputs(), net.describe()),
        });
    }
    Ok(())
}

/// Reads a J × P ensemble from `.npy` (float32 or float64) and checks its shape.
pub fn load_ensemble(path: &Path, members: usize, params: usize) -> Result<Vec<f32>> {
    let arr = crate::io::npy::read(path)?;
    if arr.shape != [members, params] {
        return Err(Error::Shape {
            what: format!("initial ensemble {}", path.display()),
            expected: format!("[{members}, {params}] (members × weights of this network)"),
            found: format!("{:?}", arr.shape),
        });
    }
    Ok(arr.data.iter().map(|&v| v as f32).collect())
}
