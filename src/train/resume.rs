//! What a resumed run may change. A checkpoint fixes what the run computes; a resumed run
//! may change only how long it runs, how it is scored and logged, and where it runs.
//! Every other difference between the checkpoint's configuration and the resumed one is
//! an error naming the setting, the checkpoint's value and the new one: nothing typed
//! with `--resume` is silently ignored, and `config.json` never records a value the run
//! did not use.

use super::config::TrainConfig;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Settings (keys of `config.json`) a resumed run may change: the length of the run
/// (`iterations`, `epochs`: checked against the iterations already done by
/// `Trainer::resume`), evaluation and logging intervals, the scored networks, where and
/// how fast it runs, and where the final ensemble goes.
pub const CHANGEABLE_ON_RESUME: &[&str] = &[
    "iterations",
    "epochs",
    "eval_every",
    "eval",
    "stats_every",
    "hist_every",
    "checkpoint_every",
    "threads",
    "backend",
    "math",
    // The same update in exact arithmetic, other rounding and cost (like math).
    "apply_order",
    "save_ensemble",
    // The folder being resumed: `--resume DIR` sets it (the run may have been moved).
    "out",
];

/// Checks a resumed configuration `new` against the checkpoint's `old`.
///
/// The data folder is compared by its canonical path (so `data/mnist` and
/// `./data/mnist/` are the same folder).
///
/// Errors: [`Error::Config`] listing every setting outside [`CHANGEABLE_ON_RESUME`] that
/// differs, each with the checkpoint's value and the new one.
pub fn check_resume_config(old: &TrainConfig, new: &TrainConfig) -> Result<()> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Err(Error::Config(
            "resume: the configurations cannot be compared".into(),
        ));
    };
    let mut differ = Vec::new();
    for (key, va) in &a {
        let vb = b.get(key).unwrap_or(&Value::Null);
        if va == vb || CHANGEABLE_ON_RESUME.contains(&key.as_str()) {
            continue;
        }
        if key == "data" && same_folder(&old.data, &new.data) {
            continue;
        }
        differ.push(format!(
            "{key}: the checkpoint's run has {}, this one {}",
            shown(va),
            shown(vb)
        ));
    }
    if differ.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "a resumed run continues the checkpoint's run and cannot change {} ({}); only {} \
             may change on resume",
            if differ.len() == 1 {
                "this setting"
            } else {
                "these settings"
            },
            differ.join("; "),
            CHANGEABLE_ON_RESUME[..CHANGEABLE_ON_RESUME.len() - 1].join(", ")
        )))
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::Optimizer;

    #[test]
    fn changeable_settings_pass_and_every_other_difference_is_named() {
        let old = TrainConfig::default();
        let mut ok = old.clone();
        ok.iterations = Some(10_000);
        ok.eval_every = 100;
        ok.threads = Some(3);
        ok.save_ensemble = Some("u.npy".into());
        ok.apply_order = crate::enkf::ApplyOrder::Members;
        check_resume_config(&old, &ok).expect("changeable settings");

        let mut bad = old.clone();
        bad.optimizer = Optimizer::Sgd;
        bad.repetitions = 4;
        bad.gamma = 0.02;
        bad.init_ensemble = Some("other.npy".into());
        let msg = check_resume_config(&old, &bad)
            .expect_err("refused")
            .to_string();
        for want in [
            "optimizer: the checkpoint's run has enkf, this one sgd",
            "repetitions: the checkpoint's run has 8, this one 4",
            "gamma: the checkpoint's run has 0.01, this one 0.02",
            "init_ensemble: the checkpoint's run has none, this one other.npy",
        ] {
            assert!(msg.contains(want), "{want:?} missing from: {msg}");
        }
        assert!(!msg.contains("eval_every:"), "{msg}");
    }

    #[test]
    fn the_data_folder_is_compared_by_its_canonical_path() {
        let dir = std::env::temp_dir().join(format!("enkf-resume-data-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a")).expect("dir");
        std::fs::create_dir_all(dir.join("b")).expect("dir");
        let old = TrainConfig {
            data: dir.join("a"),
            ..TrainConfig::default()
        };
        let same = TrainConfig {
            data: dir.join("b").join("..").join("a"),
            ..old.clone()
        };
        check_resume_config(&old, &same).expect("the same folder");
        let other = TrainConfig {
            data: dir.join("b"),
            ..old.clone()
        };
        let msg = check_resume_config(&old, &other)
            .expect_err("another folder")
            .to_string();
        assert!(msg.contains("data: the checkpoint's run has"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
