//! The CPU forward pass against a naive, layer-by-layer f64 reference.

use enkf_dnn::cpu::forward::{
    activation_forward, conv2d_forward, ensemble_forward, ensemble_forward_portable,
    ensemble_forward_with, linear_forward, maxpool2_forward, ForwardImpl,
};
use enkf_dnn::model::{Activation, Arch, Net};
use enkf_dnn::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

// ---------------------------------------------------------------- tolerance helper

/// f32 against f64 reference: the fast path accumulates in f32 over K = 25, 250 and up
/// to 1280 terms per layer. Rounding errors of K terms add up like √K·u·Σ|terms|
/// (u = 6e-8): ~1e-6 relative to the terms' scale per layer; the vector exp adds ~2 ulp.
/// Observed worst: 1.1e-6 relative (seeds below). Logits may cancel (|Σ| ≪ Σ|terms|),
/// so the absolute part is relative to the largest reference logit of the whole output
/// (the terms' scale). 1e-5 leaves a ~10× margin; a wrong tap or index gives errors of
/// order 1 relative.
const RTOL: f64 = 1e-5;
const ATOL_REL_TO_MAX: f64 = 1e-5;

/// Two-sided `|a − b| ≤ atol + rtol·|b|`; panics naming the worst element. With
/// `FORWARD_TOL_REPORT=1` (and `--nocapture`) it prints the worst ratio, to recalibrate.
fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let ratio = err / (atol + rtol * w.abs());
        assert!(!ratio.is_nan(), "{what}[{i}]: got {g}, want {w}");
        if ratio > worst.1 {
            worst = (i, ratio);
        }
    }
    let (i, ratio) = worst;
    if std::env::var_os("FORWARD_TOL_REPORT").is_some() {
        eprintln!("{what}: worst ratio {ratio:.3e} at {i}");
    }
    assert!(
        ratio <= 1.0,
        "{what}: worst element {i}: got {}, want {}, |err| = {:e} exceeds atol {atol:e} + rtol {rtol:e}·|want| by {ratio:.2}×",
        got[i],
        want[i],
        (got[i] as f64 - want[i]).abs()
    );
}

/// [`assert_close`] with the scale-aware network tolerance.
fn assert_logits_close(what: &str, got: &[f32], want: &[f64]) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(what, got, want, ATOL_REL_TO_MAX * scale.max(1.0), RTOL);
}

// ---------------------------------------------------------------- naive reference

fn naive_conv(
    input: &[f64],
    cin: usize,
    h: usize,
    w: usize,
    wt: &[f32],
    cout: usize,
    k: usize,
) -> Vec<f64> {
    let (oh, ow) = (h - k + 1, w - k + 1);
    let mut out = vec![0.0; cout * oh * ow];
    for o in 0..cout {
        for y in 0..oh {
            for x in 0..ow {
                let mut s = 0.0;
                for i in 0..cin {
                    for ky in 0..k {
                        for kx in 0..k {
                            s += wt[((o * cin + i) * k + ky) * k + kx] as f64
                                * input[(i * h + y + ky) * w + x + kx];
                        }
                    }
                }
                out[(o * oh + y) * ow + x] = s;
            }
        }
    }
    out
}

fn naive_act(act: Activation, v: &mut [f64]) {
    for x in v {
        *x = match act {
            Activation::Logistic => 1.0 / (1.0 + (-*x).exp()),
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
        };
    }
}

fn naive_pool(input: &[f64], c: usize, h: usize, w: usize) -> Vec<f64> {
    let (oh, ow) = (h / 2, w / 2);
    let mut out = vec![f64::NEG_INFINITY; c * oh * ow];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let o = &mut out[(ch * oh + y / 2) * ow + x / 2];
                *o = o.max(input[(ch * h + y) * w + x]);
            }
        }
    }
    out
}

fn naive_linear(input: &[f64], wt: &[f32], nout: usize) -> Vec<f64> {
    let nin = input.len();
    (0..nout)
        .map(|k| (0..nin).map(|i| wt[k * nin + i] as f64 * input[i]).sum())
        .collect()
}

/// The network as the paper's code defines it: conv, activation, pool, in that order.
fn naive_forward(net: &Net, w: &[f32], img: &[f32]) -> Vec<f64> {
    let img: Vec<f64> = img.iter().map(|&v| v as f64).collect();
    let mut c1 = naive_conv(&img, 1, 28, 28, &w[..250], 10, 5);
    naive_act(net.act, &mut c1);
    let p1 = naive_pool(&c1, 10, 24, 24);
    let mut c2 = naive_conv(&p1, 10, 12, 12, &w[250..5250], 20, 5);
    naive_act(net.act, &mut c2);
    let feat = match net.arch {
        Arch::Paper => c2,
        Arch::Pooled => naive_pool(&c2, 20, 8, 8),
    };
    naive_linear(&feat, &w[5250..], 10)
}

fn naive_ensemble(
    net: &Net,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
) -> Vec<f64> {
    let p = net.n_params();
    let mut out = Vec::with_capacity(members * images * 10);
    for m in 0..members {
        for d in 0..images {
            out.extend(naive_forward(
                net,
                &weights[m * p..][..p],
                &x[d * 784..][..784],
            ));
        }
    }
    out
}

// ---------------------------------------------------------------- data

fn normal(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            scale * z
        })
        .collect::<Vec<f32>>()
}

fn images(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n * 784).map(|_| rng.random::<f32>()).collect()
}

const ARCHS: [Arch; 2] = [Arch::Paper, Arch::Pooled];

/// The implementations this CPU can run (always at least the portable one). The test
/// machines: AVX-512 (all three) and AVX2-only (avx2 and portable); CI runs whichever.
fn available() -> Vec<ForwardImpl> {
    let imps: Vec<ForwardImpl> = ForwardImpl::ALL
        .into_iter()
        .filter(|i| i.is_available())
        .collect();
    eprintln!("forward implementations on this CPU: {imps:?}");
    imps
}
const ACTS: [Activation; 3] = [Activation::Logistic, Activation::Relu, Activation::Tanh];

// ---------------------------------------------------------------- whole network

#[test]
fn ensemble_forward_matches_naive_reference() {
    let imps = available();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // (members, images, weight scale): N(0,1) as in the paper, a small scale where the
    // activations work near their linear region, and a large one that drives logistic
    // and tanh deep into saturation (pre-activations of several hundred).
    let cases = [
        (1, 3, 1.0),
        (3, 67, 1.0),
        (9, 1, 0.1),
        (2, 64, 0.1),
        (2, 5, 30.0),
    ];
    for arch in ARCHS {
        for act in ACTS {
            let net = Net::new(arch, act);
            for &(members, n_img, scale) in &cases {
                let w = normal(&mut rng, members * net.n_params(), scale);
                let x = images(&mut rng, n_img);
                let want = naive_ensemble(&net, &w, members, &x, n_img);
                let what = format!("{arch:?}/{act:?} J={members} B={n_img} scale={scale}");
                for &imp in &imps {
                    let mut got = vec![f32::NAN; members * n_img * 10];
                    ensemble_forward_with(imp, &net, &w, members, &x, n_img, &mut got).unwrap();
                    assert_logits_close(&format!("{} {what}", imp.name()), &got, &want);
                }
                let mut got = vec![f32::NAN; members * n_img * 10];
                ensemble_forward(&net, &w, members, &x, n_img, &mut got).unwrap();
                assert_logits_close(&format!("best {what}"), &got, &want);
            }
        }
    }
}

/// Hand-computed network, relu. conv1: only w1[0,0,0,0] = 1, so conv1 channel 0 is the
/// image's top-left 24 × 24 window and the other channels are 0. The image has 1.0 at
/// (10, 6) and 0.5 at (11, 7): relu keeps them, the 2×2 pool block (rows 10–11, cols
/// 6–7) gives a1[0][5][3] = 1.0, all else 0. conv2: only w2[3,0,1,2] = 2, so
/// c2[3][y][x] = 2·a1[0][y+1][x+2] is 2.0 at (y, x) = (4, 1), all else 0.
/// Paper: flatten index 3·64 + 4·8 + 1 = 225. Pooled: the 2×2 pool moves it to (2, 0),
/// index 3·16 + 2·4 + 0 = 56. fc1: W[7, idx] = 1.5, W[2, idx] = −0.5, so the logits are
/// 3.0 at class 7, −1.0 at class 2, 0 elsewhere. Member 1 has every weight doubled:
/// relu is positively homogeneous, so its logits are 2³ = 8 times member 0's.
#[test]
fn hand_computed_network() {
    for (arch, idx) in [(Arch::Paper, 225), (Arch::Pooled, 56)] {
        let net = Net::new(arch, Activation::Relu);
        let p = net.n_params();
        let mut w0 = vec![0.0f32; p];
        w0[0] = 1.0;
        w0[250 + ((3 * 10) * 5 + 1) * 5 + 2] = 2.0;
        let nf = net.fc_in();
        w0[5250 + 7 * nf + idx] = 1.5;
        w0[5250 + 2 * nf + idx] = -0.5;
        let w1: Vec<f32> = w0.iter().map(|v| 2.0 * v).collect();
        let weights = [w0, w1].concat();
        let mut x = vec![0.0f32; 784];
        x[10 * 28 + 6] = 1.0;
        x[11 * 28 + 7] = 0.5;
        let mut expect = vec![0.0f32; 20];
        expect[7] = 3.0;
        expect[2] = -1.0;
        expect[17] = 24.0;
        expect[12] = -8.0;
        for imp in available() {
            let mut out = vec![f32::NAN; 20];
            ensemble_forward_with(imp, &net, &weights, 2, &x, 1, &mut out).unwrap();
            assert_eq!(out, expect, "{arch:?}, {}", imp.name());
        }
    }
}

#[test]
fn output_is_deterministic_and_independent_of_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let net = Net::new(Arch::Paper, Activation::Logistic);
    let (members, n_img) = (19, 37);
    let w = normal(&mut rng, members * net.n_params(), 1.0);
    let x = images(&mut rng, n_img);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for imp in available() {
        let name = imp.name();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut out = vec![0.0f32; members * n_img * 10];
                ensemble_forward_with(imp, &net, &w, members, &x, n_img, &mut out).unwrap();
                out
            })
        };
        let a = run(1);
        let b = run(2);
        let c = run(2);
        let d = run(3);
        assert_eq!(bits(&a), bits(&b), "{name}: 1 vs 2 threads");
        assert_eq!(bits(&b), bits(&c), "{name}: two calls");
        assert_eq!(bits(&a), bits(&d), "{name}: 1 vs 3 threads");
        // One member / one image alone gives the same bits as inside the big batch.
        let p = net.n_params();
        let mut one = vec![0.0f32; 10];
        let (wm, xi) = (&w[5 * p..6 * p], &x[20 * 784..21 * 784]);
        ensemble_forward_with(imp, &net, wm, 1, xi, 1, &mut one).unwrap();
        assert_eq!(
            bits(&one),
            bits(&a[(5 * n_img + 20) * 10..][..10]),
            "{name}: batch position"
        );
    }
}

/// Asking for an implementation this CPU lacks is an error, never a silent fallback.
#[test]
fn unavailable_implementation_is_an_error() {
    let net = Net::default();
    let w = vec![0.0f32; net.n_params()];
    let x = vec![0.0f32; 784];
    let mut out = vec![0.0f32; 10];
    for imp in ForwardImpl::ALL {
        let r = ensemble_forward_with(imp, &net, &w, 1, &x, 1, &mut out);
        assert_eq!(r.is_ok(), imp.is_available(), "{imp:?}");
        if let Err(e) = r {
            assert!(e.to_string().contains(imp.name()), "{e}");
        }
    }
    assert!(ForwardImpl::Portable.is_available());
    assert!(ForwardImpl::best().is_available());
}

#[test]
fn shape_errors_are_reported() {
    let net = Net::default();
    let p = net.n_params();
    let w = vec![0.0f32; 2 * p];
    let x = vec![0.0f32; 3 * 784];
    let mut out = vec![0.0f32; 60];
    let is_shape = |r: enkf_dnn::Result<()>| matches!(r, Err(Error::Shape { .. }));
    assert!(is_shape(ensemble_forward(
        &net,
        &w[1..],
        2,
        &x,
        3,
        &mut out
    )));
    assert!(is_shape(ensemble_forward(
        &net,
        &w,
        2,
        &x[..783],
        3,
        &mut out
    )));
    assert!(is_shape(ensemble_forward(
        &net,
        &w,
        2,
        &x,
        3,
        &mut out[..59]
    )));
    assert!(is_shape(ensemble_forward_portable(
        &net,
        &w,
        2,
        &x,
        3,
        &mut out[..59]
    )));
    assert!(ensemble_forward(&net, &w, 2, &x, 3, &mut out).is_ok());
    assert!(ensemble_forward(&net, &[], 0, &x, 3, &mut []).is_ok());
    let mut o = vec![0.0f32; 4];
    assert!(is_shape(conv2d_forward(
        &[0.0; 9], 1, 3, 3, &[0.0; 4], 1, 4, &mut o
    )));
    assert!(is_shape(maxpool2_forward(&[0.0; 9], 1, 3, 3, &mut o)));
    assert!(is_shape(linear_forward(&[0.0; 3], 3, &[0.0; 8], 4, &mut o)));
}

// ---------------------------------------------------------------- single layers

/// One layer, f32 accumulation over at most 1280 terms of O(1) values against f64:
/// the rounding errors add up like √K·u ≈ 2e-6 relative to the terms' scale (K·1.0 for
/// N(0,1) data); observed worst 1e-7. 1e-6 per term leaves a ~10× margin.
const LAYER_TOL: f64 = 1e-6;

#[test]
fn conv2d_forward_matches_naive() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for &(cin, h, w, cout, k) in &[(1, 28, 28, 10, 5), (10, 12, 12, 20, 5), (3, 7, 9, 2, 3)] {
        let input = normal(&mut rng, cin * h * w, 1.0);
        let wt = normal(&mut rng, cout * cin * k * k, 1.0);
        let (oh, ow) = (h - k + 1, w - k + 1);
        let mut out = vec![f32::NAN; cout * oh * ow];
        conv2d_forward(&input, cin, h, w, &wt, cout, k, &mut out).unwrap();
        let inp: Vec<f64> = input.iter().map(|&v| v as f64).collect();
        let want = naive_conv(&inp, cin, h, w, &wt, cout, k);
        let scale = (cin * k * k) as f64;
        assert_close("conv2d_forward", &out, &want, LAYER_TOL * scale, LAYER_TOL);
    }
}

#[test]
fn maxpool_activation_and_linear_match_naive() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let input = normal(&mut rng, 3 * 6 * 8, 1.0);
    let mut out = vec![f32::NAN; 3 * 3 * 4];
    maxpool2_forward(&input, 3, 6, 8, &mut out).unwrap();
    let want = naive_pool(
        &input.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        3,
        6,
        8,
    );
    // A max selects one of its inputs: exact.
    let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    assert_eq!(out, want, "maxpool2_forward");

    for act in ACTS {
        let mut v = normal(&mut rng, 100, 3.0);
        let mut want: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        activation_forward(act, &mut v);
        naive_act(act, &mut want);
        // libm f32 exp/tanh are within a few ulp.
        assert_close(
            &format!("activation_forward {act:?}"),
            &v,
            &want,
            1e-7,
            1e-6,
        );
    }

    let (nin, nout) = (1280, 10);
    let input = normal(&mut rng, nin, 1.0);
    let wt = normal(&mut rng, nout * nin, 1.0);
    let mut out = vec![f32::NAN; nout];
    linear_forward(&input, nin, &wt, nout, &mut out).unwrap();
    let want = naive_linear(
        &input.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &wt,
        nout,
    );
    assert_close(
        "linear_forward",
        &out,
        &want,
        LAYER_TOL * nin as f64,
        LAYER_TOL,
    );
}
