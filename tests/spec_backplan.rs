//! The GPU's backpropagation plan for layer-spec networks (`gpu::spec_backplan`), run
//! with the kernels' CPU twins (`cpu::spec_backprop_kernels::run_backprop`, the launches
//! the CUDA backend makes), against the CPU backend's own backpropagation
//! (`cpu::spec_backprop`) on random specs, the presets and real targets; the plan's
//! shape; and the target checks.
//!
//! Tolerance: `GRAD_TOL` per tensor (1e-4 of the tensor's largest |g| plus 1e-4
//! relative, see `tests/common/twins.rs`): the twins fuse multiply-adds and sum over the
//! batch in another order (a tree per weight) than the CPU path, f32 sums of at most a
//! few thousand terms; a wrong offset, a missing activation derivative, a misrouted pool
//! gradient or a transposed GEMM is off by the gradient's own size. Heaviside and ReLU
//! are replaced by tanh in the random specs where they follow a computed layer (a value
//! within rounding of 0 may step, or change its derivative, differently on the two
//! paths); heaviside's zero gradient is checked on its own below.

mod common;
use common::twins::{normals32, random_specs, spec_tensors, GRAD_TOL, REAL_TARGET_SPECS};
use common::{assert_close, up};

use enkf_dnn::cpu::spec_backprop::{spec_backprop, spec_backprop_mse};
use enkf_dnn::cpu::spec_backprop_kernels::{run_backprop, SpecTargets};
use enkf_dnn::gpu::spec_backplan::{BackPlan, BackStep, Tape};
use enkf_dnn::gpu::spec_plan::SpecPlan;
use enkf_dnn::model::spec::{parse_short, preset, NetSpec, Shape};
use enkf_dnn::model::{Activation, Arch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The twin plan's loss, correct count and gradient against the CPU path's.
fn compare(spec: &NetSpec, w: &[f32], x: &[f32], targets: SpecTargets<'_>, what: &str) {
    let plan = BackPlan::of(SpecPlan::of(spec));
    let got = run_backprop(&plan, spec, w, x, targets).expect("twin backprop");
    let want = match targets {
        SpecTargets::Labels(l) => spec_backprop(spec, w, x, l).expect("cpu backprop"),
        SpecTargets::Real(t) => spec_backprop_mse(spec, w, x, t).expect("cpu backprop"),
    };
    assert!(
        (got.loss - want.loss).abs() <= 1e-5 * (1.0 + want.loss.abs()),
        "{what}: loss {} vs {}",
        got.loss,
        want.loss
    );
    assert_eq!(got.correct, want.correct, "{what}: correct");
    for (name, r) in spec_tensors(spec) {
        let (g, wt) = (up(&got.grad[r.clone()]), up(&want.grad[r]));
        let scale = wt.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert_close(
            &format!("{what} {name}"),
            &g,
            &wt,
            GRAD_TOL * scale,
            GRAD_TOL,
        );
    }
}

#[test]
fn the_twin_plan_matches_the_cpu_backprop_on_random_specs() {
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    for (text, input) in random_specs(&mut rng) {
        let text = text.replace("heaviside", "tanh").replace("relu", "tanh");
        let spec = NetSpec::build(&parse_short(&text).unwrap(), input, 10).unwrap();
        let images = 9;
        let w = normals32(&mut rng, spec.n_params(), 0.5);
        let x: Vec<f32> = (0..images * spec.input().len())
            .map(|_| rng.random::<f32>() - 0.25)
            .collect();
        let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
        compare(&spec, &w, &x, SpecTargets::Labels(&labels), &text);
    }
}

#[test]
fn the_twin_plan_matches_the_cpu_backprop_on_the_presets_and_real_targets() {
    let mut rng = ChaCha8Rng::seed_from_u64(62);
    let image = Shape::Image { c: 1, h: 28, w: 28 };
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Tanh] {
            let spec = NetSpec::build(&preset(arch, act), image, 10).unwrap();
            let images = 5;
            let w = normals32(&mut rng, spec.n_params(), 1.0);
            let x: Vec<f32> = (0..images * 784).map(|_| rng.random()).collect();
            let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
            compare(
                &spec,
                &w,
                &x,
                SpecTargets::Labels(&labels),
                &format!("{arch:?}/{act:?}"),
            );
        }
    }
    // Real targets (the mean squared error), with an activation on the output.
    for (text, input, k) in REAL_TARGET_SPECS {
        let spec = NetSpec::build(&parse_short(text).unwrap(), input, k).unwrap();
        let images = 6;
        let w = normals32(&mut rng, spec.n_params(), 0.7);
        let x = normals32(&mut rng, images * spec.input().len(), 1.0);
        let t = normals32(&mut rng, images * k, 1.0);
        compare(&spec, &w, &x, SpecTargets::Real(&t), text);
    }
}

/// Heaviside passes no gradient in the plan either: the layers below it get exact
/// zeros, the layer above it does not.
#[test]
fn heaviside_blocks_the_twin_gradient_below_it() {
    let mut rng = ChaCha8Rng::seed_from_u64(63);
    let spec = NetSpec::build(
        &parse_short("flatten linear(8) heaviside linear(10)").unwrap(),
        Shape::Vector(12),
        10,
    )
    .unwrap();
    let images = 7;
    let w = normals32(&mut rng, spec.n_params(), 1.0);
    let x = normals32(&mut rng, images * 12, 1.0);
    let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
    let plan = BackPlan::of(SpecPlan::of(&spec));
    let got = run_backprop(&plan, &spec, &w, &x, SpecTargets::Labels(&labels)).unwrap();
    let t = spec_tensors(&spec);
    let below = got.grad[t[0].1.start..t[1].1.end].iter();
    assert!(
        below.clone().all(|&v| v == 0.0),
        "below heaviside: {:?}",
        below
    );
    assert!(got.grad[t[2].1.clone()].iter().any(|&v| v != 0.0));
}

/// The plan of the paper's network: the first op's input gradient is never formed, each
/// parameter layer gives one weight gradient, each fused activation is undone before its
/// op, and the gradient buffers alternate.
#[test]
fn the_paper_plan_has_the_expected_steps() {
    let spec = NetSpec::build(
        &preset(Arch::Paper, Activation::Logistic),
        Shape::Image { c: 1, h: 28, w: 28 },
        10,
    )
    .unwrap();
    let plan = BackPlan::of(SpecPlan::of(&spec));
    let kinds: Vec<&str> = plan
        .steps
        .iter()
        .map(|s| match s {
            BackStep::Act { .. } => "act",
            BackStep::ConvWgrad { .. } => "wgrad",
            BackStep::ConvDgrad { .. } => "dgrad",
            BackStep::BiasGrad { .. } => "bias",
            BackStep::PoolBack { .. } => "pool",
            BackStep::LinearWgrad { .. } => "lwgrad",
            BackStep::LinearDgrad { .. } => "ldgrad",
        })
        .collect();
    // conv1+act → pool → conv2+act → flatten → fc1, backwards.
    assert_eq!(
        kinds,
        ["lwgrad", "ldgrad", "act", "wgrad", "dgrad", "pool", "act", "wgrad"]
    );
    assert!(matches!(
        plan.steps.last(),
        Some(BackStep::ConvWgrad { x: Tape::Input, .. })
    ));
    // The gradient of fc1's input goes to buffer 1, conv2's to 0, the pool's to 1.
    let outs: Vec<usize> = plan
        .steps
        .iter()
        .filter_map(|s| match *s {
            BackStep::ConvDgrad { out, .. }
            | BackStep::PoolBack { out, .. }
            | BackStep::LinearDgrad { out, .. } => Some(out),
            _ => None,
        })
        .collect();
    assert_eq!(outs, [1, 0, 1]);
    assert_eq!(plan.grad_len, 10 * 24 * 24);
}

#[test]
fn bad_targets_are_errors_naming_them() {
    let spec = NetSpec::build(
        &parse_short("flatten linear(3)").unwrap(),
        Shape::Vector(4),
        3,
    )
    .unwrap();
    let plan = BackPlan::of(SpecPlan::of(&spec));
    let w = vec![0.1f32; spec.n_params()];
    let x = vec![0.5f32; 8];
    let err = run_backprop(&plan, &spec, &w, &x, SpecTargets::Labels(&[0, 3]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("label of image 1") && err.contains('3'),
        "{err}"
    );
    let err = run_backprop(&plan, &spec, &w, &x, SpecTargets::Labels(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one image"), "{err}");
    let err = run_backprop(&plan, &spec, &w, &x, SpecTargets::Real(&[0.0; 7]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("targets"), "{err}");
    let err = run_backprop(&plan, &spec, &w[1..], &x, SpecTargets::Labels(&[0, 1]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("weights"), "{err}");
}
