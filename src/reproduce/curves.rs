//! The test-error figures: 1, 5, 8 (activations, members), 9 and 10. Each runs a few
//! configurations over seeds, aggregates mean ± std of the test error per evaluated
//! iteration into `summary.csv`, draws it, and tables the final values beside the paper's.

use super::files::{self, PlotSpec, RunRef, SummaryRow};
use super::plans::{self, Kind, Plan, RunDef};
use super::render;
use super::{enkf_record, finished_rows, grad_record, mark_finished};
use super::{run_enkf, run_grad, Ctx, Experiment};
use crate::data::DataSplit;
use crate::train::gradient::GradConfig;
use crate::train::{MetricsRow, TrainConfig};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Runs one of the test-error experiments (see the module docs).
pub(crate) fn run(ctx: &Ctx, exp: Experiment, in_all: bool) -> Result<()> {
    let Some(Plan { title, x, runs }) = plans::plan(ctx, exp)? else {
        return Err(Error::Config(format!(
            "internal: {} is not a test-error experiment",
            exp.name()
        )));
    };
    plans::check_only(ctx, exp, &runs)?;
    let Some((data, dataset)) = load_data(ctx, exp, in_all)? else {
        return Ok(());
    };
    let title = if exp == Experiment::Fig9 {
        format!("{title} on {dataset}: test error, one epoch")
    } else {
        title
    };
    let only = &ctx.opts.only;
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

/// The data set of experiment `exp` and its name: MNIST, or for Fig. 9 the `--letters`
/// folder or Fashion-MNIST. `None` when Fig. 9 is skipped inside `all` for want of
/// Fashion-MNIST (its `table.md` then says why).
fn load_data(ctx: &Ctx, exp: Experiment, in_all: bool) -> Result<Option<(DataSplit, String)>> {
    if exp != Experiment::Fig9 {
        let data = ctx.load_idx(&ctx.opts.data_root.join("mnist"))?;
        return Ok(Some((data, "MNIST".into())));
    }
    if let Some(dir) = &ctx.opts.letters {
        let mut d = crate::data::letters::load_letters_dir(dir, 1.0 / 7.0, 0)?;
        ctx.limit(&mut d);
        return Ok(Some((
            d,
            format!("notMNIST letters A–J ({})", dir.display()),
        )));
    }
    let dir = ctx.opts.data_root.join("fashion-mnist");
    match ctx.load_idx(&dir) {
        Ok(d) => Ok(Some((
            d,
            "Fashion-MNIST (stand-in for the paper's notMNIST letters)".into(),
        ))),
        Err(e) if in_all => {
            let note = format!(
                "# Fig. 9 skipped\n\nFashion-MNIST is not in `{}` ({e}).\n\
                 Fetch it with `scripts/fetch-data.sh {}` or pass `--letters DIR` \
                 (a notMNIST folder), then run `enkf-dnn reproduce fig9`.\n",
                dir.display(),
                dir.display()
            );
            eprintln!(
                "reproduce fig9: skipped: Fashion-MNIST not found in {}",
                dir.display()
            );
            let path = ctx.dir.join("table.md");
            std::fs::write(&path, note).map_err(|e| Error::io(&path, e))?;
            Ok(None)
        }
        Err(e) => Err(Error::Config(format!(
            "fig9 needs Fashion-MNIST in {} ({e}); run scripts/fetch-data.sh {} or pass --letters DIR",
            dir.display(),
            dir.display()
        ))),
    }
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
