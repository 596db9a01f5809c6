//! What each test-error experiment runs: its curves (folder name, legend, the paper's
//! number, the configuration) and the check of every configuration before the first run.

use super::{Ctx, Experiment};
use crate::model::Activation;
use crate::train::config::{AdaptRule, Adaptation};
use crate::train::gradient::GradConfig;
use crate::train::optim::Optimizer;
use crate::train::TrainConfig;
use crate::{Error, Result};

/// How one curve is trained.
pub(super) enum Kind {
    Enkf(Box<TrainConfig>),
    Grad(Box<GradConfig>),
}

/// One curve of a figure.
pub(super) struct RunDef {
    /// Folder name.
    pub name: String,
    /// Legend text.
    pub label: String,
    /// The paper's number or a pointer to its figure.
    pub paper: String,
    pub kind: Kind,
}

/// The curves of one experiment and its chart's title and x axis.
pub(super) struct Plan {
    pub title: String,
    /// `epoch` or `iteration`.
    pub x: &'static str,
    pub runs: Vec<RunDef>,
}

/// Checks, before any run or folder, what experiment `exp` will run: every `--only`
/// name is one of its curves, and every curve's configuration is valid.
///
/// Errors: [`Error::Config`] naming the experiment, the run and the setting.
pub(crate) fn check(ctx: &Ctx, exp: Experiment) -> Result<()> {
    let Some(plan) = plan(ctx, exp)? else {
        return Ok(());
    };
    check_only(ctx, exp, &plan.runs)?;
    for def in &plan.runs {
        match &def.kind {
            Kind::Enkf(cfg) => cfg.validate(),
            Kind::Grad(cfg) => cfg.validate(),
        }
        .map_err(|err| {
            Error::Config(format!("reproduce {} run {}: {err}", exp.name(), def.name))
        })?;
    }
    Ok(())
}

/// Errors when an `--only` name is not one of `runs`.
pub(super) fn check_only(ctx: &Ctx, exp: Experiment, runs: &[RunDef]) -> Result<()> {
    match ctx
        .opts
        .only
        .iter()
        .find(|n| !runs.iter().any(|d| &d.name == *n))
    {
        Some(unknown) => Err(Error::Config(format!(
            "--only {unknown}: {} has the runs {}",
            exp.name(),
            runs.iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        None => Ok(()),
    }
}

fn grad(ctx: &Ctx, opt: Optimizer, sigma: f64, epochs: usize) -> GradConfig {
    GradConfig {
        epochs,
        eval_every: ctx.scale.grad_eval_every,
        hist_every: ctx.scale.hist_every,
        sigma,
        ..GradConfig::new(opt)
    }
}

/// The networks of `deep` (folder prefix, short form): a 6-layer logistic MLP (five
/// hidden layers of 32) and a network whose hidden layers are heaviside steps, where
/// backpropagation reaches only the last layer.
pub(crate) const DEEP_NETS: [(&str, &str); 2] = [
    (
        "mlp6",
        "flatten linear(32) logistic linear(32) logistic linear(32) logistic linear(32) \
         logistic linear(32) logistic linear(10)",
    ),
    (
        "step",
        "flatten linear(64) heaviside linear(32) heaviside linear(10)",
    ),
];

/// The runs of `methods`: the authors' update and the EKI variants of the README's
/// small-J comparison, each on the EnKF configuration of the scale (J from
/// `-J`: 1000 is a CPU epoch).
fn method_runs(ctx: &Ctx) -> Vec<RunDef> {
    use crate::enkf::UpdateRule;
    use crate::train::{InflationSchedule, NoiseScale, Observations, StepControl};
    let base = ctx.enkf_config();
    let additive = |c: TrainConfig| TrainConfig {
        additive_inflation: 0.3,
        additive_from: NoiseScale::Spread,
        ..c
    };
    let transform = |c: TrainConfig| TrainConfig {
        update: UpdateRule::Transform,
        ..c
    };
    let runs = [
        ("authors", "the authors' update".to_string(), base.clone()),
        (
            "inflation1.05",
            "multiplicative inflation λ = 1.05".into(),
            TrainConfig {
                inflation: 1.05,
                ..base.clone()
            },
        ),
        (
            "perturbed",
            "perturbed observations (stochastic EnKF)".into(),
            TrainConfig {
                observations: Observations::Perturbed,
                ..base.clone()
            },
        ),
        (
            "dmc",
            "the data-misfit step controller".into(),
            TrainConfig {
                step: StepControl::Dmc,
                ..base.clone()
            },
        ),
        (
            "additive0.3",
            "additive inflation, 0.3 × the spread".into(),
            additive(base.clone()),
        ),
        (
            "transform",
            "the transform update (ETKI)".into(),
            transform(base.clone()),
        ),
        (
            "transform-additive0.3",
            "ETKI with additive inflation 0.3 × the spread".into(),
            additive(transform(base.clone())),
        ),
        (
            "transform-additive0.3-exp2500",
            "ETKI with additive inflation 0.3 × the spread, decaying as exp(−t/2500)".into(),
            TrainConfig {
                inflation_schedule: InflationSchedule::Exponential,
                inflation_horizon: Some(2500),
                ..additive(transform(base.clone()))
            },
        ),
    ];
    runs.into_iter()
        .map(|(name, what, cfg)| RunDef {
            name: name.into(),
            label: format!("EnKF, {what} (J = {})", cfg.members),
            paper: if name == "authors" {
                "the paper's rule: 3.8 % after one epoch at J = 5000".into()
            } else {
                "not in the paper".into()
            },
            kind: Kind::Enkf(Box::new(cfg)),
        })
        .collect()
}

/// The runs of `deep`: SGD, Adam (one epoch, σ = 1, shuffled) and the EnKF per network.
fn deep_runs(ctx: &Ctx) -> Result<Vec<RunDef>> {
    let mut runs = Vec::new();
    for (prefix, text) in DEEP_NETS {
        let cfg = ctx.deep_config(text)?;
        let net = cfg.net();
        for (opt, name) in [(Optimizer::Sgd, "sgd"), (Optimizer::Adam, "adam")] {
            let g = GradConfig {
                net: net.clone(),
                ..grad(ctx, opt, 1.0, 1)
            };
            runs.push(RunDef {
                name: format!("{prefix}-{name}"),
                label: format!("{prefix}: {}", optimizer_label(opt)),
                paper: "beyond the paper".into(),
                kind: Kind::Grad(Box::new(g)),
            });
        }
        runs.push(RunDef {
            name: format!("{prefix}-enkf"),
            label: format!(
                "{prefix}: EnKF (J = {}, r = {})",
                cfg.members, cfg.repetitions
            ),
            paper: "beyond the paper".into(),
            kind: Kind::Enkf(Box::new(cfg)),
        });
    }
    Ok(runs)
}

fn optimizer_label(opt: Optimizer) -> &'static str {
    match opt {
        Optimizer::Sgd => "SGD (lr 0.1, momentum 0.9)",
        Optimizer::Adam => "Adam (lr 1e-3)",
        Optimizer::Enkf => "EnKF",
    }
}

/// The σ values of Fig. 5: the paper names σ = 1 and σ = 3 and allows σ ∈ [0.01, 10]
/// (Sect. 2.2) without listing its sweep; we add a decade on each side.
pub(crate) const FIG5_SIGMAS: [f64; 4] = [0.1, 1.0, 3.0, 10.0];

fn comparison_runs(ctx: &Ctx, enkf_paper: &str, fig: &str) -> Vec<RunDef> {
    let cfg = ctx.enkf_config();
    let j = cfg.members;
    vec![
        RunDef {
            name: "sgd".into(),
            label: optimizer_label(Optimizer::Sgd).into(),
            paper: format!("does not learn (see paper Fig. {fig})"),
            kind: Kind::Grad(Box::new(grad(ctx, Optimizer::Sgd, 1.0, 1))),
        },
        RunDef {
            name: "adam".into(),
            label: optimizer_label(Optimizer::Adam).into(),
            paper: format!("learns slowly (see paper Fig. {fig})"),
            kind: Kind::Grad(Box::new(grad(ctx, Optimizer::Adam, 1.0, 1))),
        },
        RunDef {
            name: "enkf".into(),
            label: format!("EnKF (J = {j}, r = {})", cfg.repetitions),
            paper: enkf_paper.into(),
            kind: Kind::Enkf(Box::new(cfg)),
        },
    ]
}

/// The curves of test-error experiment `exp`; `None` for the statistics figures (3, 4,
/// 6, 7) and `all`, which have no curves.
pub(super) fn plan(ctx: &Ctx, exp: Experiment) -> Result<Option<Plan>> {
    let s = &ctx.scale;
    let (title, x, runs): (String, &'static str, Vec<RunDef>) = match exp {
        Experiment::Fig1 => (
            "Fig. 1: MNIST test error, one epoch, σ = 1".into(),
            "epoch",
            comparison_runs(
                ctx,
                "3.8 % after one epoch (J = 5000, text of Sect. 3)",
                "1",
            ),
        ),
        Experiment::Fig5 => {
            let runs = FIG5_SIGMAS
                .iter()
                .map(|&sigma| RunDef {
                    name: format!("adam-sigma{sigma}"),
                    label: format!("Adam, σ = {sigma}"),
                    paper: if sigma == 1.0 {
                        "passes 95 % accuracy (≤ 5 % error) within 10 epochs".into()
                    } else if sigma == 3.0 {
                        "like SGD in the first epochs (no learning)".into()
                    } else {
                        "in Fig. 5 (σ values not stated; Sect. 2.2 allows 0.01–10)".into()
                    },
                    kind: Kind::Grad(Box::new(grad(ctx, Optimizer::Adam, sigma, s.fig5_epochs))),
                })
                .collect();
            (
                format!("Fig. 5: Adam on MNIST over {} epochs", s.fig5_epochs),
                "epoch",
                runs,
            )
        }
        Experiment::Fig8Activations => {
            let runs = [
                (Activation::Logistic, "logistic"),
                (Activation::Relu, "relu"),
                (Activation::Tanh, "tanh"),
            ]
            .iter()
            .map(|&(act, name)| {
                let cfg = TrainConfig {
                    activation: act,
                    ..ctx.enkf_config()
                };
                RunDef {
                    name: name.into(),
                    label: format!("EnKF, {name} (J = {})", cfg.members),
                    paper: "see paper Fig. 8".into(),
                    kind: Kind::Enkf(Box::new(cfg)),
                }
            })
            .collect();
            (
                "Fig. 8: EnKF on MNIST with different activations".into(),
                "iteration",
                runs,
            )
        }
        Experiment::Fig8Members => {
            let runs = s
                .member_sweep
                .iter()
                .map(|&j| {
                    let cfg = TrainConfig {
                        members: j,
                        ..ctx.enkf_config()
                    };
                    RunDef {
                        name: format!("J{j}"),
                        label: format!("EnKF, J = {j}"),
                        paper: if j == 5000 {
                            "3.8 % after one epoch (text); curve: see paper Fig. 8".into()
                        } else {
                            "see paper Fig. 8".into()
                        },
                        kind: Kind::Enkf(Box::new(cfg)),
                    }
                })
                .collect();
            (
                "Fig. 8: EnKF on MNIST with different ensemble sizes".into(),
                "iteration",
                runs,
            )
        }
        // The data set's name joins the title once it is loaded.
        Experiment::Fig9 => (
            "Fig. 9 (letters experiment)".into(),
            "epoch",
            comparison_runs(ctx, "see paper Fig. 9 (notMNIST)", "9"),
        ),
        Experiment::Fig10 => (
            "Fig. 10: fixed vs adaptive ensemble (Algorithm 1), MNIST".into(),
            "iteration",
            fig10_runs(ctx),
        ),
        Experiment::Methods => (
            "Beyond the paper: EKI variants against the authors' update, MNIST, σ = 1".into(),
            "iteration",
            method_runs(ctx),
        ),
        Experiment::Deep => (
            "Beyond the paper: deep logistic and heaviside networks on MNIST, σ = 1".into(),
            "epoch",
            deep_runs(ctx)?,
        ),
        Experiment::Fig3
        | Experiment::Fig4
        | Experiment::Fig6
        | Experiment::Fig7
        | Experiment::All => return Ok(None),
    };
    Ok(Some(Plan { title, x, runs }))
}

/// Fig. 10: the fixed ensemble, Algorithm 1 as printed and the authors' driver's rule,
/// with the bounds of the scale for the fixed run's J.
fn fig10_runs(ctx: &Ctx) -> Vec<RunDef> {
    let fixed = ctx.enkf_config();
    let (tau, lo, hi, v, eps) = ctx.scale.fig10_adapt(fixed.members);
    let adaptive = TrainConfig {
        adaptation: Adaptation::Adaptive,
        adapt_every: tau,
        adapt_min_members: lo,
        adapt_max_members: hi,
        adapt_step: v,
        adapt_epsilon: eps,
        ..fixed.clone()
    };
    let bounds = format!(
        "from J = {} (τ = {tau}, b_l = {lo}, b_u = {hi}, v = {v}, ε = {eps} %)",
        fixed.members
    );
    let paper = "r lowered at every comparison, J from iteration 1500; neither rose";
    vec![
        RunDef {
            name: "fixed".into(),
            label: format!("fixed J = {}", fixed.members),
            paper: "the adaptive run reaches this run's accuracy".into(),
            kind: Kind::Enkf(Box::new(fixed.clone())),
        },
        RunDef {
            name: "adaptive".into(),
            label: format!("adaptive, Algorithm 1 as printed, {bounds}"),
            paper: paper.into(),
            kind: Kind::Enkf(Box::new(adaptive.clone())),
        },
        RunDef {
            name: "adaptive-authors".into(),
            label: format!("adaptive, the authors' driver's rule, {bounds}"),
            paper: paper.into(),
            kind: Kind::Enkf(Box::new(TrainConfig {
                adapt_rule: AdaptRule::Authors,
                ..adaptive
            })),
        },
    ]
}
