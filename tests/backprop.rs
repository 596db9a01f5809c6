//! Backpropagation on the CPU: gradients against central finite differences in f64,
//! the max-pool tie rule, f32 against f64, the forward pass against the inference path,
//! determinism, and shape errors.

mod common;
use common::assert_close;

use enkf_dnn::cpu::backprop::{
    backprop, forward_cached, maxpool2_argmax_forward, maxpool2_backward, ForwardCache,
};
use enkf_dnn::cpu::forward::ensemble_forward_portable;
use enkf_dnn::model::{Activation, Arch, Net};
use enkf_dnn::train::metrics::score_logits;
use enkf_dnn::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

// ---------------------------------------------------------------- tolerances

/// Finite differences: central differences in f64 with step H have truncation error
/// H²·|L'''|/6 ≈ 2e-11·|L'''| and rounding error ≈ u·|L|/H ≈ 1e-16·3/1e-5 = 3e-11
/// (u = 1.1e-16, losses ≈ 2–3). With |L'''| up to ~100 for these weight scales the
/// absolute error stays below ~2e-9; FD_ATOL = 1e-8 leaves a 5× margin, and FD_RTOL =
/// 1e-5 covers the same errors on large entries. A wrong index, a missing activation
/// derivative or a gradient sent to the wrong pool input gives errors of order 1
/// relative, far above these.
const H: f64 = 1e-5;
const FD_ATOL: f64 = 1e-8;
const FD_RTOL: f64 = 1e-5;

/// f32 against f64 gradients: f32 sums of up to ~1e4 terms (3 images × 576 positions ×
/// 10 channels for conv1's weights) round like √n·u·Σ|terms| with u = 6e-8; relative to
/// the tensor's largest entry that is ≲ 1e-5 in the worst case, typically √n·u ≈ 1e-6.
/// Observed worst (seed 7): 4e-7 of max |g|. Atol 1e-5 × the tensor's max |g| and rtol
/// 1e-4 leave ≥ 20× margin; f32 overflow, a mixed-up conversion or a type-dependent
/// branch breaks it by orders of magnitude.
const F32_ATOL_REL_TO_MAX: f64 = 1e-5;
const F32_RTOL: f64 = 1e-4;

// ---------------------------------------------------------------- data

const ARCHS: [Arch; 2] = [Arch::Paper, Arch::Pooled];
const ACTS: [Activation; 3] = [Activation::Logistic, Activation::Relu, Activation::Tanh];

/// Weights with per-tensor scales that keep every layer out of saturation (so the
/// gradients are not vanishingly small and the check means something): conv1 0.5,
/// conv2 0.1, fc1 0.05.
fn weights(rng: &mut ChaCha8Rng, net: &Net) -> Vec<f64> {
    let scales = [0.5, 0.1, 0.05];
    let mut w = vec![0.0; net.n_params()];
    for (spec, s) in net.tensors().iter().zip(scales) {
        for v in &mut w[spec.range()] {
            let z: f64 = StandardNormal.sample(rng);
            *v = s * z;
        }
    }
    w
}

fn images(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n * 784).map(|_| rng.random::<f64>()).collect()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Whether two forward caches lie in the same smooth piece of the loss: same pool
/// arg-maxes and, for ReLU, the same active units (a1, a2 > 0).
fn same_piece(act: Activation, a: &ForwardCache<f64>, b: &ForwardCache<f64>) -> bool {
    let signs = |v: &[f64]| v.iter().map(|&x| x > 0.0).collect::<Vec<_>>();
    a.arg1 == b.arg1
        && a.arg2 == b.arg2
        && (act != Activation::Relu
            || (signs(&a.a1) == signs(&b.a1) && signs(&a.a2) == signs(&b.a2)))
}

/// Entries checked per tensor: all of conv1 (250), every 37th of conv2, every 61st of
/// fc1 (strides coprime to the tensor shapes, so every channel and tap is hit).
fn sampled_entries(net: &Net) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (spec, stride) in net.tensors().iter().zip([1, 37, 61]) {
        out.extend(spec.range().step_by(stride).map(|i| (i, spec.name.clone())));
    }
    out
}

// ---------------------------------------------------------------- finite differences

#[test]
fn gradient_matches_central_differences_for_every_layer_arch_and_activation() {
    for (k, arch) in ARCHS.into_iter().enumerate() {
        for (l, act) in ACTS.into_iter().enumerate() {
            let net = Net::new(arch, act);
            let mut rng = ChaCha8Rng::seed_from_u64(100 + 10 * k as u64 + l as u64);
            let w = weights(&mut rng, &net);
            let x = images(&mut rng, 3);
            let labels = [3u8, 7, 0];
            let bp = backprop(&net, &w, &x, &labels).expect("backprop");
            let base = forward_cached(&net, &w, &x, 3).expect("forward");
            let mut got = Vec::new();
            let mut want = Vec::new();
            let mut skipped = 0;
            let entries = sampled_entries(&net);
            for &(i, _) in &entries {
                let mut wp = w.clone();
                wp[i] += H;
                let mut wm = w.clone();
                wm[i] -= H;
                let plus = backprop(&net, &wp, &x, &labels).expect("backprop +h");
                let minus = backprop(&net, &wm, &x, &labels).expect("backprop -h");
                if !same_piece(act, &base, &plus.cache) || !same_piece(act, &base, &minus.cache) {
                    // The step crossed a ReLU kink or changed a pool's arg-max: the loss
                    // is not differentiable across it, differences mean nothing there.
                    skipped += 1;
                    continue;
                }
                got.push(bp.grad[i]);
                want.push((plus.loss - minus.loss) / (2.0 * H));
            }
            let what = format!("{arch:?}/{act:?}");
            // Kink crossings are rare (a step of 1e-5 against values of order 1); more
            // than 2 % skipped would mean the check covers too little.
            assert!(
                skipped * 50 <= entries.len(),
                "{what}: {skipped} of {} entries skipped",
                entries.len()
            );
            // Every tensor's gradient must be far from zero, or the check is vacuous.
            for spec in net.tensors() {
                let max = bp.grad[spec.range()]
                    .iter()
                    .fold(0.0f64, |m, g| m.max(g.abs()));
                assert!(
                    max > 1e-4,
                    "{what}: {} gradient max |g| = {max:e}",
                    spec.name
                );
            }
            let ratio = assert_close(&what, &got, &want, FD_ATOL, FD_RTOL);
            eprintln!(
                "{what}: {} entries, {skipped} skipped at kinks, worst error/tolerance {ratio:.2e}",
                got.len()
            );
        }
    }
}

// ---------------------------------------------------------------- max-pool ties

#[test]
fn maxpool_ties_go_to_the_first_maximum_in_row_major_order() {
    // One channel, 4 × 4, four windows:
    //   top-left  [5 5; 5 5]     → all equal: (0,0), flat index 0
    //   top-right [1 3; 3 2]     → tie between (0,1) and (1,0): (0,1), flat 3
    //   bot-left  [1 2; 4 4]     → tie on the bottom row: (1,0), flat 12
    //   bot-right [1 NaN; 9 NaN] → the first NaN wins: (0,1), flat 11
    let nan = f64::NAN;
    #[rustfmt::skip]
    let input = [
        5.0, 5.0, 1.0, 3.0,
        5.0, 5.0, 3.0, 2.0,
        1.0, 2.0, 1.0, nan,
        4.0, 4.0, 9.0, nan,
    ];
    let mut out = [0.0f64; 4];
    let mut arg = [0u32; 4];
    maxpool2_argmax_forward(&input, 1, 4, 4, &mut out, &mut arg).expect("pool");
    assert_eq!(arg, [0, 3, 12, 11]);
    assert_eq!(&out[..3], &[5.0, 3.0, 4.0]);
    assert!(out[3].is_nan());
    let mut din = [7.0f64; 16];
    maxpool2_backward(&[1.0, 2.0, 3.0, 4.0], &arg, &mut din).expect("unpool");
    let mut want = [0.0f64; 16];
    want[0] = 1.0;
    want[3] = 2.0;
    want[12] = 3.0;
    want[11] = 4.0;
    assert_eq!(din, want);
}

#[test]
fn tied_pool_windows_route_the_whole_gradient_to_one_input() {
    // conv1 weights all zero: every logistic conv1 output is exactly 0.5, so every
    // first-pool window is a four-way tie. The arg-max must be each window's top-left
    // corner (channel c, 2y, 2x); maxpool2_backward (tested above) then routes each
    // window's gradient there. (Finite differences are not valid at a tie: the loss has
    // a kink there, and PyTorch's rule picks one sub-gradient.)
    let net = Net::new(Arch::Pooled, Activation::Logistic);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut w = weights(&mut rng, &net);
    w[..Net::CONV1_LEN].fill(0.0);
    let x = images(&mut rng, 2);
    let bp = backprop(&net, &w, &x, &[1, 4]).expect("backprop");
    for (j, &a) in bp.cache.arg1.iter().enumerate() {
        let local = j % 1440;
        let (c, y, xo) = (local / 144, (local / 12) % 12, local % 12);
        assert_eq!(a as usize, (c * 24 + 2 * y) * 24 + 2 * xo, "window {j}");
    }
}

// ---------------------------------------------------------------- f32, forward, loss

#[test]
fn f32_gradient_agrees_with_f64() {
    for arch in ARCHS {
        for act in ACTS {
            let net = Net::new(arch, act);
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let w = weights(&mut rng, &net);
            let x = images(&mut rng, 11);
            let labels: Vec<u8> = (0..11).map(|i| (i * 3 % 10) as u8).collect();
            let g64 = backprop(&net, &w, &x, &labels).expect("f64").grad;
            let bp32 = backprop(&net, &to_f32(&w), &to_f32(&x), &labels).expect("f32");
            for spec in net.tensors() {
                let want = &g64[spec.range()];
                let got: Vec<f64> = bp32.grad[spec.range()].iter().map(|&v| v as f64).collect();
                let max = want.iter().fold(0.0f64, |m, g| m.max(g.abs()));
                let what = format!("{arch:?}/{act:?} {}", spec.name);
                let ratio = assert_close(&what, &got, want, F32_ATOL_REL_TO_MAX * max, F32_RTOL);
                eprintln!("{what}: worst error/tolerance {ratio:.2e}");
            }
        }
    }
}

/// The cached forward (activation then pool) and the inference path (pool then
/// activation) compute the same function: identical f32 operations except the order of
/// pooling and a monotone activation, so logits agree to a few ulp. 1e-6 relative to the
/// largest logit (plus 1e-6 relative per element) leaves margin; a different layer
/// order or a wrong layout differs by order 1.
const FORWARD_TOL: f64 = 1e-6;

#[test]
fn forward_cache_matches_the_inference_forward_and_the_loss_matches_score_logits() {
    for arch in ARCHS {
        for act in ACTS {
            let net = Net::new(arch, act);
            let mut rng = ChaCha8Rng::seed_from_u64(21);
            let w = to_f32(&weights(&mut rng, &net));
            let x = to_f32(&images(&mut rng, 13));
            let labels: Vec<u8> = (0..13).map(|i| (i % 10) as u8).collect();
            let mut out = vec![0.0f32; 13 * 10];
            ensemble_forward_portable(&net, &w, 1, &x, 13, &mut out).expect("forward");
            let bp = backprop(&net, &w, &x, &labels).expect("backprop");
            let got: Vec<f64> = bp.cache.logits.iter().map(|&v| v as f64).collect();
            let want: Vec<f64> = out.iter().map(|&v| v as f64).collect();
            let max = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let what = format!("{arch:?}/{act:?}");
            assert_close(&what, &got, &want, FORWARD_TOL * max, FORWARD_TOL);
            let (loss, correct) = score_logits(&out, &labels);
            assert_close(
                &format!("{what} loss"),
                &[bp.loss],
                &[loss],
                0.0,
                FORWARD_TOL,
            );
            assert_eq!(bp.correct, correct, "{what} correct count");
            // Softmax rows sum to 1.
            for row in bp.cache.probs.chunks_exact(10) {
                let s: f32 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{what}: softmax row sums to {s}");
            }
        }
    }
}

#[test]
fn gradient_is_deterministic_and_independent_of_thread_count() {
    let net = Net::new(Arch::Paper, Activation::Logistic);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let w = to_f32(&weights(&mut rng, &net));
    let x = to_f32(&images(&mut rng, 29));
    let labels: Vec<u8> = (0..29).map(|i| (i * 7 % 10) as u8).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| backprop(&net, &w, &x, &labels).expect("backprop"))
    };
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let a = run(1);
    let b = run(2);
    let c = run(3);
    assert_eq!(bits(&a.grad), bits(&b.grad), "1 vs 2 threads");
    assert_eq!(bits(&a.grad), bits(&c.grad), "1 vs 3 threads");
    assert_eq!(a.loss.to_bits(), c.loss.to_bits(), "loss");
    assert_eq!(a.cache, c.cache, "cache");
}

#[test]
fn shape_errors_are_reported() {
    let net = Net::default();
    let w = vec![0.0f32; net.n_params()];
    let x = vec![0.0f32; 2 * 784];
    let shape = |r: Result<_, Error>| matches!(r, Err(Error::Shape { .. }));
    assert!(shape(backprop(&net, &w[1..], &x, &[0, 1]).map(|_| ())));
    assert!(shape(backprop(&net, &w, &x[1..], &[0, 1]).map(|_| ())));
    assert!(shape(backprop(&net, &w, &x, &[0, 10]).map(|_| ())));
    assert!(shape(backprop(&net, &w, &[], &[]).map(|_| ())));
    assert!(shape(forward_cached(&net, &w, &x, 3).map(|_| ())));
    let mut out = [0.0f32; 4];
    let mut arg = [0u32; 4];
    assert!(shape(maxpool2_argmax_forward(
        &[0.0f32; 15],
        1,
        3,
        5,
        &mut out,
        &mut arg
    )));
    assert!(shape(maxpool2_backward(
        &[1.0f32; 4],
        &[0, 1, 2, 99],
        &mut [0.0; 16]
    )));
}
