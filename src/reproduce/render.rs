//! Drawing an experiment folder from its CSVs and `plot.json` (used at the end of each
//! experiment and by `enkf-dnn plot DIR`).
//!
//! Charts written into the experiment folder:
//! - `test-error.{png,svg}` from `summary.csv` (mean line, ± std band), when the spec
//!   lists runs;
//! - per statistics run `R` (spec `stats`, CSVs in `R.dir`): `activations-R` (mean
//!   ± std per layer), `gradient-std-R` (std of each weight tensor's gradient, log
//!   axis), `hist-activations-R` and `hist-gradients-R` (one panel per layer, the
//!   first, middle and last recorded histogram overlaid).

use super::files::{read_csv, PlotSpec, StatsCsvRow, StatsRef, SummaryRow};
use crate::plot::{histogram_chart, line_chart, HistPanel, HistSeries, Series};
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Re-renders the charts of an experiment folder (holding `plot.json`) or of every
/// experiment folder directly under `dir`, from their CSVs.
///
/// Errors: [`Error::Config`] when neither `dir` nor any sub-folder holds `plot.json`;
/// [`Error::Io`] or [`Error::Parse`] naming the file that could not be read, does not
/// parse, or holds no rows (an empty `summary.csv`, or none for a run of `plot.json`).
pub fn plot_dir(dir: &Path) -> Result<()> {
    if dir.join("plot.json").is_file() {
        return render(dir);
    }
    let mut subs: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("plot.json").is_file())
        .collect();
    subs.sort();
    if subs.is_empty() {
        return Err(Error::Config(format!(
            "{} holds no plot.json (nor do its sub-folders); give an experiment folder written by `enkf-dnn reproduce`",
            dir.display()
        )));
    }
    for s in subs {
        render(&s)?;
    }
    Ok(())
}

/// Draws the charts of one experiment folder (see the module docs).
pub(crate) fn render(dir: &Path) -> Result<()> {
    let spec_path = dir.join("plot.json");
    let text = std::fs::read_to_string(&spec_path).map_err(|e| Error::io(&spec_path, e))?;
    let spec: PlotSpec = serde_json::from_str(&text).map_err(|e| Error::Parse {
        path: spec_path.clone(),
        msg: format!("not a plot specification: {e}"),
    })?;
    if !spec.runs.is_empty() {
        let path = dir.join("summary.csv");
        let rows: Vec<SummaryRow> = read_csv(&path)?;
        check_summary(&path, &rows)?;
        for run in &spec.runs {
            if !rows.iter().any(|r| r.run == run.name) {
                return Err(Error::Parse {
                    path,
                    msg: format!(
                        "holds no rows for run '{}' (listed in {}); {} rows in all",
                        run.name,
                        spec_path.display(),
                        rows.len()
                    ),
                });
            }
        }
        let series: Vec<Series> = spec
            .runs
            .iter()
            .map(|run| {
                let mine: Vec<&SummaryRow> = rows.iter().filter(|r| r.run == run.name).collect();
                let seeds = mine.first().map_or(0, |r| r.seeds);
                Series {
                    label: if seeds > 1 {
                        format!("{} (mean ± std, {seeds} seeds)", run.label)
                    } else {
                        run.label.clone()
                    },
                    x: mine
                        .iter()
                        .map(|r| {
                            if spec.x == "epoch" {
                                r.epoch
                            } else {
                                r.iteration as f64
                            }
                        })
                        .collect(),
                    y: mine.iter().map(|r| r.test_error_mean).collect(),
                    band: (seeds > 1).then(|| mine.iter().map(|r| r.test_error_std).collect()),
                }
            })
            .collect();
        line_chart(
            &dir.join("test-error"),
            &spec.title,
            &spec.x_label,
            &spec.y_label,
            &series,
            spec.log_y,
        )?;
    }
    for s in &spec.stats {
        render_stats(dir, &spec, s)?;
    }
    Ok(())
}

/// Checks that every row of `summary.csv` can be drawn: a test error (mean and std)
/// in [0, 100] % or NaN (a diverged run), an epoch that is finite and ≥ 0.
/// Errors: [`Error::Parse`] naming the file, the row and the value.
fn check_summary(path: &Path, rows: &[SummaryRow]) -> Result<()> {
    let percent = |v: f64| v.is_nan() || (0.0..=100.0).contains(&v);
    for (i, r) in rows.iter().enumerate() {
        let bad = if !percent(r.test_error_mean) {
            Some((
                "test_error_mean",
                r.test_error_mean,
                "a percentage in [0, 100] or NaN",
            ))
        } else if !percent(r.test_error_std) {
            Some((
                "test_error_std",
                r.test_error_std,
                "a percentage in [0, 100] or NaN",
            ))
        } else if !(r.epoch.is_finite() && r.epoch >= 0.0) {
            Some(("epoch", r.epoch, "a finite number ≥ 0"))
        } else {
            None
        };
        if let Some((column, value, allowed)) = bad {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                msg: format!(
                    "row {} (run '{}'): {column} is {value}, expected {allowed}",
                    i + 1,
                    r.run
                ),
            });
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct HistCsvRow {
    iteration: usize,
    layer: usize,
    quantity: String,
    bin_lo: f64,
    bin_hi: f64,
    count: f64,
}

const LAYER_NAMES: [&str; 3] = [
    "layer 1 (conv1 + activation)",
    "layer 2 (conv2 + activation)",
    "layer 3 (softmax output)",
];
const GRAD_NAMES: [&str; 3] = ["conv1.weight", "conv2.weight", "fc1.weight"];

fn layer_name(quantity: &str, layer: usize) -> String {
    let names = if quantity == "gradient" {
        &GRAD_NAMES
    } else {
        &LAYER_NAMES
    };
    names
        .get(layer.wrapping_sub(1))
        .map_or(format!("layer {layer}"), |s| s.to_string())
}

fn render_stats(dir: &Path, spec: &PlotSpec, s: &StatsRef) -> Result<()> {
    let run_dir = dir.join(&s.dir);
    let path = run_dir.join("stats.csv");
    // (quantity, layer) → (iterations, means, stds)
    type Curve = (Vec<f64>, Vec<f64>, Vec<f64>);
    let mut curves: BTreeMap<(String, usize), Curve> = BTreeMap::new();
    for r in read_csv::<StatsCsvRow>(&path)? {
        let c = curves.entry((r.quantity, r.layer)).or_default();
        c.0.push(r.iteration as f64);
        c.1.push(r.mean);
        c.2.push(r.std);
    }
    let act: Vec<Series> = curves
        .iter()
        .filter(|((q, _), _)| q == "activation")
        .map(|((q, l), (x, m, sd))| Series {
            label: layer_name(q, *l),
            x: x.clone(),
            y: m.clone(),
            band: Some(sd.clone()),
        })
        .collect();
    line_chart(
        &dir.join(format!("activations-{}", s.name)),
        &format!(
            "{}: activations per layer, mean ± std ({})",
            spec.title, s.label
        ),
        "iteration (optimizer steps)",
        "activation value (mean ± std over the mini-batch)",
        &act,
        false,
    )?;
    let grad: Vec<Series> = curves
        .iter()
        .filter(|((q, _), _)| q == "gradient")
        .map(|((q, l), (x, _, sd))| Series {
            label: format!("∂loss/∂{}", layer_name(q, *l)),
            x: x.clone(),
            y: sd.clone(),
            band: None,
        })
        .collect();
    if !grad.is_empty() {
        line_chart(
            &dir.join(format!("gradient-std-{}", s.name)),
            &format!(
                "{}: gradient spread per weight tensor ({})",
                spec.title, s.label
            ),
            "iteration (optimizer steps)",
            "std of the gradient entries (log scale)",
            &grad,
            true,
        )?;
    }
    let hpath = run_dir.join("hist.csv");
    if !hpath.is_file() {
        return Ok(());
    }
    // (quantity, layer) → iteration → bins
    type Bins = Vec<(f64, f64, f64)>;
    let mut hists: BTreeMap<(String, usize), BTreeMap<usize, Bins>> = BTreeMap::new();
    for r in read_csv::<HistCsvRow>(&hpath)? {
        hists
            .entry((r.quantity, r.layer))
            .or_default()
            .entry(r.iteration)
            .or_default()
            .push((r.bin_lo, r.bin_hi, r.count));
    }
    for quantity in ["activation", "gradient"] {
        let panels: Vec<HistPanel> = hists
            .iter()
            .filter(|((q, _), _)| q == quantity)
            .map(|((q, l), by_it)| HistPanel {
                title: layer_name(q, *l),
                series: pick_three(by_it)
                    .into_iter()
                    .map(|(it, bins)| {
                        let (edges, counts) = if quantity == "gradient" {
                            fold_log_magnitude(bins)
                        } else {
                            finite_bins(bins)
                        };
                        HistSeries {
                            label: format!("iteration {it}"),
                            edges,
                            counts,
                        }
                    })
                    .filter(|h| !h.counts.is_empty())
                    .collect(),
            })
            .collect();
        if panels.is_empty() {
            continue;
        }
        let (x_label, stem) = if quantity == "gradient" {
            (
                "log10 |gradient entry| (the bin at −13 holds |g| < 1e-12, the bin at 0 holds |g| ≥ 1)",
                format!("hist-gradients-{}", s.name),
            )
        } else {
            ("activation value", format!("hist-activations-{}", s.name))
        };
        histogram_chart(
            &dir.join(stem),
            &format!("{}: {quantity} histograms ({})", spec.title, s.label),
            x_label,
            "fraction of values",
            &panels,
        )?;
    }
    Ok(())
}

/// The first, middle and last entries of a map.
fn pick_three<V>(m: &BTreeMap<usize, V>) -> Vec<(usize, &V)> {
    let v: Vec<(usize, &V)> = m.iter().map(|(k, v)| (*k, v)).collect();
    let mut idx = vec![0, v.len() / 2, v.len().saturating_sub(1)];
    idx.dedup();
    idx.into_iter().filter_map(|i| v.get(i).copied()).collect()
}

/// The finite bins, counts as fractions of all values (under/overflow included in
/// the total).
fn finite_bins(bins: &[(f64, f64, f64)]) -> (Vec<f64>, Vec<f64>) {
    let total: f64 = bins.iter().map(|b| b.2).sum::<f64>().max(1.0);
    let fin: Vec<_> = bins
        .iter()
        .filter(|b| b.0.is_finite() && b.1.is_finite())
        .collect();
    let mut edges: Vec<f64> = fin.iter().map(|b| b.0).collect();
    if let Some(last) = fin.last() {
        edges.push(last.1);
    }
    (edges, fin.iter().map(|b| b.2 / total).collect())
}

/// Folds sign-symmetric log bins into magnitude bins on a log10 axis: a bin
/// [lo, hi) with 0 < lo becomes [log10 lo, log10 hi); a negative bin maps to
/// [log10 |hi|, log10 |lo|); the bin straddling 0 becomes [−13, −12); values beyond
/// ±1 (under/overflow) become [0, 0.25). Counts are fractions of all values.
fn fold_log_magnitude(bins: &[(f64, f64, f64)]) -> (Vec<f64>, Vec<f64>) {
    let total: f64 = bins.iter().map(|b| b.2).sum::<f64>().max(1.0);
    // Keyed by the lower edge in quarter decades, to merge the ± halves.
    let mut acc: BTreeMap<i64, (f64, f64, f64)> = BTreeMap::new();
    for &(lo, hi, c) in bins {
        let (a, b) = if !lo.is_finite() || !hi.is_finite() {
            (0.0, 0.25)
        } else if lo < 0.0 && hi > 0.0 {
            (-13.0, -12.0)
        } else if lo >= 0.0 {
            (lo.max(1e-300).log10(), hi.log10())
        } else {
            (hi.abs().max(1e-300).log10(), lo.abs().log10())
        };
        let key = (a * 4.0).round() as i64;
        let e = acc.entry(key).or_insert((a, b, 0.0));
        e.2 += c / total;
    }
    // Keep a strictly increasing, gap-free edge list: bins in order, skip overlaps.
    let mut edges = Vec::new();
    let mut counts = Vec::new();
    for (_, (a, b, c)) in acc {
        match edges.last().copied() {
            None => {
                edges.push(a);
                edges.push(b);
                counts.push(c);
            }
            Some(last) if a >= last - 1e-9 && b > last => {
                if a > last + 1e-9 {
                    // A gap between bins: an empty bin keeps the edges increasing.
                    edges.push(a);
                    counts.push(0.0);
                }
                edges.push(b);
                counts.push(c);
            }
            Some(_) => {
                if let Some(x) = counts.last_mut() {
                    *x += c;
                }
            }
        }
    }
    (edges, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_bins_fold_to_increasing_magnitudes_and_keep_the_total() {
        let edges = crate::train::stats::gradient_edges();
        let mut bins = vec![(f64::NEG_INFINITY, edges[0], 1.0)];
        for w in edges.windows(2) {
            bins.push((w[0], w[1], 2.0));
        }
        bins.push((edges[edges.len() - 1], f64::INFINITY, 3.0));
        let total: f64 = bins.iter().map(|b| b.2).sum();
        let (e, c) = fold_log_magnitude(&bins);
        assert_eq!(e.len(), c.len() + 1);
        assert!(e.windows(2).all(|w| w[0] < w[1]), "{e:?}");
        assert!((e[0] + 13.0).abs() < 1e-12 && (e[e.len() - 1] - 0.25).abs() < 1e-12);
        let sum: f64 = c.iter().sum();
        // Fractions of all values: must add up to 1 up to rounding of ~100 terms.
        assert!((sum - 1.0).abs() <= 1e-12, "sum {sum}");
        // The ±1e-12 … ±10^-11.75 halves merge: 2 + 2 values.
        assert!((c[1] - 4.0 / total).abs() <= 1e-15, "{}", c[1]);
    }
}
