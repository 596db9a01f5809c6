//! `enkf-dnn reproduce <experiment>`: the paper's figures, one command each.
//!
//! Every experiment writes into `OUT/<experiment>/`:
//! - `<run>/seed-<s>/metrics.csv` (one row per iteration, the columns of
//!   [`MetricsRow`]), `config.json`, and for EnKF runs `model.safetensors` (the mean
//!   network) and, when adaptive, `adaptive.csv` (Algorithm 1's decisions) — or, for the statistics figures, `stats.csv` and `hist.csv`;
//! - `summary.csv`: per run and evaluated iteration the test error's mean and
//!   standard deviation over seeds (population std, as NumPy's default);
//! - `plot.json` (what to draw) and the charts as PNG and SVG ([`plot_dir`] redraws
//!   them from the CSVs);
//! - `table.md`: our numbers beside the paper's.
//!
//! Sizes: the default is the paper's (J = 5000, all 60,000 / 10,000 images, one epoch);
//! `--quick` scales every experiment down so that `reproduce all --quick` runs in
//! minutes on a laptop CPU; `tiny` (tests only) is smaller still. [`Scale`] holds the
//! numbers.

mod curves;
pub mod done;
mod files;
mod plans;
mod render;
mod stats_figs;

use crate::app::{dispatch, resolve_backend, BackendJob};
use crate::backend::{Backend, BackendKind, MathMode};
use crate::data::DataSplit;
use crate::train::gradient::{train_gradient, GradConfig};
use crate::train::stats::StatsWriter;
use crate::train::{MetricsRow, Observer, TrainConfig, Trainer};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

pub(crate) use done::{enkf_record, finished_rows, grad_record, mark_finished};

pub use render::plot_dir;

/// The paper's experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Experiment {
    /// Fig. 1: SGD vs Adam vs EnKF, one epoch, σ = 1, mean ± std over seeds.
    Fig1,
    /// Fig. 3: SGD, one epoch: activation mean ± std per layer, gradient histograms.
    Fig3,
    /// Fig. 4: as Fig. 3 over 50 epochs.
    Fig4,
    /// Fig. 5: Adam over 50 epochs for σ ∈ {0.1, 1, 3, 10}.
    Fig5,
    /// Fig. 6: Adam, one epoch: activation mean ± std per layer, gradient histograms.
    Fig6,
    /// Fig. 7: as Fig. 6 over 50 epochs, at σ = 3 (the σ whose slow learning Fig. 7 shows).
    Fig7,
    /// Fig. 8 (left): EnKF with logistic, ReLU and tanh activations.
    Fig8Activations,
    /// Fig. 8 (right): EnKF for several ensemble sizes J.
    Fig8Members,
    /// Fig. 9: the letters experiment (Fashion-MNIST here unless a notMNIST folder is given).
    Fig9,
    /// Fig. 10: fixed vs adaptive ensemble (Algorithm 1).
    Fig10,
    /// Beyond the paper: a 6-layer logistic MLP and a heaviside network (no useful
    /// gradient), SGD and Adam against the EnKF at a CPU-sized J (layer-spec networks).
    Deep,
    /// Beyond the paper: the EKI variants against the authors' update (inflations,
    /// the transform update), the paper's network and one epoch (issue 13).
    Methods,
    /// Every experiment above, in that order.
    All,
}

impl Experiment {
    /// The experiments `All` runs, in order.
    pub const EVERY: [Experiment; 12] = [
        Experiment::Fig1,
        Experiment::Fig5,
        Experiment::Fig8Activations,
        Experiment::Fig8Members,
        Experiment::Fig9,
        Experiment::Fig10,
        Experiment::Deep,
        Experiment::Methods,
        Experiment::Fig3,
        Experiment::Fig6,
        Experiment::Fig4,
        Experiment::Fig7,
    ];

    /// Folder name and CLI name, e.g. `fig8-members`.
    pub fn name(self) -> &'static str {
        match self {
            Experiment::Fig1 => "fig1",
            Experiment::Fig3 => "fig3",
            Experiment::Fig4 => "fig4",
            Experiment::Fig5 => "fig5",
            Experiment::Fig6 => "fig6",
            Experiment::Fig7 => "fig7",
            Experiment::Fig8Activations => "fig8-activations",
            Experiment::Fig8Members => "fig8-members",
            Experiment::Fig9 => "fig9",
            Experiment::Fig10 => "fig10",
            Experiment::Deep => "deep",
            Experiment::Methods => "methods",
            Experiment::All => "all",
        }
    }
}

/// Settings of a reproduction.
#[derive(Debug, Clone, PartialEq)]
pub struct ReproduceOptions {
    /// Output root; experiment `e` writes into `out/e`.
    pub out: PathBuf,
    /// Seeds per curve (0, 1, …, seeds − 1). The paper's Fig. 1 uses 10.
    pub seeds: usize,
    /// Seeds of the statistics figures (fig3, fig4, fig6, fig7): each seed is one run
    /// with its own statistics, charts and table rows. The paper shows one run; `--seeds`
    /// sets it when given.
    pub stats_seeds: usize,
    /// Scale every experiment down (see [`Scale::quick`]).
    pub quick: bool,
    /// Smaller still, for tests (see [`Scale::tiny`]); overrides `quick`.
    pub tiny: bool,
    /// Where EnKF runs execute (gradient runs are CPU).
    pub backend: BackendKind,
    /// Precision of the large EnKF products.
    pub math: MathMode,
    /// Folder holding `mnist/` and `fashion-mnist/`.
    pub data_root: PathBuf,
    /// A notMNIST folder (A … J of 28 × 28 PNGs) for Fig. 9 instead of Fashion-MNIST.
    pub letters: Option<PathBuf>,
    /// Ensemble size J of every EnKF run except the sweep of Fig. 8 (right).
    pub members: Option<usize>,
    /// CPU threads (the global pool, set once).
    pub threads: Option<usize>,
    /// Train only these curves (run folder names such as `J5000`, `sgd`, `adaptive`);
    /// the others are taken from their finished run folders when present. Empty: all.
    pub only: Vec<String>,
    /// Fig. 10's ε (percent) instead of the scale's (the paper's 10 %); fig10 only.
    pub adapt_epsilon: Option<f64>,
}

impl Default for ReproduceOptions {
    fn default() -> Self {
        ReproduceOptions {
            out: PathBuf::from("runs/reproduce"),
            seeds: 2,
            stats_seeds: 1,
            quick: true,
            tiny: false,
            backend: BackendKind::Auto,
            math: MathMode::Fp32,
            data_root: crate::data::data_root(),
            letters: None,
            members: None,
            threads: None,
            only: Vec::new(),
            adapt_epsilon: None,
        }
    }
}

/// Flags of `enkf-dnn reproduce`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReproduceArgs {
    /// Which figure to reproduce (`all` runs every one).
    #[arg(value_enum)]
    pub experiment: Experiment,
    /// Output root; each experiment writes into OUT/<experiment>.
    #[arg(
        long,
        short = 'o',
        value_name = "DIR",
        default_value = "runs/reproduce"
    )]
    pub out: PathBuf,
    /// Seeds per curve [default: 10 (the paper's Fig. 1), 2 with --quick]; for the
    /// statistics figures (fig3, fig4, fig6, fig7) the number of runs [default: 1].
    #[arg(long, value_name = "N")]
    pub seeds: Option<usize>,
    /// Scale every run down so that `reproduce all --quick` takes minutes on a CPU.
    #[arg(long)]
    pub quick: bool,
    /// Smaller than --quick (smoke tests only).
    #[arg(long, hide = true)]
    pub tiny: bool,
    /// Where EnKF runs execute: cpu, cuda, or auto [default: auto].
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// Precision of the large EnKF products.
    #[arg(long, value_enum, default_value = "fp32")]
    pub math: MathMode,
    /// Folder holding mnist/ and fashion-mnist/ [default: $ENKF_DATA_DIR, else data].
    #[arg(long, value_name = "DIR")]
    pub data_root: Option<PathBuf>,
    /// A notMNIST folder (A … J of 28×28 PNG files) for fig9 instead of Fashion-MNIST.
    #[arg(long, value_name = "DIR")]
    pub letters: Option<PathBuf>,
    /// Ensemble size J of the EnKF runs (not the J sweep of fig8-members)
    /// [default: 5000, 100 with --quick]. Fig. 10's bounds b_l, b_u and step v scale with
    /// it (the paper's 1000 / 10,000 / 1000 at J = 5000 become 200 / 2000 / 200 at
    /// J = 1000).
    #[arg(long, short = 'J')]
    pub members: Option<usize>,
    /// CPU threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run only these curves of the experiment, comma-separated run names (e.g.
    /// `--only J5000`, `--only logistic,relu`, `--only adaptive`): a slice that fits a
    /// time budget. The summary, chart and table cover every curve whose runs are
    /// finished (a finished run is never run again: its folder holds `done.json`), and
    /// list the curves still to run.
    #[arg(long, value_delimiter = ',', value_name = "RUN")]
    pub only: Vec<String>,
    /// fig10 only: Algorithm 1's ε in percent (adapt only below this test error)
    /// [default: the paper's 10, 100 with --quick]. A smaller J levels off higher (J =
    /// 1000: 10.89 % after one epoch), so at the J a CPU allows the paper's 10 % would
    /// never let the rule act; e.g. `-J 1000 --adapt-epsilon 20` puts the first decision
    /// at iteration 500 as in the paper.
    #[arg(long, value_name = "PERCENT")]
    pub adapt_epsilon: Option<f64>,
}

impl ReproduceArgs {
    /// The options these flags describe.
    pub fn to_options(&self) -> ReproduceOptions {
        let small = self.quick || self.tiny;
        ReproduceOptions {
            out: self.out.clone(),
            seeds: self.seeds.unwrap_or(if small { 2 } else { 10 }),
            stats_seeds: self.seeds.unwrap_or(1),
            quick: self.quick,
            tiny: self.tiny,
            backend: self.backend,
            math: self.math,
            data_root: self
                .data_root
                .clone()
                .unwrap_or_else(crate::data::data_root),
            letters: self.letters.clone(),
            members: self.members,
            threads: self.threads,
            only: self.only.clone(),
            adapt_epsilon: self.adapt_epsilon,
        }
    }
}

/// Flags of `enkf-dnn plot`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// An experiment folder (holding plot.json) or a reproduce root holding several.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// The sizes of one reproduction level (paper, quick, tiny).
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    /// Words for tables: "paper size", "quick", "tiny".
    pub name: &'static str,
    /// Ensemble size J of EnKF runs.
    pub members: usize,
    /// The J sweep of Fig. 8 (right).
    pub member_sweep: Vec<usize>,
    /// Training images used (None = all).
    pub train_limit: Option<usize>,
    /// Test images used (None = all).
    pub test_limit: Option<usize>,
    /// EnKF iterations (None = one epoch, ⌈N/B⌉·r).
    pub enkf_iterations: Option<usize>,
    /// EnKF test-evaluation interval.
    pub enkf_eval_every: usize,
    /// Gradient-run test-evaluation interval (also at each epoch end).
    pub grad_eval_every: usize,
    /// Epochs of Fig. 5.
    pub fig5_epochs: usize,
    /// Epochs of Figs. 4 and 7 (the paper: 50).
    pub long_epochs: usize,
    /// Histogram interval of the statistics runs.
    pub hist_every: usize,
    /// Algorithm 1 for Fig. 10: (τ, b_l, b_u, v, ε %).
    pub adapt: (usize, usize, usize, usize, f64),
    /// `deep`: the EnKF's J (`-J` overrides) and iterations; layer-spec networks run on
    /// the CPU, so J is a CPU size.
    pub deep_enkf: (usize, usize),
}

impl Scale {
    /// The paper's sizes: J = 5000, all images, one epoch (7504 EnKF iterations).
    pub fn paper() -> Scale {
        Scale {
            name: "paper size",
            members: 5000,
            member_sweep: vec![500, 1000, 5000, 10_000],
            train_limit: None,
            test_limit: None,
            enkf_iterations: None,
            enkf_eval_every: 500,
            grad_eval_every: 100,
            fig5_epochs: 50,
            long_epochs: 50,
            hist_every: 200,
            adapt: (500, 1000, 10_000, 1000, 10.0),
            deep_enkf: (500, 1500),
        }
    }

    /// `--quick`: J = 100, 2000 training and 1000 test images, 100 EnKF iterations,
    /// gradient runs of 1 epoch (Fig. 5: 3 epochs; Figs. 4, 7: 3 epochs). Algorithm 1 at
    /// this size uses τ = 25, b_l = 50, b_u = 200, v = 50 and ε = 100 % (so that the
    /// rule can fire at all in 100 iterations; the paper's ε is 10 %).
    pub fn quick() -> Scale {
        Scale {
            name: "quick",
            members: 100,
            member_sweep: vec![25, 50, 100],
            train_limit: Some(2000),
            test_limit: Some(1000),
            enkf_iterations: Some(100),
            enkf_eval_every: 20,
            grad_eval_every: 8,
            fig5_epochs: 3,
            long_epochs: 3,
            hist_every: 16,
            adapt: (25, 50, 200, 50, 100.0),
            deep_enkf: (100, 100),
        }
    }

    /// Tests only: J = 6, 128 / 64 images, 4 EnKF iterations, 1-epoch gradient runs.
    pub fn tiny() -> Scale {
        Scale {
            name: "tiny",
            members: 6,
            member_sweep: vec![4, 8],
            train_limit: Some(128),
            test_limit: Some(64),
            enkf_iterations: Some(4),
            enkf_eval_every: 2,
            grad_eval_every: 1,
            fig5_epochs: 1,
            long_epochs: 2,
            hist_every: 1,
            adapt: (2, 4, 8, 2, 100.0),
            deep_enkf: (6, 4),
        }
    }

    /// Algorithm 1's settings for Fig. 10 when the runs start from `members`: τ and ε as
    /// in [`Scale::adapt`]; b_l, b_u and v scaled by `members / self.members`, so that
    /// `-J 1000` runs the paper's rule one fifth as large (b_l 200, b_u 2000, v 200)
    /// instead of letting a J = 1000 ensemble grow to the paper's b_u = 10,000. Rounded
    /// to the nearest member, then b_l ≥ 2, v ≥ 1, b_l ≤ members ≤ b_u.
    pub fn fig10_adapt(&self, members: usize) -> (usize, usize, usize, usize, f64) {
        let (tau, lo, hi, v, eps) = self.adapt;
        let scaled = |x: usize| {
            // Exact for every J a machine holds (J ≤ 2^53).
            ((x as f64) * (members as f64) / (self.members as f64)).round() as usize
        };
        let lo = scaled(lo).max(2).min(members.max(2));
        let hi = scaled(hi).max(members).max(lo);
        (tau, lo, hi, scaled(v).max(1), eps)
    }

    /// The scale of `opts` (tiny over quick over paper).
    pub fn of(opts: &ReproduceOptions) -> Scale {
        let mut scale = if opts.tiny {
            Scale::tiny()
        } else if opts.quick {
            Scale::quick()
        } else {
            Scale::paper()
        };
        if let Some(eps) = opts.adapt_epsilon {
            scale.adapt.4 = eps;
        }
        scale
    }
}

/// Runs experiment `exp` (every one for [`Experiment::All`]) with `opts`.
///
/// Errors: [`Error::Config`] for zero seeds or a missing data set (for `All`, a missing
/// Fashion-MNIST only skips Fig. 9 with a note in its `table.md`), and whatever a run,
/// a CSV or a chart returns.
pub fn run(exp: Experiment, opts: &ReproduceOptions) -> Result<()> {
    // SIGINT, SIGTERM, SIGUSR1: the EnKF run in progress checkpoints and the command
    // stops; the same command later continues it.
    crate::signals::install();
    if opts.seeds == 0 || opts.stats_seeds == 0 {
        return Err(Error::Config("seeds must be at least 1".into()));
    }
    if !opts.only.is_empty()
        && matches!(
            exp,
            Experiment::All
                | Experiment::Fig3
                | Experiment::Fig4
                | Experiment::Fig6
                | Experiment::Fig7
        )
    {
        return Err(Error::Config(format!(
            "--only selects curves of one test-error experiment (fig1, fig5, fig8-activations, \
             fig8-members, fig9, fig10, deep, methods; e.g. `reproduce fig8-members --only J5000`), not {}",
            exp.name()
        )));
    }
    if let Some(eps) = opts.adapt_epsilon {
        if exp != Experiment::Fig10 {
            return Err(Error::Config(format!(
                "--adapt-epsilon {eps} sets Fig. 10's ε: give it with `reproduce fig10`, not {}",
                exp.name()
            )));
        }
        if !(eps.is_finite() && eps > 0.0 && eps <= 100.0) {
            return Err(Error::Config(format!(
                "--adapt-epsilon must be a test error in percent, 0 < ε ≤ 100, got {eps}"
            )));
        }
    }
    // Every setting every run will use, and the output folder, before the first run: a
    // bad -J or --threads must not surface after the SGD and Adam runs.
    let exps: Vec<Experiment> = if exp == Experiment::All {
        Experiment::EVERY.to_vec()
    } else {
        vec![exp]
    };
    for &e in &exps {
        let ctx = Ctx {
            opts,
            scale: Scale::of(opts),
            dir: opts.out.join(e.name()),
        };
        ctx.enkf_config()
            .validate()
            .map_err(|err| Error::Config(format!("reproduce {}: {err}", e.name())))?;
        plans::check(&ctx, e)?;
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    crate::run_dir::check_dir_writable(&opts.out)?;
    crate::app::set_threads(opts.threads);
    if exp == Experiment::All {
        for e in Experiment::EVERY {
            run_one(e, opts, true)?;
        }
        return Ok(());
    }
    run_one(exp, opts, false)
}

fn run_one(exp: Experiment, opts: &ReproduceOptions, in_all: bool) -> Result<()> {
    let dir = opts.out.join(exp.name());
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    eprintln!("reproduce {}: writing {}", exp.name(), dir.display());
    let ctx = Ctx {
        opts,
        scale: Scale::of(opts),
        dir,
    };
    match exp {
        Experiment::Fig3 => stats_figs::run(&ctx, crate::train::optim::Optimizer::Sgd, false, "3"),
        Experiment::Fig4 => stats_figs::run(&ctx, crate::train::optim::Optimizer::Sgd, true, "4"),
        Experiment::Fig6 => stats_figs::run(&ctx, crate::train::optim::Optimizer::Adam, false, "6"),
        Experiment::Fig7 => stats_figs::run(&ctx, crate::train::optim::Optimizer::Adam, true, "7"),
        Experiment::All => Ok(()),
        curve => curves::run(&ctx, curve, in_all),
    }
}

/// What every experiment needs: options, sizes, its folder.
pub(crate) struct Ctx<'a> {
    pub opts: &'a ReproduceOptions,
    pub scale: Scale,
    pub dir: PathBuf,
}

impl Ctx<'_> {
    /// The EnKF configuration of this scale (J, limits, iterations), σ = 1, logistic.
    pub fn enkf_config(&self) -> TrainConfig {
        let s = &self.scale;
        TrainConfig {
            members: self.opts.members.unwrap_or(s.members),
            iterations: s.enkf_iterations,
            eval_every: s.enkf_eval_every,
            train_limit: s.train_limit,
            test_limit: s.test_limit,
            backend: self.opts.backend,
            math: self.opts.math,
            threads: self.opts.threads,
            data: self.opts.data_root.join("mnist"),
            ..TrainConfig::default()
        }
    }

    /// The EnKF configuration of `deep` for the layer-spec network `net` (short form):
    /// J and iterations of [`Scale::deep_enkf`] (`-J` overrides J), the CPU backend
    /// unless `--backend` asked for another (CUDA has no kernels for specs: an error).
    /// Errors: [`Error::Config`] when `net` does not parse (not expected).
    pub fn deep_config(&self, net: &str) -> Result<TrainConfig> {
        let (members, iterations) = self.scale.deep_enkf;
        let base = self.enkf_config();
        Ok(TrainConfig {
            members: self.opts.members.unwrap_or(members),
            iterations: Some(iterations),
            eval_every: (iterations / 10).max(1),
            net: Some(crate::model::spec::NetSetting::parse(net)?),
            backend: match self.opts.backend {
                BackendKind::Auto => BackendKind::Cpu,
                other => other,
            },
            ..base
        })
    }

    /// Loads the folder of `cfg.data` (IDX files) with this scale's limits, reading
    /// only the images used.
    pub fn load_idx(&self, dir: &Path) -> Result<DataSplit> {
        Ok(crate::data::load_dir_limited(
            dir,
            self.scale.train_limit,
            self.scale.test_limit,
        )?)
    }

    /// Applies this scale's train/test limits.
    pub fn limit(&self, data: &mut DataSplit) {
        if let Some(n) = self.scale.train_limit {
            data.train = data.train.subset(n);
        }
        if let Some(n) = self.scale.test_limit {
            data.test = data.test.subset(n);
        }
    }

    /// The backend EnKF runs use, in words (for tables).
    pub fn backend_words(&self) -> String {
        match resolve_backend(self.opts.backend) {
            Ok((BackendKind::Cuda, desc)) => desc,
            Ok(_) => format!("CPU, {} threads", rayon::current_num_threads()),
            Err(e) => e.to_string(),
        }
    }
}

/// Writes each row to `metrics.csv` in a run folder.
pub(crate) struct CsvObserver {
    w: csv::Writer<std::fs::File>,
    path: PathBuf,
}

impl CsvObserver {
    /// Creates `dir/metrics.csv` (and `dir`).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join("metrics.csv");
        let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(CsvObserver {
            w: csv::Writer::from_writer(f),
            path,
        })
    }

    /// Flushes the file.
    pub fn finish(&mut self) -> Result<()> {
        self.w.flush().map_err(|e| Error::io(&self.path, e))
    }
}

impl Observer for CsvObserver {
    fn on_row(&mut self, row: &MetricsRow, _total: usize) -> Result<()> {
        self.w.serialize(row)?;
        Ok(())
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

struct EnkfJob<'a> {
    cfg: &'a TrainConfig,
    data: &'a DataSplit,
    dir: &'a Path,
}

impl BackendJob for EnkfJob<'_> {
    type Output = Vec<MetricsRow>;
    fn run<B: Backend>(self, backend: &B, _desc: &str) -> Result<Vec<MetricsRow>> {
        // A run stopped by a signal left a checkpoint: continue it (the configuration
        // must match, `Trainer::resume` checks), rewriting its first rows.
        let ckpt = crate::train::checkpoint::path_in(self.dir);
        let mut trainer = if ckpt.exists() {
            let t = Trainer::resume(backend, self.cfg, self.data, &ckpt)?;
            eprintln!(
                "  {}: resuming from its checkpoint at iteration {}",
                self.dir.display(),
                t.iteration()
            );
            t
        } else {
            Trainer::new(backend, self.cfg, self.data)?
        };
        let mut obs = CsvObserver::create(self.dir)?;
        for row in trainer.rows() {
            obs.on_row(row, 0)?;
        }
        let rows = trainer.run(&mut obs).map_err(|e| match e {
            Error::Interrupted {
                iteration,
                signal,
                exit_code,
                ..
            } => Error::Interrupted {
                iteration,
                signal,
                exit_code,
                resume: format!(
                    "a checkpoint was written in {}; run the same `enkf-dnn reproduce` \
                     command again to continue it (finished runs are reused)",
                    self.dir.display()
                ),
            },
            e => e,
        });
        obs.finish()?;
        let rows = rows?;
        if self.cfg.adaptation == crate::train::config::Adaptation::Adaptive {
            let path = self.dir.join("adaptive.csv");
            let mut w = csv::Writer::from_path(&path)?;
            for r in trainer.adaptive_log() {
                w.serialize(r)?;
            }
            w.flush().map_err(|e| Error::io(&path, e))?;
        }
        let mean = trainer.mean_host()?;
        crate::io::safetensors::write_net(
            &self.dir.join("model.safetensors"),
            &self.cfg.net(),
            &mean,
        )?;
        Ok(rows)
    }
}

/// One EnKF run on `data` into `dir` (metrics.csv, config.json, model.safetensors).
pub(crate) fn run_enkf(cfg: &TrainConfig, data: &DataSplit, dir: &Path) -> Result<Vec<MetricsRow>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut cfg = cfg.clone();
    cfg.out = Some(dir.to_path_buf());
    write_json(&dir.join("config.json"), &cfg)?;
    let job = EnkfJob {
        cfg: &cfg,
        data,
        dir,
    };
    let (rows, _) = dispatch(cfg.backend, cfg.math, job)?;
    Ok(rows)
}

/// One gradient run on `data` into `dir` (metrics.csv, config.json, and with `stats`
/// also stats.csv and hist.csv every `hist_every` iterations).
pub(crate) fn run_grad(
    cfg: &GradConfig,
    data: &DataSplit,
    dir: &Path,
    stats: Option<usize>,
) -> Result<Vec<MetricsRow>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_json(&dir.join("config.json"), &grad_record(cfg, data))?;
    let mut obs = CsvObserver::create(dir)?;
    let rows = match stats {
        Some(every) => {
            let mut w = StatsWriter::create(dir, every)?;
            train_gradient(cfg, data, &mut obs, Some(&mut w))?
        }
        None => train_gradient(cfg, data, &mut obs, None)?,
    };
    obs.finish()?;
    Ok(rows)
}
