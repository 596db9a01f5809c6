//! CUDA backpropagation and optimizer steps against their CPU twins
//! (`gpu::backprop` vs `cpu::backprop`, `GpuOptimizer` vs `Sgd`/`Adam`), and a short
//! GPU gradient run against the CPU run. GPU tests skip with a printed reason when no
//! usable GPU is present (the probe fails) and fail instead when `REQUIRE_GPU=1`.

//!
//! Inputs and tolerances are those of `tests/common/twins.rs`.

mod common;
use common::twins::{
    assert_bits, assert_moved, case_inputs, compare_cache, nets, optimizer_inputs, twin_case,
    ACT_TOL, B, GRAD_TOL, LOGIT_TOL, TIE_GAP,
};
use common::{assert_close, gpu, max_abs, up};

use enkf_dnn::backend::{Backend, MathMode};
use enkf_dnn::cpu::backprop::backprop;
use enkf_dnn::data::{default_mnist_dir, load_dir, DataSplit};
use enkf_dnn::gpu::backprop::{self as gbp, GpuOptimizer};
use enkf_dnn::gpu::CudaBackend;
use enkf_dnn::model::{Activation, Arch, Net};
use enkf_dnn::train::gradient::{GradConfig, GradientTrainer};
use enkf_dnn::train::optim::{Adam, GradOptimizer, Optimizer, Sgd};
use enkf_dnn::train::stats::StatsWriter;

/// Short GPU vs CPU training runs: the trajectories differ only by the rounding of the
/// gradients (≲ 1e-5 relative) propagated through 4 steps; the train loss of each row
/// must agree to 1e-3 relative, ≥ 100× the expected difference, while one wrong step
/// (a sign, a missing momentum term) changes it by ≥ 1e-2.
const RUN_TOL: f64 = 1e-3;

/// CPU only (runs everywhere): the seeded inputs of the GPU twins have no near ties in
/// any pool window, and the CPU f32 gradient is within a small fraction of GRAD_TOL of
/// the f64 gradient, which is what the tolerances above assume.
#[test]
fn twin_inputs_have_no_near_ties_and_small_f32_error() {
    for (i, net) in nets().into_iter().enumerate() {
        let (w, x, labels) = twin_case(&net, i);
        let f = backprop(&net, &w, &x, &labels).expect("f32 backprop");
        let w64: Vec<f64> = up(&w);
        let x64: Vec<f64> = up(&x);
        let d = backprop(&net, &w64, &x64, &labels).expect("f64 backprop");
        for (name, a32, a64) in [
            ("a1", &f.cache.a1, &d.cache.a1),
            ("a2", &f.cache.a2, &d.cache.a2),
        ] {
            let err = up(a32)
                .iter()
                .zip(a64)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            println!("{net:?} {name}: f32 vs f64 max error {err:.2e}");
            if net.act == Activation::Relu {
                assert_eq!(
                    err, 0.0,
                    "{net:?} {name}: ReLU pre-activations must be exact"
                );
            }
            assert!(
                err <= 0.1 * (TIE_GAP as f64).min(ACT_TOL),
                "{net:?} {name}: f32 error {err:e} leaves TIE_GAP and ACT_TOL no margin"
            );
        }
        assert_eq!(
            f.cache.arg1, d.cache.arg1,
            "{net:?}: f32 and f64 pool1 arg-max"
        );
        assert_eq!(
            f.cache.arg2, d.cache.arg2,
            "{net:?}: f32 and f64 pool2 arg-max"
        );
        assert!(
            (f.loss - d.loss).abs() <= 0.1 * LOGIT_TOL * d.loss.abs(),
            "{net:?}: f32 loss {} vs f64 {}",
            f.loss,
            d.loss
        );
        for spec in net.tensors() {
            let g32 = up(&f.grad[spec.range()]);
            let g64 = &d.grad[spec.range()];
            let m = max_abs(g64);
            assert!(m > 0.0, "{net:?} {}: zero gradient", spec.name);
            let worst = g32
                .iter()
                .zip(g64)
                .fold(0.0f64, |acc, (a, b)| acc.max((a - b).abs()));
            println!(
                "{net:?} {}: max|g| = {m:.3e}, f32 vs f64 max error = {:.2e} of max|g|",
                spec.name,
                worst / m
            );
            assert!(
                worst <= 0.1 * GRAD_TOL * m,
                "{net:?} {}: f32 vs f64 error {worst:e} leaves the GPU tolerance no margin",
                spec.name
            );
        }
    }
}

#[test]
fn backprop_matches_cpu_for_every_arch_and_activation() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    for (i, net) in nets().into_iter().enumerate() {
        let what = format!("{net:?}");
        let (w, x, labels) = twin_case(&net, i);
        let want = backprop(&net, &w, &x, &labels).expect("cpu backprop");
        let (wd, xd) = (be.upload_f32(&w).unwrap(), be.upload_f32(&x).unwrap());
        let got = gbp::backprop(&be, &net, &wd, &xd, &labels).expect("gpu backprop");
        assert!(
            (got.loss - want.loss).abs() <= LOGIT_TOL * 0.1 * want.loss.abs(),
            "{what}: loss {} vs cpu {}",
            got.loss,
            want.loss
        );
        assert_eq!(got.correct, want.correct, "{what}: correct count");
        compare_cache(&what, &got.cache.download(&be).unwrap(), &want.cache);
        let g = be.download_f32(&got.grad).unwrap();
        for spec in net.tensors() {
            let wg = up(&want.grad[spec.range()]);
            assert_close(
                &format!("{what} d/d {}", spec.name),
                &up(&g[spec.range()]),
                &wg,
                GRAD_TOL * max_abs(&wg),
                GRAD_TOL,
            );
        }
        // The forward-only entry point gives the same cache as the backprop pass.
        let fwd = gbp::forward_cached(&be, &net, &wd, &xd, B).expect("gpu forward_cached");
        let a = fwd.download(&be).unwrap();
        let b = got.cache.download(&be).unwrap();
        assert_eq!(a, b, "{what}: forward_cached vs backprop cache");
    }
}

#[test]
fn backprop_is_deterministic_and_checks_its_inputs() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let net = Net::new(Arch::Paper, Activation::Logistic);
    let (w, x, labels) = case_inputs(&net, 7);
    let (wd, xd) = (be.upload_f32(&w).unwrap(), be.upload_f32(&x).unwrap());
    let a = gbp::backprop(&be, &net, &wd, &xd, &labels).unwrap();
    let b = gbp::backprop(&be, &net, &wd, &xd, &labels).unwrap();
    let (ga, gb) = (
        be.download_f32(&a.grad).unwrap(),
        be.download_f32(&b.grad).unwrap(),
    );
    assert!(
        ga.iter().zip(&gb).all(|(p, q)| p.to_bits() == q.to_bits()),
        "two identical GPU passes gave different gradients"
    );
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    let mut bad = labels.clone();
    bad[3] = 10;
    assert!(
        gbp::backprop(&be, &net, &wd, &xd, &bad).is_err(),
        "label 10"
    );
    assert!(
        gbp::backprop(&be, &net, &wd, &xd, &labels[..B - 1]).is_err(),
        "x longer than labels × 784"
    );
    assert!(gbp::backprop(
        &be,
        &Net::new(Arch::Pooled, Activation::Logistic),
        &wd,
        &xd,
        &labels
    )
    .is_err());
}

/// Runs `steps` updates of the CPU optimizer and its GPU twin on the same seeded
/// parameters and gradients, and requires bit-identical parameters (and state) after
/// each: the kernels round exactly as the CPU code (no FMA contraction, IEEE √ and ÷).
fn optimizer_case(be: &CudaBackend, what: &str, mut cpu: GradOptimizer, seed: u64) {
    let (start, grads) = optimizer_inputs(seed, 1000, 4);
    let mut p = start.clone();
    let mut gpu_opt = GpuOptimizer::from_host(be, &cpu).expect("gpu optimizer");
    let mut pd = be.upload_f32(&p).unwrap();
    for (s, g) in grads.iter().enumerate() {
        let gd = be.upload_f32(g).unwrap();
        cpu.step(&mut p, g).expect("cpu step");
        gpu_opt.step(be, &mut pd, &gd).expect("gpu step");
        assert_bits(
            &format!("{what} step {s} (gpu vs cpu)"),
            &be.download_f32(&pd).unwrap(),
            &p,
        );
    }
    assert_moved(what, &p, &start);
}

#[test]
fn optimizer_steps_are_bit_identical_to_cpu() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    optimizer_case(
        &be,
        "sgd momentum 0.9",
        GradOptimizer::Sgd(Sgd::new(0.1, 0.9).unwrap()),
        1,
    );
    optimizer_case(
        &be,
        "sgd no momentum",
        GradOptimizer::Sgd(Sgd::new(0.05, 0.0).unwrap()),
        2,
    );
    optimizer_case(
        &be,
        "adam defaults",
        GradOptimizer::Adam(Adam::new(1e-3).unwrap()),
        3,
    );
    optimizer_case(
        &be,
        "adam custom",
        GradOptimizer::Adam(Adam::with_params(3e-2, 0.8, 0.99, 1e-6).unwrap()),
        4,
    );
    let mut sgd =
        GpuOptimizer::from_host(&be, &GradOptimizer::Sgd(Sgd::new(0.1, 0.9).unwrap())).unwrap();
    let mut p = be.zeros_f32(10).unwrap();
    let g = be.zeros_f32(9).unwrap();
    assert!(sgd.step(&be, &mut p, &g).is_err(), "grad length 9 vs 10");
}

fn mnist_subset(train: usize, test: usize) -> Option<DataSplit> {
    let d = match load_dir(&default_mnist_dir()) {
        Ok(d) => d,
        Err(e) => {
            if std::env::var("REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_GPU=1 but MNIST is missing: {e}");
            }
            println!("skipped: no MNIST: {e}");
            return None;
        }
    };
    Some(DataSplit {
        train: d.train.subset(train),
        test: d.test.subset(test),
        dir: d.dir.clone(),
        task: Default::default(),
    })
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("enkf-gpubp-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn gpu_gradient_run_tracks_the_cpu_run_and_writes_statistics() {
    let Some(first) = gpu(MathMode::Fp32) else {
        return;
    };
    let mut first = Some(first);
    let Some(data) = mnist_subset(200, 100) else {
        return;
    };
    for (opt, act) in [
        (Optimizer::Sgd, Activation::Relu),
        (Optimizer::Adam, Activation::Logistic),
    ] {
        let mut cfg = GradConfig::new(opt);
        cfg.net = Net::new(Arch::Paper, act);
        cfg.sigma = 0.1;
        cfg.iterations = Some(4);
        cfg.batch = 64;
        cfg.eval_every = 2;
        cfg.hist_every = 2;
        let what = format!("{opt:?} {act:?}");
        let (dc, dg) = (tmpdir("cpu"), tmpdir("gpu"));
        let mut wc = StatsWriter::create(&dc, cfg.hist_every).expect("writer");
        let mut wg = StatsWriter::create(&dg, cfg.hist_every).expect("writer");
        let mut cpu = GradientTrainer::new(&cfg, &data).expect("cpu trainer");
        let rc = cpu.run(&mut (), Some(&mut wc)).expect("cpu run");
        // The trainer owns its device: the opened backend, then a new one for the second run.
        let dev = match first.take() {
            Some(be) => be,
            None => CudaBackend::new(0, MathMode::Fp32).expect("second backend"),
        };
        let mut g = GradientTrainer::on(dev, &cfg, &data).expect("gpu trainer");
        assert!(g.device_name().starts_with("cuda"), "{}", g.device_name());
        let rg = g.run(&mut (), Some(&mut wg)).expect("gpu run");
        drop((wc, wg));
        assert_eq!(rc.len(), rg.len(), "{what}: rows");
        for (a, b) in rc.iter().zip(&rg) {
            assert!(
                (a.train_loss - b.train_loss).abs() <= RUN_TOL * a.train_loss.abs(),
                "{what} row {}: gpu loss {} vs cpu {}",
                a.iteration,
                b.train_loss,
                a.train_loss
            );
            assert_eq!(a.test_error.is_some(), b.test_error.is_some());
            if let (Some(x), Some(y)) = (a.test_loss, b.test_loss) {
                assert!(
                    (x - y).abs() <= RUN_TOL * x.abs(),
                    "{what}: test loss {y} vs {x}"
                );
            }
        }
        assert_close(
            &format!("{what} final weights"),
            &up(g.weights()),
            &up(cpu.weights()),
            RUN_TOL * max_abs(&up(cpu.weights())),
            RUN_TOL,
        );
        for file in ["stats.csv", "hist.csv"] {
            let a = std::fs::read_to_string(dc.join(file)).expect("cpu stats");
            let b = std::fs::read_to_string(dg.join(file)).expect("gpu stats");
            assert_eq!(
                a.lines().count(),
                b.lines().count(),
                "{what}: {file} line count"
            );
            assert!(a.lines().count() > 1, "{what}: {file} is empty");
        }
        let _ = std::fs::remove_dir_all(&dc);
        let _ = std::fs::remove_dir_all(&dg);
    }
}
