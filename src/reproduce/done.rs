//! Finished runs of `reproduce`: every (curve, seed) run folder gets `done.json`, the
//! configuration it ran with, once all its outputs are written. A later `reproduce` into
//! the same `--out` reuses a finished run with the same configuration instead of training
//! it again (so `--only` slices add up, and nothing finished is overwritten), and refuses
//! one that ran with another configuration.

use super::write_json;
use crate::data::DataSplit;
use crate::train::gradient::GradConfig;
use crate::train::{MetricsRow, TrainConfig};
use crate::{Error, Result};
use std::path::Path;

/// The file a finished run leaves in its folder: the configuration it ran with (as its
/// `config.json`), written only after every output is.
pub const DONE_FILE: &str = "done.json";

/// The rows of the finished run in `dir` when its `done.json` records `config`; `None`
/// when the folder holds no finished run (absent, or stopped part-way).
///
/// Errors: [`Error::Config`] when the finished run had another configuration (a reused
/// `--out` with other settings: never silently mixed in, never overwritten); read errors
/// naming the file.
pub(crate) fn finished_rows(
    dir: &Path,
    config: &serde_json::Value,
) -> Result<Option<Vec<MetricsRow>>> {
    let done = dir.join(DONE_FILE);
    if !done.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&done).map_err(|e| Error::io(&done, e))?;
    let stored: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not a run record: {e}", done.display())))?;
    if &stored != config {
        return Err(Error::Config(format!(
            "{} holds a finished run with other settings than this one (see its {DONE_FILE}); \
             choose another --out, or remove that folder to run it again",
            dir.display()
        )));
    }
    let path = dir.join("metrics.csv");
    let mut r = csv::Reader::from_path(&path).map_err(|e| match e.into_kind() {
        csv::ErrorKind::Io(io) => Error::io(&path, io),
        other => Error::Config(format!("{}: {other:?}", path.display())),
    })?;
    let rows = r
        .deserialize()
        .collect::<std::result::Result<Vec<MetricsRow>, _>>()
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(Some(rows))
}

/// Marks the run in `dir` finished with `config` (see [`finished_rows`]).
pub(crate) fn mark_finished(dir: &Path, config: &serde_json::Value) -> Result<()> {
    write_json(&dir.join(DONE_FILE), config)
}

/// The configuration record of an EnKF run into `dir` (its `config.json`, less the
/// thread count: how fast a run went is not what it computed).
pub(crate) fn enkf_record(cfg: &TrainConfig, dir: &Path) -> Result<serde_json::Value> {
    let cfg = TrainConfig {
        out: Some(dir.to_path_buf()),
        threads: None,
        ..cfg.clone()
    };
    Ok(serde_json::to_value(&cfg)?)
}

/// The configuration record of a gradient run on `data` (its `config.json`).
pub(crate) fn grad_record(cfg: &GradConfig, data: &DataSplit) -> serde_json::Value {
    let mut v = serde_json::json!({
        "optimizer": cfg.optimizer, "lr": cfg.lr.or(cfg.optimizer.default_lr()),
        "momentum": cfg.momentum, "epochs": cfg.epochs, "iterations": cfg.iterations,
        "batch": cfg.batch, "eval_every": cfg.eval_every, "hist_every": cfg.hist_every,
        "seed": cfg.seed, "sigma": cfg.sigma, "arch": cfg.net.arch, "activation": cfg.net.act,
        "train_images": data.train.len(), "test_images": data.test.len(),
    });
    // Layer-spec networks (records of the presets stay as they were).
    if let (Some(spec), Some(m)) = (cfg.net.spec(), v.as_object_mut()) {
        m.insert("net".into(), spec.to_json());
        m.insert("bias_init".into(), serde_json::json!(cfg.bias_init));
    }
    v
}
