//! Command-line definitions (clap). Every `train` setting is optional here so that a
//! flag overrides `--config FILE.json`, which overrides the default shown in `--help`.

use crate::backend::{BackendKind, MathMode};
use crate::enkf::UpdateRule;
use crate::model::spec::NetLayers;
use crate::model::{Activation, Arch};
use crate::train::config::{AdaptRule, Adaptation, BiasInit, FailurePolicy, LabelPairing};
use crate::train::optim::Optimizer;
use crate::train::{BatchOrder, EvalMode, PartialConfig};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `enkf-dnn --version`: the crate version and what the build embedded for the GPU (which
/// PTX architectures, or sources for NVRTC). The PTX and forward geometry a device gets
/// are chosen at start-up and named in the backend line of every run.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (CUDA kernels: ",
    env!("ENKF_KERNELS_BUILT_WITH"),
    "; the sources are embedded too, for NVRTC where no PTX suits the device)"
);

/// Train the Yegenoglu et al. (2020) CNN with the Ensemble Kalman Filter (EnKF), on CUDA
/// or on the CPU reference path.
#[derive(Debug, Parser)]
#[command(name = "enkf-dnn", version = VERSION, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// The CPU backend's matrix products: auto (OpenBLAS if it loads, else MKL, else the
    /// built-in gemm crate), builtin, openblas or mkl (required: an error when missing).
    /// Loaded at run time; the build needs none
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub blas: crate::cpu::blas::BlasChoice,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train with the EnKF (or SGD / Adam baselines) and write metrics.csv, config.json,
    /// stats.csv, hist.csv, mean.npy and model.safetensors to --out.
    Train(Box<TrainArgs>),
    /// Time each phase of an EnKF iteration (forward, update, scoring, evaluation).
    Bench(BenchArgs),
    /// Reproduce a figure of the paper: runs, CSVs, charts (PNG, SVG) and a table beside
    /// the paper's numbers.
    Reproduce(crate::reproduce::ReproduceArgs),
    /// Redraw the charts of a reproduce folder from its CSVs.
    Plot(crate::reproduce::PlotArgs),
}

/// Flags of `enkf-dnn train`.
#[derive(Debug, Args, Default)]
pub struct TrainArgs {
    /// JSON file with any of the settings below (keys as in a run's config.json; the
    /// authors' n_ensembles, batch_size, checkpoints, ... are accepted). Flags override it.
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Ensemble size J (members) [default: 1000; the paper uses 5000].
    #[arg(long, short = 'J', value_name = "J")]
    pub members: Option<usize>,
    /// Observation noise γ; the solve uses C + γI [default: 0.01].
    #[arg(long)]
    pub gamma: Option<f64>,
    /// Standard deviation of the initial N(0, σ²) weights [default: 1.0].
    #[arg(long)]
    pub sigma: Option<f64>,
    /// Images per mini-batch B [default: 64].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Iterations each mini-batch is shown for, r [default: 8].
    #[arg(long, short = 'r')]
    pub repetitions: Option<usize>,
    /// Epochs; one epoch is ceil(N/B)·r iterations (7504 for MNIST) [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Total iterations, overriding --epochs.
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Evaluate on the test set every N iterations (and at 0 and at the end) [default: 500].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,
    /// Networks to score at each evaluation, comma-separated; the first fills test_error
    /// [default: mean]. `ensemble` runs every member over the test set (slow on the CPU).
    #[arg(long, value_delimiter = ',')]
    pub eval: Option<Vec<EvalMode>>,
    /// Activation after each convolution [default: logistic].
    #[arg(long, value_enum)]
    pub activation: Option<Activation>,
    /// How the biases of a --net network start: zero (the paper's Sect. 2.2) or normal
    /// (N(0, σ²) like the weights) [default: zero].
    #[arg(long, value_enum)]
    pub bias_init: Option<BiasInit>,
    /// Architecture: paper (no second pool, P = 18,050) or pooled (P = 8,450) [default: paper].
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// A layer-spec network instead of --arch/--activation (CPU backend for now; the
    /// EnKF, SGD and Adam), like torch.nn.Sequential: short form "conv2d(10,5) logistic maxpool2d(2)
    /// flatten linear(10)" (conv2d: out_channels, kernel_size, stride, padding; key=value
    /// for any argument, e.g. bias=false) or the JSON list config.json records. Layers:
    /// conv2d, maxpool2d, avgpool2d, flatten, linear, logistic, relu, tanh, heaviside;
    /// PyTorch's defaults (stride 1, padding 0, bias true); the last layer must give as
    /// many outputs as the data has classes (10 for the IDX data sets) or real targets.
    #[arg(long, value_name = "LAYERS", value_parser = parse_net)]
    pub net: Option<NetLayers>,
    /// EnKF update rule: sequential (the authors'), batch (all 10·B outputs at once) or
    /// transform (ETKI: the batch rule's mean, anomalies by the symmetric square root of
    /// the transform) [default: sequential].
    #[arg(long, value_enum)]
    pub update: Option<UpdateRule>,
    /// EnKF observations: exact (every member sees the targets y: the authors'
    /// deterministic update) or perturbed (the stochastic EnKF: member j sees y + η_j,
    /// η_j ~ N(0, γI), drawn from the seed at every update) [default: exact].
    #[arg(long, value_enum)]
    pub observations: Option<crate::train::config::Observations>,
    /// Multiplicative inflation λ ≥ 1: before every update each member moves to
    /// mean + λ·(member − mean), against the collapse of the ensemble's spread
    /// [default: 1, none].
    #[arg(long, value_name = "LAMBDA")]
    pub inflation: Option<f64>,
    /// Additive inflation s ≥ 0: before every update each weight of each member gets
    /// Gaussian noise of standard deviation s times the scale of --additive-from (drawn on
    /// the device by a counter-based generator from the seed and the iteration)
    /// [default: 0, none].
    #[arg(long, value_name = "S")]
    pub additive_inflation: Option<f64>,
    /// The scale of additive inflation: prior (σ, the initial ensemble's standard
    /// deviation) or spread (each weight's current spread over the ensemble)
    /// [default: prior].
    #[arg(long, value_enum)]
    pub additive_from: Option<crate::train::config::NoiseScale>,
    /// How --inflation and --additive-inflation follow the updates t = 0, 1, …: constant,
    /// linear (factor max(0, 1 − t/N) on λ − 1 and on s), exponential (factor
    /// exp(−t/N)) or delayed (none before update N, full from N on), N =
    /// --inflation-horizon [default: constant].
    #[arg(long, value_enum)]
    pub inflation_schedule: Option<crate::train::config::InflationSchedule>,
    /// The horizon N of --inflation-schedule linear|exponential|delayed, in updates.
    #[arg(long, value_name = "N")]
    pub inflation_horizon: Option<usize>,
    /// Tikhonov-regularised EKI with strength λ ≥ 0: the prior N(0, σ²/λ · I) joins the
    /// data as P extra observations, solved in member space (J × J); needs --update batch
    /// [default: 0, none].
    #[arg(long, value_name = "LAMBDA")]
    pub tikhonov: Option<f64>,
    /// Step control: fixed (Γ/Δt with --dt every update) or dmc (the data-misfit
    /// controller of Iglesias and Yang 2021, per mini-batch: Δt from the ensemble's
    /// misfits until the algorithm time reaches 1; later repetitions of the batch do not
    /// update) [default: fixed]. Δt is a column of metrics.csv.
    #[arg(long, value_enum)]
    pub step: Option<crate::train::config::StepControl>,
    /// The fixed step Δt > 0 of --step fixed: the noise Γ becomes Γ/Δt [default: 1, the
    /// authors'].
    #[arg(long, value_name = "DT")]
    pub dt: Option<f64>,
    /// Momentum on the members after each update: none or nesterov (Nesterov-accelerated
    /// EKI, EnsembleKalmanProcesses' default accelerator) [default: none].
    #[arg(long, value_enum)]
    pub accelerator: Option<crate::train::config::Accelerator>,
    /// Association of the update's last product U += X (AᵀU)/J: `params` (through the
    /// m × P matrix AᵀU), `members` (through the J × J matrix I + XAᵀ/J, formed in f64),
    /// or `auto`, the cheaper by flop count for each mini-batch size (members whenever
    /// J ≤ m, the outputs per batch). The same update in exact arithmetic, and both
    /// round relative to bounded factors (the gain hands the apply whitened ones: README
    /// "How the update works"), so the choice is one of cost. Not with --tikhonov (its
    /// own member-space apply); `members` not on ranks [default: auto].
    #[arg(long, value_enum)]
    pub apply_order: Option<crate::enkf::ApplyOrder>,
    /// Seed of every random stream (initial ensemble, shuffling) [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Folder with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
    /// t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]
    /// [default: $ENKF_DATA_DIR/mnist, else data/mnist].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// A NumPy data set instead of --data: a folder holding train_x.npy, train_y.npy,
    /// test_x.npy, test_y.npy, or those four files comma-separated. X: N×C×H×W or N×H×W
    /// (images) or N×F (vectors), uint8 (scaled to [0, 1]) or float32. Y: integer class
    /// labels (shape N; classes = largest label + 1) or float32 real targets (N×k or N:
    /// regression, scored by the test mean squared error, which the test_error and
    /// test_loss columns then hold). Other shapes than 1×28×28 with 10 classes need --net.
    #[arg(
        long,
        value_name = "DIR|TX,TY,VX,VY",
        value_delimiter = ',',
        num_args = 1
    )]
    pub data_npy: Option<Vec<PathBuf>>,
    /// Train on the first N training images only [default: all].
    #[arg(long, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only [default: all].
    #[arg(long, value_name = "N")]
    pub test_limit: Option<usize>,
    /// Output folder for metrics.csv, config.json, mean.npy [default: none, log only]. A
    /// folder that already holds a run is refused (see --overwrite, --resume), and a folder
    /// in use by another run is refused with that run's process id.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace the run already in --out: its files (config.json, metrics.csv, stats.csv,
    /// hist.csv, adaptive.csv, mean.npy, model.safetensors, checkpoint.bin) are removed
    /// first; other files in the folder are left alone.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Draw mini-batches from a seeded permutation per epoch instead of file order.
    #[arg(long)]
    pub shuffle: bool,
    /// Where to run: cpu, cuda, or auto (CUDA when a GPU is usable) [default: auto].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Precision of the large products: fp32 (strict) or tf32 (tensor cores, CUDA)
    /// [default: fp32].
    #[arg(long, value_enum)]
    pub math: Option<MathMode>,
    /// CPU threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Start from this ensemble (.npy, J × P, float32 or float64) instead of drawing one.
    #[arg(long, value_name = "FILE.npy")]
    pub init_ensemble: Option<PathBuf>,
    /// Write the final ensemble (.npy, J × P, float32).
    #[arg(long, value_name = "FILE.npy")]
    pub save_ensemble: Option<PathBuf>,
    /// Adapt J and r during training (the paper's Algorithm 1) [default: fixed].
    #[arg(long, value_enum)]
    pub adaptation: Option<Adaptation>,
    /// Algorithm 1: compare test errors every τ iterations [default: 500].
    #[arg(long, value_name = "TAU")]
    pub adapt_every: Option<usize>,
    /// Algorithm 1: lower bound b_l of J [default: 1000].
    #[arg(long)]
    pub adapt_min_members: Option<usize>,
    /// Algorithm 1: upper bound b_u of J [default: 10000].
    #[arg(long)]
    pub adapt_max_members: Option<usize>,
    /// Algorithm 1: members added or removed per change, v [default: 1000].
    #[arg(long)]
    pub adapt_step: Option<usize>,
    /// Algorithm 1: improvement threshold κ in percentage points [default: 1].
    #[arg(long)]
    pub adapt_kappa: Option<f64>,
    /// Algorithm 1: adapt only below this test error ε in percent [default: 10].
    #[arg(long)]
    pub adapt_epsilon: Option<f64>,
    /// Algorithm 1's decision rule: `algorithm` (as printed: below ε a gain of at most κ
    /// lowers J and r, a larger one raises both) or `authors` (the authors' published
    /// driver: any gain lowers r, and J too when it is at most κ; a loss raises r, and J
    /// too when it exceeds κ; the rule behind Fig. 10) [default: algorithm].
    #[arg(long, value_enum)]
    pub adapt_rule: Option<AdaptRule>,
    /// Members with non-finite outputs: `error` stops, `resample` redraws them from the
    /// Gaussian of the successful members [default: error].
    #[arg(long, value_enum)]
    pub on_failure: Option<FailurePolicy>,
    /// Which outputs are paired with a mini-batch's labels: `matched` (the batch's own,
    /// every iteration) or `authors` (the authors' driver: the first of the r iterations
    /// on a new batch uses the previous batch's outputs; file order only) [default:
    /// matched].
    #[arg(long, value_enum)]
    pub pairing: Option<LabelPairing>,
    /// Training method: enkf (the default), or sgd / adam by backpropagation (same
    /// network, data, initialisation and seed; one network, shuffled mini-batches,
    /// one step per mini-batch; runs on the CPU).
    #[arg(long, value_enum)]
    pub optimizer: Option<Optimizer>,
    /// Learning rate of sgd / adam [default: 0.1 for sgd, 1e-3 for adam].
    #[arg(long)]
    pub lr: Option<f64>,
    /// SGD momentum [default: 0.9].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Activation statistics (and, for sgd/adam, gradient statistics) every N
    /// iterations into stats.csv, when --out is given [default: 1].
    #[arg(long, value_name = "N")]
    pub stats_every: Option<usize>,
    /// Histograms of activations (and gradients) every N iterations into hist.csv [default: 200].
    #[arg(long, value_name = "N")]
    pub hist_every: Option<usize>,
    /// Continue the run whose output folder (with checkpoint.bin) is DIR; its settings are
    /// the base. Flags may extend the run (--iterations, --epochs beyond what is done) or
    /// change evaluation and logging (--eval, --eval-every, --stats-every, --hist-every,
    /// --checkpoint-every), --threads, --backend, --math, --apply-order and
    /// --save-ensemble; any other setting that differs from the checkpoint's is an error
    /// naming both values.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Write OUT/checkpoint.bin every N iterations and at the end of the run (also on
    /// Ctrl-C or SIGTERM), so that a finished run can be continued with --resume.
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
}

impl TrainArgs {
    /// The settings given on the command line.
    pub fn to_partial(&self) -> PartialConfig {
        PartialConfig {
            members: self.members,
            gamma: self.gamma,
            sigma: self.sigma,
            batch: self.batch,
            repetitions: self.repetitions,
            epochs: self.epochs,
            iterations: self.iterations,
            eval_every: self.eval_every,
            eval: self.eval.clone(),
            activation: self.activation,
            arch: self.arch,
            net: self.net.clone(),
            bias_init: self.bias_init,
            update: self.update,
            observations: self.observations,
            inflation: self.inflation,
            additive_inflation: self.additive_inflation,
            additive_from: self.additive_from,
            inflation_schedule: self.inflation_schedule,
            inflation_horizon: self.inflation_horizon,
            tikhonov: self.tikhonov,
            step: self.step,
            dt: self.dt,
            accelerator: self.accelerator,
            apply_order: self.apply_order,
            seed: self.seed,
            data: self.data.clone(),
            data_npy: self.data_npy.clone(),
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            out: self.out.clone(),
            order: self.shuffle.then_some(BatchOrder::Shuffle),
            backend: self.backend,
            math: self.math,
            threads: self.threads,
            init_ensemble: self.init_ensemble.clone(),
            save_ensemble: self.save_ensemble.clone(),
            adaptation: self.adaptation,
            adapt_every: self.adapt_every,
            adapt_min_members: self.adapt_min_members,
            adapt_max_members: self.adapt_max_members,
            adapt_step: self.adapt_step,
            adapt_kappa: self.adapt_kappa,
            adapt_epsilon: self.adapt_epsilon,
            adapt_rule: self.adapt_rule,
            on_failure: self.on_failure,
            pairing: self.pairing,
            checkpoint_every: self.checkpoint_every,
            optimizer: self.optimizer,
            lr: self.lr,
            momentum: self.momentum,
            stats_every: self.stats_every,
            hist_every: self.hist_every,
        }
    }
}

/// Flags of `enkf-dnn bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Where to run [default: auto].
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// Ensemble sizes to time, comma-separated.
    #[arg(long, short = 'J', value_delimiter = ',', default_value = "250,1000")]
    pub members: Vec<usize>,
    /// Update rule to time.
    #[arg(long, value_enum, default_value = "sequential")]
    pub update: UpdateRule,
    /// Architecture [default: paper].
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Activation [default: logistic].
    #[arg(long, value_enum)]
    pub activation: Option<Activation>,
    /// A layer-spec network (as `train --net`) instead of --arch/--activation: timed on
    /// the CPU's generic per-layer path, with a table of each layer's time and GFLOP/s.
    #[arg(long, value_parser = parse_net, value_name = "LAYERS")]
    pub net: Option<NetLayers>,
    /// Precision of the large products.
    #[arg(long, value_enum, default_value = "fp32")]
    pub math: MathMode,
    /// Timed iterations per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Untimed warm-up iterations per size.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// CPU threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data folder (a real mini-batch and test set are timed) [default: data/mnist].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Also write the table as CSV here.
    #[arg(long, value_name = "FILE.csv")]
    pub csv: Option<PathBuf>,
    /// Time only the update with the ensemble sharded over MPI ranks (run under `mpirun
    /// -np N`; needs a build with `--features mpi`): each -J is split over the ranks,
    /// rank 0 prints the median update time and the bytes each rank exchanges.
    #[arg(long)]
    pub sharded: bool,
}

impl BenchArgs {
    /// The network these flags describe. Errors: [`crate::Error::Config`] when `--net`
    /// is given with `--arch` or `--activation`, or with `--backend cuda`.
    pub fn net(&self) -> crate::Result<crate::model::Net> {
        match &self.net {
            Some(n) => {
                if self.arch.is_some() || self.activation.is_some() {
                    return Err(crate::Error::Config(
                        "bench: --net replaces --arch and --activation; give one or the other"
                            .into(),
                    ));
                }
                let n = n.build(crate::model::spec::IDX_INPUT, crate::model::CLASSES)?;
                Ok(crate::model::Net::from_spec(n.0.clone()))
            }
            None => Ok(crate::model::Net::new(
                self.arch.unwrap_or_default(),
                self.activation.unwrap_or_default(),
            )),
        }
    }
}

/// clap's parser of `--net`.
fn parse_net(text: &str) -> std::result::Result<NetLayers, String> {
    NetLayers::parse(text).map_err(|e| e.to_string())
}
