//! The checks of a training configuration ([`TrainConfig::validate`]): every value in
//! range, every combination built, each error naming the setting and its value.

use super::config::{
    Accelerator, Adaptation, BatchOrder, BiasInit, InflationSchedule, LabelPairing, NoiseScale,
    Observations, StepControl, TrainConfig,
};
use crate::enkf::{ApplyOrder, UpdateRule};
use crate::train::optim::Optimizer;
use crate::{Error, Result};

impl TrainConfig {
    /// The checks of the EnKF variants of issue 13 (`tikhonov`, `step`, `dt`,
    /// `accelerator`) and how they combine.
    fn validate_methods(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if !(self.tikhonov.is_finite() && self.tikhonov >= 0.0) {
            return bad(format!(
                "tikhonov must be a finite number ≥ 0 (0: none), got {}",
                self.tikhonov
            ));
        }
        if self.tikhonov > 0.0 {
            if self.update != UpdateRule::Batch {
                return bad(format!(
                    "tikhonov = {} needs update = batch (the member-space Tikhonov update \
                     solves all observations at once); got update = {:?}",
                    self.tikhonov, self.update
                )
                .replace("Sequential", "sequential"));
            }
            if self.observations != Observations::Exact {
                return bad(format!(
                    "tikhonov = {} with observations = perturbed is not built (the prior's P \
                     extra observations would need J × P perturbations); use one or the other",
                    self.tikhonov
                ));
            }
            if self.sigma <= 0.0 || self.sigma.is_nan() {
                return bad(format!(
                    "tikhonov = {} needs sigma > 0 (the prior is N(0, σ²/λ · I)), got sigma = {}",
                    self.tikhonov, self.sigma
                ));
            }
        }
        if self.update == UpdateRule::Transform && self.observations != Observations::Exact {
            return bad(
                "update = transform with observations = perturbed: the transform (square-root) \
                 update is deterministic and takes no perturbed observations"
                    .into(),
            );
        }
        if !(self.additive_inflation.is_finite() && self.additive_inflation >= 0.0) {
            return bad(format!(
                "additive_inflation must be a finite number ≥ 0 (0: none), got {}",
                self.additive_inflation
            ));
        }
        match (self.inflation_schedule, self.inflation_horizon) {
            (InflationSchedule::Constant, Some(n)) => {
                return bad(format!(
                    "inflation_horizon = {n} with inflation_schedule = constant: a horizon \
                     belongs to a linear, exponential or delayed schedule"
                ))
            }
            (InflationSchedule::Constant, None) => {}
            (sched, None | Some(0)) => {
                return bad(format!(
                    "inflation_schedule = {} needs inflation_horizon ≥ 1 (updates; \
                     --inflation-horizon N), got {}",
                    sched.name(),
                    self.inflation_horizon
                        .map_or("none".to_string(), |n| n.to_string())
                ))
            }
            (sched, Some(_)) if self.inflation == 1.0 && self.additive_inflation == 0.0 => {
                return bad(format!(
                    "inflation_schedule = {} without inflation: give --inflation LAMBDA > 1 \
                     or --additive-inflation S > 0 for the schedule to act on",
                    sched.name()
                ))
            }
            _ => {}
        }
        if self.additive_from != NoiseScale::Prior && self.additive_inflation == 0.0 {
            return bad(format!(
                "additive_from = {:?} without additive_inflation: give the noise's size with \
                 --additive-inflation S",
                self.additive_from
            )
            .replace("Spread", "spread"));
        }
        if !(self.dt.is_finite() && self.dt > 0.0) {
            return bad(format!(
                "dt must be a positive, finite number (1: the authors' step), got {}",
                self.dt
            ));
        }
        if self.step == StepControl::Dmc && self.dt != 1.0 {
            return bad(format!(
                "dt = {} with step = dmc: the data-misfit controller chooses every Δt itself; \
                 give dt only with step = fixed",
                self.dt
            ));
        }
        if self.apply_order != ApplyOrder::Auto && self.tikhonov > 0.0 {
            return bad(format!(
                "apply_order = {} with tikhonov = {}: the Tikhonov update has its own \
                 member-space apply phase; leave apply_order at auto",
                self.apply_order.name(),
                self.tikhonov
            ));
        }
        if self.accelerator == Accelerator::Nesterov && self.adaptation == Adaptation::Adaptive {
            return bad(
                "accelerator = nesterov with adaptation = adaptive is not built (Algorithm 1 \
                 changes J, and the momentum's previous ensemble would have to follow)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Checks every value; errors say which setting, the value, and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.bias_init == BiasInit::Normal && self.net().bias_ranges().is_empty() {
            return bad(format!(
                "bias_init = normal, but the network ({}) has no biases",
                self.net().describe()
            ));
        }
        if !(self.inflation.is_finite() && self.inflation >= 1.0) {
            return bad(format!(
                "inflation must be a finite number ≥ 1 (1: none), got {}",
                self.inflation
            ));
        }
        if self.optimizer != Optimizer::Enkf
            && (self.observations != Observations::Exact
                || self.inflation != 1.0
                || self.additive_inflation != 0.0
                || self.additive_from != NoiseScale::Prior
                || self.inflation_schedule != InflationSchedule::Constant
                || self.inflation_horizon.is_some()
                || self.tikhonov != 0.0
                || self.step != StepControl::Fixed
                || self.dt != 1.0
                || self.accelerator != Accelerator::None)
        {
            return bad(format!(
                "observations = {:?}, inflation = {}, additive_inflation = {}, additive_from = \
                 {:?}, inflation_schedule = {:?}, tikhonov = {}, step = {:?}, dt = {} and \
                 accelerator = {:?} are EnKF settings (their defaults: exact, 1, 0, prior, \
                 constant, 0, fixed, 1, none); --optimizer {:?} trains one network by \
                 backpropagation",
                self.observations,
                self.inflation,
                self.additive_inflation,
                self.additive_from,
                self.inflation_schedule,
                self.tikhonov,
                self.step,
                self.dt,
                self.accelerator,
                self.optimizer
            )
            .to_lowercase());
        }
        if self.optimizer != Optimizer::Enkf && self.apply_order != ApplyOrder::Auto {
            return bad(format!(
                "apply_order = {} is an EnKF setting (its default: auto); --optimizer {:?} \
                 trains one network by backpropagation",
                self.apply_order.name(),
                self.optimizer
            )
            .replace("Sgd", "sgd")
            .replace("Adam", "adam"));
        }
        self.validate_methods()?;
        if self.members < 2 {
            return bad(format!(
                "members (J) must be at least 2 for a covariance, got {}",
                self.members
            ));
        }
        if !(self.gamma.is_finite() && self.gamma > 0.0) {
            return bad(format!(
                "gamma must be a positive, finite number, got {}",
                self.gamma
            ));
        }
        if !(self.sigma.is_finite() && self.sigma > 0.0) {
            return bad(format!(
                "sigma must be a positive, finite number, got {}",
                self.sigma
            ));
        }
        if self.batch == 0 {
            return bad("batch must be at least 1".into());
        }
        if self.repetitions == 0 {
            return bad("repetitions must be at least 1".into());
        }
        if self.iterations.is_none() && self.epochs == 0 {
            return bad("epochs must be at least 1 (or give iterations)".into());
        }
        if self.iterations == Some(0) {
            return bad("iterations must be at least 1".into());
        }
        if self.eval_every == 0 {
            return bad("eval_every must be at least 1".into());
        }
        if self.eval.is_empty() {
            return bad("eval must name at least one of mean, last, ensemble".into());
        }
        if self.threads == Some(0) {
            return bad("threads must be at least 1".into());
        }
        if self.train_limit == Some(0) || self.test_limit == Some(0) {
            return bad("train_limit and test_limit must be at least 1 when given".into());
        }
        if self.adaptation == Adaptation::Adaptive {
            if self.adapt_every == 0 || self.adapt_step == 0 {
                return bad("adapt_every and adapt_step must be at least 1".into());
            }
            if self.adapt_min_members < 2 || self.adapt_min_members > self.adapt_max_members {
                return bad(format!(
                    "adaptive bounds need 2 ≤ adapt_min_members ≤ adapt_max_members, got {} and {}",
                    self.adapt_min_members, self.adapt_max_members
                ));
            }
        }
        // Checked whatever the adaptation, so that config.json never records a value
        // that could not be used.
        if !(self.adapt_kappa.is_finite() && self.adapt_kappa >= 0.0) {
            return bad(format!(
                "adapt_kappa must be a finite number ≥ 0 (percentage points), got {}",
                self.adapt_kappa
            ));
        }
        if !(self.adapt_epsilon.is_finite() && self.adapt_epsilon > 0.0) {
            return bad(format!(
                "adapt_epsilon must be a finite number > 0 (percent), got {}",
                self.adapt_epsilon
            ));
        }
        if self.adaptation == Adaptation::Fixed {
            // Algorithm 1's settings act only with adaptation = adaptive: one given to a
            // fixed run would be silently ignored.
            let (mine, default) = (
                serde_json::to_value(self).unwrap_or_default(),
                serde_json::to_value(TrainConfig::default()).unwrap_or_default(),
            );
            let set = TrainConfig::ADAPTIVE_ONLY
                .iter()
                .find(|k| mine.get(**k) != default.get(**k));
            if let Some(key) = set {
                let value = match mine.get(*key) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    v => v.map_or_else(String::new, |v| v.to_string()),
                };
                return bad(format!(
                    "{key} = {value} (--{}) but adaptation = fixed: Algorithm 1's settings act \
                     only with --adaptation adaptive",
                    key.replace('_', "-")
                ));
            }
        }
        if self.pairing == LabelPairing::Authors && self.order == BatchOrder::Shuffle {
            return bad(
                "pairing authors reproduces the authors' driver, which reads mini-batches in \
                 file order: it cannot be combined with shuffle (order)"
                    .into(),
            );
        }
        if self.stats_every == 0 || self.hist_every == 0 {
            return bad("stats_every and hist_every must be at least 1".into());
        }
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return bad(format!("lr must be a positive, finite number, got {lr}"));
            }
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if self.optimizer != Optimizer::Enkf
            && (self.adaptation == Adaptation::Adaptive
                || self.checkpoint_every.is_some()
                || self.init_ensemble.is_some())
        {
            return bad(format!(
                "--optimizer {:?} trains one network by backpropagation: adaptation, checkpoints and \
                 --init-ensemble apply to the EnKF only",
                self.optimizer
            )
            .to_lowercase());
        }
        if self.checkpoint_every == Some(0) {
            return bad("checkpoint_every must be at least 1".into());
        }
        if self.checkpoint_every.is_some() && self.out.is_none() {
            return bad(
                "checkpoint_every needs an output folder (--out) to write checkpoints into".into(),
            );
        }
        if let Some(p) = &self.init_ensemble {
            if !p.is_file() {
                return bad(format!("init_ensemble {} does not exist", p.display()));
            }
        }
        Ok(())
    }
}
