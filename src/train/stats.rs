//! Activation and gradient statistics (the paper's Figures 3–7): per iteration and per
//! layer the mean and standard deviation, and every `hist_every` iterations a histogram
//! with fixed, recorded bin edges.
//!
//! Layers: for `quantity = activation`, layer 1 is conv1's activation output before
//! pooling (10 × 24 × 24 per image), layer 2 conv2's activation output (20 × 8 × 8, before
//! the optional second pool), layer 3 the softmax output (10 per image), all over the
//! images of the mini-batch. For `quantity = gradient`, layer 1, 2, 3 is the gradient of
//! the mini-batch loss with respect to `conv1.weight`, `conv2.weight`, `fc1.weight`.
//!
//! Layer-spec networks ([`spec_stats`]): activation layer k is the output of the spec's
//! k-th activation layer, the last one the softmax of its output; gradient layer i the
//! i-th parameter tensor (weights and biases, `Sequential` order).
//!
//! Moments: mean and population standard deviation (divide by n), two-pass in f64.
//!
//! Histogram bins (edges fixed per activation, written with every count):
//! - logistic and softmax: [0, 1] in 50 equal bins; tanh: [−1, 1] in 50; ReLU: [0, 10]
//!   in 50 (values above 10 land in the overflow bin);
//! - gradients: sign-symmetric log bins, 4 per decade from 1e-12 to 1: edges
//!   −1, −10^(−1/4), …, −1e-12, +1e-12, …, 1 (97 bins, the middle one [−1e-12, 1e-12]
//!   holds the vanished gradients). Log bins because the point is how many orders of
//!   magnitude the gradients shrink.
//!
//! Every bin is [lo, hi) except the last, [lo, hi]. Two extra bins catch the rest:
//! underflow (−∞, first edge) and overflow (last edge, +∞); NaN values are counted in
//! the overflow bin (a run with NaN activations has diverged; its mean is NaN too).
//! So the counts of one histogram always sum to the number of values.

use crate::backend::check_len;
use crate::cpu::backprop::{forward_cached, ForwardCache};
use crate::model::spec::{Layer, SpecActivation};
use crate::model::{Activation, Net};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Default interval, in iterations, between histograms.
pub const DEFAULT_HIST_EVERY: usize = 200;
/// Equal-width bins of an activation histogram.
pub const ACTIVATION_BINS: usize = 50;
/// Upper edge of the ReLU activation histogram.
pub const RELU_HIST_MAX: f64 = 10.0;
/// Smallest gradient magnitude with its own bin (smaller ones share the middle bin).
pub const GRAD_HIST_MIN_DECADE: i32 = -12;
/// Largest gradient magnitude edge is 10^this.
pub const GRAD_HIST_MAX_DECADE: i32 = 0;
/// Log bins per decade of a gradient histogram.
pub const GRAD_BINS_PER_DECADE: i32 = 4;

/// What a statistics row describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantity {
    /// Layer outputs (activations, softmax).
    Activation,
    /// Gradients of the loss with respect to a weight tensor.
    Gradient,
}

/// Mean and population standard deviation of n values.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Moments {
    /// Number of values.
    pub count: usize,
    /// Mean (NaN when count is 0).
    pub mean: f64,
    /// Population standard deviation (divide by n; NaN when count is 0).
    pub std: f64,
}

impl Moments {
    /// Two-pass mean and standard deviation of the values of `parts` taken together.
    pub fn of<T: Copy + Into<f64>>(parts: &[&[T]]) -> Moments {
        let count: usize = parts.iter().map(|p| p.len()).sum();
        if count == 0 {
            return Moments {
                count,
                mean: f64::NAN,
                std: f64::NAN,
            };
        }
        let sum: f64 = parts.iter().flat_map(|p| p.iter()).map(|&v| v.into()).sum();
        let mean = sum / count as f64;
        let ss: f64 = parts
            .iter()
            .flat_map(|p| p.iter())
            .map(|&v| {
                let d = v.into() - mean;
                d * d
            })
            .sum();
        Moments {
            count,
            mean,
            std: (ss / count as f64).sqrt(),
        }
    }
}

/// A histogram over fixed edges with an underflow and an overflow bin.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Bin edges, strictly increasing (bins + 1 values).
    pub edges: Vec<f64>,
    /// Counts: `counts[0]` underflow, `counts[1..=bins]` the bins, `counts[bins + 1]`
    /// overflow (and NaN); bins + 2 values.
    pub counts: Vec<u64>,
}

impl Histogram {
    /// An empty histogram over `edges` (at least two, strictly increasing).
    /// Errors: [`Error::Config`] when the edges are not like that.
    pub fn new(edges: Vec<f64>) -> Result<Self> {
        if edges.len() < 2
            || edges
                .windows(2)
                .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
        {
            return Err(Error::Config(format!(
                "histogram edges must be ≥ 2 strictly increasing values, got {} values",
                edges.len()
            )));
        }
        let counts = vec![0; edges.len() + 1];
        Ok(Histogram { edges, counts })
    }

    /// Counts every value of `values`.
    pub fn add<T: Copy + Into<f64>>(&mut self, values: &[T]) {
        let last = self.edges.len() - 1;
        for &v in values {
            let v: f64 = v.into();
            // Index of the first edge > v: 0 = underflow, last+1 = overflow.
            let i = if v.is_nan() || v > self.edges[last] {
                last + 1
            } else if v == self.edges[last] {
                last
            } else {
                self.edges.partition_point(|&e| e <= v)
            };
            self.counts[i] += 1;
        }
    }

    /// Total number of values counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Every bin as (lo, hi, count), underflow (−∞, first edge) first and overflow
    /// (last edge, +∞) last.
    pub fn bins(&self) -> Vec<(f64, f64, u64)> {
        let n = self.edges.len();
        (0..=n)
            .map(|i| {
                let lo = if i == 0 {
                    f64::NEG_INFINITY
                } else {
                    self.edges[i - 1]
                };
                let hi = if i == n { f64::INFINITY } else { self.edges[i] };
                (lo, hi, self.counts[i])
            })
            .collect()
    }
}

/// Edges of the activation histogram of layer 1 or 2 for `act` (see the module docs).
pub fn activation_edges(act: Activation) -> Vec<f64> {
    let (lo, hi) = match act {
        Activation::Logistic => (0.0, 1.0),
        Activation::Tanh => (-1.0, 1.0),
        Activation::Relu => (0.0, RELU_HIST_MAX),
    };
    uniform_edges(lo, hi, ACTIVATION_BINS)
}

/// Edges of the histogram of a layer-spec activation: as [`activation_edges`], and
/// heaviside on [0, 1] like logistic.
pub fn spec_activation_edges(act: SpecActivation) -> Vec<f64> {
    match act {
        SpecActivation::Logistic | SpecActivation::Heaviside => {
            activation_edges(Activation::Logistic)
        }
        SpecActivation::Relu => activation_edges(Activation::Relu),
        SpecActivation::Tanh => activation_edges(Activation::Tanh),
    }
}

/// Edges of the softmax (layer 3) histogram: [0, 1] in 50 bins.
pub fn softmax_edges() -> Vec<f64> {
    uniform_edges(0.0, 1.0, ACTIVATION_BINS)
}

/// Edges of a gradient histogram: ±10^(k/4) for k from −48 to 0 (see the module docs).
pub fn gradient_edges() -> Vec<f64> {
    let steps: Vec<f64> = (GRAD_HIST_MIN_DECADE * GRAD_BINS_PER_DECADE
        ..=GRAD_HIST_MAX_DECADE * GRAD_BINS_PER_DECADE)
        .map(|k| 10f64.powf(k as f64 / GRAD_BINS_PER_DECADE as f64))
        .collect();
    let mut edges: Vec<f64> = steps.iter().rev().map(|&v| -v).collect();
    edges.extend(steps);
    edges
}

fn uniform_edges(lo: f64, hi: f64, bins: usize) -> Vec<f64> {
    (0..=bins)
        .map(|i| lo + (hi - lo) * i as f64 / bins as f64)
        .collect()
}

/// Statistics of one layer and quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStat {
    /// Layer 1, 2 or 3 (see the module docs).
    pub layer: usize,
    /// Activation or gradient.
    pub quantity: Quantity,
    /// Mean and standard deviation.
    pub moments: Moments,
    /// Histogram, when one was asked for.
    pub histogram: Option<Histogram>,
}

/// The statistics of one iteration: activations of layers 1–3, then (backprop runs)
/// gradients of layers 1–3.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerStats {
    /// One entry per layer and quantity, in the order above.
    pub layers: Vec<LayerStat>,
}

fn stat<T: Copy + Into<f64>>(
    layer: usize,
    quantity: Quantity,
    values: &[T],
    edges: Option<Vec<f64>>,
) -> Result<LayerStat> {
    let histogram = match edges {
        Some(e) => {
            let mut h = Histogram::new(e)?;
            h.add(values);
            Some(h)
        }
        None => None,
    };
    Ok(LayerStat {
        layer,
        quantity,
        moments: Moments::of(&[values]),
        histogram,
    })
}

/// Appends the statistics of a gradient (P values), when given: gradient layer i is the
/// i-th tensor of [`Net::tensors`]. Errors: [`Error::Shape`] when its length is not P.
fn push_gradient_stats(
    net: &Net,
    grad: Option<&[f32]>,
    histograms: bool,
    layers: &mut Vec<LayerStat>,
) -> Result<()> {
    if let Some(g) = grad {
        check_len("stats gradient (P)", g.len(), net.n_params())?;
        for (i, t) in net.tensors().iter().enumerate() {
            layers.push(stat(
                i + 1,
                Quantity::Gradient,
                &g[t.range()],
                histograms.then(gradient_edges),
            )?);
        }
    }
    Ok(())
}

/// Statistics of a forward cache (activations of layers 1–3) and, when given, of a
/// gradient (P values, `state_dict` order of `net`). Histograms when `histograms`.
/// Errors: [`Error::Shape`] when the gradient length is not P.
pub fn stats_from_cache(
    net: &Net,
    cache: &ForwardCache<f32>,
    grad: Option<&[f32]>,
    histograms: bool,
) -> Result<LayerStats> {
    net.require_fused("activation statistics")?;
    let act_edges = || histograms.then(|| activation_edges(net.act));
    let mut layers = vec![
        stat(1, Quantity::Activation, &cache.a1, act_edges())?,
        stat(2, Quantity::Activation, &cache.a2, act_edges())?,
        stat(
            3,
            Quantity::Activation,
            &cache.probs,
            histograms.then(softmax_edges),
        )?,
    ];
    push_gradient_stats(net, grad, histograms, &mut layers)?;
    Ok(LayerStats { layers })
}

/// Activation statistics (layers 1–3) of ONE network — for the EnKF, the ensemble-mean
/// weights — on `images` images, computed on the CPU. `weights`: P, `x`: images × 784.
/// Histograms when `histograms`. A layer-spec network: [`spec_stats`].
/// Errors: [`Error::Shape`] on a length mismatch.
pub fn activation_stats(
    net: &Net,
    weights: &[f32],
    x: &[f32],
    images: usize,
    histograms: bool,
) -> Result<LayerStats> {
    if net.spec().is_some() {
        return spec_stats(net, weights, x, images, None, histograms);
    }
    let cache = forward_cached(net, weights, x, images)?;
    stats_from_cache(net, &cache, None, histograms)
}

/// Statistics of a layer-spec network (`weights`: P) on `images` inputs and, when
/// given, of its gradient (P). Activation layers 1 … n are the outputs of the spec's
/// activation layers in order, layer n + 1 the softmax of its output; gradient layer
/// i is the i-th tensor of [`Net::tensors`] (`0.weight`, `0.bias`, … in `Sequential`
/// order). Histograms when `histograms` (edges per activation: [`spec_activation_edges`]).
/// Errors: [`Error::Shape`] on a length mismatch.
pub fn spec_stats(
    net: &Net,
    weights: &[f32],
    x: &[f32],
    images: usize,
    grad: Option<&[f32]>,
    histograms: bool,
) -> Result<LayerStats> {
    let Some(spec) = net.spec() else {
        return Err(Error::Config(
            "internal: spec_stats needs a layer-spec network".into(),
        ));
    };
    let (acts, probs) = crate::cpu::spec_backprop::spec_activations(spec, weights, x, images)?;
    let kinds = spec.layers().iter().filter_map(|l| match l.layer {
        Layer::Act(a) => Some(a),
        _ => None,
    });
    let mut layers = Vec::new();
    for (i, (values, act)) in acts.iter().zip(kinds).enumerate() {
        let edges = histograms.then(|| spec_activation_edges(act));
        layers.push(stat(i + 1, Quantity::Activation, values, edges)?);
    }
    let n = layers.len();
    layers.push(stat(
        n + 1,
        Quantity::Activation,
        &probs,
        histograms.then(softmax_edges),
    )?);
    push_gradient_stats(net, grad, histograms, &mut layers)?;
    Ok(LayerStats { layers })
}

/// One row of `stats.csv`.
#[derive(Debug, Clone, Serialize)]
struct StatsRow {
    iteration: usize,
    layer: usize,
    quantity: Quantity,
    mean: f64,
    std: f64,
}

/// One row of `hist.csv` (the underflow bin has `bin_lo = -inf`, overflow `bin_hi = inf`).
#[derive(Debug, Clone, Serialize)]
struct HistRow {
    iteration: usize,
    layer: usize,
    quantity: Quantity,
    bin_lo: f64,
    bin_hi: f64,
    count: u64,
}

/// Writes `stats.csv` (iteration, layer, quantity, mean, std) and `hist.csv`
/// (iteration, layer, quantity, bin_lo, bin_hi, count) into a folder.
pub struct StatsWriter {
    stats: csv::Writer<std::fs::File>,
    hist: csv::Writer<std::fs::File>,
    hist_every: usize,
    dir: PathBuf,
}

impl StatsWriter {
    /// Creates (truncates) both files in `dir` (created if missing). Histograms are
    /// wanted every `hist_every` iterations (iteration 0 included). Errors:
    /// [`Error::Config`] when `hist_every` is 0, [`Error::Io`] when a file cannot be created.
    pub fn create(dir: &Path, hist_every: usize) -> Result<Self> {
        if hist_every == 0 {
            return Err(Error::Config("hist_every = 0: must be ≥ 1".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let open = |name: &str| -> Result<csv::Writer<std::fs::File>> {
            let path = dir.join(name);
            let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            Ok(csv::Writer::from_writer(f))
        };
        Ok(StatsWriter {
            stats: open("stats.csv")?,
            hist: open("hist.csv")?,
            hist_every,
            dir: dir.to_path_buf(),
        })
    }

    /// Opens both files in `dir` for appending, without headers (a resumed run, after
    /// `checkpoint::rewind_outputs`). A file that is missing or empty is created with
    /// its header. Errors: as [`StatsWriter::create`].
    pub fn append(dir: &Path, hist_every: usize) -> Result<Self> {
        if hist_every == 0 {
            return Err(Error::Config("hist_every = 0: must be ≥ 1".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let open = |name: &str| -> Result<csv::Writer<std::fs::File>> {
            let path = dir.join(name);
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            let empty = f.metadata().map_err(|e| Error::io(&path, e))?.len() == 0;
            Ok(csv::WriterBuilder::new().has_headers(empty).from_writer(f))
        };
        Ok(StatsWriter {
            stats: open("stats.csv")?,
            hist: open("hist.csv")?,
            hist_every,
            dir: dir.to_path_buf(),
        })
    }

    /// Whether iteration `t` should carry histograms.
    pub fn wants_histograms(&self, t: usize) -> bool {
        t.is_multiple_of(self.hist_every)
    }

    /// The folder written into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends the statistics of iteration `t` (and its histograms, if present).
    /// Errors: [`Error::Io`] naming the file, with the OS error (e.g. ENOSPC), when
    /// writing fails (see [`Error::csv`]).
    pub fn write(&mut self, t: usize, stats: &LayerStats) -> Result<()> {
        for s in &stats.layers {
            self.stats
                .serialize(StatsRow {
                    iteration: t,
                    layer: s.layer,
                    quantity: s.quantity,
                    mean: s.moments.mean,
                    std: s.moments.std,
                })
                .map_err(|e| Error::csv(self.dir.join("stats.csv"), e))?;
            if let Some(h) = &s.histogram {
                for (bin_lo, bin_hi, count) in h.bins() {
                    self.hist
                        .serialize(HistRow {
                            iteration: t,
                            layer: s.layer,
                            quantity: s.quantity,
                            bin_lo,
                            bin_hi,
                            count,
                        })
                        .map_err(|e| Error::csv(self.dir.join("hist.csv"), e))?;
                }
            }
        }
        Ok(())
    }

    /// Flushes both files. Errors: [`Error::Io`] when flushing fails.
    pub fn flush(&mut self) -> Result<()> {
        self.stats
            .flush()
            .map_err(|e| Error::io(self.dir.join("stats.csv"), e))?;
        self.hist
            .flush()
            .map_err(|e| Error::io(self.dir.join("hist.csv"), e))
    }
    /// Flushes both files and waits until they are on disk (`fsync`).
    /// Errors: [`Error::Io`] when flushing or syncing fails.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.stats
            .get_ref()
            .sync_data()
            .map_err(|e| Error::io(self.dir.join("stats.csv"), e))?;
        self.hist
            .get_ref()
            .sync_data()
            .map_err(|e| Error::io(self.dir.join("hist.csv"), e))
    }
}

/// Computes and writes the activation statistics of the EnKF mean network on a worker
/// thread, so that they overlap the next iterations instead of lengthening them.
/// Jobs are processed in order; a bounded queue applies back-pressure. When the worker
/// fails (a full disk), the next call that talks to it returns the worker's own error.
pub struct StatsSink {
    tx: Option<std::sync::mpsc::SyncSender<Job>>,
    /// The worker; taken by the first call that finds it stopped, or by `finish`.
    handle: std::sync::Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
    /// The folder written into (for errors without a file of their own).
    dir: PathBuf,
}

/// Work for the statistics thread.
enum Job {
    /// Statistics of iteration `t`: mean weights (P), the mini-batch (images × 784).
    Stats {
        t: usize,
        weights: Vec<f32>,
        x: Vec<f32>,
        images: usize,
    },
    /// Write and sync everything queued before, then answer on the channel.
    Sync(std::sync::mpsc::SyncSender<()>),
}

impl StatsSink {
    /// Starts the worker writing through `writer` for network `net`.
    pub fn spawn(mut writer: StatsWriter, net: Net) -> Self {
        let dir = writer.dir().to_path_buf();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(4);
        let handle = std::thread::spawn(move || -> Result<()> {
            for job in rx {
                match job {
                    Job::Stats {
                        t,
                        weights,
                        x,
                        images,
                    } => {
                        let hist = writer.wants_histograms(t);
                        let stats = activation_stats(&net, &weights, &x, images, hist)?;
                        writer.write(t, &stats)?;
                    }
                    Job::Sync(done) => {
                        writer.sync()?;
                        // The caller may have given up waiting; nothing to do then.
                        let _ = done.send(());
                    }
                }
            }
            writer.flush()
        });
        StatsSink {
            tx: Some(tx),
            handle: std::sync::Mutex::new(Some(handle)),
            dir,
        }
    }

    /// The worker's result, once it has ended (its queue is closed only when it stops).
    /// `None` when an earlier call already returned it.
    fn join(&self) -> Option<Result<()>> {
        let handle = match self.handle.lock() {
            Ok(mut h) => h.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }?;
        Some(match handle.join() {
            Ok(result) => result,
            Err(_) => Err(Error::io(
                self.dir.join("stats.csv"),
                std::io::Error::other("the statistics worker panicked"),
            )),
        })
    }

    /// The error to report when the worker is found stopped: its own.
    fn stopped(&self) -> Error {
        match self.join() {
            Some(Err(e)) => e,
            // It ended without an error, or its error was returned already.
            _ => Error::io(
                self.dir.join("stats.csv"),
                std::io::Error::other(
                    "the statistics worker has stopped (its error was reported before)",
                ),
            ),
        }
    }

    /// Queues iteration `t` (blocks while four jobs are pending). Errors: the worker's
    /// own error (e.g. [`Error::Io`] naming stats.csv) when it has stopped.
    pub fn send(&self, t: usize, weights: Vec<f32>, x: Vec<f32>, images: usize) -> Result<()> {
        match &self.tx {
            Some(tx) => tx
                .send(Job::Stats {
                    t,
                    weights,
                    x,
                    images,
                })
                .map_err(|_| self.stopped()),
            None => Ok(()),
        }
    }

    /// Waits until every iteration queued so far is written and synced to disk (the
    /// trainer calls this before writing a checkpoint, so that the files hold every row
    /// up to the checkpoint). Errors: the worker's own error when it has stopped.
    pub fn sync(&self) -> Result<()> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        tx.send(Job::Sync(done)).map_err(|_| self.stopped())?;
        wait.recv().map_err(|_| self.stopped())
    }

    /// Waits for the queued jobs, flushes the files, and returns the worker's result.
    /// Returns `Ok` when the worker's error was already returned by an earlier call.
    pub fn finish(mut self) -> Result<()> {
        self.tx.take();
        self.join().unwrap_or(Ok(()))
    }
}

impl Drop for StatsSink {
    fn drop(&mut self) {
        self.tx.take();
        let _ = self.join();
    }
}
