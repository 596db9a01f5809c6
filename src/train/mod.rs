//! The EnKF training loop, written once over [`Backend`].
//!
//! Iteration t (counted from 1) uses mini-batch ⌊(t−1)/r⌋ mod ⌈N/B⌉ of the current epoch's
//! order: each mini-batch is shown for r consecutive iterations, and the targets always
//! belong to the images the outputs were computed on (the authors' driver paired the
//! previous batch's outputs with the new batch's labels once every r iterations; we do
//! not). The last mini-batch of an epoch holds N mod B images when B does not divide N.
//! After every update the mean network is scored on that mini-batch; at iteration 0,
//! every `eval_every` iterations and at the end, the `eval` networks are scored on the
//! whole test set.

pub mod config;
pub mod metrics;

use crate::backend::{Backend, Trans};
use crate::data::{DataSplit, Dataset};
use crate::enkf::{init_ensemble, one_hot, EnkfWorkspace};
use crate::model::{Net, CLASSES, IMG, IMG_PIXELS};
use crate::{Error, Result};
pub use config::{BatchOrder, EvalMode, PartialConfig, TrainConfig};
pub use metrics::MetricsRow;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Random stream ids derived from the one seed (ChaCha streams of the same key).
const STREAM_INIT: u64 = 0;
const STREAM_SHUFFLE: u64 = 1;

/// Seconds spent in each phase, with the device synchronised at phase boundaries.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PhaseTimes {
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
    /// Called once per iteration (and once for iteration 0), in order.
    fn on_row(&mut self, row: &MetricsRow, total_iterations: usize) -> Result<()>;
}

impl Observer for () {
    fn on_row(&mut self, _: &MetricsRow, _: usize) -> Result<()> {
        Ok(())
    }
}

/// An EnKF training run on one backend.
pub struct Trainer<'a, B: Backend> {
    backend: &'a B,
    cfg: TrainConfig,
    net: Net,
    train: &'a Dataset,
    test: &'a Dataset,
    members: usize,
    params: usize,
    /// Ensemble U, members × params.
    u: B::F32,
    /// Outputs G of the current mini-batch, members × batch × 10 (full-batch capacity).
    workspaces: Vec<(usize, EnkfWorkspace<B>, B::F32, B::F32, B::F32)>,
    /// Mean (or selected) weights, params.
    weights: B::F32,
    test_x: B::F32,
    test_out: B::F32,
    order: Vec<usize>,
    shuffle_rng: ChaCha8Rng,
    /// Seconds per phase so far.
    pub times: PhaseTimes,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Prepares a run: validates the data against the network, draws (or loads) the
    /// initial ensemble and uploads the test set.
    pub fn new(backend: &'a B, cfg: &TrainConfig, data: &'a DataSplit) -> Result<Self> {
        cfg.validate()?;
        for (name, set) in [("training", &data.train), ("test", &data.test)] {
            if set.rows != IMG || set.cols != IMG {
                return Err(Error::Shape {
                    what: format!("{name} images in {}", data.dir.display()),
                    expected: format!("{IMG}×{IMG} pixels (the network's input)"),
                    found: format!("{}×{}", set.rows, set.cols),
                });
            }
        }
        let net = cfg.net();
        let params = net.n_params();
        let members = cfg.members;
        let host_u = match &cfg.init_ensemble {
            Some(path) => load_ensemble(path, members, params)?,
            None => {
                let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
                rng.set_stream(STREAM_INIT);
                init_ensemble(&mut rng, members, params, cfg.sigma)
            }
        };
        let u = backend.upload_f32(&host_u)?;
        drop(host_u);
        let train = &data.train;
        let test = &data.test;
        let test_x = backend.upload_f32(&test.images)?;
        let test_out = backend.zeros_f32(test.len() * CLASSES)?;
        let weights = backend.zeros_f32(params)?;
        let mut shuffle_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        shuffle_rng.set_stream(STREAM_SHUFFLE);
        Ok(Trainer {
            backend,
            cfg: cfg.clone(),
            net,
            train,
            test,
            members,
            params,
            u,
            workspaces: Vec::new(),
            weights,
            test_x,
            test_out,
            order: (0..train.len()).collect(),
            shuffle_rng,
            times: PhaseTimes::default(),
        })
    }

    /// Total iterations of this run.
    pub fn total_iterations(&self) -> usize {
        self.cfg.total_iterations(self.train.len())
    }

    /// The ensemble, members × params, copied to the host.
    pub fn ensemble_host(&self) -> Result<Vec<f32>> {
        self.backend.download_f32(&self.u)
    }

    /// The ensemble-mean weights, copied to the host.
    pub fn mean_host(&mut self) -> Result<Vec<f32>> {
        self.backend
            .row_mean(&self.u, self.members, self.params, &mut self.weights)?;
        self.backend.download_f32(&self.weights)
    }

    /// Index into `workspaces` for a mini-batch of `b` images (allocated on first use:
    /// at most two sizes occur, the full batch and the epoch's tail).
    fn workspace_for(&mut self, b: usize) -> Result<usize> {
        if let Some(i) = self.workspaces.iter().position(|w| w.0 == b) {
            return Ok(i);
        }
        let be = self.backend;
        let ws = EnkfWorkspace::new(be, self.members, self.params, b)?;
        let g = be.zeros_f32(self.members * b * CLASSES)?;
        let x = be.zeros_f32(b * IMG_PIXELS)?;
        let y = be.zeros_f32(b * CLASSES)?;
        self.workspaces.push((b, ws, g, x, y));
        Ok(self.workspaces.len() - 1)
    }

    /// Runs every iteration, reporting each metrics row to `observer`.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Vec<MetricsRow>> {
        let total = self.total_iterations();
        let per_epoch = self.cfg.iterations_per_epoch(self.train.len());
        let batches = self.train.len().div_ceil(self.cfg.batch);
        let r = self.cfg.repetitions;
        let start = Instant::now();
        let mut rows = Vec::with_capacity(total + 1);
        let mut host_x = Vec::new();
        let mut labels: Vec<u8> = Vec::new();
        let mut current = usize::MAX; // (epoch · batches + batch) of the uploaded batch
        let mut slot = 0;
        for t in 0..=total {
            // Iteration t > 0 updates with the batch of step t − 1; row 0 scores batch 0.
            let step = t.saturating_sub(1);
            let epoch = step / per_epoch;
            let bi = (step % per_epoch) / r;
            if epoch * batches + bi != current {
                if bi == 0
                    && self.cfg.order == BatchOrder::Shuffle
                    && (current == usize::MAX || epoch > 0)
                {
                    self.order = (0..self.train.len()).collect();
                    self.order.shuffle(&mut self.shuffle_rng);
                }
                let lo = bi * self.cfg.batch;
                let hi = (lo + self.cfg.batch).min(self.train.len());
                labels = self.train.gather(&self.order[lo..hi], &mut host_x);
                slot = self.workspace_for(hi - lo)?;
                let be = self.backend;
                let (_, _, _, x, y) = &mut self.workspaces[slot];
                be.write_f32(&host_x, x)?;
                be.write_f32(&one_hot(&labels, CLASSES), y)?;
                current = epoch * batches + bi;
            }
            if t > 0 {
                self.step(slot)?;
            }
            let (train_loss, train_accuracy) = self.score_batch(slot, &labels)?;
            let mut row = MetricsRow {
                iteration: t,
                epoch: t as f64 / per_epoch as f64,
                members: self.members,
                repetitions: r,
                train_loss,
                train_accuracy,
                test_error: None,
                test_loss: None,
                test_error_last: None,
                test_loss_last: None,
                test_error_ensemble: None,
                test_loss_ensemble: None,
                test_error_mean: None,
                test_loss_mean: None,
                elapsed_s: 0.0,
            };
            if t % self.cfg.eval_every == 0 || t == total {
                let t0 = Instant::now();
                for (i, mode) in self.cfg.eval.clone().into_iter().enumerate() {
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
                            (row.test_error_ensemble, row.test_loss_ensemble) =
                                (Some(err), Some(loss))
                        }
                    }
                }
                self.times.eval += t0.elapsed().as_secs_f64();
            }
            row.elapsed_s = start.elapsed().as_secs_f64();
            observer.on_row(&row, total)?;
            rows.push(row);
        }
        Ok(rows)
    }

    /// One EnKF iteration on the uploaded mini-batch in workspace `slot`.
    fn step(&mut self, slot: usize) -> Result<()> {
        let be = self.backend;
        let (b, ws, g, x, y) = &mut self.workspaces[slot];
        let t0 = Instant::now();
        be.ensemble_forward(&self.net, &self.u, self.members, x, *b, g)?;
        be.synchronize()?;
        let t1 = Instant::now();
        ws.update(be, self.cfg.update, self.cfg.gamma, &mut self.u, g, y)?;
        be.synchronize()?;
        self.times.forward += (t1 - t0).as_secs_f64();
        self.times.update += t1.elapsed().as_secs_f64();
        Ok(())
    }

    /// Loss and accuracy of the mean network on the mini-batch in workspace `slot`.
    fn score_batch(&mut self, slot: usize, labels: &[u8]) -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let be = self.backend;
        be.row_mean(&self.u, self.members, self.params, &mut self.weights)?;
        let (b, _, _, x, _) = &self.workspaces[slot];
        let mut out = be.zeros_f32(b * CLASSES)?;
        be.ensemble_forward(&self.net, &self.weights, 1, x, *b, &mut out)?;
        let logits = be.download_f32(&out)?;
        let (loss, correct) = metrics::score_logits(&logits, labels);
        self.times.train_score += t0.elapsed().as_secs_f64();
        Ok((loss, correct as f64 / labels.len() as f64))
    }

    /// Test error (%) and cross-entropy of one evaluated network on the whole test set.
    pub fn evaluate(&mut self, mode: EvalMode) -> Result<(f64, f64)> {
        let be = self.backend;
        let n = self.test.len();
        let (loss, correct) = match mode {
            EvalMode::Mean | EvalMode::Last => {
                if mode == EvalMode::Mean {
                    be.row_mean(&self.u, self.members, self.params, &mut self.weights)?;
                } else {
                    // Row J−1 of U, selected by a one-hot 1 × J times U (J × P).
                    let mut sel = vec![0.0f32; self.members];
                    sel[self.members - 1] = 1.0;
                    let sel = be.upload_f32(&sel)?;
                    be.gemm_f32(
                        Trans::No,
                        Trans::No,
                        1,
                        self.params,
                        self.members,
                        1.0,
                        &sel,
                        &self.u,
                        0.0,
                        &mut self.weights,
                    )?;
                }
                be.ensemble_forward(
                    &self.net,
                    &self.weights,
                    1,
                    &self.test_x,
                    n,
                    &mut self.test_out,
                )?;
                let logits = be.download_f32(&self.test_out)?;
                metrics::score_logits(&logits, &self.test.labels)
            }
            EvalMode::Ensemble => {
                // Chunks of test images so that the J × chunk × 10 outputs stay ≤ 16 Mi floats.
                let chunk = ((16usize << 20) / (self.members * CLASSES)).clamp(1, n);
                let mut probs = vec![0.0f64; n * CLASSES];
                let mut out = be.zeros_f32(self.members * chunk * CLASSES)?;
                let mut lo = 0;
                while lo < n {
                    let hi = (lo + chunk).min(n);
                    let x = be.upload_f32(&self.test.images[lo * IMG_PIXELS..hi * IMG_PIXELS])?;
                    if hi - lo != chunk {
                        out = be.zeros_f32(self.members * (hi - lo) * CLASSES)?;
                    }
                    be.ensemble_forward(&self.net, &self.u, self.members, &x, hi - lo, &mut out)?;
                    let g = be.download_f32(&out)?;
                    for j in 0..self.members {
                        for i in lo..hi {
                            let row = &g[(j * (hi - lo) + (i - lo)) * CLASSES..][..CLASSES];
                            metrics::add_softmax(row, &mut probs[i * CLASSES..(i + 1) * CLASSES]);
                        }
                    }
                    lo = hi;
                }
                for p in &mut probs {
                    *p /= self.members as f64;
                }
                metrics::score_probabilities(&probs, &self.test.labels)
            }
        };
        Ok((100.0 * (1.0 - correct as f64 / n as f64), loss))
    }
}

/// Reads a J × P ensemble from `.npy` (float32 or float64) and checks its shape.
pub fn load_ensemble(path: &std::path::Path, members: usize, params: usize) -> Result<Vec<f32>> {
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
