//! A partial configuration (what a `--config` file or the command line sets) and how it
//! resolves onto [`TrainConfig`]: the authors' key names, the run's informational keys,
//! precedence and the checks that name a bad key and its value.

use super::config::{
    Accelerator, AdaptRule, Adaptation, BatchOrder, BiasInit, EvalMode, FailurePolicy,
    InflationSchedule, LabelPairing, NoiseScale, Observations, StepControl, TrainConfig,
};
use crate::backend::{BackendKind, MathMode};
use crate::enkf::{ApplyOrder, UpdateRule};
use crate::model::spec::NetLayers;
use crate::model::{Activation, Arch};
use crate::train::optim::Optimizer;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Keys accepted in a config file besides the field names of [`TrainConfig`]:
/// the authors' names and what they map to.
pub const AUTHOR_ALIASES: &[(&str, &str)] = &[
    ("n_ensembles", "members"),
    ("batch_size", "batch"),
    ("checkpoints", "eval_every"),
];

/// Keys of the run's own `config.json` that describe the run rather than configure it.
const INFORMATIONAL_KEYS: &[&str] = &[
    "program",
    "version",
    "backend_used",
    "data_used",
    "params",
    "iterations_total",
];

/// A partial configuration: what a file or the command line sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialConfig {
    #[allow(missing_docs)]
    pub members: Option<usize>,
    #[allow(missing_docs)]
    pub gamma: Option<f64>,
    #[allow(missing_docs)]
    pub sigma: Option<f64>,
    #[allow(missing_docs)]
    pub batch: Option<usize>,
    #[allow(missing_docs)]
    pub repetitions: Option<usize>,
    #[allow(missing_docs)]
    pub epochs: Option<usize>,
    #[allow(missing_docs)]
    pub iterations: Option<usize>,
    #[allow(missing_docs)]
    pub eval_every: Option<usize>,
    #[allow(missing_docs)]
    pub eval: Option<Vec<EvalMode>>,
    #[allow(missing_docs)]
    pub activation: Option<Activation>,
    #[allow(missing_docs)]
    pub arch: Option<Arch>,
    #[allow(missing_docs)]
    pub net: Option<NetLayers>,
    #[allow(missing_docs)]
    pub bias_init: Option<BiasInit>,
    #[allow(missing_docs)]
    pub update: Option<UpdateRule>,
    #[allow(missing_docs)]
    pub observations: Option<Observations>,
    #[allow(missing_docs)]
    pub inflation: Option<f64>,
    #[allow(missing_docs)]
    pub additive_inflation: Option<f64>,
    #[allow(missing_docs)]
    pub additive_from: Option<NoiseScale>,
    #[allow(missing_docs)]
    pub inflation_schedule: Option<InflationSchedule>,
    #[allow(missing_docs)]
    pub inflation_horizon: Option<usize>,
    #[allow(missing_docs)]
    pub tikhonov: Option<f64>,
    #[allow(missing_docs)]
    pub step: Option<StepControl>,
    #[allow(missing_docs)]
    pub dt: Option<f64>,
    #[allow(missing_docs)]
    pub accelerator: Option<Accelerator>,
    #[allow(missing_docs)]
    pub apply_order: Option<ApplyOrder>,
    #[allow(missing_docs)]
    pub seed: Option<u64>,
    #[allow(missing_docs)]
    pub data: Option<PathBuf>,
    #[allow(missing_docs)]
    pub data_npy: Option<Vec<PathBuf>>,
    #[allow(missing_docs)]
    pub train_limit: Option<usize>,
    #[allow(missing_docs)]
    pub test_limit: Option<usize>,
    #[allow(missing_docs)]
    pub out: Option<PathBuf>,
    #[allow(missing_docs)]
    pub order: Option<BatchOrder>,
    #[allow(missing_docs)]
    pub pairing: Option<LabelPairing>,
    #[allow(missing_docs)]
    pub backend: Option<BackendKind>,
    #[allow(missing_docs)]
    pub math: Option<MathMode>,
    #[allow(missing_docs)]
    pub threads: Option<usize>,
    #[allow(missing_docs)]
    pub init_ensemble: Option<PathBuf>,
    #[allow(missing_docs)]
    pub save_ensemble: Option<PathBuf>,
    #[allow(missing_docs)]
    pub adaptation: Option<Adaptation>,
    #[allow(missing_docs)]
    pub adapt_every: Option<usize>,
    #[allow(missing_docs)]
    pub adapt_min_members: Option<usize>,
    #[allow(missing_docs)]
    pub adapt_max_members: Option<usize>,
    #[allow(missing_docs)]
    pub adapt_step: Option<usize>,
    #[allow(missing_docs)]
    pub adapt_kappa: Option<f64>,
    #[allow(missing_docs)]
    pub adapt_epsilon: Option<f64>,
    #[allow(missing_docs)]
    pub adapt_rule: Option<AdaptRule>,
    #[allow(missing_docs)]
    pub on_failure: Option<FailurePolicy>,
    #[allow(missing_docs)]
    pub checkpoint_every: Option<usize>,
    #[allow(missing_docs)]
    pub optimizer: Option<Optimizer>,
    #[allow(missing_docs)]
    pub lr: Option<f64>,
    #[allow(missing_docs)]
    pub momentum: Option<f64>,
    #[allow(missing_docs)]
    pub stats_every: Option<usize>,
    #[allow(missing_docs)]
    pub hist_every: Option<usize>,
}

impl PartialConfig {
    /// Reads a JSON config file. Authors' key names are translated; keys that mean
    /// nothing here are returned as warnings, never silently dropped. A JSON `null`
    /// leaves the setting at its default.
    pub fn from_file(path: &Path) -> Result<(PartialConfig, Vec<String>)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses the JSON text of a config file (see [`PartialConfig::from_file`]).
    pub fn from_json(text: &str) -> Result<(PartialConfig, Vec<String>)> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(Error::Config(
                "a config file must hold one JSON object".into(),
            ));
        };
        let known: Vec<String> = match serde_json::to_value(TrainConfig::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let mut out = serde_json::Map::new();
        let mut warnings = Vec::new();
        // (key as written, the setting it maps to), to name the key in errors.
        let mut originals: Vec<(String, String)> = Vec::new();
        for (key, val) in map {
            // Runs before layer specs wrote an object {train_images, test_images} as "net".
            if key == "net" && val.is_object() {
                continue;
            }
            let target = AUTHOR_ALIASES
                .iter()
                .find(|(a, _)| *a == key)
                .map(|(_, t)| t.to_string())
                .unwrap_or(key.clone());
            if known.contains(&target) {
                if out.contains_key(&target) {
                    return Err(Error::Config(format!(
                        "key '{key}' sets '{target}', which is already set"
                    )));
                }
                originals.push((key.clone(), target.clone()));
                out.insert(target, val);
            } else if !INFORMATIONAL_KEYS.contains(&key.as_str()) {
                warnings.push(format!(
                    "config key '{key}' is not used by enkf-dnn and was ignored"
                ));
            }
        }
        // The authors' "checkpoints" may be a boolean flag rather than an interval.
        if let Some(v) = out.get("eval_every") {
            if v.is_boolean() {
                warnings.push(
                    "config key 'checkpoints' is a boolean here; eval_every keeps its default"
                        .into(),
                );
                out.remove("eval_every");
            }
        }
        // Each key on its own first, so that a type error names the key it is about.
        for (target, val) in &out {
            let mut one = serde_json::Map::new();
            one.insert(target.clone(), val.clone());
            serde_json::from_value::<PartialConfig>(serde_json::Value::Object(one)).map_err(
                |e| {
                    let source = source_key(&originals, target);
                    Error::Config(format!("key '{source}': {e} (the value is {val})"))
                },
            )?;
        }
        let partial: PartialConfig = serde_json::from_value(serde_json::Value::Object(out))
            .map_err(|e| Error::Config(format!("bad value: {e}")))?;
        partial.check_floats()?;
        Ok((partial, warnings))
    }

    /// The floating-point settings, by key: the values JSON cannot hold when they are not
    /// finite (they would turn into `null`, i.e. "unset"), so they are carried and
    /// checked by hand. A test checks that this lists every `f64` field.
    pub(super) fn floats(&self) -> [(&'static str, Option<f64>); 10] {
        [
            ("gamma", self.gamma),
            ("sigma", self.sigma),
            ("adapt_kappa", self.adapt_kappa),
            ("adapt_epsilon", self.adapt_epsilon),
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("inflation", self.inflation),
            ("tikhonov", self.tikhonov),
            ("dt", self.dt),
            ("additive_inflation", self.additive_inflation),
        ]
    }

    /// Errors: [`Error::Config`] naming the first set floating-point value that is NaN
    /// or infinite (the flag `--gamma NaN` reaches here as NaN).
    pub fn check_floats(&self) -> Result<()> {
        for (key, v) in self.floats() {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return Err(Error::Config(format!(
                    "{key} = {v}: must be a finite number (flag --{}, config key \"{key}\")",
                    key.replace('_', "-")
                )));
            }
        }
        Ok(())
    }

    /// Settings of `other` replace those of `self` where `other` has them. Non-finite
    /// floats are kept as they are (for [`PartialConfig::resolve`] to reject).
    pub fn overlay(self, other: &PartialConfig) -> PartialConfig {
        let mut map = to_map(&self);
        map.extend(to_map(other));
        // Both maps come from PartialConfig values, so this cannot fail.
        let mut merged: PartialConfig =
            serde_json::from_value(serde_json::Value::Object(map)).unwrap_or(self.clone());
        // JSON drops NaN and ±inf (they become null): carry the floats over directly.
        merged.gamma = other.gamma.or(self.gamma);
        merged.sigma = other.sigma.or(self.sigma);
        merged.adapt_kappa = other.adapt_kappa.or(self.adapt_kappa);
        merged.adapt_epsilon = other.adapt_epsilon.or(self.adapt_epsilon);
        merged.lr = other.lr.or(self.lr);
        merged.momentum = other.momentum.or(self.momentum);
        merged.inflation = other.inflation.or(self.inflation);
        merged.tikhonov = other.tikhonov.or(self.tikhonov);
        merged.dt = other.dt.or(self.dt);
        merged.additive_inflation = other.additive_inflation.or(self.additive_inflation);
        merged
    }

    /// Fills unset values with defaults and validates the result.
    ///
    /// Errors: [`Error::Config`] naming the key: a non-finite float
    /// ([`PartialConfig::check_floats`]), or any check of [`TrainConfig::validate`].
    pub fn resolve(&self) -> Result<TrainConfig> {
        self.check_floats()?;
        let set = to_map(self);
        for (given, replaced) in [
            (self.net.is_some(), &TrainConfig::REPLACED_BY_NET[..]),
            (self.data_npy.is_some(), &TrainConfig::REPLACED_BY_NPY[..]),
        ] {
            if let Some(key) = replaced.iter().find(|k| given && set.contains_key(**k)) {
                return Err(Error::Config(if self.net.is_some() && key != &"data" {
                    format!(
                        "net and {key} are both set: a layer-spec network (net, --net) \
                         replaces --arch and --activation; give one or the other"
                    )
                } else {
                    "data and data_npy are both set: a NumPy data set (--data-npy) replaces \
                     the IDX folder (--data); give one or the other"
                        .to_string()
                }));
            }
        }
        let mut map = to_map(&TrainConfig::default());
        map.extend(set);
        // The network is built below, for the data's shape.
        map.remove("net");
        let mut c: TrainConfig = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| Error::Config(format!("bad value: {e}")))?;
        c.bind_data(self.net.as_ref())?;
        c.validate()?;
        Ok(c)
    }
}

/// The key of the config file that set `target` (an author's alias, or `target` itself).
fn source_key(originals: &[(String, String)], target: &str) -> String {
    originals
        .iter()
        .find(|(_, t)| t == target)
        .map_or_else(|| target.to_string(), |(k, _)| k.clone())
}

/// The set fields of a config as a JSON object (unset `Option`s are left out).
fn to_map<T: Serialize>(value: &T) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => serde_json::Map::new(),
    }
}
