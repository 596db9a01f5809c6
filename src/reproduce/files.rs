//! The files of an experiment folder that the runner writes and the renderer reads:
//! `plot.json` ([`PlotSpec`] with its [`RunRef`]s and [`StatsRef`]s), `summary.csv`
//! ([`SummaryRow`]) and the rows of a run's `stats.csv` ([`StatsCsvRow`]), with the CSV
//! reader both sides use. One home for these types, so that `curves.rs` (the runner
//! of the test-error experiments) and `render.rs` (the charts) depend on it and not on
//! each other.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A curve of the test-error chart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct RunRef {
    /// `run` value in summary.csv.
    pub name: String,
    /// Legend text.
    pub label: String,
}

/// A statistics run: where its stats.csv and hist.csv are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct StatsRef {
    /// Chart file suffix.
    pub name: String,
    /// Words for titles, e.g. "SGD, σ = 1".
    pub label: String,
    /// Folder relative to the experiment folder.
    pub dir: String,
}

/// What `plot.json` says to draw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct PlotSpec {
    /// Experiment name.
    pub experiment: String,
    /// Chart title.
    pub title: String,
    /// Abscissa: "epoch" or "iteration".
    pub x: String,
    /// x-axis label with units.
    pub x_label: String,
    /// y-axis label with units.
    pub y_label: String,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// Curves of `summary.csv`.
    pub runs: Vec<RunRef>,
    /// Statistics runs.
    pub stats: Vec<StatsRef>,
}

/// Writes `dir/plot.json`.
pub(crate) fn write_spec(dir: &Path, spec: &PlotSpec) -> Result<()> {
    let path = dir.join("plot.json");
    let text = serde_json::to_string_pretty(spec)?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// One row of `summary.csv`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct SummaryRow {
    /// Run folder name.
    pub run: String,
    /// Legend text.
    pub label: String,
    /// Iteration of the evaluation.
    pub iteration: usize,
    /// Epochs done at that iteration.
    pub epoch: f64,
    /// Mean test error over seeds, percent.
    pub test_error_mean: f64,
    /// Population standard deviation over seeds, percentage points.
    pub test_error_std: f64,
    /// Seeds aggregated.
    pub seeds: usize,
}

/// Every row of the CSV file `path` (with a header). Errors: [`Error::Io`] or
/// [`Error::Parse`] naming the file (and the record), also when it holds no rows.
pub(crate) fn read_csv<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let mut rdr = csv::Reader::from_path(path).map_err(|e| Error::csv(path, e))?;
    let headers = rdr.headers().map_err(|e| Error::csv(path, e))?.clone();
    let mut rows = Vec::new();
    for r in rdr.deserialize() {
        rows.push(r.map_err(|e| {
            // Name the column of a field that does not parse.
            let column = match e.kind() {
                csv::ErrorKind::Deserialize { err, .. } => err
                    .field()
                    .and_then(|f| headers.get(usize::try_from(f).ok()?))
                    .map(str::to_string),
                _ => None,
            };
            match (Error::csv(path, e), column) {
                (Error::Parse { path, msg }, Some(c)) => Error::Parse {
                    path,
                    msg: format!("{msg} (column '{c}')"),
                },
                (other, _) => other,
            }
        })?);
    }
    if rows.is_empty() {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            msg: "holds no rows (nothing to draw); re-run the experiment to write it".into(),
        });
    }
    Ok(rows)
}

/// One row of a run's `stats.csv`.
#[derive(Debug, Deserialize)]
pub(crate) struct StatsCsvRow {
    pub(crate) iteration: usize,
    pub(crate) layer: usize,
    pub(crate) quantity: String,
    pub(crate) mean: f64,
    pub(crate) std: f64,
}
