//! `reproduce` end to end at the tiny size: CSVs, table, charts, and `plot_dir`.

use enkf_dnn::backend::BackendKind;
use enkf_dnn::reproduce::{plot_dir, run, Experiment, ReproduceOptions, Scale};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("enkf-repro-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tiny(out: &Path) -> ReproduceOptions {
    ReproduceOptions {
        out: out.to_path_buf(),
        seeds: 2,
        quick: true,
        tiny: true,
        backend: BackendKind::Cpu,
        data_root: enkf_dnn::data::data_root(),
        ..ReproduceOptions::default()
    }
}

fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = r
        .headers()
        .expect("header")
        .iter()
        .map(String::from)
        .collect();
    let rows = r
        .records()
        .map(|x| x.expect("record").iter().map(String::from).collect())
        .collect();
    (header, rows)
}

fn assert_chart(stem: &Path) {
    for ext in ["png", "svg"] {
        let p = stem.with_extension(ext);
        let len = std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .len();
        assert!(len > 1000, "{} is only {len} bytes", p.display());
    }
}

#[test]
fn fig1_tiny_writes_runs_summary_table_and_charts() {
    let out = tmp("fig1");
    run(Experiment::Fig1, &tiny(&out)).expect("fig1 tiny");
    let dir = out.join("fig1");
    for run in ["sgd", "adam", "enkf"] {
        for seed in 0..2 {
            let (h, rows) = read_csv(
                &dir.join(run)
                    .join(format!("seed-{seed}"))
                    .join("metrics.csv"),
            );
            assert_eq!(&h[..2], ["iteration", "epoch"], "{run}");
            assert!(h.iter().any(|c| c == "test_error"));
            // Tiny: EnKF 4 iterations, gradient 1 epoch of 128/64 = 2 steps; plus row 0.
            let expected = if run == "enkf" { 5 } else { 3 };
            assert_eq!(rows.len(), expected, "{run} seed {seed}");
        }
    }
    assert!(dir.join("enkf/seed-0/model.safetensors").is_file());
    let (h, rows) = read_csv(&dir.join("summary.csv"));
    assert_eq!(
        h,
        [
            "run",
            "label",
            "iteration",
            "epoch",
            "test_error_mean",
            "test_error_std",
            "seeds"
        ]
    );
    // EnKF evaluates at 0, 2, 4; gradient runs at every step (0, 1, 2).
    let count = |name: &str| rows.iter().filter(|r| r[0] == name).count();
    assert_eq!((count("sgd"), count("adam"), count("enkf")), (3, 3, 3));
    for r in &rows {
        let mean: f64 = r[4].parse().expect("mean");
        let std: f64 = r[5].parse().expect("std");
        assert!((0.0..=100.0).contains(&mean) && std >= 0.0, "{r:?}");
        assert_eq!(r[6], "2");
    }
    let table = std::fs::read_to_string(dir.join("table.md")).expect("table");
    assert!(
        table.contains("3.8 %") && table.contains("EnKF (J = 6"),
        "{table}"
    );
    // Every seed's final error, and how many runs of each curve learn.
    let (h, seeds) = read_csv(&dir.join("seeds.csv"));
    assert_eq!(h, ["run", "seed", "final_test_error", "learned"]);
    assert_eq!(seeds.len(), 3 * 2, "{seeds:?}");
    for r in &seeds {
        let e: f64 = r[2].parse().expect("error");
        assert_eq!(r[3] == "true", e < 50.0, "{r:?}");
    }
    let learned = |run: &str| {
        seeds
            .iter()
            .filter(|r| r[0] == run && r[3] == "true")
            .count()
    };
    assert!(
        table.contains(&format!("| {} of 2 |", learned("enkf"))),
        "the table's count must be seeds.csv's: {table}"
    );
    assert_chart(&dir.join("test-error"));
    let svg = std::fs::read_to_string(dir.join("test-error.svg")).expect("svg");
    assert!(svg.contains("SGD (lr 0.1, momentum 0.9) (mean ± std, 2 seeds)"));

    // plot_dir redraws from the CSVs alone, from the experiment folder or the root.
    for stem in ["test-error.png", "test-error.svg"] {
        std::fs::remove_file(dir.join(stem)).expect("rm");
    }
    plot_dir(&out).expect("plot root");
    assert_chart(&dir.join("test-error"));
    plot_dir(&dir).expect("plot experiment");
    let err = plot_dir(&dir.join("sgd")).expect_err("no plot.json there");
    assert!(err.to_string().contains("plot.json"), "{err}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn fig3_tiny_writes_statistics_and_histogram_charts() {
    let out = tmp("fig3");
    // Two seeds: each is its own run with its own charts and table rows.
    let opts = ReproduceOptions {
        stats_seeds: 2,
        ..tiny(&out)
    };
    run(Experiment::Fig3, &opts).expect("fig3 tiny");
    let dir = out.join("fig3");
    let (h, rows) = read_csv(&dir.join("sgd/seed-0/stats.csv"));
    assert_eq!(h, ["iteration", "layer", "quantity", "mean", "std"]);
    // 3 rows (0, 1, 2) × (3 activation + 3 gradient layers).
    assert_eq!(rows.len(), 3 * 6);
    let (h, _) = read_csv(&dir.join("sgd/seed-0/hist.csv"));
    assert_eq!(
        h,
        [
            "iteration",
            "layer",
            "quantity",
            "bin_lo",
            "bin_hi",
            "count"
        ]
    );
    for chart in [
        "activations-sgd",
        "gradient-std-sgd",
        "hist-activations-sgd",
        "hist-gradients-sgd",
        "activations-sgd-seed-1",
        "hist-gradients-sgd-seed-1",
    ] {
        assert_chart(&dir.join(chart));
    }
    let (_, rows1) = read_csv(&dir.join("sgd/seed-1/stats.csv"));
    assert_eq!(rows1.len(), 3 * 6);
    assert_ne!(rows, rows1, "seed 1 is a different run");
    let table = std::fs::read_to_string(dir.join("table.md")).expect("table");
    // The paper's stated numbers beside ours, one row per layer and quantity.
    assert!(table.contains("mean 0.4597, std 0.2976"), "{table}");
    for layer in 1..=3 {
        assert!(
            table.contains(&format!("| activation, layer {layer} | mean ")),
            "{table}"
        );
        assert!(
            table.contains(&format!("| gradient, layer {layer} | mean ")),
            "{table}"
        );
    }
    plot_dir(&dir).expect("replot");
    std::fs::remove_dir_all(&out).ok();
}

/// Fig. 10's bounds follow `-J`: the paper's (b_l 1000, b_u 10,000, v 1000 at J = 5000)
/// one fifth as large at J = 1000, twice at 10,000; the quick scale keeps its own at its
/// own J; tiny J keeps 2 ≤ b_l ≤ J ≤ b_u and v ≥ 1.
#[test]
fn fig10_bounds_scale_with_the_ensemble_size() {
    let paper = Scale::paper();
    assert_eq!(paper.fig10_adapt(5000), (500, 1000, 10_000, 1000, 10.0));
    assert_eq!(paper.fig10_adapt(1000), (500, 200, 2000, 200, 10.0));
    assert_eq!(paper.fig10_adapt(10_000), (500, 2000, 20_000, 2000, 10.0));
    assert_eq!(paper.fig10_adapt(3), (500, 2, 6, 1, 10.0));
    assert_eq!(Scale::quick().fig10_adapt(100), Scale::quick().adapt);
    let (_, lo, hi, v, _) = Scale::tiny().fig10_adapt(4);
    assert_eq!((lo, hi, v), (3, 5, 1));
}

#[test]
fn fig10_tiny_runs_fixed_and_adaptive_with_a_decision_log() {
    let out = tmp("fig10");
    // ε given (`--adapt-epsilon`): both adaptive runs take it, the fixed run has none.
    let opts = ReproduceOptions {
        seeds: 1,
        adapt_epsilon: Some(99.5),
        ..tiny(&out)
    };
    run(Experiment::Fig10, &opts).expect("fig10 tiny");
    let dir = out.join("fig10");
    assert!(dir.join("adaptive/seed-0/adaptive.csv").is_file());
    assert!(!dir.join("fixed/seed-0/adaptive.csv").exists());
    let (_, rows) = read_csv(&dir.join("summary.csv"));
    assert!(dir.join("adaptive-authors/seed-0/adaptive.csv").is_file());
    for run in ["fixed", "adaptive", "adaptive-authors"] {
        assert!(rows.iter().any(|r| r[0] == run), "{run} missing: {rows:?}");
    }
    let (tau, lo, hi, v, _) = Scale::tiny().fig10_adapt(Scale::tiny().members);
    for (run, rule) in [("adaptive", "algorithm"), ("adaptive-authors", "authors")] {
        let path = dir.join(run).join("seed-0/config.json");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("config"))
                .expect("config json");
        assert_eq!(cfg["adapt_rule"], rule, "{run}: {cfg}");
        assert_eq!(cfg["adapt_epsilon"].as_f64(), Some(99.5), "{run}: {cfg}");
        for (key, want) in [
            ("adapt_every", tau),
            ("adapt_min_members", lo),
            ("adapt_max_members", hi),
            ("adapt_step", v),
        ] {
            assert_eq!(cfg[key].as_u64(), Some(want as u64), "{run} {key}: {cfg}");
        }
    }
    assert_chart(&dir.join("test-error"));
    std::fs::remove_dir_all(&out).ok();
}

/// `--adapt-epsilon` is Fig. 10's: with another experiment, or out of (0, 100], it is an
/// error naming the flag before any run or folder.
#[test]
fn adapt_epsilon_is_checked_before_any_run() {
    let out = tmp("eps");
    for (exp, eps, want) in [
        (Experiment::Fig1, 20.0, "reproduce fig10"),
        (Experiment::Fig10, f64::NAN, "0 < ε ≤ 100, got NaN"),
        (Experiment::Fig10, 0.0, "got 0"),
        (Experiment::Fig10, 120.0, "got 120"),
    ] {
        let opts = ReproduceOptions {
            seeds: 1,
            adapt_epsilon: Some(eps),
            ..tiny(&out)
        };
        let e = run(exp, &opts).expect_err("bad epsilon").to_string();
        assert!(e.contains("--adapt-epsilon") && e.contains(want), "{e}");
        assert!(!out.exists(), "a folder was made for {e}");
    }
}

/// A misspelt `--only` name is an error that lists the experiment's runs, before any
/// folder is made (it used to surface only once the data were loaded).
#[test]
fn unknown_only_is_checked_before_any_run() {
    let out = tmp("only");
    for (exp, name, listed) in [
        (Experiment::Methods, "transfrom", "transform-additive0.3"),
        (Experiment::Fig10, "adaptive-author", "adaptive-authors"),
        (Experiment::Fig1, "J5000", "sgd, adam, enkf"),
    ] {
        let opts = ReproduceOptions {
            seeds: 1,
            only: vec![name.to_string()],
            ..tiny(&out)
        };
        let e = run(exp, &opts).expect_err("unknown run").to_string();
        assert!(
            e.contains(&format!("--only {name}")) && e.contains(listed),
            "{e}"
        );
        assert!(!out.exists(), "a folder was made for {e}");
    }
}

/// `reproduce deep`: SGD, Adam and the EnKF on both layer-spec networks, on the CPU
/// even with `--backend auto`; each run's config and done record hold its network;
/// `--backend cuda` is refused before any run (heaviside's zero gradient is tested in
/// `tests/spec_backprop.rs`).
#[test]
fn deep_tiny_trains_spec_networks_with_every_method() {
    let out = tmp("deep");
    let opts = ReproduceOptions {
        seeds: 1,
        backend: BackendKind::Auto,
        ..tiny(&out)
    };
    run(Experiment::Deep, &opts).expect("deep tiny");
    let dir = out.join("deep");
    let (_, rows) = read_csv(&dir.join("summary.csv"));
    for run in [
        "mlp6-sgd",
        "mlp6-adam",
        "mlp6-enkf",
        "step-sgd",
        "step-adam",
        "step-enkf",
    ] {
        assert!(rows.iter().any(|r| r[0] == run), "{run} missing: {rows:?}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("step-enkf/seed-0/config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(cfg["net"][2]["type"], "heaviside", "{cfg}");
    assert_eq!(cfg["backend"], "cpu");
    let done = std::fs::read_to_string(dir.join("step-sgd/seed-0/done.json")).expect("done");
    assert!(done.contains("heaviside"), "{done}");
    let table = std::fs::read_to_string(dir.join("table.md")).expect("table");
    assert!(table.contains("beyond the paper"), "{table}");
    assert_chart(&dir.join("test-error"));
    // The EnKF runs layer-spec networks on CUDA (the gradient runs stay on the CPU):
    // without a GPU the only refusal is the missing GPU, not the networks.
    let cuda = run(
        Experiment::Deep,
        &ReproduceOptions {
            backend: BackendKind::Cuda,
            ..tiny(&tmp("deep-cuda"))
        },
    );
    if let Err(err) = cuda {
        assert!(err.to_string().contains("no GPU is usable"), "{err}");
    }
    std::fs::remove_dir_all(&out).ok();
}

/// `reproduce methods`: the authors' update and the EKI variants, one run each; every
/// run's config.json holds its variant.
#[test]
fn methods_tiny_runs_every_variant() {
    let out = tmp("methods");
    let opts = ReproduceOptions {
        seeds: 1,
        ..tiny(&out)
    };
    run(Experiment::Methods, &opts).expect("methods tiny");
    let dir = out.join("methods");
    let (_, rows) = read_csv(&dir.join("summary.csv"));
    let config = |run: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join(run).join("seed-0/config.json")).expect("config"),
        )
        .expect("json")
    };
    for (run, key, value) in [
        ("authors", "update", serde_json::json!("sequential")),
        ("inflation1.05", "inflation", serde_json::json!(1.05)),
        ("perturbed", "observations", serde_json::json!("perturbed")),
        ("dmc", "step", serde_json::json!("dmc")),
        ("additive0.3", "additive_from", serde_json::json!("spread")),
        ("transform", "update", serde_json::json!("transform")),
        (
            "transform-additive0.3",
            "additive_inflation",
            serde_json::json!(0.3),
        ),
        (
            "transform-additive0.3-exp2500",
            "inflation_schedule",
            serde_json::json!("exponential"),
        ),
    ] {
        assert!(rows.iter().any(|r| r[0] == run), "{run} missing: {rows:?}");
        assert_eq!(config(run)[key], value, "{run}");
    }
    assert_eq!(config("transform-additive0.3")["update"], "transform");
    let decaying = config("transform-additive0.3-exp2500");
    assert_eq!(decaying["inflation_horizon"], 2500);
    assert_eq!(decaying["additive_inflation"], 0.3);
    assert_eq!(decaying["update"], "transform");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn zero_seeds_is_a_config_error() {
    let out = tmp("zero");
    let opts = ReproduceOptions {
        seeds: 0,
        ..tiny(&out)
    };
    let err = run(Experiment::Fig8Members, &opts).expect_err("0 seeds");
    assert!(err.to_string().contains("seeds"), "{err}");
}

/// The whole set at `--quick` size (minutes on a 2-core CPU), data from `$ENKF_DATA_DIR`
/// (else `data/`): `REPRO_OUT=dir cargo test --test reproduce_quick -- --ignored`.
#[test]
#[ignore]
fn all_quick() {
    let out = std::env::var_os("REPRO_OUT").map_or_else(|| tmp("all"), PathBuf::from);
    let opts = ReproduceOptions {
        tiny: false,
        backend: BackendKind::Auto,
        data_root: enkf_dnn::data::data_root(),
        ..tiny(&out)
    };
    run(Experiment::All, &opts).expect("all --quick");
    for e in Experiment::EVERY {
        assert!(
            out.join(e.name()).join("table.md").is_file(),
            "{}",
            e.name()
        );
    }
}

/// `--only` slices: one curve of fig8-members, then the other; the second call reuses the
/// first's finished runs (their `done.json`) and completes the table; a reused folder
/// with other settings is refused instead of mixed in or overwritten.
#[test]
fn slices_add_up_and_finished_runs_are_reused_not_overwritten() {
    let out = tmp("slices");
    let dir = out.join("fig8-members");
    let first = ReproduceOptions {
        only: vec!["J4".into()],
        ..tiny(&out)
    };
    run(Experiment::Fig8Members, &first).expect("slice J4");
    assert!(dir.join("J4/seed-1/done.json").is_file());
    assert!(!dir.join("J8").exists(), "J8 trained outside its slice");
    let table = std::fs::read_to_string(dir.join("table.md")).expect("table");
    assert!(
        table.contains("Not run yet") && table.contains("--only J8"),
        "{table}"
    );
    let (_, rows) = read_csv(&dir.join("summary.csv"));
    assert!(rows.iter().all(|r| r[0] == "J4"), "{rows:?}");

    // The second slice: J4's metrics are reused byte for byte, J8 is trained.
    let j4 = std::fs::read(dir.join("J4/seed-0/metrics.csv")).expect("J4 metrics");
    let second = ReproduceOptions {
        only: vec!["J8".into()],
        ..tiny(&out)
    };
    run(Experiment::Fig8Members, &second).expect("slice J8");
    assert_eq!(
        std::fs::read(dir.join("J4/seed-0/metrics.csv")).unwrap(),
        j4
    );
    let table = std::fs::read_to_string(dir.join("table.md")).expect("table");
    assert!(!table.contains("Not run yet"), "{table}");
    let (_, rows) = read_csv(&dir.join("summary.csv"));
    assert!(rows.iter().any(|r| r[0] == "J4") && rows.iter().any(|r| r[0] == "J8"));

    // Other settings into the same folders: refused, J4 untouched.
    let other = ReproduceOptions {
        seeds: 1,
        threads: Some(1),
        ..tiny(&out)
    };
    let other = ReproduceOptions {
        members: Some(7),
        ..other
    };
    run(Experiment::Fig8Members, &other).expect("J is swept, -J does not enter fig8-members");
    let mut changed = tiny(&out);
    changed.data_root = out.join("elsewhere");
    std::fs::create_dir_all(changed.data_root.join("mnist")).unwrap();
    for f in std::fs::read_dir(enkf_dnn::data::data_root().join("mnist")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(
            f.path(),
            changed.data_root.join("mnist").join(f.file_name()),
        )
        .unwrap();
    }
    let err = run(Experiment::Fig8Members, &changed).expect_err("other settings");
    assert!(
        err.to_string()
            .contains("holds a finished run with other settings"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.join("J4/seed-0/metrics.csv")).unwrap(),
        j4
    );

    // Unknown curve names and `all` are errors naming what exists.
    let bad = ReproduceOptions {
        only: vec!["J5".into()],
        ..tiny(&out)
    };
    let err = run(Experiment::Fig8Members, &bad).expect_err("unknown run");
    assert!(err.to_string().contains("J4, J8"), "{err}");
    let err = run(Experiment::All, &first).expect_err("--only with all");
    assert!(err.to_string().contains("--only"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
