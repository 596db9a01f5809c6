//! The statistics figures: Fig. 3 (SGD, one epoch), Fig. 4 (SGD, 50 epochs), Fig. 6
//! (Adam, one epoch), Fig. 7 (Adam, 50 epochs). One run (seed 0, σ = 1, logistic) with
//! the activation and gradient statistics of `crate::train::stats`, drawn per layer.

use super::render::{self, PlotSpec, StatsRef};
use super::{run_grad, Ctx};
use crate::train::gradient::GradConfig;
use crate::train::optim::Optimizer;
use crate::train::MetricsRow;
use crate::{Error, Result};
use std::fmt::Write as _;

/// Runs one statistics figure: `long` selects the many-epoch version; `fig` is the
/// paper's figure number (for titles and the table).
pub(crate) fn run(ctx: &Ctx, opt: Optimizer, long: bool, fig: &str) -> Result<()> {
    let s = &ctx.scale;
    let data = ctx.load_idx(&ctx.opts.data_root.join("mnist"))?;
    let epochs = if long { s.long_epochs } else { 1 };
    let per_epoch = data.train.len().div_ceil(64);
    let cfg = GradConfig {
        epochs,
        eval_every: s.grad_eval_every.max(if long { per_epoch } else { 1 }),
        // Long runs: a histogram per epoch-ish (at most ~60 of them); short: the scale's.
        hist_every: if long {
            (epochs * per_epoch / 50).max(s.hist_every)
        } else {
            s.hist_every
        },
        sigma: 1.0,
        seed: 0,
        ..GradConfig::new(opt)
    };
    let name = match opt {
        Optimizer::Sgd => "sgd",
        Optimizer::Adam => "adam",
        Optimizer::Enkf => {
            return Err(Error::Config(
                "internal: statistics figures are for gradient optimizers".into(),
            ))
        }
    };
    let label = match opt {
        Optimizer::Sgd => "SGD (lr 0.1, momentum 0.9), σ = 1",
        _ => "Adam (lr 1e-3), σ = 1",
    };
    let run_dir = format!("{name}/seed-0");
    let rows = run_grad(&cfg, &data, &ctx.dir.join(&run_dir), Some(cfg.hist_every))?;
    let spec = PlotSpec {
        experiment: format!("fig{fig}"),
        title: format!("Fig. {fig}, MNIST, {epochs} epoch(s)"),
        x: "iteration".into(),
        x_label: "iteration (optimizer steps)".into(),
        y_label: "value".into(),
        log_y: false,
        runs: Vec::new(),
        stats: vec![StatsRef {
            name: name.into(),
            label: label.into(),
            dir: run_dir.clone(),
        }],
    };
    render::write_spec(&ctx.dir, &spec)?;
    render::render(&ctx.dir)?;
    write_table(ctx, fig, label, epochs, &data, &rows, &run_dir)
}

fn write_table(
    ctx: &Ctx,
    fig: &str,
    label: &str,
    epochs: usize,
    data: &crate::data::DataSplit,
    rows: &[MetricsRow],
    run_dir: &str,
) -> Result<()> {
    let last = rows.iter().rev().find(|r| r.test_error.is_some());
    let mut t = String::new();
    let _ = writeln!(t, "# fig{fig} — ours beside the paper\n");
    let _ = writeln!(
        t,
        "{label}, {epochs} epoch(s) on {} MNIST training images ({} test), seed 0, size: {}. \
         Statistics per iteration in `{run_dir}/stats.csv`, histograms in `{run_dir}/hist.csv`; \
         charts `activations-*`, `gradient-std-*`, `hist-activations-*`, `hist-gradients-*`.\n",
        data.train.len(),
        data.test.len(),
        ctx.scale.name
    );
    let _ = writeln!(t, "| quantity | ours | paper |");
    let _ = writeln!(t, "|---|---|---|");
    let _ = writeln!(
        t,
        "| final test error (%) | {} | see paper Fig. {fig} |",
        last.and_then(|r| r.test_error)
            .map_or("no evaluation".into(), |e| format!(
                "{e:.2} after {} steps",
                last.map_or(0, |r| r.iteration)
            ))
    );
    let _ = writeln!(
        t,
        "| activation mean ± std per layer | chart `activations-*` | see paper Fig. {fig} |"
    );
    let _ = writeln!(
        t,
        "| gradient histograms per layer | chart `hist-gradients-*` | see paper Fig. {fig} |"
    );
    let path = ctx.dir.join("table.md");
    std::fs::write(&path, t).map_err(|e| Error::io(&path, e))
}
