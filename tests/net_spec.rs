//! Layer-spec networks: parsing (JSON and short form, errors naming the layer and key),
//! shapes and parameter layout, and the CPU forward pass against naive loops.

use enkf_dnn::cpu::forward::ensemble_forward;
use enkf_dnn::cpu::spec_forward::spec_forward;
use enkf_dnn::model::spec::{
    parse_json, parse_short, preset, Layer, NetSpec, Shape, SpecActivation,
};
use enkf_dnn::model::{Activation, Arch, Net};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::json;

mod common;
use common::twins::random_specs;

const MNIST: Shape = Shape::Image { c: 1, h: 28, w: 28 };

fn config_err(r: enkf_dnn::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(enkf_dnn::Error::Config(m)) => m,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- parsing

#[test]
fn json_form_with_pytorch_defaults() {
    let layers = parse_json(&json!([
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3},
        {"type": "heaviside"},
        {"type": "avgpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10, "bias": false}
    ]))
    .unwrap();
    assert_eq!(
        layers,
        [
            Layer::Conv2d {
                out_channels: 4,
                kernel_size: 3,
                stride: 1,
                padding: 0,
                bias: true
            },
            Layer::Act(SpecActivation::Heaviside),
            Layer::AvgPool2d { kernel_size: 2 },
            Layer::Flatten,
            Layer::Linear {
                out_features: 10,
                bias: false
            },
        ]
    );
    // The recorded form writes every default out and parses back to the same layers.
    let spec = NetSpec::build(&layers, MNIST, 10).unwrap();
    let recorded = spec.to_json();
    assert_eq!(recorded[0]["stride"], 1);
    assert_eq!(recorded[0]["padding"], 0);
    assert_eq!(recorded[0]["bias"], true);
    assert_eq!(parse_json(&recorded).unwrap(), layers);
}

#[test]
fn short_form_equals_json_form() {
    let short = parse_short(
        "conv2d(10,5,bias=false) logistic maxpool2d(2) conv2d(20, 5, bias=false) logistic \
         flatten linear(10,bias=false)",
    )
    .unwrap();
    assert_eq!(short, preset(Arch::Paper, Activation::Logistic));
    let keyed = parse_short(
        "conv2d(out_channels=3,kernel_size=3,stride=2,padding=1) relu flatten linear(10)",
    )
    .unwrap();
    assert_eq!(
        keyed[0],
        Layer::Conv2d {
            out_channels: 3,
            kernel_size: 3,
            stride: 2,
            padding: 1,
            bias: true
        }
    );
}

#[test]
fn errors_name_the_layer_index_and_the_key() {
    let cases = [
        (
            json!([{"type": "conv2d", "out_channels": 4, "kernal_size": 3}]),
            "net[0] (conv2d): unknown key `kernal_size`",
        ),
        (
            json!([{"type": "flatten"}, {"type": "conv2d", "kernel_size": 3}]),
            "net[1] (conv2d): missing key `out_channels`",
        ),
        (
            json!([{"type": "linear", "out_features": 0}]),
            "net[0] (linear): `out_features` = 0",
        ),
        (
            json!([{"type": "linear", "out_features": 2.5}]),
            "net[0] (linear): `out_features` = 2.5",
        ),
        (
            json!([{"type": "linear", "out_features": 10, "bias": "no"}]),
            "net[0] (linear): `bias` = \"no\"",
        ),
        (
            json!([{"type": "relu"}, {"type": "softmax"}]),
            "net[1]: unknown `type` \"softmax\"",
        ),
        (json!([{"out_features": 10}]), "net[0]: missing key `type`"),
        (
            json!([{"type": "maxpool2d", "kernel_size": 2, "stride": 1}]),
            "net[0] (maxpool2d): unknown key `stride`",
        ),
        (
            json!([{"type": "tanh", "inplace": true}]),
            "net[0] (tanh): unknown key `inplace` (it takes no arguments)",
        ),
        (json!([]), "empty"),
        (json!({"type": "relu"}), "not a list"),
    ];
    for (v, want) in cases {
        let msg = config_err(parse_json(&v));
        assert!(msg.contains(want), "{v}: {msg}");
    }
    for (text, want) in [
        (
            "conv2d(10,5 relu",
            "net[0] (conv2d): `(` without a closing `)`",
        ),
        (
            "relu linear(10,5)",
            "net[1] (linear): too many positional arguments at `5`",
        ),
        ("linear(ten)", "net[0] (linear): `out_features` = `ten`"),
        (
            "linear(10,out_features=3)",
            "net[0] (linear): `out_features` given twice",
        ),
        ("relu dense(3)", "net[1]: unknown `type` \"dense\""),
        ("relu (3)", "net[1]: a layer name is missing at `(3)`"),
    ] {
        let msg = config_err(parse_short(text));
        assert!(msg.contains(want), "{text}: {msg}");
    }
}

#[test]
fn shape_errors_name_the_layer() {
    let build = |text: &str| NetSpec::build(&parse_short(text).unwrap(), MNIST, 10);
    for (text, want) in [
        (
            "linear(10)",
            "net[0] (linear): needs a flat input, got 1 × 28 × 28",
        ),
        (
            "flatten conv2d(3,3) flatten linear(10)",
            "net[1] (conv2d): needs a C × H × W input",
        ),
        (
            "conv2d(3,29) flatten linear(10)",
            "net[0] (conv2d): `kernel_size` = 29 does not fit",
        ),
        (
            "maxpool2d(29) flatten linear(10)",
            "net[0] (maxpool2d): `kernel_size` = 29 is larger",
        ),
        (
            "flatten linear(7)",
            "the last layer gives 7 values per image, the data needs 10",
        ),
        (
            "conv2d(3,3) relu",
            "the last layer gives 3 × 26 × 26 values",
        ),
    ] {
        let msg = config_err(build(text));
        assert!(msg.contains(want), "{text}: {msg}");
    }
    // Absurd sizes are errors, not overflows.
    let msg = config_err(build("conv2d(4000000000,1) flatten linear(10)"));
    assert!(
        msg.contains("net[0] (conv2d): gives 4000000000 × 28 × 28 values"),
        "{msg}"
    );
    let msg = config_err(build("flatten linear(3000000) linear(3000000) linear(10)"));
    assert!(
        msg.contains("net[2] (linear): more than 2^32 parameters"),
        "{msg}"
    );
    // Padding lets a kernel larger than the image fit, as in PyTorch.
    assert!(build("conv2d(2,29,padding=1) flatten linear(10)").is_ok());
}

// ---------------------------------------------------------------- layout

#[test]
fn presets_have_the_fused_networks_layout() {
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Relu, Activation::Tanh] {
            let net = Net::new(arch, act);
            let spec = NetSpec::build(&preset(arch, act), MNIST, 10).unwrap();
            assert_eq!(spec.n_params(), net.n_params(), "{arch:?}");
            assert_eq!(spec.macs_per_image(), net.macs_per_image(), "{arch:?}");
            let ours: Vec<_> = spec
                .tensors()
                .iter()
                .map(|t| (t.offset, t.shape.clone()))
                .collect();
            let fused: Vec<_> = net
                .tensors()
                .iter()
                .map(|t| (t.offset, t.shape.clone()))
                .collect();
            assert_eq!(ours, fused, "{arch:?}");
        }
    }
    let names: Vec<_> = NetSpec::build(&preset(Arch::Paper, Activation::Relu), MNIST, 10)
        .unwrap()
        .tensors()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["0.weight", "3.weight", "6.weight"]);
}

#[test]
fn biases_follow_their_weights_in_sequential_order() {
    let spec = NetSpec::build(
        &parse_short("conv2d(3,5,stride=2,padding=2) tanh flatten linear(16) relu linear(10)")
            .unwrap(),
        MNIST,
        10,
    )
    .unwrap();
    // conv: (28 + 4 − 5)/2 + 1 = 14 → 3 × 14 × 14 = 588 features.
    assert_eq!(spec.layers()[0].output, Shape::Image { c: 3, h: 14, w: 14 });
    let t: Vec<_> = spec
        .tensors()
        .into_iter()
        .map(|t| (t.name, t.shape, t.offset))
        .collect();
    assert_eq!(
        t,
        [
            ("0.weight".to_string(), vec![3, 1, 5, 5], 0),
            ("0.bias".to_string(), vec![3], 75),
            ("3.weight".to_string(), vec![16, 588], 78),
            ("3.bias".to_string(), vec![16], 78 + 16 * 588),
            ("5.weight".to_string(), vec![10, 16], 78 + 16 * 588 + 16),
            ("5.bias".to_string(), vec![10], 78 + 16 * 588 + 16 + 160),
        ]
    );
    assert_eq!(spec.n_params(), 78 + 16 * 588 + 16 + 160 + 10);
}

// ---------------------------------------------------------------- forward

/// Naive per-output loops in f32, adding the terms of each output in the order the
/// module documents (conv: input channel, ky, kx, skipping padding, then bias; linear:
/// 8 interleaved partial sums, a pairwise tree, the tail, then bias; avg-pool: window
/// rows, then / k²): written independently of the library, equal bit for bit.
fn naive(spec: &NetSpec, w: &[f32], input: &[f32]) -> Vec<f32> {
    let mut cur = input.to_vec();
    for l in spec.layers() {
        cur = match (l.layer, l.input, l.output) {
            (Layer::Act(a), _, _) => cur.iter().map(|&v| a.apply(v)).collect(),
            (Layer::Flatten, _, _) => cur,
            (
                Layer::Conv2d {
                    kernel_size: k,
                    stride,
                    padding,
                    ..
                },
                Shape::Image { c, h, w: wd },
                Shape::Image {
                    c: co,
                    h: oh,
                    w: ow,
                },
            ) => {
                let mut out = vec![0.0f32; co * oh * ow];
                for o in 0..co {
                    for y in 0..oh {
                        for x in 0..ow {
                            let mut s = 0.0f32;
                            for i in 0..c {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iy = (y * stride + ky) as isize - padding as isize;
                                        let ix = (x * stride + kx) as isize - padding as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize
                                        {
                                            continue;
                                        }
                                        let wt =
                                            w[l.weight_offset + ((o * c + i) * k + ky) * k + kx];
                                        s += wt * cur[(i * h + iy as usize) * wd + ix as usize];
                                    }
                                }
                            }
                            if let Some(b) = l.bias_offset {
                                s += w[b + o];
                            }
                            out[(o * oh + y) * ow + x] = s;
                        }
                    }
                }
                out
            }
            (
                Layer::MaxPool2d { kernel_size: k } | Layer::AvgPool2d { kernel_size: k },
                Shape::Image { c, h, w: wd },
                Shape::Image { h: oh, w: ow, .. },
            ) => {
                let is_max = matches!(l.layer, Layer::MaxPool2d { .. });
                let mut out = Vec::new();
                for ch in 0..c {
                    for y in 0..oh {
                        for x in 0..ow {
                            let mut acc = if is_max { f32::NEG_INFINITY } else { 0.0 };
                            for ky in 0..k {
                                for kx in 0..k {
                                    let v = cur[(ch * h + y * k + ky) * wd + x * k + kx];
                                    acc = if is_max { acc.max(v) } else { acc + v };
                                }
                            }
                            out.push(if is_max { acc } else { acc / (k * k) as f32 });
                        }
                    }
                }
                out
            }
            (Layer::Linear { .. }, Shape::Vector(f), Shape::Vector(n)) => (0..n)
                .map(|o| {
                    let row = &w[l.weight_offset + o * f..][..f];
                    let mut part = [0.0f32; 8];
                    let n8 = f - f % 8;
                    for i in 0..n8 {
                        part[i % 8] += row[i] * cur[i];
                    }
                    let p = part;
                    let mut s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
                    for i in n8..f {
                        s += row[i] * cur[i];
                    }
                    match l.bias_offset {
                        Some(b) => s + w[b + o],
                        None => s,
                    }
                })
                .collect(),
            other => panic!("unexpected {other:?}"),
        };
    }
    cur
}

fn normal(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            scale * z
        })
        .collect()
}

#[test]
fn spec_forward_equals_naive_loops_on_random_specs() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (text, input) in random_specs(&mut rng) {
        let spec = NetSpec::build(&parse_short(&text).unwrap(), input, 10)
            .unwrap_or_else(|e| panic!("{text} on {input}: {e}"));
        let (members, images) = (3, 5);
        let w = normal(&mut rng, members * spec.n_params(), 0.7);
        let x: Vec<f32> = (0..images * input.len())
            .map(|_| rng.random::<f32>())
            .collect();
        let mut got = vec![f32::NAN; members * images * 10];
        spec_forward(&spec, &w, members, &x, images, &mut got).unwrap();
        for m in 0..members {
            for d in 0..images {
                let p = spec.n_params();
                let want = naive(
                    &spec,
                    &w[m * p..][..p],
                    &x[d * input.len()..][..input.len()],
                );
                let g = &got[(m * images + d) * 10..][..10];
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(g),
                    bits(&want),
                    "{text} on {input}, member {m}, image {d}"
                );
            }
        }
    }
}

/// The generic path on the paper presets gives the fused kernels' function. They add in
/// different orders (the fused kernels pool before the activation and vectorise), so
/// the tolerance is the one of `tests/forward_naive.rs` (f32 sums of up to 1280 terms:
/// 1e-5 of the largest logit) against an error of order 1 for a wrong layout.
#[test]
fn spec_forward_on_the_presets_matches_the_fused_kernels() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Relu, Activation::Tanh] {
            let net = Net::new(arch, act);
            let spec = NetSpec::build(&preset(arch, act), MNIST, 10).unwrap();
            let (members, images) = (3, 9);
            let w = normal(&mut rng, members * net.n_params(), 1.0);
            let x: Vec<f32> = (0..images * 784).map(|_| rng.random::<f32>()).collect();
            let mut fused = vec![0.0f32; members * images * 10];
            ensemble_forward(&net, &w, members, &x, images, &mut fused).unwrap();
            let mut generic = vec![0.0f32; members * images * 10];
            spec_forward(&spec, &w, members, &x, images, &mut generic).unwrap();
            let scale = fused.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for (i, (g, f)) in generic.iter().zip(&fused).enumerate() {
                assert!(
                    (g - f).abs() <= 1e-5 * scale,
                    "{arch:?}/{act:?}[{i}]: generic {g}, fused {f} (scale {scale})"
                );
            }
        }
    }
}

/// The GPU's launch plan, executed with the CPU twins of its kernels (and of the
/// strided-batched GEMM), in blocks of whole members and of one member's images (member
/// strides, the shared-input stride 0, each block's output rows): the function of
/// `spec_forward` on every random spec. The twins use fused multiply-adds in the
/// convolutions, the CPU path does not: the forward tolerance (`FORWARD_TOL`, f32
/// sums reordered) against an error of order 1 for a wrong buffer, stride or offset.
#[test]
fn the_gpu_launch_plan_equals_spec_forward() {
    use common::twins::FORWARD_TOL;
    use enkf_dnn::cpu::spec_kernels::run_plan;
    use enkf_dnn::gpu::spec_plan::{blocks_of, SpecPlan};
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let mut specs = random_specs(&mut rng);
    specs.push(("flatten".into(), Shape::Vector(10)));
    specs.push((
        "relu avgpool2d(2) flatten linear(10)".into(),
        Shape::Image { c: 2, h: 9, w: 8 },
    ));
    for (text, input) in specs {
        let spec = NetSpec::build(&parse_short(&text).unwrap(), input, 10).unwrap();
        let plan = SpecPlan::of(&spec);
        let (members, images) = (5, 3);
        let w = normal(&mut rng, members * spec.n_params(), 0.7);
        let x: Vec<f32> = (0..images * input.len())
            .map(|_| rng.random::<f32>() - 0.25)
            .collect();
        let mut want = vec![0.0f32; members * images * 10];
        spec_forward(&spec, &w, members, &x, images, &mut want).unwrap();
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
        // Whole members in chunks of 1, 2 and all; one member at a time in chunks of 2
        // images; the backend's own blocks.
        for (mc, dc) in [(1, images), (2, images), (members, images), (1, 2), (0, 0)] {
            let blocks = if mc == 0 {
                plan.blocks(members, images)
            } else {
                blocks_of(members, images, mc, dc)
            };
            let mut got = vec![f32::NAN; want.len()];
            run_plan(&plan, &spec, &w, members, &x, images, &mut got, &blocks).unwrap();
            common::assert_close(
                &format!("{text} on {input}, blocks of {mc} × {dc}"),
                &common::up(&got),
                &common::up(&want),
                FORWARD_TOL * scale,
                FORWARD_TOL,
            );
        }
    }
}

#[test]
fn spec_forward_is_independent_of_thread_count_and_checks_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let spec = NetSpec::build(
        &parse_short("conv2d(4,3,padding=1) heaviside maxpool2d(2) conv2d(6,3,stride=2) tanh flatten linear(10)").unwrap(),
        MNIST,
        10,
    )
    .unwrap();
    let (members, images) = (7, 11);
    let w = normal(&mut rng, members * spec.n_params(), 1.0);
    let x: Vec<f32> = (0..images * 784).map(|_| rng.random::<f32>()).collect();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let mut out = vec![0.0f32; members * images * 10];
                spec_forward(&spec, &w, members, &x, images, &mut out).unwrap();
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            })
    };
    assert_eq!(run(1), run(3));
    let mut out = vec![0.0f32; members * images * 10];
    let is_shape = |r: enkf_dnn::Result<()>| matches!(r, Err(enkf_dnn::Error::Shape { .. }));
    assert!(is_shape(spec_forward(
        &spec,
        &w[1..],
        members,
        &x,
        images,
        &mut out
    )));
    assert!(is_shape(spec_forward(
        &spec,
        &w,
        members,
        &x[1..],
        images,
        &mut out
    )));
    assert!(is_shape(spec_forward(
        &spec,
        &w,
        members,
        &x,
        images,
        &mut out[1..]
    )));
    assert!(spec_forward(&spec, &[], 0, &x, images, &mut []).is_ok());
}

#[test]
fn heaviside_is_a_step_and_keeps_nan() {
    let h = SpecActivation::Heaviside;
    assert_eq!(
        [h.apply(-1e-30), h.apply(-0.0), h.apply(0.0), h.apply(3.0)],
        [0.0, 1.0, 1.0, 1.0]
    );
    assert!(h.apply(f32::NAN).is_nan());
    assert_eq!(h.apply(f32::NEG_INFINITY), 0.0);
}

// ---------------------------------------------------------------- as a training setting

use enkf_dnn::model::spec::NetSetting;
use enkf_dnn::train::PartialConfig;

fn resolve(json: &str) -> enkf_dnn::Result<enkf_dnn::train::TrainConfig> {
    let (partial, warnings) = PartialConfig::from_json(json)?;
    assert!(warnings.is_empty(), "{warnings:?}");
    partial.resolve()
}

#[test]
fn net_is_a_config_key_with_errors_before_any_work() {
    let cfg = resolve(r#"{"net": [{"type": "flatten"}, {"type": "linear", "out_features": 10}]}"#)
        .unwrap();
    let net = cfg.net();
    assert_eq!(net.n_params(), 784 * 10 + 10);
    assert_eq!(net.describe(), "flatten linear(10,bias=true)");
    // The command line's short form is the same setting.
    assert_eq!(
        cfg.net,
        Some(NetSetting::parse("flatten linear(10)").unwrap())
    );
    for (json, want) in [
        (
            r#"{"net": [{"type": "flatten"}, {"type": "linear", "out_features": 7}]}"#,
            "the data needs 10",
        ),
        (
            r#"{"net": [{"type": "flatten"}, {"type": "linear"}]}"#,
            "net[1] (linear): missing key `out_features`",
        ),
        (
            r#"{"net": [{"type": "flatten"}, {"type": "linear", "out_features": 10}], "arch": "pooled"}"#,
            "net and arch are both set",
        ),
        (
            r#"{"net": [{"type": "flatten"}, {"type": "linear", "out_features": 10}], "activation": "relu"}"#,
            "net and activation are both set",
        ),
    ] {
        let msg = match resolve(json) {
            Err(e) => e.to_string(),
            Ok(c) => panic!("{json} resolved to {:?}", c.net),
        };
        assert!(msg.contains(want), "{json}: {msg}");
    }
    // The EnKF and the gradient optimizers have CUDA kernels for layer-spec networks:
    // those configurations are valid.
    for opt in ["enkf", "sgd", "adam"] {
        let cuda = resolve(&format!(
            r#"{{"net": [{{"type": "flatten"}}, {{"type": "linear", "out_features": 10}}], "backend": "cuda", "optimizer": "{opt}"}}"#
        ))
        .unwrap_or_else(|e| panic!("{opt} on CUDA with a layer spec: {e}"));
        assert!(cuda.net.is_some());
    }
    // A config.json of an earlier version held an informational object under "net".
    let old = resolve(r#"{"net": {"train_images": 60000, "test_images": 10000}, "members": 50}"#)
        .unwrap();
    assert_eq!((old.net, old.members), (None, 50));
}

/// `enkf-dnn train --net ...` end to end on the CPU: the run's config.json records the
/// JSON form (without arch and activation) and reads back as a --config; the model is
/// exported under the `Sequential` keys; a typo is an error before any work.
#[test]
fn train_with_a_layer_spec_network() {
    let out = std::env::temp_dir().join(format!("enkf-net-spec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let bin = env!("CARGO_BIN_EXE_enkf-dnn");
    let data = enkf_dnn::data::data_root().join("mnist");
    let run = |extra: &[&str]| {
        std::process::Command::new(bin)
            .args([
                "train",
                "-J",
                "20",
                "--train-limit",
                "256",
                "--test-limit",
                "100",
            ])
            .args(["--iterations", "4", "--eval-every", "2", "--threads", "1"])
            .arg("--data")
            .arg(&data)
            .args(extra)
            .output()
            .expect("run enkf-dnn")
    };
    let net = "conv2d(4,5,stride=2) heaviside flatten linear(10,bias=false)";
    let o = run(&["--net", net, "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["net"][0]["type"], "conv2d");
    assert_eq!(cfg["net"][0]["stride"], 2);
    assert_eq!(cfg["net"][1]["type"], "heaviside");
    assert!(
        cfg.get("arch").is_none() && cfg.get("activation").is_none(),
        "{cfg}"
    );
    assert_eq!(cfg["params"], 4 * 25 + 4 + 10 * 4 * 12 * 12);
    // Statistics: the heaviside layer (1) and the softmax (2), every iteration.
    let stats = std::fs::read_to_string(out.join("stats.csv")).unwrap();
    assert!(
        stats.starts_with("iteration,layer,quantity,mean,std"),
        "{stats}"
    );
    let rows: Vec<_> = stats.lines().skip(1).collect();
    assert_eq!(rows.len(), 5 * 2, "{stats}");
    assert!(rows
        .iter()
        .all(|r| r.split(',').nth(2) == Some("activation")));
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    let (partial, _) = PartialConfig::from_json(&text).unwrap();
    assert_eq!(
        partial.resolve().unwrap().net,
        Some(NetSetting::parse(net).unwrap())
    );
    let tensors = enkf_dnn::io::safetensors::read(&out.join("model.safetensors")).unwrap();
    let mut keys: Vec<_> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.clone()))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            ("0.bias", vec![4]),
            ("0.weight", vec![4, 1, 5, 5]),
            ("3.weight", vec![10, 576])
        ]
    );
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 1 + 5, "{metrics}");
    // Errors name the layer and key, before anything is written.
    let bad = out.join("bad");
    let o = run(&[
        "--net",
        "conv2d(4,5,strde=2) flatten linear(10)",
        "--out",
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("net[0] (conv2d): unknown key `strde`"),
        "{err}"
    );
    assert!(!bad.exists());
    let o = run(&["--net", net, "--arch", "pooled"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("net and arch are both set"));
    // A spec run resumes from its checkpoint (its stored configuration leaves out the
    // keys the spec replaces, so it resolves again) and may be extended.
    let ck = out.join("ck");
    let o = run(&[
        "--net",
        net,
        "--checkpoint-every",
        "2",
        "--out",
        ck.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = std::process::Command::new(bin)
        .args([
            "train",
            "--resume",
            ck.to_str().unwrap(),
            "--iterations",
            "6",
        ])
        .args(["--threads", "1"])
        .output()
        .expect("resume");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(ck.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 1 + 7, "{metrics}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// IDX images of any size train a layer-spec network built for them (the shape is read
/// from the training images' header); a network that does not fit them, or the fused
/// paper network (28 × 28 only), is refused before any work, naming the size.
#[test]
fn idx_images_of_any_size_train_a_spec_network() {
    let dir = common::tmpdir("net-spec-idx-12x14");
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    common::write_idx_dir(&data, 96, 30, 12, 14);
    let out = dir.join("run");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_enkf-dnn"))
            .args(["train", "--backend", "cpu", "-J", "8", "--iterations", "3"])
            .args(["--eval-every", "3", "--threads", "1", "--data"])
            .arg(&data)
            .args(extra)
            .output()
            .expect("run enkf-dnn")
    };
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let o = run(&[
        "--net",
        "conv2d(4,5) relu maxpool2d(2) flatten linear(10)",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    // conv 4 × 1 × 5 × 5 + 4 on 12 × 14 → 4 × 8 × 10, pooled 4 × 4 × 5 = 80 features.
    assert_eq!(cfg["params"], 4 * 25 + 4 + 10 * 80 + 10, "{cfg}");
    let o = run(&["--net", "conv2d(4,13) flatten linear(10)"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("1 × 12 × 14"), "{}", err(&o));
    let o = run(&[]);
    assert!(
        !o.status.success(),
        "the 28 × 28 paper network on 12 × 14 images"
    );
    assert!(
        err(&o).contains("12") && err(&o).contains("14"),
        "{}",
        err(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
