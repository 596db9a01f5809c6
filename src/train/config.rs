//! The resolved training configuration, and how a JSON config file maps onto it.
//!
//! Precedence: command-line flag > `--config FILE.json` > default. The file takes the
//! same keys as `config.json` written by a run (so a run can be repeated from its
//! output) and also the authors' names: `n_ensembles`, `gamma`, `sigma`, `batch_size`,
//! `seed`, `checkpoints`, `repetitions`, `epochs`.

use crate::backend::{BackendKind, MathMode};
use crate::enkf::{ApplyOrder, UpdateRule};
use crate::model::spec::{NetLayers, NetSetting};
use crate::model::{Activation, Arch, Net};
use crate::train::optim::Optimizer;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use super::partial::{PartialConfig, AUTHOR_ALIASES};

/// Which network the periodic test evaluation scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    /// The network whose weights are the ensemble mean (the default).
    Mean,
    /// The last member (what the authors' script scored).
    Last,
    /// The ensemble's averaged prediction (softmax averaged over all members; costly:
    /// a forward pass of every member over the whole test set).
    Ensemble,
}

/// Order in which mini-batches are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BatchOrder {
    /// File order, as the authors' EnKF runs.
    #[default]
    File,
    /// A seeded permutation per epoch.
    Shuffle,
}

/// Which outputs the update pairs with a mini-batch's labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LabelPairing {
    /// The outputs of the mini-batch's own images, every iteration.
    #[default]
    Matched,
    /// As the authors' driver: the first of the r iterations on a new mini-batch uses
    /// the outputs of the previous mini-batch's images with the new labels (when the two
    /// batches have the same size; file order only).
    Authors,
}

/// Which targets each member's update is paired with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Observations {
    /// Every member sees the same targets y: the deterministic update the authors used.
    #[default]
    Exact,
    /// The stochastic EnKF: member j sees y + η_j, η_j ~ N(0, γI) drawn anew at every
    /// update from the run's seed (a function of the seed and the iteration, so a
    /// resumed run draws the same values).
    Perturbed,
}

/// How the inflation of each update follows the iterations: the factor f(t) of update
/// t (t = 0, 1, …) scales both the multiplicative excess and the additive noise,
/// λ_t = 1 + (λ − 1)·f(t) and s_t = s·f(t), with horizon N (`inflation_horizon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InflationSchedule {
    /// f(t) = 1: the same inflation at every update.
    #[default]
    Constant,
    /// f(t) = max(0, 1 − t/N): down to none at update N.
    Linear,
    /// f(t) = exp(−t/N): decays by e every N updates.
    Exponential,
    /// f(t) = 0 for t < N, 1 from update N on: no inflation until the ensemble has
    /// collapsed (the authors' update learns only once the spread is small; noise of a
    /// fraction of a still-large spread holds it there, REPRODUCTION.md "Beyond the
    /// paper").
    Delayed,
}

impl InflationSchedule {
    /// The setting's value as written.
    pub fn name(self) -> &'static str {
        match self {
            InflationSchedule::Constant => "constant",
            InflationSchedule::Linear => "linear",
            InflationSchedule::Exponential => "exponential",
            InflationSchedule::Delayed => "delayed",
        }
    }

    /// The factor f(t) at update `t` with horizon `n` (≥ 1; ignored by `Constant`).
    pub fn factor(self, t: usize, n: usize) -> f64 {
        let x = t as f64 / n.max(1) as f64;
        match self {
            InflationSchedule::Constant => 1.0,
            InflationSchedule::Linear => (1.0 - x).max(0.0),
            InflationSchedule::Exponential => (-x).exp(),
            InflationSchedule::Delayed => f64::from(u8::from(t >= n.max(1))),
        }
    }
}

/// How the step Δt of each update is chosen (the noise Γ is scaled by 1/Δt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StepControl {
    /// The same Δt every update (`dt`; 1: the authors' update).
    #[default]
    Fixed,
    /// The data-misfit controller of Iglesias and Yang (2021), as EnsembleKalmanProcesses'
    /// `DataMisfitController`: Δt = min(max(m / 2Φ̄, √(m / 2 var Φ)), 1 − t), Φ_j =
    /// |y − g_j|² / 2γ, per mini-batch (its algorithm time t starts at 0 on each new
    /// mini-batch; once t reaches 1 the batch's remaining repetitions do not update).
    Dmc,
}

/// The scale of additive inflation's noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NoiseScale {
    /// N(0, (s·σ)²) for every weight: a multiple s of the prior's (the initial
    /// ensemble's) standard deviation σ.
    #[default]
    Prior,
    /// N(0, (s·sd_p)²) for weight p, sd_p the ensemble's current spread of that weight.
    Spread,
}

/// Momentum applied to the members after each update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// No momentum (the authors').
    #[default]
    None,
    /// Nesterov-accelerated EKI (Vernon, Bach, Dunbar 2025; EnsembleKalmanProcesses'
    /// `NesterovAccelerator`): u ← u + θ_k (1/θ_{k−1} − 1)(u − u_prev), θ_0 = 1,
    /// θ_k = (−θ² + √(θ⁴ + 4θ²))/2 with θ = θ_{k−1}, counted over the whole run.
    Nesterov,
}

/// How biases start (weights always start N(0, σ²)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BiasInit {
    /// 0, as the paper's Sect. 2.2.
    #[default]
    Zero,
    /// N(0, σ²) like the weights.
    Normal,
}

/// Whether the ensemble size and repetitions adapt during training (the paper's Algorithm 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Adaptation {
    /// J and r stay as configured.
    #[default]
    Fixed,
    /// Algorithm 1: every `adapt_every` iterations J and r move by `adapt_step` and 1.
    Adaptive,
}

/// How Algorithm 1 turns two test errors into a change of J and r.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdaptRule {
    /// Algorithm 1 as printed: below ε, a better error by at most κ lowers J and r, by
    /// more than κ raises both.
    #[default]
    Algorithm,
    /// The authors' driver (`enkf_pytorch_conv-run.py`, published with the paper): below
    /// ε, any better (or equal) error lowers r, and J too when the gain is at most κ; a
    /// worse one raises r (up to the configured r), and J too when it is worse by more
    /// than κ. This is the rule that gives Fig. 10's "r lowered at every comparison, J
    /// from 1500 on, neither ever rose".
    Authors,
}

/// What to do when members produce non-finite outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Stop with the iteration and the number of failed members.
    #[default]
    Error,
    /// Replace failed members by draws from the Gaussian of the successful ones.
    Resample,
}

/// Every setting of a training run, fully resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Ensemble size J.
    pub members: usize,
    /// Observation noise γ (Γ = γI).
    pub gamma: f64,
    /// Standard deviation σ of the initial N(0, σ²) weights.
    pub sigma: f64,
    /// Images per mini-batch B.
    pub batch: usize,
    /// Iterations each mini-batch is shown for, r.
    pub repetitions: usize,
    /// Epochs to run (ignored when `iterations` is set).
    pub epochs: usize,
    /// Total iterations; overrides `epochs` when set.
    pub iterations: Option<usize>,
    /// Test-set evaluation interval in iterations.
    pub eval_every: usize,
    /// Networks scored at each evaluation (the first is the headline `test_error`).
    pub eval: Vec<EvalMode>,
    /// Activation after each convolution.
    pub activation: Activation,
    /// Network architecture.
    pub arch: Arch,
    /// A layer-spec network instead of `arch` and `activation` (absent: the fused
    /// networks; see `crate::model::spec`).
    #[serde(default)]
    pub net: Option<NetSetting>,
    /// How the biases of a layer-spec network start (drawn N(0, σ²) with the weights,
    /// then set to 0 unless `normal`, so the weights are the same either way).
    #[serde(default)]
    pub bias_init: BiasInit,
    /// EnKF update rule.
    pub update: UpdateRule,
    /// Exact or perturbed (stochastic EnKF) observations (absent in configurations
    /// written before the setting existed: [`Observations::Exact`]).
    #[serde(default)]
    pub observations: Observations,
    /// Multiplicative inflation λ ≥ 1: before every update each member moves to
    /// mean + λ · (member − mean) (1: none, the authors'; absent in older configurations).
    #[serde(default = "one")]
    pub inflation: f64,
    /// Additive inflation s ≥ 0: before every update (after the multiplicative
    /// inflation) each weight of each member gets Gaussian noise of standard deviation s
    /// times the scale of `additive_from` (0: none; absent in older configurations).
    #[serde(default)]
    pub additive_inflation: f64,
    /// The scale of additive inflation's noise (absent in older configurations: prior).
    #[serde(default)]
    pub additive_from: NoiseScale,
    /// How both inflations follow the iterations (absent in older configurations:
    /// constant).
    #[serde(default)]
    pub inflation_schedule: InflationSchedule,
    /// The schedule's horizon N in updates (with a schedule other than constant only).
    #[serde(default)]
    pub inflation_horizon: Option<usize>,
    /// Tikhonov-regularised EKI with strength λ ≥ 0: the prior N(0, σ²/λ · I) joins the
    /// data as P extra observations, solved in member space (0: none; absent in older
    /// configurations).
    #[serde(default)]
    pub tikhonov: f64,
    /// How Δt is chosen (absent in older configurations: fixed).
    #[serde(default)]
    pub step: StepControl,
    /// The fixed step Δt > 0 of `step = fixed`: Γ becomes Γ/Δt (1: the authors').
    #[serde(default = "one")]
    pub dt: f64,
    /// Momentum on the members after each update (absent in older configurations: none).
    #[serde(default)]
    pub accelerator: Accelerator,
    /// Association of the update's apply phase: auto (the cheaper by flop count per
    /// mini-batch size), params or members; the same update in exact arithmetic,
    /// different rounding and cost (absent in older configurations: auto).
    #[serde(default)]
    pub apply_order: ApplyOrder,
    /// Seed of every random stream of the run.
    pub seed: u64,
    /// Folder with the four IDX files.
    pub data: PathBuf,
    /// A NumPy data set instead of `data`: one folder holding `train_x.npy`,
    /// `train_y.npy`, `test_x.npy`, `test_y.npy`, or those four paths (see
    /// `crate::data::npy`).
    #[serde(default)]
    pub data_npy: Option<Vec<PathBuf>>,
    /// Use only the first N training images (all when unset).
    pub train_limit: Option<usize>,
    /// Use only the first N test images (all when unset).
    pub test_limit: Option<usize>,
    /// Output folder (metrics.csv, config.json, mean.npy).
    pub out: Option<PathBuf>,
    /// Mini-batch order.
    pub order: BatchOrder,
    /// Which outputs are paired with the labels (absent in configurations written before
    /// the setting existed: [`LabelPairing::Matched`]).
    #[serde(default)]
    pub pairing: LabelPairing,
    /// Requested backend.
    pub backend: BackendKind,
    /// Precision policy of the large products.
    pub math: MathMode,
    /// CPU threads (rayon); all cores when unset.
    pub threads: Option<usize>,
    /// Start from this ensemble (J × P `.npy`) instead of drawing one.
    pub init_ensemble: Option<PathBuf>,
    /// Write the final ensemble here (J × P float32 `.npy`).
    pub save_ensemble: Option<PathBuf>,
    /// Fixed or adaptive ensemble size and repetitions.
    pub adaptation: Adaptation,
    /// Algorithm 1: test-error comparison interval τ in iterations.
    pub adapt_every: usize,
    /// Algorithm 1: lower bound b_l of J.
    pub adapt_min_members: usize,
    /// Algorithm 1: upper bound b_u of J.
    pub adapt_max_members: usize,
    /// Algorithm 1: members added or removed per change, v.
    pub adapt_step: usize,
    /// Algorithm 1: improvement threshold κ in percentage points.
    pub adapt_kappa: f64,
    /// Algorithm 1: adapt only once the test error is below ε percent.
    pub adapt_epsilon: f64,
    /// Algorithm 1: the decision rule (absent in configurations written before the
    /// setting existed: [`AdaptRule::Algorithm`]).
    #[serde(default)]
    pub adapt_rule: AdaptRule,
    /// Members with non-finite outputs: stop, or resample them.
    pub on_failure: FailurePolicy,
    /// Write a checkpoint every N iterations (into `out`/checkpoint).
    pub checkpoint_every: Option<usize>,
    /// The training method: the EnKF, or SGD / Adam by backpropagation.
    pub optimizer: Optimizer,
    /// Learning rate of SGD / Adam (their defaults 0.1 / 1e-3 when unset).
    pub lr: Option<f64>,
    /// SGD momentum.
    pub momentum: f64,
    /// Activation (and gradient) statistics every N iterations, into stats.csv.
    pub stats_every: usize,
    /// Histograms every N iterations, into hist.csv.
    pub hist_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            members: 1000,
            gamma: 0.01,
            sigma: 1.0,
            batch: 64,
            repetitions: 8,
            epochs: 1,
            iterations: None,
            eval_every: 500,
            eval: vec![EvalMode::Mean],
            activation: Activation::Logistic,
            arch: Arch::Paper,
            net: None,
            bias_init: BiasInit::Zero,
            update: UpdateRule::Sequential,
            observations: Observations::Exact,
            inflation: 1.0,
            additive_inflation: 0.0,
            additive_from: NoiseScale::Prior,
            inflation_schedule: InflationSchedule::Constant,
            inflation_horizon: None,
            tikhonov: 0.0,
            step: StepControl::Fixed,
            dt: 1.0,
            accelerator: Accelerator::None,
            apply_order: ApplyOrder::Auto,
            seed: 0,
            data: crate::data::default_mnist_dir(),
            data_npy: None,
            train_limit: None,
            test_limit: None,
            out: None,
            order: BatchOrder::File,
            pairing: LabelPairing::Matched,
            backend: BackendKind::Auto,
            math: MathMode::Fp32,
            threads: None,
            init_ensemble: None,
            save_ensemble: None,
            adaptation: Adaptation::Fixed,
            adapt_every: 500,
            adapt_min_members: 1000,
            adapt_max_members: 10_000,
            adapt_step: 1000,
            adapt_kappa: 1.0,
            adapt_epsilon: 10.0,
            adapt_rule: AdaptRule::Algorithm,
            on_failure: FailurePolicy::Error,
            checkpoint_every: None,
            optimizer: Optimizer::Enkf,
            lr: None,
            momentum: 0.9,
            stats_every: 1,
            hist_every: crate::train::stats::DEFAULT_HIST_EVERY,
        }
    }
}

fn one() -> f64 {
    1.0
}

/// Reads a resolved configuration as the run stored it (a checkpoint's): every field as
/// written, the layer-spec network built for the stored data's shape (a NumPy data set's
/// files are probed), not for the IDX images a bare [`NetSetting`] assumes.
pub fn deserialize_stored<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<TrainConfig, D::Error> {
    use serde::de::Error as _;
    let mut v = serde_json::Value::deserialize(d)?;
    let layers = match v.as_object_mut().and_then(|m| m.remove("net")) {
        Some(serde_json::Value::Null) | None => None,
        Some(n) => Some(serde_json::from_value::<NetLayers>(n).map_err(D::Error::custom)?),
    };
    let mut c: TrainConfig = serde_json::from_value(v).map_err(D::Error::custom)?;
    c.bind_data(layers.as_ref()).map_err(D::Error::custom)?;
    Ok(c)
}

impl TrainConfig {
    /// The keys a layer-spec network (`net`) replaces: left out
    /// of [`TrainConfig::to_file_json`], refused beside `net` by
    /// [`PartialConfig::resolve`].
    pub const REPLACED_BY_NET: [&'static str; 2] = ["arch", "activation"];

    /// Algorithm 1's keys: refused away from their defaults when adaptation = fixed,
    /// where they would act on nothing.
    pub const ADAPTIVE_ONLY: [&'static str; 7] = [
        "adapt_every",
        "adapt_min_members",
        "adapt_max_members",
        "adapt_step",
        "adapt_kappa",
        "adapt_epsilon",
        "adapt_rule",
    ];

    /// The keys a NumPy data set (`data_npy`) replaces: left out of
    /// [`TrainConfig::to_file_json`], refused beside `data_npy`.
    pub const REPLACED_BY_NPY: [&'static str; 1] = ["data"];

    /// The sample shape and task of this configuration's data: an IDX folder's images
    /// (1 × H × W from the header of its training images, nothing else read) and 10
    /// classes, or what a NumPy data set's files declare ([`crate::data::npy::probe`]:
    /// the X headers and the Y files are read).
    /// Errors: the IDX file's faults ([`crate::data::DataError`], naming the file); as
    /// [`crate::data::npy::probe`].
    pub fn data_shape(&self) -> Result<(crate::model::spec::Shape, crate::data::Task)> {
        match &self.data_npy {
            None => {
                let path = crate::data::find_file(&self.data, crate::data::TRAIN_IMAGES)?;
                let head = crate::data::read_images_first(&path, 0)?;
                let shape = crate::model::spec::Shape::Image {
                    c: 1,
                    h: head.rows,
                    w: head.cols,
                };
                Ok((shape, crate::data::Task::default()))
            }
            Some(paths) => crate::data::npy::probe(paths),
        }
    }

    /// Builds the network `layers` (or checks the fused one) for this configuration's
    /// data ([`TrainConfig::data_shape`]). Errors: [`Error::Config`] when the network
    /// does not fit the data, naming the layer or the shapes; a data file's fault.
    pub(super) fn bind_data(&mut self, layers: Option<&NetLayers>) -> Result<()> {
        if layers.is_none() && self.data_npy.is_none() {
            return Ok(());
        }
        let (shape, task) = self.data_shape()?;
        if let (crate::data::Task::Regress { .. }, Adaptation::Adaptive) = (task, self.adaptation) {
            return Err(Error::Config(format!(
                "adaptation = adaptive with {}: Algorithm 1's thresholds (adapt_kappa, \
                 adapt_epsilon) are in test-error percent, which real targets do not have",
                task.describe()
            )));
        }
        match layers {
            Some(l) => {
                self.net = Some(l.build(shape, task.outputs()).map_err(|e| match e {
                    Error::Config(msg) if self.data_npy.is_some() => Error::Config(format!(
                        "{msg} (the NumPy data set has samples of {shape} and {})",
                        task.describe()
                    )),
                    Error::Config(msg) => Error::Config(format!(
                        "{msg} (the images of {} are {shape})",
                        self.data.display()
                    )),
                    other => other,
                })?)
            }
            None => {
                if shape != crate::model::spec::IDX_INPUT || task != crate::data::Task::default() {
                    return Err(Error::Config(
                        format!(
                            "the NumPy data set has samples of {shape} and {}, but --arch {:?} \
                         takes 1 × 28 × 28 images and 10 classes: give a layer-spec network \
                         for this data with --net",
                            task.describe(),
                            self.arch
                        )
                        .replace("Paper", "paper")
                        .replace("Pooled", "pooled"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// This configuration as a config file states it (what `config.json` holds and a
    /// resumed run starts from): every field, except that a layer-spec network's
    /// configuration leaves out [`TrainConfig::REPLACED_BY_NET`], so that it resolves
    /// again without a conflict. Errors: [`Error::Json`] (not expected).
    pub fn to_file_json(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self)?;
        if let serde_json::Value::Object(m) = &mut v {
            if self.net.is_some() {
                for key in Self::REPLACED_BY_NET {
                    m.remove(key);
                }
            }
            if self.data_npy.is_some() {
                for key in Self::REPLACED_BY_NPY {
                    m.remove(key);
                }
            }
        }
        Ok(v)
    }

    /// The network this configuration trains.
    pub fn net(&self) -> Net {
        match &self.net {
            Some(n) => Net::from_spec(n.0.clone()),
            None => Net::new(self.arch, self.activation),
        }
    }

    /// Iterations per epoch: ⌈N / B⌉ · r.
    /// Saturates at `usize::MAX` rather than overflowing for absurd settings.
    pub fn iterations_per_epoch(&self, n_train: usize) -> usize {
        n_train
            .div_ceil(self.batch.max(1))
            .saturating_mul(self.repetitions)
    }

    /// Total iterations of the run for a training set of `n_train` images (saturating).
    pub fn total_iterations(&self, n_train: usize) -> usize {
        self.iterations.unwrap_or(
            self.epochs
                .saturating_mul(self.iterations_per_epoch(n_train)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authors_config_runs_unchanged() {
        let text = r#"{"n_ensembles": 5000, "gamma": 0.01, "sigma": 1.0, "batch_size": 64,
                       "seed": 3, "checkpoints": 250, "repetitions": 8, "epochs": 2, "dataset": "mnist"}"#;
        let (p, warnings) = PartialConfig::from_json(text).expect("parse");
        let c = p.resolve().expect("resolve");
        assert_eq!(c.members, 5000);
        assert_eq!(c.batch, 64);
        assert_eq!(c.seed, 3);
        assert_eq!(c.eval_every, 250);
        assert_eq!(c.epochs, 2);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("dataset"));
    }

    #[test]
    fn flags_override_the_file() {
        let (file, _) =
            PartialConfig::from_json(r#"{"members": 300, "gamma": 0.5}"#).expect("parse");
        let flags = PartialConfig {
            members: Some(20),
            ..Default::default()
        };
        let c = file.overlay(&flags).resolve().expect("resolve");
        assert_eq!(c.members, 20);
        assert_eq!(c.gamma, 0.5);
    }

    #[test]
    fn written_config_reads_back() {
        let c = PartialConfig {
            members: Some(77),
            iterations: Some(12),
            ..Default::default()
        }
        .resolve()
        .expect("ok");
        let text = serde_json::to_string(&c).expect("json");
        let (p, warnings) = PartialConfig::from_json(&text).expect("parse");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(p.resolve().expect("resolve"), c);
    }

    #[test]
    fn authors_pairing_round_trips_and_refuses_shuffle() {
        let p = PartialConfig {
            pairing: Some(LabelPairing::Authors),
            ..Default::default()
        };
        let c = p.resolve().expect("file order");
        assert_eq!(c.pairing, LabelPairing::Authors);
        let json = serde_json::to_string(&c).expect("json");
        assert!(json.contains(r#""pairing":"authors""#), "{json}");
        let (back, _) = PartialConfig::from_json(&json).expect("parse");
        assert_eq!(back.resolve().expect("resolve"), c);
        // A configuration written before the key existed still reads (as matched).
        let old = json.replace(r#""pairing":"authors","#, "");
        let t: TrainConfig = serde_json::from_str(&old).expect("old config");
        assert_eq!(t.pairing, LabelPairing::Matched);
        let e = PartialConfig {
            order: Some(BatchOrder::Shuffle),
            ..p
        }
        .resolve()
        .expect_err("shuffle");
        assert!(e.to_string().contains("pairing authors"), "{e}");
    }

    /// Algorithm 1's settings given to a fixed run are an error naming the key and value,
    /// not silently unused; the same settings with adaptation = adaptive resolve.
    #[test]
    fn adapt_settings_need_adaptive() {
        for (p, key) in [
            (
                PartialConfig {
                    adapt_rule: Some(AdaptRule::Authors),
                    ..Default::default()
                },
                "adapt_rule = authors",
            ),
            (
                PartialConfig {
                    adapt_every: Some(250),
                    ..Default::default()
                },
                "adapt_every = 250",
            ),
            (
                PartialConfig {
                    adapt_epsilon: Some(5.0),
                    ..Default::default()
                },
                "adapt_epsilon = 5",
            ),
        ] {
            let e = p.resolve().expect_err(key);
            assert!(e.to_string().contains(key), "{e}");
            assert!(e.to_string().contains("adaptation = fixed"), "{e}");
            let c = PartialConfig {
                adaptation: Some(Adaptation::Adaptive),
                ..p
            }
            .resolve()
            .expect("adaptive");
            assert_eq!(c.adaptation, Adaptation::Adaptive);
        }
    }

    /// A configuration with every field set away from its default.
    fn every_field_set() -> TrainConfig {
        TrainConfig {
            members: 33,
            gamma: 0.5,
            sigma: 2.0,
            batch: 16,
            repetitions: 3,
            epochs: 4,
            iterations: Some(99),
            eval_every: 7,
            eval: vec![EvalMode::Last, EvalMode::Mean],
            activation: Activation::Tanh,
            arch: Arch::Pooled,
            // A layer spec replaces arch; its round trip (and bias_init's, which needs a
            // network with biases) is tested in tests/net_spec.rs.
            net: None,
            bias_init: BiasInit::Zero,
            update: UpdateRule::Batch,
            observations: Observations::Perturbed,
            inflation: 1.25,
            additive_inflation: 0.125,
            additive_from: NoiseScale::Spread,
            inflation_schedule: InflationSchedule::Exponential,
            inflation_horizon: Some(300),
            tikhonov: 0.0, // batch rule and exact observations only: tests/enkf_methods.rs
            step: StepControl::Fixed,
            dt: 0.5,
            // Nesterov is not built for Algorithm 1 (adaptive below): the next test.
            accelerator: Accelerator::None,
            apply_order: ApplyOrder::Params,
            seed: 42,
            data: "/some/where".into(),
            // data_npy replaces data and reads its files: tests/data_npy.rs.
            data_npy: None,
            train_limit: Some(1000),
            test_limit: Some(500),
            out: Some("/tmp/out".into()),
            order: BatchOrder::Shuffle,
            pairing: LabelPairing::Matched, // authors is file order only: its own test
            backend: BackendKind::Cpu,
            math: MathMode::Tf32,
            threads: Some(3),
            init_ensemble: None,
            save_ensemble: Some("/tmp/u.npy".into()),
            adaptation: Adaptation::Adaptive,
            adapt_every: 11,
            adapt_min_members: 10,
            adapt_max_members: 90,
            adapt_step: 5,
            adapt_kappa: 0.25,
            adapt_epsilon: 20.0,
            adapt_rule: AdaptRule::Authors,
            on_failure: FailurePolicy::Resample,
            checkpoint_every: Some(13),
            optimizer: Optimizer::Enkf,
            lr: Some(0.01),
            momentum: 0.5,
            stats_every: 4,
            hist_every: 8,
        }
    }

    /// Every field survives config.json → `--config` → resolve, and overlaying a partial
    /// config onto an empty one keeps it: a field missing from either struct fails here.
    #[test]
    fn every_field_round_trips() {
        let c = every_field_set();
        let text = serde_json::to_string(&c).expect("json");
        let (p, warnings) = PartialConfig::from_json(&text).expect("parse");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(p.resolve().expect("resolve"), c);
        assert_eq!(PartialConfig::default().overlay(&p), p);
        assert_eq!(p.clone().overlay(&PartialConfig::default()), p);
    }

    /// The schedules' factors: constant 1, linear down to 0 at the horizon and past it,
    /// exponential e^(−t/N).
    #[test]
    fn inflation_schedule_factors() {
        use InflationSchedule::*;
        assert_eq!(Constant.factor(1000, 3), 1.0);
        assert_eq!(
            [0, 1, 2, 4, 5, 9].map(|t| Linear.factor(t, 4)),
            [1.0, 0.75, 0.5, 0.0, 0.0, 0.0]
        );
        assert_eq!(Exponential.factor(0, 7), 1.0);
        assert!((Exponential.factor(7, 7) - (-1.0f64).exp()).abs() < 1e-15);
        assert!((Exponential.factor(21, 7) - (-3.0f64).exp()).abs() < 1e-15);
        assert_eq!(
            [0, 1, 3, 4, 5, 100].map(|t| Delayed.factor(t, 4)),
            [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
        );
    }

    /// The EnKF variants that every_field_set cannot combine with its other settings.
    #[test]
    fn method_fields_round_trip() {
        let c = TrainConfig {
            update: UpdateRule::Batch,
            tikhonov: 2.5,
            step: StepControl::Dmc,
            accelerator: Accelerator::Nesterov,
            ..TrainConfig::default()
        };
        let text = serde_json::to_string(&c).expect("json");
        let (p, _) = PartialConfig::from_json(&text).expect("parse");
        assert_eq!(p.resolve().expect("resolve"), c);
        // Each combination that is not built is an error naming the settings.
        for (json, needle) in [
            (
                r#"{"inflation": 1.1, "inflation_schedule": "linear"}"#,
                "needs inflation_horizon ≥ 1",
            ),
            (
                r#"{"inflation": 1.1, "inflation_schedule": "linear", "inflation_horizon": 0}"#,
                "got 0",
            ),
            (
                r#"{"inflation": 1.1, "inflation_horizon": 5}"#,
                "inflation_horizon = 5 with inflation_schedule = constant",
            ),
            (
                r#"{"inflation_schedule": "exponential", "inflation_horizon": 10}"#,
                "without inflation",
            ),
            (
                r#"{"optimizer": "sgd", "inflation_schedule": "linear"}"#,
                "are enkf settings",
            ),
            (r#"{"tikhonov": 1.0}"#, "update = batch"),
            (
                r#"{"tikhonov": 1.0, "update": "batch", "observations": "perturbed"}"#,
                "perturbed",
            ),
            (r#"{"tikhonov": -1.0, "update": "batch"}"#, "got -1"),
            (r#"{"step": "dmc", "dt": 0.5}"#, "dt = 0.5 with step = dmc"),
            (r#"{"dt": 0.0}"#, "dt must be"),
            (
                r#"{"additive_from": "spread"}"#,
                "without additive_inflation",
            ),
            (r#"{"additive_inflation": -0.5}"#, "got -0.5"),
            (
                r#"{"accelerator": "nesterov", "adaptation": "adaptive"}"#,
                "nesterov",
            ),
            (r#"{"optimizer": "sgd", "step": "dmc"}"#, "enkf settings"),
            (
                r#"{"optimizer": "adam", "apply_order": "members"}"#,
                "apply_order = members is an EnKF setting (its default: auto); --optimizer adam",
            ),
            (
                r#"{"tikhonov": 1.0, "update": "batch", "apply_order": "params"}"#,
                "apply_order = params with tikhonov = 1",
            ),
            (r#"{"apply_order": "rows"}"#, "apply_order"),
        ] {
            let err = PartialConfig::from_json(json)
                .and_then(|(p, _)| p.resolve())
                .expect_err(json)
                .to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn bad_values_are_rejected_with_the_value() {
        let cases = [
            (r#"{"members": 1}"#, "at least 2"),
            (r#"{"gamma": 0}"#, "gamma must be a positive"),
            (r#"{"gamma": -1.0}"#, "got -1"),
            (r#"{"activation": "gelu"}"#, "gelu"),
            (r#"{"update": "smoother"}"#, "smoother"),
            (r#"{"members": 10, "n_ensembles": 20}"#, "already set"),
        ];
        for (text, needle) in cases {
            let err = PartialConfig::from_json(text)
                .and_then(|(p, _)| p.resolve())
                .expect_err(text);
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }

    /// `--gamma NaN` and friends: JSON turns a non-finite float into null, which used to
    /// read as "unset", so the run went ahead with the default and recorded it.
    #[test]
    fn non_finite_floats_are_errors_naming_the_key() {
        let keys: Vec<&str> = PartialConfig::default()
            .floats()
            .iter()
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let mut flags = PartialConfig::default();
                let slot = match key {
                    "gamma" => &mut flags.gamma,
                    "sigma" => &mut flags.sigma,
                    "adapt_kappa" => &mut flags.adapt_kappa,
                    "adapt_epsilon" => &mut flags.adapt_epsilon,
                    "lr" => &mut flags.lr,
                    "momentum" => &mut flags.momentum,
                    "inflation" => &mut flags.inflation,
                    "tikhonov" => &mut flags.tikhonov,
                    "dt" => &mut flags.dt,
                    "additive_inflation" => &mut flags.additive_inflation,
                    other => panic!("no slot for {other}"),
                };
                *slot = Some(v);
                // As main.rs combines them: checkpoint base, then file, then flags.
                let (file, _) = PartialConfig::from_json(r#"{"members": 20}"#).expect("parse");
                let merged = PartialConfig::default().overlay(&file).overlay(&flags);
                assert!(
                    merged
                        .floats()
                        .iter()
                        .any(|(k, x)| *k == key && x.is_some_and(|x| x.to_bits() == v.to_bits())),
                    "{key} = {v} lost by overlay"
                );
                let err = merged.resolve().expect_err(key).to_string();
                assert!(
                    err.contains(&format!("{key} = {v}")) && err.contains("finite"),
                    "{key} = {v}: {err}"
                );
                // The same value under a set file value still wins and is rejected.
                let (file, _) =
                    PartialConfig::from_json(&format!(r#"{{"{key}": 0.5}}"#)).expect("parse");
                assert!(file.overlay(&flags).resolve().is_err(), "{key} over file");
            }
        }
    }

    /// The list of floats checked by hand is every f64 field of the configuration.
    #[test]
    fn the_float_list_covers_every_float_field() {
        let v = serde_json::to_value(every_field_set()).expect("json");
        let serde_json::Value::Object(m) = v else {
            panic!("not an object")
        };
        let mut floats: Vec<&str> = m
            .iter()
            .filter(|(_, v)| v.is_f64())
            .map(|(k, _)| k.as_str())
            .collect();
        floats.sort_unstable();
        let mut listed: Vec<&str> = PartialConfig::default()
            .floats()
            .iter()
            .map(|(k, _)| *k)
            .collect();
        listed.sort_unstable();
        assert_eq!(floats, listed);
    }

    #[test]
    fn out_of_range_floats_are_errors_naming_the_key() {
        // Not adaptive: the adaptive settings are still checked, since config.json
        // records them.
        let cases = [
            (r#"{"adapt_kappa": -1.0}"#, "adapt_kappa", "-1"),
            (r#"{"adapt_epsilon": 0.0}"#, "adapt_epsilon", "got 0"),
            (r#"{"momentum": 1.0}"#, "momentum", "got 1"),
            (r#"{"momentum": -0.5}"#, "momentum", "-0.5"),
            (r#"{"lr": 0.0}"#, "lr", "got 0"),
            (r#"{"sigma": -2.0}"#, "sigma", "-2"),
            (r#"{"gamma": 1e-320}"#, "", ""),
        ];
        for (text, key, value) in cases {
            let r = PartialConfig::from_json(text).and_then(|(p, _)| p.resolve());
            if key.is_empty() {
                // A tiny but positive, finite gamma is allowed.
                assert!(r.is_ok(), "{text}: {r:?}");
                continue;
            }
            let err = r.expect_err(text).to_string();
            assert!(err.contains(key) && err.contains(value), "{text}: {err}");
        }
    }

    #[test]
    fn type_errors_name_the_key_as_written() {
        let cases = [
            (r#"{"batch_size": "sixteen"}"#, "'batch_size'", "sixteen"),
            (r#"{"members": -3}"#, "'members'", "-3"),
            (r#"{"gamma": "small"}"#, "'gamma'", "small"),
            (r#"{"eval": ["mean", 3]}"#, "'eval'", "3"),
            (r#"{"seed": 1.5}"#, "'seed'", "1.5"),
        ];
        for (text, key, value) in cases {
            let err = PartialConfig::from_json(text).expect_err(text).to_string();
            assert!(err.contains(key) && err.contains(value), "{text}: {err}");
        }
    }

    #[test]
    fn absurd_lengths_saturate_instead_of_overflowing() {
        let c = TrainConfig {
            epochs: usize::MAX,
            repetitions: usize::MAX / 2,
            ..TrainConfig::default()
        };
        assert_eq!(c.total_iterations(60_000), usize::MAX);
    }

    #[test]
    fn epoch_length_is_ceil_n_over_b_times_r() {
        let c = TrainConfig::default();
        assert_eq!(c.iterations_per_epoch(60_000), 938 * 8);
        assert_eq!(c.iterations_per_epoch(64 * 10), 80);
    }
}
