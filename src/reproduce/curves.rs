//! The test-error figures: 1, 5, 8 (activations, members), 9 and 10. Each runs a few
//! configurations over seeds, aggregates mean ± std of the test error per evaluated
//! iteration into `summary.csv`, draws it, and tables the final values beside the paper's.

use super::files::{self, PlotSpec, RunRef, SummaryRow};
use super::render;
use super::{enkf_record, finished_rows, grad_record, mark_finished};
use super::{run_enkf, run_grad, Ctx, Experiment};
use crate::data::DataSplit;
use crate::model::Activation;
use crate::train::config::{AdaptRule, Adaptation};
use crate::train::gradient::GradConfig;
use crate::train::optim::Optimizer;
use crate::train::{MetricsRow, TrainConfig};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// How one curve is trained.
enum Kind {
    Enkf(Box<TrainConfig>),
    Grad(Box<GradConfig>),
}

/// One curve of a figure.
struct RunDef {
    /// Folder name.
    name: String,
    /// Legend text.
    label: String,
    /// The paper's number or a pointer to its figure.
    paper: String,
    kind: Kind,
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

/// The runs of `methods`: the authors' update and the EKI variants that did best in
/// the README's small-J comparison, each on the EnKF configuration of the scale (J from
/// `-J`: 1000 is a CPU epoch).
fn method_runs(ctx: &Ctx) -> Vec<RunDef> {
    use crate::enkf::UpdateRule;
    use crate::train::{InflationSchedule, NoiseScale};
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

/// Runs one of the test-error experiments (see the module docs).
pub(crate) fn run(ctx: &Ctx, exp: Experiment, in_all: bool) -> Result<()> {
    let s = &ctx.scale;
    let mnist = || ctx.load_idx(&ctx.opts.data_root.join("mnist"));
    let (title, x, data, runs, dataset): (String, &str, DataSplit, Vec<RunDef>, String) = match exp
    {
        Experiment::Fig1 => (
            "Fig. 1: MNIST test error, one epoch, σ = 1".into(),
            "epoch",
            mnist()?,
            comparison_runs(
                ctx,
                "3.8 % after one epoch (J = 5000, text of Sect. 3)",
                "1",
            ),
            "MNIST".into(),
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
                mnist()?,
                runs,
                "MNIST".into(),
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
                mnist()?,
                runs,
                "MNIST".into(),
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
                mnist()?,
                runs,
                "MNIST".into(),
            )
        }
        Experiment::Fig9 => {
            let (data, dataset) = match &ctx.opts.letters {
                Some(dir) => {
                    let mut d = crate::data::letters::load_letters_dir(dir, 1.0 / 7.0, 0)?;
                    ctx.limit(&mut d);
                    (d, format!("notMNIST letters A–J ({})", dir.display()))
                }
                None => {
                    let dir = ctx.opts.data_root.join("fashion-mnist");
                    match ctx.load_idx(&dir) {
                        Ok(d) => (d, "Fashion-MNIST (stand-in for the paper's notMNIST letters)".into()),
                        Err(e) if in_all => {
                            let note = format!(
                                "# Fig. 9 skipped\n\nFashion-MNIST is not in `{}` ({e}).\n\
                                 Fetch it with `scripts/fetch-data.sh {}` or pass `--letters DIR` \
                                 (a notMNIST folder), then run `enkf-dnn reproduce fig9`.\n",
                                dir.display(),
                                dir.display()
                            );
                            eprintln!("reproduce fig9: skipped: Fashion-MNIST not found in {}", dir.display());
                            let path = ctx.dir.join("table.md");
                            return std::fs::write(&path, note).map_err(|e| Error::io(&path, e));
                        }
                        Err(e) => {
                            return Err(Error::Config(format!(
                                "fig9 needs Fashion-MNIST in {} ({e}); run scripts/fetch-data.sh {} or pass --letters DIR",
                                dir.display(),
                                dir.display()
                            )))
                        }
                    }
                }
            };
            (
                format!("Fig. 9 (letters experiment) on {dataset}: test error, one epoch"),
                "epoch",
                data,
                comparison_runs(ctx, "see paper Fig. 9 (notMNIST)", "9"),
                dataset,
            )
        }
        Experiment::Fig10 => {
            let fixed = ctx.enkf_config();
            let (tau, lo, hi, v, eps) = s.fig10_adapt(fixed.members);
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
            let runs = vec![
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
            ];
            (
                "Fig. 10: fixed vs adaptive ensemble (Algorithm 1), MNIST".into(),
                "iteration",
                mnist()?,
                runs,
                "MNIST".into(),
            )
        }
        Experiment::Methods => (
            "Beyond the paper: EKI variants against the authors' update, MNIST, σ = 1".into(),
            "iteration",
            mnist()?,
            method_runs(ctx),
            "MNIST".into(),
        ),
        Experiment::Deep => (
            "Beyond the paper: deep logistic and heaviside networks on MNIST, σ = 1".into(),
            "epoch",
            mnist()?,
            deep_runs(ctx)?,
            "MNIST".into(),
        ),
        other => {
            return Err(Error::Config(format!(
                "internal: {} is not a test-error experiment",
                other.name()
            )))
        }
    };

    let only = &ctx.opts.only;
    if let Some(unknown) = only.iter().find(|n| !runs.iter().any(|d| &d.name == *n)) {
        return Err(Error::Config(format!(
            "--only {unknown}: {} has the runs {}",
            exp.name(),
            runs.iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut summary = Vec::new();
    let mut table_rows = Vec::new();
    let mut seed_rows = Vec::new();
    let mut pending = Vec::new();
    let mut done_runs = Vec::new();
    'curves: for def in &runs {
        let train = only.is_empty() || only.contains(&def.name);
        let mut per_seed: Vec<Vec<MetricsRow>> = Vec::new();
        for seed in 0..ctx.opts.seeds as u64 {
            let dir = ctx.dir.join(&def.name).join(format!("seed-{seed}"));
            let (record, kind) = match &def.kind {
                Kind::Enkf(cfg) => {
                    let cfg = TrainConfig {
                        seed,
                        ..(**cfg).clone()
                    };
                    (enkf_record(&cfg, &dir)?, Kind::Enkf(Box::new(cfg)))
                }
                Kind::Grad(cfg) => {
                    let cfg = GradConfig {
                        seed,
                        ..(**cfg).clone()
                    };
                    (grad_record(&cfg, &data), Kind::Grad(Box::new(cfg)))
                }
            };
            let rows = match finished_rows(&dir, &record)? {
                Some(rows) => {
                    eprintln!("  {}: finished earlier, reused", dir.display());
                    rows
                }
                None if !train => {
                    pending.push(def.name.clone());
                    continue 'curves;
                }
                None => {
                    let rows = match &kind {
                        Kind::Enkf(cfg) => run_enkf(cfg, &data, &dir)?,
                        Kind::Grad(cfg) => run_grad(cfg, &data, &dir, None)?,
                    };
                    mark_finished(&dir, &record)?;
                    rows
                }
            };
            if let Some(r) = rows.iter().rev().find(|r| r.test_error.is_some()) {
                eprintln!(
                    "  {}/{} seed {seed}: test error {:.2} % after {} iterations ({:.1} s)",
                    ctx.dir.display(),
                    def.name,
                    r.test_error.unwrap_or(f64::NAN),
                    r.iteration,
                    r.elapsed_s
                );
            }
            per_seed.push(rows);
        }
        let rows = aggregate(&def.name, &def.label, &per_seed);
        let last = rows.last().cloned();
        let finals: Vec<f64> = per_seed.iter().filter_map(|r| final_error(r)).collect();
        for (seed, e) in finals.iter().enumerate() {
            seed_rows.push(SeedRow {
                run: def.name.clone(),
                seed,
                final_test_error: *e,
                learned: *e < LEARNED_BELOW,
            });
        }
        let learned = finals.iter().filter(|&&e| e < LEARNED_BELOW).count();
        table_rows.push(TableRow {
            def,
            last,
            first_below_5: first_below(&rows, 5.0),
            learned,
            seeds: finals.len(),
        });
        summary.extend(rows);
        done_runs.push(def);
    }
    write_summary(&ctx.dir.join("summary.csv"), &summary)?;
    write_summary(&ctx.dir.join("seeds.csv"), &seed_rows)?;
    let spec = PlotSpec {
        experiment: ctx
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        title,
        x: x.into(),
        x_label: if x == "epoch" {
            "epoch (passes over the training set)".into()
        } else {
            "iteration (EnKF updates)".into()
        },
        y_label: "test error (%)".into(),
        log_y: false,
        runs: done_runs
            .iter()
            .map(|d| RunRef {
                name: d.name.clone(),
                label: d.label.clone(),
            })
            .collect(),
        stats: Vec::new(),
    };
    files::write_spec(&ctx.dir, &spec)?;
    render::render(&ctx.dir)?;
    write_table(ctx, exp, &dataset, &data, &table_rows, &pending)
}

/// Mean ± population std over seeds of the test error at every iteration that all
/// seeds evaluated.
pub(crate) fn aggregate(name: &str, label: &str, per_seed: &[Vec<MetricsRow>]) -> Vec<SummaryRow> {
    let mut by_it: BTreeMap<usize, (f64, Vec<f64>)> = BTreeMap::new();
    for rows in per_seed {
        for r in rows {
            if let Some(e) = r.test_error {
                by_it
                    .entry(r.iteration)
                    .or_insert((r.epoch, Vec::new()))
                    .1
                    .push(e);
            }
        }
    }
    by_it
        .into_iter()
        .filter(|(_, (_, v))| v.len() == per_seed.len())
        .map(|(iteration, (epoch, v))| {
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let var = v.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / n;
            SummaryRow {
                run: name.into(),
                label: label.into(),
                iteration,
                epoch,
                test_error_mean: mean,
                test_error_std: var.sqrt(),
                seeds: v.len(),
            }
        })
        .collect()
}

fn first_below(rows: &[SummaryRow], threshold: f64) -> Option<f64> {
    rows.iter()
        .find(|r| r.test_error_mean <= threshold)
        .map(|r| r.epoch)
}

/// A run "learns" when its final test error is below this (percent): chance is 90 %, and
/// the runs of Fig. 1 either stay near it or end far below (SGD from N(0, 1) learns in
/// some seeds only).
const LEARNED_BELOW: f64 = 50.0;

/// One row of `seeds.csv`: each seed's final test error, so the runs, not only their
/// mean ± std, can be plotted and counted.
#[derive(Debug, Clone, Serialize)]
struct SeedRow {
    run: String,
    seed: usize,
    final_test_error: f64,
    learned: bool,
}

/// One curve's line of `table.md`.
struct TableRow<'a> {
    def: &'a RunDef,
    last: Option<SummaryRow>,
    first_below_5: Option<f64>,
    /// Seeds whose final test error is below [`LEARNED_BELOW`].
    learned: usize,
    seeds: usize,
}

/// The last evaluated test error of one run.
fn final_error(rows: &[MetricsRow]) -> Option<f64> {
    rows.iter().rev().find_map(|r| r.test_error)
}

fn write_summary<T: Serialize>(path: &std::path::Path, rows: &[T]) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = csv::Writer::from_writer(f);
    for r in rows {
        w.serialize(r)?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

fn write_table(
    ctx: &Ctx,
    exp: Experiment,
    dataset: &str,
    data: &DataSplit,
    rows: &[TableRow],
    pending: &[String],
) -> Result<()> {
    let mut t = String::new();
    let _ = writeln!(t, "# {} — ours beside the paper\n", exp.name());
    let _ = writeln!(
        t,
        "Data: {dataset}, {} training / {} test images. Size: {}. Seeds: {}. EnKF backend: {}. \
         Ours is the final test error, mean ± std over seeds (population std).\n",
        data.train.len(),
        data.test.len(),
        ctx.scale.name,
        ctx.opts.seeds,
        ctx.backend_words()
    );
    let below = exp == Experiment::Fig5;
    let learned_col = format!("ours: runs that learn (final error < {LEARNED_BELOW} %)");
    if below {
        let _ = writeln!(t, "| run | ours: final test error (%) | {learned_col} | iterations | ours: first epoch with mean error ≤ 5 % | paper |");
        let _ = writeln!(t, "|---|---|---|---|---|---|");
    } else {
        let _ = writeln!(
            t,
            "| run | ours: final test error (%) | {learned_col} | iterations | paper |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|");
    }
    for row in rows {
        let (def, last, first) = (row.def, &row.last, row.first_below_5);
        let learned = format!("{} of {}", row.learned, row.seeds);
        let ours = last.as_ref().map_or("no evaluation".into(), |r| {
            format!("{:.2} ± {:.2}", r.test_error_mean, r.test_error_std)
        });
        let its = last
            .as_ref()
            .map_or(String::from("–"), |r| r.iteration.to_string());
        if below {
            let f = first.map_or("not reached".into(), |e| format!("{e:.2}"));
            let _ = writeln!(
                t,
                "| {} | {ours} | {learned} | {its} | {f} | {} |",
                def.label, def.paper
            );
        } else {
            let _ = writeln!(
                t,
                "| {} | {ours} | {learned} | {its} | {} |",
                def.label, def.paper
            );
        }
    }
    if ctx.scale.name != "paper size" {
        let _ = writeln!(
            t,
            "\nThese runs are scaled down ({}); the paper's numbers are for J = 5000 and the full \
             data set, so compare shapes and orderings, not values.",
            ctx.scale.name
        );
    }
    if !pending.is_empty() {
        let _ = writeln!(
            t,
            "\nNot run yet (slices still to do): {}. Run them with `enkf-dnn reproduce {} \
             --only {}` and the same other flags; finished runs are reused.",
            pending.join(", "),
            exp.name(),
            pending.join(",")
        );
    }
    let path = ctx.dir.join("table.md");
    std::fs::write(&path, t).map_err(|e| Error::io(&path, e))
}
