//! The CUDA forward pass of layer-spec networks (`gpu::spec_forward`: `kernels/spec.cu`
//! and the strided-batched cuBLAS GEMM) against the CPU's (`cpu::spec_forward`), and
//! against the fused kernel on the paper's presets. Skips with a printed reason when no
//! usable GPU is present; fails instead when `REQUIRE_GPU=1`.
//!
//! Tolerance: `FORWARD_TOL` (1e-4 of the largest output, plus 1e-4 relative): the GPU
//! fuses multiply-adds and cuBLAS sums in its own order, f32 sums of up to a few
//! thousand terms, against an error of order 1 for a wrong offset, stride or block.
//! Heaviside after a computed layer is left out of the random specs (a sum within
//! rounding of 0 may step either way on the two devices); it is checked on exact
//! inputs instead.

mod common;
use common::twins::{normals32, random_specs, FORWARD_TOL};
use common::{assert_close, gpu, up};

use enkf_dnn::backend::{Backend, MathMode};
use enkf_dnn::cpu::spec_forward::spec_forward;
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::gpu::spec_plan::SpecPlan;
use enkf_dnn::gpu::CudaBackend;
use enkf_dnn::model::spec::{parse_short, preset, NetSpec, Shape};
use enkf_dnn::model::{Activation, Arch, Net};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The GPU's outputs of `members` networks of `spec` against the CPU's; returns the
/// number of blocks the GPU pass ran in.
fn spec_case(be: &CudaBackend, spec: NetSpec, members: usize, images: usize, seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (n_in, n_out) = (spec.input().len(), spec.outputs());
    let w = normals32(&mut rng, members * spec.n_params(), 0.7);
    let x: Vec<f32> = (0..images * n_in)
        .map(|_| rng.random::<f32>() - 0.25)
        .collect();
    let mut want = vec![0.0f32; members * images * n_out];
    spec_forward(&spec, &w, members, &x, images, &mut want).expect("cpu");
    let blocks = SpecPlan::of(&spec).blocks(members, images).len();
    let net = Net::from_spec(std::sync::Arc::new(spec));
    let (wd, xd) = (be.upload_f32(&w).unwrap(), be.upload_f32(&x).unwrap());
    let mut out = be.zeros_f32(want.len()).unwrap();
    be.ensemble_forward(&net, &wd, members, &xd, images, &mut out)
        .expect("gpu spec forward");
    let got = be.download_f32(&out).unwrap();
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
    assert_close(
        &format!("{}, {members} × {images}", net.describe()),
        &up(&got),
        &up(&want),
        FORWARD_TOL * scale,
        FORWARD_TOL,
    );
    blocks
}

#[test]
fn spec_forward_matches_cpu_on_random_specs() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let mut seed = 100;
    for (text, input) in random_specs(&mut rng) {
        let text = text.replace("heaviside", "relu");
        let spec = NetSpec::build(&parse_short(&text).unwrap(), input, 10).unwrap();
        spec_case(&be, spec, 5, 7, seed);
        seed += 1;
    }
    // Heaviside on exact inputs (the images themselves, then after a pool of them), a
    // leading activation, a network of flatten only.
    for (text, input) in [
        ("flatten heaviside linear(10)", Shape::Vector(37)),
        (
            "maxpool2d(2) heaviside flatten linear(10)",
            Shape::Image { c: 2, h: 8, w: 8 },
        ),
        ("flatten", Shape::Vector(10)),
    ] {
        let spec = NetSpec::build(&parse_short(text).unwrap(), input, 10).unwrap();
        spec_case(&be, spec, 3, 9, seed);
        seed += 1;
    }
}

/// Passes larger than one scratch block: the ensemble in chunks of members, and one
/// member (the mean network on a test set) in chunks of images.
#[test]
fn spec_forward_matches_cpu_across_blocks() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let mnist = Shape::Image { c: 1, h: 28, w: 28 };
    let text = "conv2d(64,3,padding=1) relu maxpool2d(4) flatten linear(10)";
    let build = || NetSpec::build(&parse_short(text).unwrap(), mnist, 10).unwrap();
    assert!(spec_case(&be, build(), 50, 64, 1) > 1, "chunks of members");
    assert!(spec_case(&be, build(), 1, 3000, 2) > 1, "chunks of images");
}

/// The generic path on the paper presets gives the fused kernel's function on the GPU
/// (the fused kernel pools before its activation and sums in its own order: the same
/// tolerance as the CPU's test of the two, 1e-5 of the largest logit, plus FMA).
#[test]
fn spec_forward_on_the_presets_matches_the_fused_kernel() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let cpu = CpuBackend::new();
    let mnist = Shape::Image { c: 1, h: 28, w: 28 };
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Relu, Activation::Tanh] {
            let fused = Net::new(arch, act);
            let spec = NetSpec::build(&preset(arch, act), mnist, 10).unwrap();
            let generic = Net::from_spec(std::sync::Arc::new(spec));
            let (members, images) = (40, 64);
            let w = normals32(&mut rng, members * fused.n_params(), 1.0);
            let x: Vec<f32> = (0..images * 784).map(|_| rng.random::<f32>()).collect();
            let (wd, xd) = (be.upload_f32(&w).unwrap(), be.upload_f32(&x).unwrap());
            let run = |net: &Net| {
                let mut out = be.zeros_f32(members * images * 10).unwrap();
                be.ensemble_forward(net, &wd, members, &xd, images, &mut out)
                    .expect("gpu forward");
                be.download_f32(&out).unwrap()
            };
            let (a, b) = (run(&fused), run(&generic));
            let mut want = vec![0.0f32; a.len()];
            cpu.ensemble_forward(&fused, &w, members, &x, images, &mut want)
                .unwrap();
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
            for (what, got) in [("fused", &a), ("generic", &b)] {
                assert_close(
                    &format!("{arch:?}/{act:?} {what}"),
                    &up(got),
                    &up(&want),
                    1e-5 * scale,
                    FORWARD_TOL,
                );
            }
        }
    }
}

/// `bench --net`'s per-layer shares on the GPU: one share per layer, adding up to 1,
/// positive for every layer that launches work, 0 for `flatten` and for an activation
/// fused into the layer before it.
#[test]
fn layer_shares_on_the_gpu_add_up_to_one() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let mnist = Shape::Image { c: 1, h: 28, w: 28 };
    let text = "conv2d(8,5) relu maxpool2d(2) flatten linear(10)";
    let spec = NetSpec::build(&parse_short(text).unwrap(), mnist, 10).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(44);
    let (members, images) = (64, 64);
    let w = be
        .upload_f32(&normals32(&mut rng, members * spec.n_params(), 1.0))
        .unwrap();
    let x = be
        .upload_f32(
            &(0..images * 784)
                .map(|_| rng.random::<f32>())
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let shares = be
        .spec_layer_shares(&spec, &w, members, &x, images)
        .unwrap();
    assert_eq!(shares.len(), 5);
    assert!(
        (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
        "{shares:?}"
    );
    for (i, s) in shares.iter().enumerate() {
        match i {
            1 | 3 => assert_eq!(*s, 0.0, "layer {i} launches nothing: {shares:?}"),
            _ => assert!(*s > 0.0, "layer {i}: {shares:?}"),
        }
    }
}
