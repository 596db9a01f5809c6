//! The gradient baselines: ONE network trained by backpropagation with SGD or Adam,
//! written once over the [`Backend`] seam ([`Backend::backprop`],
//! [`Backend::optimizer_step`]) like the EnKF: on the CPU (`crate::cpu::backprop` for
//! the fused presets, `crate::cpu::spec_backprop` for layer-spec networks) or on the GPU
//! (`crate::gpu::backprop`, presets only: the weights, optimizer state, mini-batch and
//! test set live on the device; the paths draw the same initial weights and batches and
//! agree to the twins' tolerances).
//!
//! Same network, data, initialisation and seed as an EnKF run: the initial weights are
//! the first P draws of the run's init stream (`ChaCha8Rng` seeded with `seed`, stream
//! `STREAM_INIT`, N(0, σ²) via [`crate::enkf::init_ensemble`] with one member), i.e.
//! exactly member 0 of the EnKF ensemble of the same seed. Epochs are seeded
//! permutations of the training set from the shuffle stream (`STREAM_SHUFFLE`), cut into
//! ⌈N/B⌉ mini-batches (the last holds N mod B images when B does not divide N): the same
//! batches an EnKF run sees with `--order shuffle` and r = 1.
//!
//! Rows: iteration t ≥ 1 takes one optimizer step on mini-batch t − 1. Its `train_loss`
//! and `train_accuracy` are those of that mini-batch under the weights BEFORE the step
//! (they come from the same forward pass as the gradient, so cost nothing extra); its
//! test columns are of the weights AFTER the step. Row 0 holds the initial weights on
//! mini-batch 0 (so its train columns equal row 1's). The test set is scored at
//! iteration 0, every `eval_every` iterations, at each epoch end and at the last
//! iteration. Statistics (when a [`StatsWriter`] is given) describe row t's forward
//! pass and gradient: activations and gradients of the weights before step t. On the
//! GPU they are computed on the host from the downloaded cache and gradient (only when a
//! [`StatsWriter`] is given).

use super::config::BiasInit;
use super::metrics::{self, MetricsRow};
use super::optim::{GradOptimizer, Optimizer};
use super::stats::{spec_stats, stats_from_cache, StatsWriter, DEFAULT_HIST_EVERY};
use super::{Observer, TrainConfig, STREAM_INIT, STREAM_SHUFFLE};
use crate::backend::{Backend, CacheMode};
use crate::cpu::CpuBackend;
use crate::data::DataSplit;
use crate::data::Task;
use crate::enkf::init_ensemble;
use crate::model::Net;
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Settings of a gradient run. [`GradConfig::from_train`] takes the shared ones from a
/// [`TrainConfig`] (σ, seed, batch, epochs, iterations, eval interval, network).
#[derive(Debug, Clone, PartialEq)]
pub struct GradConfig {
    /// SGD or Adam ([`Optimizer::Enkf`] is rejected).
    pub optimizer: Optimizer,
    /// Learning rate; `None` = the optimizer's default (SGD 0.1, Adam 1e-3).
    pub lr: Option<f64>,
    /// SGD momentum (ignored by Adam); the paper's 0.9 by default.
    pub momentum: f64,
    /// Epochs (ignored when `iterations` is set).
    pub epochs: usize,
    /// Total optimizer steps; overrides `epochs` when set.
    pub iterations: Option<usize>,
    /// Images per mini-batch B.
    pub batch: usize,
    /// Test evaluation interval in iterations (also at each epoch end and the end).
    pub eval_every: usize,
    /// Histogram interval in iterations.
    pub hist_every: usize,
    /// Seed of the init and shuffle streams.
    pub seed: u64,
    /// Standard deviation σ of the N(0, σ²) initial weights.
    pub sigma: f64,
    /// The network.
    pub net: Net,
    /// How the biases start (the weights are drawn either way).
    pub bias_init: BiasInit,
}

impl GradConfig {
    /// The gradient run matching `cfg` (same σ, seed, batch, epochs, iterations,
    /// eval interval, network), with the optimizer-specific settings given here.
    /// `cfg.init_ensemble`, members, γ, r and the update rule do not apply.
    pub fn from_train(
        cfg: &TrainConfig,
        optimizer: Optimizer,
        lr: Option<f64>,
        momentum: f64,
        hist_every: usize,
    ) -> Self {
        GradConfig {
            optimizer,
            lr,
            momentum,
            epochs: cfg.epochs,
            iterations: cfg.iterations,
            batch: cfg.batch,
            eval_every: cfg.eval_every,
            hist_every,
            seed: cfg.seed,
            sigma: cfg.sigma,
            net: cfg.net(),
            bias_init: cfg.bias_init,
        }
    }

    /// Defaults: Adam (lr 1e-3), momentum 0.9, 1 epoch, B = 64, eval every 500,
    /// histograms every 200, seed 0, σ = 1, the paper's network (logistic).
    pub fn new(optimizer: Optimizer) -> Self {
        GradConfig {
            optimizer,
            lr: None,
            momentum: super::optim::Sgd::DEFAULT_MOMENTUM,
            epochs: 1,
            iterations: None,
            batch: 64,
            eval_every: 500,
            hist_every: DEFAULT_HIST_EVERY,
            seed: 0,
            sigma: 1.0,
            net: Net::default(),
            bias_init: BiasInit::Zero,
        }
    }

    /// Steps per epoch, ⌈N / B⌉.
    pub fn iterations_per_epoch(&self, n_train: usize) -> usize {
        n_train.div_ceil(self.batch.max(1))
    }

    /// Total steps of the run for a training set of `n_train` images.
    pub fn total_iterations(&self, n_train: usize) -> usize {
        self.iterations.unwrap_or(
            self.epochs
                .saturating_mul(self.iterations_per_epoch(n_train)),
        )
    }

    /// Checks every value. Errors: [`Error::Config`] naming the setting and its value.
    pub fn validate(&self) -> Result<()> {
        if self.optimizer == Optimizer::Enkf {
            return Err(Error::Config(
                "optimizer 'enkf' is not a gradient method; choose sgd or adam".into(),
            ));
        }
        for (name, v) in [
            ("batch", self.batch),
            ("eval_every", self.eval_every),
            ("hist_every", self.hist_every),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{name} = 0: must be ≥ 1")));
            }
        }
        if !(self.sigma > 0.0 && self.sigma.is_finite()) {
            return Err(Error::Config(format!(
                "sigma = {}: must be finite and > 0",
                self.sigma
            )));
        }
        GradOptimizer::new(self.optimizer, self.lr, self.momentum).map(|_| ())
    }
}

/// A gradient training run on backend `B` (the weights, optimizer state, mini-batch and
/// test set live in `B`'s memory); [`train_gradient`] is the one-call form on the CPU.
pub struct GradientTrainer<'a, B: Backend = CpuBackend> {
    cfg: GradConfig,
    data: &'a DataSplit,
    be: B,
    /// Current weights (P) on the backend.
    weights: B::F32,
    /// Host copy of the weights, refreshed at the end of [`Self::run`].
    host_weights: Vec<f32>,
    /// The last gradient (P).
    grad: B::F32,
    opt: B::Optim,
    /// The current mini-batch (B × inputs; reallocated when B changes).
    x: B::F32,
    /// The whole test set (N_test × inputs) and its outputs (N_test × classes).
    test_x: B::F32,
    test_out: B::F32,
    order: Vec<usize>,
    shuffle_rng: ChaCha8Rng,
    /// Seconds spent in backpropagation, optimizer steps and test evaluation.
    pub times: GradTimes,
}

/// Seconds spent per phase of a gradient run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GradTimes {
    /// Forward and backward passes.
    pub backprop: f64,
    /// Optimizer steps.
    pub step: f64,
    /// Statistics (computing and writing).
    pub stats: f64,
    /// Test-set evaluations.
    pub eval: f64,
}

/// One mini-batch: images, and the labels (classification) or real targets (regression).
struct Batch<'b> {
    x: &'b [f32],
    labels: &'b [u8],
    targets: &'b [f32],
    images: usize,
}

impl<'a> GradientTrainer<'a, CpuBackend> {
    /// Validates `cfg` and the data, and draws the initial weights (see the module docs);
    /// runs on the CPU.
    /// Errors: [`Error::Config`] for a bad setting, [`Error::Shape`] when the images do
    /// not fit the network or a split is empty.
    pub fn new(cfg: &GradConfig, data: &'a DataSplit) -> Result<Self> {
        Self::on(CpuBackend::new(), cfg, data)
    }
}

impl<'a, B: Backend> GradientTrainer<'a, B> {
    /// As [`GradientTrainer::new`], computing on `be` (the same initial weights and
    /// batches on any backend). The weights, the optimizer state and the test set are
    /// uploaded here.
    /// Errors: those of [`GradientTrainer::new`], and the backend's when an upload fails.
    pub fn on(be: B, cfg: &GradConfig, data: &'a DataSplit) -> Result<Self> {
        cfg.validate()?;
        super::check_splits(data, &cfg.net)?;
        if let (crate::data::Task::Regress { .. }, None) = (data.task, cfg.net.spec()) {
            return Err(Error::Config(format!(
                "--optimizer {} with real targets ({}) needs a layer-spec network (--net)",
                format!("{:?}", cfg.optimizer).to_lowercase(),
                data.task.describe()
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(STREAM_INIT);
        let p = cfg.net.n_params();
        let mut host_weights = init_ensemble(&mut rng, 1, p, cfg.sigma);
        if cfg.bias_init == BiasInit::Zero {
            cfg.net.zero_biases(&mut host_weights);
        }
        let mut shuffle_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        shuffle_rng.set_stream(STREAM_SHUFFLE);
        let opt = be.optimizer(&GradOptimizer::new(cfg.optimizer, cfg.lr, cfg.momentum)?)?;
        let test = &data.test;
        Ok(GradientTrainer {
            cfg: cfg.clone(),
            data,
            weights: be.upload_f32(&host_weights)?,
            grad: be.zeros_f32(p)?,
            opt,
            x: be.zeros_f32(1)?,
            test_x: be.upload_f32(&test.images)?,
            test_out: be.zeros_f32(test.len() * cfg.net.outputs())?,
            host_weights,
            be,
            order: (0..data.train.len()).collect(),
            shuffle_rng,
            times: GradTimes::default(),
        })
    }

    /// The current weights (P, `state_dict` order): as of the end of the last
    /// [`Self::run`] (or the initial weights before it).
    pub fn weights(&self) -> &[f32] {
        &self.host_weights
    }

    /// The backend in words ("cpu (2 threads, avx2 forward)", the CUDA device).
    pub fn device_name(&self) -> String {
        self.be.name()
    }

    /// Total iterations of this run.
    pub fn total_iterations(&self) -> usize {
        self.cfg.total_iterations(self.data.train.len())
    }

    /// Test error (%) and mean cross-entropy of the current weights on the whole test
    /// set. Errors: [`Error::Shape`] from the forward pass, the backend's errors.
    pub fn evaluate(&mut self) -> Result<(f64, f64)> {
        let test = &self.data.test;
        if test.is_empty() {
            return Ok((f64::NAN, f64::NAN));
        }
        self.be.ensemble_forward(
            &self.cfg.net,
            &self.weights,
            1,
            &self.test_x,
            test.len(),
            &mut self.test_out,
        )?;
        let out = self.be.download_f32(&self.test_out)?;
        if let Task::Regress { .. } = self.data.task {
            let mse = metrics::mean_squared_error(&out, &test.values);
            return Ok((mse, mse));
        }
        let (loss, correct) = metrics::score_logits(&out, &test.labels);
        Ok((100.0 * (1.0 - correct as f64 / test.len() as f64), loss))
    }

    /// Runs every iteration, reporting each row to `observer` and, when given, writing
    /// the statistics of every iteration (histograms when `stats.wants_histograms`).
    /// Errors: [`Error::Config`] when statistics are asked of a layer-spec network.
    pub fn run(
        &mut self,
        observer: &mut dyn Observer,
        mut stats: Option<&mut StatsWriter>,
    ) -> Result<Vec<MetricsRow>> {
        let n = self.data.train.len();
        let total = self.total_iterations();
        let per_epoch = self.cfg.iterations_per_epoch(n);
        let start = Instant::now();
        let mut rows = Vec::with_capacity(total + 1);
        let mut x = Vec::new();
        for t in 0..=total {
            let step = t.saturating_sub(1);
            let bi = step % per_epoch;
            // A new permutation at each epoch's first mini-batch (row 1 reuses row 0's).
            if bi == 0 && (t == 0 || step > 0) {
                self.order = (0..n).collect();
                self.order.shuffle(&mut self.shuffle_rng);
            }
            let lo = bi * self.cfg.batch;
            let hi = (lo + self.cfg.batch).min(n);
            let labels = self.data.train.gather(&self.order[lo..hi], &mut x);
            let targets = match self.data.task {
                Task::Classify { .. } => Vec::new(),
                Task::Regress { .. } => {
                    self.data.train.targets(&self.order[lo..hi], self.data.task)
                }
            };
            let batch = Batch {
                x: &x,
                labels: &labels,
                targets: &targets,
                images: hi - lo,
            };
            let (loss, correct) = self.iteration(batch, t, stats.as_deref_mut())?;
            let accuracy = match self.data.task {
                Task::Classify { .. } => correct as f64 / (hi - lo) as f64,
                Task::Regress { .. } => f64::NAN,
            };
            let mut row =
                MetricsRow::training(t, t as f64 / per_epoch as f64, 1, 1, loss, accuracy);
            if t.is_multiple_of(self.cfg.eval_every) || t.is_multiple_of(per_epoch) || t == total {
                let t0 = Instant::now();
                let (err, loss) = self.evaluate()?;
                row.test_error = Some(err);
                row.test_loss = Some(loss);
                self.times.eval += t0.elapsed().as_secs_f64();
            }
            row.elapsed_s = start.elapsed().as_secs_f64();
            observer.on_row(&row, total)?;
            rows.push(row);
        }
        if let Some(w) = stats {
            w.flush()?;
        }
        self.host_weights = self.be.download_f32(&self.weights)?;
        Ok(rows)
    }

    /// Row t: backpropagation on the mini-batch `(x, labels)`, the statistics when
    /// asked (computed on the host), and (t > 0) one optimizer step. Returns the batch's
    /// loss and correct count. Each phase waits for the backend, so the times are its
    /// own.
    fn iteration(
        &mut self,
        batch: Batch<'_>,
        t: usize,
        stats: Option<&mut StatsWriter>,
    ) -> Result<(f64, usize)> {
        let x = batch.x;
        let be = &self.be;
        let t0 = Instant::now();
        if be.len_f32(&self.x) == x.len() {
            be.write_f32(x, &mut self.x)?;
        } else {
            self.x = be.upload_f32(x)?;
        }
        let keep = match stats {
            Some(_) => CacheMode::Keep,
            None => CacheMode::Drop,
        };
        let net = &self.cfg.net;
        let bp = match self.data.task {
            Task::Classify { .. } => be.backprop(
                net,
                &self.weights,
                &self.x,
                batch.labels,
                &mut self.grad,
                keep,
            )?,
            Task::Regress { .. } => {
                be.backprop_mse(net, &self.weights, &self.x, batch.targets, &mut self.grad)?
            }
        };
        be.synchronize()?;
        self.times.backprop += t0.elapsed().as_secs_f64();
        if let Some(w) = stats {
            let t0 = Instant::now();
            let grad = be.download_f32(&self.grad)?;
            let hist = w.wants_histograms(t);
            let s = match &bp.cache {
                Some(cache) => stats_from_cache(net, cache, Some(&grad), hist)?,
                // Layer-spec networks: one more forward pass of the weights, on the host.
                None => {
                    let weights = be.download_f32(&self.weights)?;
                    spec_stats(net, &weights, x, batch.images, Some(&grad), hist)?
                }
            };
            w.write(t, &s)?;
            self.times.stats += t0.elapsed().as_secs_f64();
        }
        if t > 0 {
            let t0 = Instant::now();
            be.optimizer_step(&mut self.opt, &mut self.weights, &self.grad)?;
            be.synchronize()?;
            self.times.step += t0.elapsed().as_secs_f64();
        }
        Ok((bp.loss, bp.correct))
    }
}

/// Trains one network by backpropagation (see the module docs) and returns one metrics
/// row per iteration (iteration 0 included; `members` and `repetitions` are 1).
/// Errors: [`Error::Config`] for a bad setting, [`Error::Shape`] for unsuitable data,
/// and whatever the observer or the statistics writer return.
pub fn train_gradient(
    cfg: &GradConfig,
    data: &DataSplit,
    observer: &mut dyn Observer,
    stats: Option<&mut StatsWriter>,
) -> Result<Vec<MetricsRow>> {
    GradientTrainer::new(cfg, data)?.run(observer, stats)
}
