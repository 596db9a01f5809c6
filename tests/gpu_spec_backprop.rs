//! CUDA backpropagation of layer-spec networks (`gpu::spec_backprop`: the forward ops of
//! `kernels/spec.cu` with one member, `kernels/spec_backprop.cu` and cuBLAS) against the
//! CPU backend's (`cpu::spec_backprop`) on random specs, real targets and the presets
//! (where the fused GPU backprop gives the same function), and bit-identical from run to
//! run. Skips with a printed reason when no usable GPU is present; fails instead when
//! `REQUIRE_GPU=1`.
//!
//! Tolerance: `GRAD_TOL` per tensor, as `tests/spec_backplan.rs` (the same plan with the
//! kernels' CPU twins): the device's expf/tanhf (≤ 2 ulp) and cuBLAS's summation order
//! add rounding of the same size as the FMA and order differences there.

mod common;
use common::twins::{normals32, random_specs, spec_tensors, GRAD_TOL, REAL_TARGET_SPECS};
use common::{assert_close, gpu, up};

use enkf_dnn::backend::{Backend, CacheMode, MathMode};
use enkf_dnn::cpu::spec_backprop::{spec_backprop, spec_backprop_mse};
use enkf_dnn::gpu::CudaBackend;
use enkf_dnn::model::spec::{parse_short, preset, NetSpec, Shape};
use enkf_dnn::model::{Activation, Arch, Net};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// The GPU's (loss, correct, gradient) of one spec network on a batch.
fn gpu_grad(
    be: &CudaBackend,
    net: &Net,
    w: &[f32],
    x: &[f32],
    labels: Option<&[u8]>,
    targets: &[f32],
) -> (f64, usize, Vec<f32>) {
    let (wd, xd) = (be.upload_f32(w).unwrap(), be.upload_f32(x).unwrap());
    let mut gd = be.zeros_f32(net.n_params()).unwrap();
    let step = match labels {
        Some(l) => be.backprop(net, &wd, &xd, l, &mut gd, CacheMode::Drop),
        None => be.backprop_mse(net, &wd, &xd, targets, &mut gd),
    }
    .expect("gpu spec backprop");
    (step.loss, step.correct, be.download_f32(&gd).unwrap())
}

fn compare(
    what: &str,
    spec: &NetSpec,
    got: &(f64, usize, Vec<f32>),
    loss: f64,
    correct: usize,
    want: &[f32],
) {
    assert!(
        (got.0 - loss).abs() <= 1e-5 * (1.0 + loss.abs()),
        "{what}: loss {} vs {loss}",
        got.0
    );
    assert_eq!(got.1, correct, "{what}: correct");
    for (name, r) in spec_tensors(spec) {
        let (g, wt) = (up(&got.2[r.clone()]), up(&want[r]));
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
fn spec_backprop_matches_cpu_on_random_specs_and_repeats_bit_for_bit() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    for (text, input) in random_specs(&mut rng) {
        let text = text.replace("heaviside", "tanh").replace("relu", "tanh");
        let spec = NetSpec::build(&parse_short(&text).unwrap(), input, 10).unwrap();
        let images = 33;
        let w = normals32(&mut rng, spec.n_params(), 0.5);
        let x: Vec<f32> = (0..images * spec.input().len())
            .map(|_| rng.random::<f32>() - 0.25)
            .collect();
        let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
        let want = spec_backprop(&spec, &w, &x, &labels).unwrap();
        let net = Net::from_spec(Arc::new(spec.clone()));
        let got = gpu_grad(&be, &net, &w, &x, Some(&labels), &[]);
        compare(&text, &spec, &got, want.loss, want.correct, &want.grad);
        let again = gpu_grad(&be, &net, &w, &x, Some(&labels), &[]);
        assert_eq!(got.0.to_bits(), again.0.to_bits(), "{text}: loss repeats");
        assert!(
            got.2
                .iter()
                .zip(&again.2)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{text}: the gradient repeats bit for bit"
        );
    }
}

#[test]
fn spec_backprop_of_real_targets_and_heaviside_matches_cpu() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(72);
    for (text, input, k) in REAL_TARGET_SPECS {
        let spec = NetSpec::build(&parse_short(text).unwrap(), input, k).unwrap();
        let images = 17;
        let w = normals32(&mut rng, spec.n_params(), 0.7);
        let x = normals32(&mut rng, images * spec.input().len(), 1.0);
        let t = normals32(&mut rng, images * k, 1.0);
        let want = spec_backprop_mse(&spec, &w, &x, &t).unwrap();
        let net = Net::from_spec(Arc::new(spec.clone()));
        let got = gpu_grad(&be, &net, &w, &x, None, &t);
        compare(text, &spec, &got, want.loss, 0, &want.grad);
    }
    // Heaviside passes no gradient on the GPU either: the weights below it get exact
    // zeros.
    let text = "flatten heaviside linear(8) heaviside linear(10)";
    let spec = NetSpec::build(&parse_short(text).unwrap(), Shape::Vector(12), 10).unwrap();
    let images = 9;
    let w = normals32(&mut rng, spec.n_params(), 1.0);
    let x = normals32(&mut rng, images * 12, 1.0);
    let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
    let net = Net::from_spec(Arc::new(spec.clone()));
    let got = gpu_grad(&be, &net, &w, &x, Some(&labels), &[]);
    let tensors = spec_tensors(&spec);
    // linear(8)'s weight and bias sit below the second heaviside; linear(10)'s above.
    assert!(got.2[tensors[0].1.start..tensors[1].1.end]
        .iter()
        .all(|&v| v == 0.0));
    assert!(got.2[tensors[2].1.clone()].iter().any(|&v| v != 0.0));
}

/// On the paper presets the generic GPU pass gives the fused GPU backprop's gradient.
#[test]
fn spec_backprop_on_the_presets_matches_the_fused_gpu_backprop() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(73);
    let mnist = Shape::Image { c: 1, h: 28, w: 28 };
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Tanh] {
            let fused = Net::new(arch, act);
            let spec = NetSpec::build(&preset(arch, act), mnist, 10).unwrap();
            let generic = Net::from_spec(Arc::new(spec.clone()));
            let images = 64;
            let w = normals32(&mut rng, fused.n_params(), 1.0);
            let x: Vec<f32> = (0..images * 784).map(|_| rng.random()).collect();
            let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
            let want = gpu_grad(&be, &fused, &w, &x, Some(&labels), &[]);
            let got = gpu_grad(&be, &generic, &w, &x, Some(&labels), &[]);
            compare(
                &format!("{arch:?}/{act:?}"),
                &spec,
                &got,
                want.0,
                want.1,
                &want.2,
            );
        }
    }
}
