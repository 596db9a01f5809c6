//! Inputs and tolerances of the GPU-vs-CPU twin tests, shared by the tests that run the
//! kernels on a GPU (`gpu_twins.rs`, `gpu_backprop.rs`) and those that run the same
//! kernels in the CPU emulation (`kernel_emu.rs`): the emulation stands for the GPU, so
//! it is held to the same tolerances, each written once here with its reason.
//!
//! The backprop inputs are quantized so that the comparison is not at the mercy of ties:
//! pixels are multiples of 1/16, conv1 weights multiples of 1/64 in [−1/4, 1/4] and conv2
//! weights multiples of 1/64 in [−1/2, 1/2]. Then conv1's pre-activations are exact in f32
//! on both sides whatever the summation order (products are multiples of 2^−10, partial
//! sums stay far below 2^14), and with ReLU so are conv2's (multiples of 2^−16, partial
//! sums below 2^8; `gpu_backprop.rs` checks it against f64): the two sides see the very
//! same max-pool ties and ReLU kinks. With the smooth activations the pool inputs differ
//! in the last bits, so [`twin_case`] takes the first seed whose inputs have no near tie
//! (a gap below [`TIE_GAP`]) in any pool window, which such bits could flip.

use super::{assert_close, max_abs, up};
use enkf_dnn::backend::Backend;
use enkf_dnn::cpu::backprop::{backprop, ForwardCache};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::enkf::one_hot;
use enkf_dnn::model::spec::Shape;
use enkf_dnn::model::{Activation, Arch, Net, C1, C2, CLASSES, H1, H2, IMG_PIXELS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// f32 and f64 machine epsilons as f64.
pub const EPS32: f64 = f32::EPSILON as f64;
pub const EPS64: f64 = f64::EPSILON;

/// Forward pass: both sides are f32 with the same layer order but different summation
/// order (conv2 sums 250 terms, fc1 1280) and different expf/tanhf (≤ 2 ulp each). Each
/// layer then differs by ~1e-6 relative to the sum of |terms|, which exceeds the logit
/// itself by cancellation (up to ~50× with N(0, 1) weights). 1e-4 of the largest logit
/// absolute, plus 1e-4 relative, leaves a margin of about 2 orders of magnitude.
pub const FORWARD_TOL: f64 = 1e-4;

/// f64 solves of well-conditioned (cond ≲ 10) systems of size ≤ 200: the error is about
/// n·eps64·cond relative to the solution's size, ≤ 2e-12; 1e-11 leaves 5× margin.
pub const SOLVE_TOL: f64 = 1e-11;

/// `n` seeded N(0, scale²) draws.
pub fn normals(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            scale * z
        })
        .collect()
}

/// [`normals`] rounded to f32.
pub fn normals32(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f32> {
    normals(rng, n, scale)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// An n × n matrix (n = blocks·bs) whose diagonal blocks are SPD (M Mᵀ/bs + I, so
/// eigenvalues in [1, ~5]) and whose off-block entries are garbage the solve must ignore.
pub fn block_spd(rng: &mut ChaCha8Rng, blocks: usize, bs: usize) -> Vec<f64> {
    let n = blocks * bs;
    let mut a = normals(rng, n * n, 100.0);
    for d in 0..blocks {
        let mm = normals(rng, bs * bs, 1.0);
        for i in 0..bs {
            for j in 0..bs {
                let s: f64 = (0..bs).map(|l| mm[i * bs + l] * mm[j * bs + l]).sum();
                a[(d * bs + i) * n + d * bs + j] = s / bs as f64 + if i == j { 1.0 } else { 0.0 };
            }
        }
    }
    a
}

/// Images per test batch (few, so that seeds without near ties are common).
pub const B: usize = 8;

/// Near ties: a window's maximum y₀ and runner-up y₁ (unless exactly equal) must differ by
/// at least `TIE_GAP · act'(y₀) + TIE_ULPS`. The pool inputs of the two sides differ by
/// act'·Δz + a few ulp of the activation, where Δz, the pre-activation difference, is
/// about twice the CPU's f32-vs-f64 error at most (the CPU test bounds that error by
/// TIE_GAP / 10; measured ≤ 1.2e-6), so a window cannot pick another arg-max on the GPU.
/// Scaling by act' matters near saturation, where many values crowd below 1.
pub const TIE_GAP: f32 = 3e-5;
/// The activation-rounding part of the near-tie gap: expf/tanhf and the division differ
/// by ≤ 2 ulp (≤ 2.4e-7 below 1); 1e-6 is 4× that.
pub const TIE_ULPS: f32 = 1e-6;

/// Activations and probabilities: conv1 pre-activations are exact on both sides, then
/// expf/tanhf differ by ≤ 2 ulp; conv2 sums 250 products of those in another order. The
/// CPU test measures the f32-vs-f64 error of a1, a2 (≤ 1.2e-6, bounded there by
/// ACT_TOL / 10); the GPU differs from the CPU by at most about twice that. 3e-5 absolute
/// plus 3e-5 relative leaves ≥ 10×; a wrong index or activation moves values by O(0.1).
pub const ACT_TOL: f64 = 3e-5;

/// Logits and loss: fc1 sums 1280 products (different order and FMA on the GPU), each
/// ~1e-7 relative to the sum of |terms|; 1e-4 of the largest |logit| absolute plus 1e-5
/// relative (loss) leaves ≥ 10× margin over the measured f32-vs-f64 error.
pub const LOGIT_TOL: f64 = 1e-4;

/// Weight gradients per tensor: sums over B images of up to 576 positions (conv1) after
/// backward sums of up to 500 terms, in a different order (and with FMA) on the GPU than
/// on the CPU. Both sides are within ~1e-6·max|g| of the f64 gradient on these inputs
/// (printed by the CPU test), so they differ by at most twice that; allowed:
/// 1e-4·max|g| of the tensor absolute plus 1e-4 relative, ≥ 10× margin. A wrong index,
/// a missing activation derivative or a wrong pool arg-max moves elements by O(max|g|).
pub const GRAD_TOL: f64 = 1e-4;

/// Seeded quantized inputs (see the module docs): weights P, images B × 784, labels B.
pub fn case_inputs(net: &Net, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = vec![0.0f32; net.n_params()];
    for (i, v) in w.iter_mut().enumerate() {
        *v = if i < Net::CONV2_OFFSET {
            rng.random_range(-16i32..=16) as f32 / 64.0
        } else if i < Net::FC_OFFSET {
            rng.random_range(-32i32..=32) as f32 / 64.0
        } else {
            let z: f64 = StandardNormal.sample(&mut rng);
            (0.1 * z) as f32
        };
    }
    let x: Vec<f32> = (0..B * IMG_PIXELS)
        .map(|_| rng.random_range(0..=16u8) as f32 / 16.0)
        .collect();
    let labels: Vec<u8> = (0..B).map(|_| rng.random_range(0..CLASSES as u8)).collect();
    (w, x, labels)
}

/// Number of 2×2 windows over the `c × h × w` planes of `images` images in `a` whose
/// maximum and runner-up are a near tie (see [`TIE_GAP`]) for activation `act`. ReLU
/// inputs are exact on both sides (the CPU test checks it), so they have none.
pub fn near_ties(act: Activation, a: &[f32], images: usize, c: usize, h: usize, w: usize) -> usize {
    if act == Activation::Relu {
        return 0;
    }
    let mut n = 0;
    for plane in a[..images * c * h * w].chunks_exact(h * w) {
        for y in (0..h).step_by(2) {
            for x in (0..w).step_by(2) {
                let mut v = [
                    plane[y * w + x],
                    plane[y * w + x + 1],
                    plane[(y + 1) * w + x],
                    plane[(y + 1) * w + x + 1],
                ];
                v.sort_by(|a, b| b.total_cmp(a));
                let g = v[0] - v[1];
                let slope = act.derivative_from_output(v[0]);
                if g > 0.0 && g < TIE_GAP * slope + TIE_ULPS {
                    n += 1;
                }
            }
        }
    }
    n
}

pub fn nets() -> Vec<Net> {
    let mut v = Vec::new();
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Relu, Activation::Tanh] {
            v.push(Net::new(arch, act));
        }
    }
    v
}

/// The inputs of case `i` (network `net`): those of the first seed from 1000·i on whose
/// CPU f32 forward pass has no near tie in any pool window (see [`TIE_GAP`]).
pub fn twin_case(net: &Net, i: usize) -> (Vec<f32>, Vec<f32>, Vec<u8>) {
    let mut fewest = usize::MAX;
    for seed in 1000 * i as u64..1000 * i as u64 + 200 {
        let (w, x, labels) = case_inputs(net, seed);
        let f = backprop(net, &w, &x, &labels).expect("f32 backprop");
        let mut ties = near_ties(net.act, &f.cache.a1, B, C1, H1, H1);
        if net.arch == Arch::Pooled {
            ties += near_ties(net.act, &f.cache.a2, B, C2, H2, H2);
        }
        if ties == 0 {
            println!("{net:?}: seed {seed}");
            return (w, x, labels);
        }
        fewest = fewest.min(ties);
    }
    panic!("{net:?}: every seed among 200 has ≥ {fewest} near ties; lower B or TIE_GAP");
}

pub fn compare_cache(what: &str, got: &ForwardCache<f32>, want: &ForwardCache<f32>) {
    assert_eq!(got.images, want.images, "{what}: images");
    assert_eq!(got.arg1, want.arg1, "{what}: pool1 arg-max");
    assert_eq!(got.arg2, want.arg2, "{what}: pool2 arg-max");
    for (name, g, w) in [
        ("a1", &got.a1, &want.a1),
        ("p1", &got.p1, &want.p1),
        ("a2", &got.a2, &want.a2),
        ("p2", &got.p2, &want.p2),
        ("probs", &got.probs, &want.probs),
    ] {
        assert_close(&format!("{what} {name}"), &up(g), &up(w), ACT_TOL, ACT_TOL);
    }
    let wl = up(&want.logits);
    assert_close(
        &format!("{what} logits"),
        &up(&got.logits),
        &wl,
        LOGIT_TOL * max_abs(&wl),
        LOGIT_TOL,
    );
}

/// Inputs of the reduction twins: outputs G (rows × cols, N(0, 25)) and one-hot targets
/// y (cols = 10·images).
pub fn reduce_inputs(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let g = normals32(rng, rows * cols, 5.0);
    let labels: Vec<u8> = (0..cols / CLASSES).map(|i| (i % CLASSES) as u8).collect();
    (g, one_hot(&labels, CLASSES))
}

/// Parameters (n, N(0, 1)) and `steps` gradients (over six magnitudes, every 17th exactly
/// zero) for the optimizer twins, from `seed`.
pub fn optimizer_inputs(seed: u64, n: usize, steps: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |s: f64| -> f32 {
        let z: f64 = StandardNormal.sample(&mut rng);
        (s * z) as f32
    };
    let start: Vec<f32> = (0..n).map(|_| normal(1.0)).collect();
    let grads = (0..steps)
        .map(|_| {
            (0..n)
                .map(|i| {
                    if i % 17 == 0 {
                        0.0
                    } else {
                        normal(10f64.powi(-(i as i32 % 6)))
                    }
                })
                .collect()
        })
        .collect();
    (start, grads)
}

/// Panics unless `got` and `want` are bit-identical, naming the first difference.
pub fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        panic!("{what}: element {i}: {} vs {}", got[i], want[i]);
    }
}

/// Panics unless at least half of `p` moved away from `start` (a no-op step fails).
pub fn assert_moved(what: &str, p: &[f32], start: &[f32]) {
    let moved = p.iter().zip(start).filter(|(a, b)| a != b).count();
    assert!(
        moved > p.len() / 2,
        "{what}: the steps left the parameters unchanged"
    );
}

/// A unit-lower solve case: T (n × n) with small strictly lower entries (well
/// conditioned) and garbage (N(0, 50²)) on and above the diagonal that must not be read,
/// and right-hand sides b (rows × n).
pub fn unit_lower_inputs(rng: &mut ChaCha8Rng, n: usize, rows: usize) -> (Vec<f64>, Vec<f64>) {
    let mut t = normals(rng, n * n, 50.0);
    for i in 0..n {
        for j in 0..i {
            t[i * n + j] = 0.3 * normals(rng, 1, 1.0)[0] / (n as f64).sqrt();
        }
    }
    let b = normals(rng, rows * n, 1.0);
    (t, b)
}

/// A block-Cholesky case: a = [`block_spd`] (n × n, n = blocks·bs), rhs (nrhs × n,
/// N(0, 1)), and the CPU backend's solution of `rhs · A_dd⁻¹` per block.
pub fn cholesky_inputs(
    rng: &mut ChaCha8Rng,
    blocks: usize,
    bs: usize,
    nrhs: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let a = block_spd(rng, blocks, bs);
    let rhs = normals(rng, nrhs * blocks * bs, 1.0);
    let (mut ac, mut want) = (a.clone(), rhs.clone());
    CpuBackend::new()
        .block_cholesky_solve_f64(&mut ac, blocks, bs, &mut want, nrhs)
        .expect("cpu block Cholesky of SPD blocks");
    (a, rhs, want)
}

/// Layer-spec networks on real targets (the mean squared error), with an activation on
/// the output: (short form, input shape, outputs), for the CPU and GPU backprop tests.
pub const REAL_TARGET_SPECS: [(&str, Shape, usize); 2] = [
    ("flatten linear(6) tanh linear(3)", Shape::Vector(7), 3),
    (
        "conv2d(2,3,padding=1) logistic avgpool2d(2) flatten linear(2) tanh",
        Shape::Image { c: 1, h: 8, w: 8 },
        2,
    ),
];

/// Random specs: several depths, channel counts, kernel sizes, strides, paddings,
/// biases, both pools, every activation, image and vector inputs.
pub fn random_specs(rng: &mut ChaCha8Rng) -> Vec<(String, Shape)> {
    let acts = ["logistic", "relu", "tanh", "heaviside"];
    let mut specs = vec![
        ("flatten linear(10)".to_string(), Shape::Vector(37)),
        (
            "linear(24) heaviside linear(12,bias=false) tanh linear(10)".to_string(),
            Shape::Vector(37),
        ),
    ];
    for _ in 0..12 {
        let (c, h, w) = (
            rng.random_range(1..4),
            rng.random_range(9..16),
            rng.random_range(9..16),
        );
        let mut text = String::new();
        let mut side = h.min(w);
        for _ in 0..rng.random_range(1..4) {
            let k = rng.random_range(1..4).min(side);
            let stride = rng.random_range(1..3);
            let padding = rng.random_range(0..2);
            let bias = rng.random_bool(0.5);
            text += &format!(
                "conv2d({},{k},{stride},{padding},bias={bias}) {} ",
                rng.random_range(1..5),
                acts[rng.random_range(0..4)]
            );
            side = (side + 2 * padding - k) / stride + 1;
            if side >= 4 && rng.random_bool(0.5) {
                let pool = if rng.random_bool(0.5) {
                    "maxpool2d"
                } else {
                    "avgpool2d"
                };
                text += &format!("{pool}(2) ");
                side /= 2;
            }
        }
        text += &format!(
            "flatten linear({}) {} linear(10)",
            rng.random_range(3..12),
            acts[rng.random_range(0..4)]
        );
        specs.push((text, Shape::Image { c, h, w }));
    }
    specs
}

/// The parameter tensors of `spec`: (name, range) in P, in offset order.
pub fn spec_tensors(
    spec: &enkf_dnn::model::spec::NetSpec,
) -> Vec<(String, std::ops::Range<usize>)> {
    let mut starts: Vec<(usize, String)> = Vec::new();
    for (i, l) in spec.layers().iter().enumerate() {
        if matches!(
            l.layer,
            enkf_dnn::model::spec::Layer::Conv2d { .. }
                | enkf_dnn::model::spec::Layer::Linear { .. }
        ) {
            starts.push((l.weight_offset, format!("{i}.weight")));
            if let Some(b) = l.bias_offset {
                starts.push((b, format!("{i}.bias")));
            }
        }
    }
    starts.sort();
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|s| s.0)
        .chain([spec.n_params()])
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .map(|((s, name), e)| (name, s..e))
        .collect()
}
