//! Backpropagation through layer-spec networks (`cpu::spec_backprop`): gradients
//! against central finite differences on random specs (f64), the fused presets' own
//! backpropagation, heaviside's zero gradient, thread-count independence and shape
//! errors.

mod common;
use common::limited;

use enkf_dnn::cpu::backprop::backprop;
use enkf_dnn::cpu::spec_backprop::{spec_backprop, spec_backprop_mse};
use enkf_dnn::model::spec::{parse_short, preset, NetSpec, Shape};
use enkf_dnn::model::{Activation, Arch, Net};
use enkf_dnn::train::gradient::{GradConfig, GradientTrainer};
use enkf_dnn::train::optim::Optimizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;

fn normal(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            scale * z
        })
        .collect()
}

fn build(text: &str, input: Shape, outputs: usize) -> NetSpec {
    NetSpec::build(&parse_short(text).unwrap(), input, outputs)
        .unwrap_or_else(|e| panic!("{text} on {input}: {e}"))
}

/// Specs covering every layer kind and option: strides, paddings, biases, both pools
/// (with floored sides), every differentiable activation, image and vector inputs,
/// an activation on the output.
fn specs() -> Vec<(&'static str, Shape, usize)> {
    let img = |c, h, w| Shape::Image { c, h, w };
    vec![
        (
            "conv2d(3,3,2,1) tanh maxpool2d(2) flatten linear(5) logistic linear(4)",
            img(2, 9, 8),
            4,
        ),
        (
            "conv2d(2,2,bias=false) relu avgpool2d(2) conv2d(3,2,padding=1) logistic flatten linear(4,bias=false)",
            img(1, 9, 9),
            4,
        ),
        (
            "conv2d(2,3,stride=2,padding=2,bias=true) logistic avgpool2d(3) flatten linear(3)",
            img(3, 11, 10),
            3,
        ),
        ("flatten linear(6) tanh linear(5,bias=false) relu linear(4) tanh", Shape::Vector(7), 4),
    ]
}

/// Central differences of the batch loss against the analytic gradient in f64, for
/// every parameter. Step h = 1e-5: truncation error ~h²·|L'''| ≈ 1e-10, rounding
/// ~1e-16/h ≈ 1e-11, so 1e-7 · (1 + |g|) leaves a margin of 100× while a missing
/// 1/B, a transposed weight or a wrong stride is off by the gradient's own size.
#[test]
fn gradients_match_central_differences_on_random_specs() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (text, input, outputs) in specs() {
        let spec = build(text, input, outputs);
        let images = 3;
        let w = normal(&mut rng, spec.n_params(), 0.8);
        let x: Vec<f64> = (0..images * input.len()).map(|_| rng.random()).collect();
        let labels: Vec<u8> = (0..images)
            .map(|_| rng.random_range(0..outputs as u8))
            .collect();
        let bp = spec_backprop(&spec, &w, &x, &labels).unwrap();
        assert_eq!(bp.grad.len(), spec.n_params());
        let h = 1e-5;
        let mut nonzero = 0;
        for p in 0..spec.n_params() {
            let mut wp = w.clone();
            wp[p] += h;
            let up = spec_backprop(&spec, &wp, &x, &labels).unwrap().loss;
            wp[p] -= 2.0 * h;
            let down = spec_backprop(&spec, &wp, &x, &labels).unwrap().loss;
            let fd = (up - down) / (2.0 * h);
            let g = bp.grad[p];
            assert!(
                (fd - g).abs() <= 1e-7 * (1.0 + g.abs()),
                "{text}: parameter {p}: analytic {g}, finite difference {fd}"
            );
            nonzero += usize::from(g.abs() > 1e-9);
        }
        // A gradient of zeros would pass the check where the loss is flat: most entries
        // must carry signal.
        assert!(
            nonzero * 2 > spec.n_params(),
            "{text}: only {nonzero} of {} gradient entries are non-zero",
            spec.n_params()
        );
    }
}

/// The squared-error loss (regression targets) against central differences on the same
/// specs, at the same step and tolerance as the cross-entropy above, and the loss is
/// PyTorch's `MSELoss` (the mean over the batch and the outputs).
#[test]
fn squared_error_gradients_match_central_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (text, input, outputs) in specs() {
        let spec = build(text, input, outputs);
        let images = 3;
        let w = normal(&mut rng, spec.n_params(), 0.8);
        let x: Vec<f64> = (0..images * input.len()).map(|_| rng.random()).collect();
        let y = normal(&mut rng, images * outputs, 1.0);
        let bp = spec_backprop_mse(&spec, &w, &x, &y).unwrap();
        let h = 1e-5;
        let mut nonzero = 0;
        for p in 0..spec.n_params() {
            let mut wp = w.clone();
            wp[p] += h;
            let up = spec_backprop_mse(&spec, &wp, &x, &y).unwrap().loss;
            wp[p] -= 2.0 * h;
            let down = spec_backprop_mse(&spec, &wp, &x, &y).unwrap().loss;
            let fd = (up - down) / (2.0 * h);
            let g = bp.grad[p];
            assert!(
                (fd - g).abs() <= 1e-7 * (1.0 + g.abs()),
                "{text}: parameter {p}: analytic {g}, finite difference {fd}"
            );
            nonzero += usize::from(g.abs() > 1e-9);
        }
        assert!(nonzero * 2 > spec.n_params(), "{text}: {nonzero} non-zero");
    }
    // MSELoss by hand: one output, two images, outputs 0 (zero weights) against 1 and 3.
    let spec = build("flatten linear(1,bias=false)", Shape::Vector(2), 1);
    let bp = spec_backprop_mse(&spec, &[0.0f64, 0.0], &[1.0, 0.0, 0.0, 1.0], &[1.0, 3.0]).unwrap();
    assert_eq!(bp.loss, (1.0 + 9.0) / 2.0);
    // d/dw of mean (w·x − y)²: 2/B Σ (w·x − y) x = [−1, −3].
    assert_eq!(bp.grad, vec![-1.0, -3.0]);
    assert!(spec_backprop_mse(&spec, &[0.0f64, 0.0], &[1.0, 0.0], &[1.0, 3.0]).is_err());
}

/// The loss is that of PyTorch's `CrossEntropyLoss` on the last layer's output.
#[test]
fn loss_and_correct_count_are_the_mean_cross_entropy() {
    let spec = build("flatten linear(3,bias=false)", Shape::Vector(2), 3);
    // Rows of W: (1, 0), (0, 1), (1, 1); x = (1, 2) gives logits (1, 2, 3).
    let w = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    let bp = spec_backprop(&spec, &w, &[1.0, 2.0, 1.0, 2.0], &[2, 0]).unwrap();
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    let want = ((lse - 3.0) + (lse - 1.0)) / 2.0;
    assert!((bp.loss - want).abs() < 1e-12, "{} vs {want}", bp.loss);
    assert_eq!(bp.correct, 1);
}

/// On the paper presets the generic backward pass is the fused one's: same layout,
/// same function. Both in f64, so they agree to rounding (1e-10 of the largest entry)
/// while a wrong offset or a missed pool is off by order 1.
#[test]
fn presets_give_the_fused_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Relu, Activation::Tanh] {
            let net = Net::new(arch, act);
            let spec = NetSpec::build(&preset(arch, act), Shape::Image { c: 1, h: 28, w: 28 }, 10)
                .unwrap();
            let images = 4;
            let w = normal(&mut rng, net.n_params(), 1.0);
            let x: Vec<f64> = (0..images * 784).map(|_| rng.random()).collect();
            let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
            let fused = backprop(&net, &w, &x, &labels).unwrap();
            let generic = spec_backprop(&spec, &w, &x, &labels).unwrap();
            assert!((fused.loss - generic.loss).abs() < 1e-10);
            assert_eq!(fused.correct, generic.correct);
            let scale = fused.grad.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
            for (i, (g, f)) in generic.grad.iter().zip(&fused.grad).enumerate() {
                assert!(
                    (g - f).abs() <= 1e-10 * scale,
                    "{arch:?}/{act:?}[{i}]: generic {g}, fused {f}"
                );
            }
        }
    }
}

/// Heaviside passes no gradient: every weight below it gets exactly 0, the ones above
/// it do not, so SGD and Adam leave the lower layers where they started.
#[test]
fn heaviside_blocks_the_gradient_below_it() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let spec = build(
        "conv2d(3,3,padding=1) heaviside flatten linear(4)",
        Shape::Image { c: 1, h: 6, w: 6 },
        4,
    );
    let w: Vec<f32> = normal(&mut rng, spec.n_params(), 1.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let x: Vec<f32> = (0..5 * 36).map(|_| rng.random()).collect();
    let bp = spec_backprop(&spec, &w, &x, &[0, 1, 2, 3, 0]).unwrap();
    let conv = 3 * 9 + 3; // weights and biases of layer 0
    assert!(bp.grad[..conv].iter().all(|&g| g == 0.0));
    assert!(bp.grad[conv..].iter().filter(|g| g.abs() > 0.0).count() > 10);
}

#[test]
fn independent_of_thread_count_and_checks_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let spec = build(
        "conv2d(4,3,padding=1) tanh maxpool2d(2) conv2d(6,3,stride=2) logistic flatten linear(10)",
        Shape::Image { c: 1, h: 28, w: 28 },
        10,
    );
    let images = 37; // several chunks and a partial one
    let w: Vec<f32> = normal(&mut rng, spec.n_params(), 1.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let x: Vec<f32> = (0..images * 784).map(|_| rng.random()).collect();
    let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let bp = spec_backprop(&spec, &w, &x, &labels).unwrap();
                let bits: Vec<u32> = bp.grad.iter().map(|v| v.to_bits()).collect();
                (bits, bp.loss.to_bits(), bp.correct)
            })
    };
    assert_eq!(run(1), run(3));
    let is_shape = |r: enkf_dnn::Result<_>| matches!(r, Err(enkf_dnn::Error::Shape { .. }));
    assert!(is_shape(spec_backprop(&spec, &w[1..], &x, &labels)));
    assert!(is_shape(spec_backprop(&spec, &w, &x[1..], &labels)));
    assert!(is_shape(spec_backprop(&spec, &w, &[], &[])));
    let mut bad = labels.clone();
    bad[5] = 10;
    assert!(is_shape(spec_backprop(&spec, &w, &x, &bad)));
}

/// SGD and Adam train a layer-spec network through the same trainer as the presets:
/// an MLP with biases learns (test error from chance to below 40 % in 60 steps of 64
/// images of MNIST, where a broken gradient stays near 90 %), and below a heaviside
/// layer the weights never move.
#[test]
fn sgd_and_adam_train_spec_networks_and_heaviside_stops_them() {
    let data = limited(3840, 500);
    let mlp = build(
        "flatten linear(32) tanh linear(10)",
        Shape::Image { c: 1, h: 28, w: 28 },
        10,
    );
    for (opt, lr) in [(Optimizer::Sgd, 0.1), (Optimizer::Adam, 1e-2)] {
        let mut cfg = GradConfig::new(opt);
        cfg.net = Net::from_spec(Arc::new(mlp.clone()));
        cfg.sigma = 0.1;
        cfg.lr = Some(lr);
        cfg.iterations = Some(60);
        cfg.eval_every = 30;
        let mut tr = GradientTrainer::new(&cfg, &data).unwrap();
        let rows = tr.run(&mut (), None).unwrap();
        let first = rows[0].test_error.unwrap();
        let last = rows.last().unwrap().test_error.unwrap();
        assert!(first > 70.0 && last < 40.0, "{opt:?}: {first} % → {last} %");
    }
    let step = build(
        "conv2d(4,5,stride=2) heaviside flatten linear(10)",
        Shape::Image { c: 1, h: 28, w: 28 },
        10,
    );
    let mut cfg = GradConfig::new(Optimizer::Adam);
    cfg.net = Net::from_spec(Arc::new(step));
    cfg.iterations = Some(5);
    let mut tr = GradientTrainer::new(&cfg, &data).unwrap();
    let before = tr.weights().to_vec();
    tr.run(&mut (), None).unwrap();
    let after = tr.weights();
    let conv = 4 * 25 + 4;
    assert_eq!(
        &after[..conv],
        &before[..conv],
        "weights below heaviside moved"
    );
    assert!(after[conv..]
        .iter()
        .zip(&before[conv..])
        .any(|(a, b)| a != b));
}

/// Biases start at 0 (the paper's Sect. 2.2) in the EnKF ensemble and the gradient
/// runs; `bias_init = normal` draws them N(0, σ²) with the weights, which are the same
/// either way; asking for normal biases of a network without biases is an error.
#[test]
fn biases_start_at_zero_unless_normal_is_asked() {
    use enkf_dnn::cpu::CpuBackend;
    use enkf_dnn::train::{PartialConfig, Trainer};
    let data = limited(64, 10);
    let resolve = |extra: &str| {
        let json = format!(
            r#"{{"net": "flatten linear(8) tanh linear(10)", "members": 4, "sigma": 0.5{extra}}}"#
        );
        PartialConfig::from_json(&json).and_then(|(p, _)| p.resolve())
    };
    let cfg = resolve("").unwrap();
    let net = cfg.net();
    let ranges = net.bias_ranges();
    assert_eq!(
        ranges,
        [
            784 * 8..784 * 8 + 8,
            784 * 8 + 8 + 80..784 * 8 + 8 + 80 + 10
        ]
    );
    let be = CpuBackend::new();
    let zero = Trainer::new(&be, &cfg, &data)
        .unwrap()
        .ensemble_host()
        .unwrap();
    let normal_cfg = resolve(r#", "bias_init": "normal""#).unwrap();
    let normal = Trainer::new(&be, &normal_cfg, &data)
        .unwrap()
        .ensemble_host()
        .unwrap();
    let p = net.n_params();
    let mut biases = 0;
    for m in 0..4 {
        for i in 0..p {
            let (z, n) = (zero[m * p + i], normal[m * p + i]);
            if ranges.iter().any(|r| r.contains(&i)) {
                assert_eq!(z, 0.0);
                assert!(n != 0.0 && n.abs() < 5.0 * 0.5);
                biases += 1;
            } else {
                assert_eq!(z, n, "weights differ at member {m}, index {i}");
            }
        }
    }
    assert_eq!(biases, 4 * 18);
    let mut g = GradConfig::from_train(&cfg, Optimizer::Sgd, None, 0.9, 200);
    let w = GradientTrainer::new(&g, &data).unwrap().weights().to_vec();
    assert!(ranges
        .iter()
        .all(|r| w[r.clone()].iter().all(|&v| v == 0.0)));
    assert_eq!(&w[..ranges[0].start], &zero[..ranges[0].start]);
    g.bias_init = enkf_dnn::train::BiasInit::Normal;
    let w = GradientTrainer::new(&g, &data).unwrap().weights().to_vec();
    assert_eq!(&w[..p], &normal[..p]);
    let msg = PartialConfig::from_json(r#"{"bias_init": "normal"}"#)
        .and_then(|(p, _)| p.resolve())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bias_init = normal") && msg.contains("no biases"),
        "{msg}"
    );
}

/// Statistics of a spec network: on the paper preset written as a spec they are the
/// fused network's (same layers: conv1's and conv2's activations, the softmax; the
/// three weight gradients), to f32 rounding of the different summation orders (1e-5
/// relative; a wrong layer is off by order 1); a spec with biases has one gradient row
/// per tensor.
#[test]
fn spec_statistics_match_the_fused_ones_on_the_preset() {
    use enkf_dnn::train::stats::{spec_stats, stats_from_cache, Quantity};
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let net = Net::new(Arch::Paper, Activation::Logistic);
    let spec = Net::from_spec(Arc::new(
        NetSpec::build(
            &preset(Arch::Paper, Activation::Logistic),
            Shape::Image { c: 1, h: 28, w: 28 },
            10,
        )
        .unwrap(),
    ));
    let w: Vec<f32> = normal(&mut rng, net.n_params(), 0.3)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let images = 6;
    let x: Vec<f32> = (0..images * 784).map(|_| rng.random()).collect();
    let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
    let bp = backprop(&net, &w, &x, &labels).unwrap();
    let fused = stats_from_cache(&net, &bp.cache, Some(&bp.grad), true).unwrap();
    let generic = spec_stats(&spec, &w, &x, images, Some(&bp.grad), true).unwrap();
    assert_eq!(fused.layers.len(), generic.layers.len());
    for (f, g) in fused.layers.iter().zip(&generic.layers) {
        assert_eq!((f.layer, f.quantity), (g.layer, g.quantity));
        assert_eq!(f.moments.count, g.moments.count);
        for (a, b) in [
            (f.moments.mean, g.moments.mean),
            (f.moments.std, g.moments.std),
        ] {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-3), "{f:?} vs {g:?}");
        }
        let (hf, hg) = (f.histogram.as_ref().unwrap(), g.histogram.as_ref().unwrap());
        assert_eq!(hf.total(), hg.total());
    }
    let biased = Net::from_spec(Arc::new(build(
        "flatten linear(5) relu linear(10)",
        Shape::Image { c: 1, h: 28, w: 28 },
        10,
    )));
    let wb = vec![0.01f32; biased.n_params()];
    let s = spec_stats(&biased, &wb, &x, images, Some(&wb), false).unwrap();
    let kinds: Vec<_> = s.layers.iter().map(|l| (l.layer, l.quantity)).collect();
    assert_eq!(
        kinds,
        [
            (1, Quantity::Activation),
            (2, Quantity::Activation),
            (1, Quantity::Gradient),
            (2, Quantity::Gradient),
            (3, Quantity::Gradient),
            (4, Quantity::Gradient),
        ]
    );
}
