//! The layer-spec backprop kernels of `kernels/spec_backprop.cu`, unchanged, in the CPU
//! emulation (`tests/emu/`, see `tests/kernel_emu.rs`), against their CPU twins of the
//! same names (`enkf_dnn::cpu::spec_backprop_kernels`): bit for bit (the same fused
//! multiply-adds, separately rounded products and sums, the same block-tree order and
//! the host libm's expf/exp/log), in both schedules (a missing barrier in the block sums
//! shows as a schedule-dependent result), guards intact, every output written. The whole
//! pass on the GPU against the CPU is `tests/gpu_spec.rs`.

mod common;
use common::emu::{emu, launch, same_in_both_orders, Guarded, Launch, ORDERS};
use common::twins::{assert_bits, normals32};

use cudarc::driver::LaunchConfig;
use enkf_dnn::cpu::spec_backprop_kernels::{
    spec_act_backward_f32, spec_bias_grad_f32, spec_conv2d_dgrad_f32, spec_conv2d_wgrad_f32,
    spec_mse_backward_f32, spec_pool2d_backward_f32, spec_softmax_xent_f32,
};
use enkf_dnn::gpu::geometry::{
    elementwise_launch, elementwise_stride_launch, grid_1d, spec_reduce_launch, SPEC_RED_THREADS,
};
use enkf_dnn::gpu::spec_plan::{PoolMode, ACT_NONE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type ActFn = unsafe extern "C" fn(*const Launch, *mut f32, *const f32, i64, i32) -> i32;
type ConvFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    *const f32,
    *mut f32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
) -> i32;
type BiasFn = unsafe extern "C" fn(*const Launch, *const f32, *mut f32, i32, i32, i32) -> i32;
type PoolFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    *const f32,
    *mut f32,
    i64,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
) -> i32;
type XentFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    *const i32,
    i32,
    i32,
    f32,
    *mut f64,
    *mut i32,
    *mut f32,
) -> i32;
type MseFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    *const f32,
    i32,
    i32,
    f32,
    *mut f64,
    *mut f32,
) -> i32;

/// The element-wise launches: the backend's, and a small grid that makes threads loop.
fn stride_configs(n: usize) -> [LaunchConfig; 2] {
    [elementwise_stride_launch(n), grid_1d(n, 32, 3)]
}

/// The reduction launches: one block per output, and 3 blocks that loop over outputs.
fn reduce_configs(outputs: usize) -> [LaunchConfig; 2] {
    let mut few = spec_reduce_launch(outputs);
    few.grid_dim.0 = few.grid_dim.0.min(3);
    [spec_reduce_launch(outputs), few]
}

/// Conv cases (c, h, w, co, k, stride, pad): padding, strides that skip input columns,
/// a 1 × 1 kernel, a kernel wider than the stride.
const CONVS: [(usize, usize, usize, usize, usize, usize, usize); 4] = [
    (1, 9, 8, 3, 3, 1, 0),
    (2, 7, 9, 2, 3, 2, 1),
    (3, 6, 6, 4, 1, 1, 0),
    (2, 5, 7, 3, 4, 1, 2),
];

fn out_side(side: usize, k: usize, stride: usize, pad: usize) -> usize {
    (side + 2 * pad - k) / stride + 1
}

#[test]
fn the_reduction_block_size_is_the_kernels() {
    let src = std::fs::read_to_string(common::crate_root().join("kernels/spec_backprop.cu"))
        .expect("kernels/spec_backprop.cu");
    let line = src
        .lines()
        .find(|l| l.starts_with("#define SPEC_RED_THREADS"))
        .expect("the SPEC_RED_THREADS define");
    let v: u32 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(v, SPEC_RED_THREADS);
    assert!(v.is_power_of_two(), "the tree sum halves the block");
}

#[test]
fn spec_act_backward_equals_its_twin() {
    let Some(e) = emu() else { return };
    let k = e.entry::<ActFn>("spec_act_backward_f32");
    let mut rng = ChaCha8Rng::seed_from_u64(201);
    let n = 1000;
    let g0 = normals32(&mut rng, n, 1.0);
    for act in [ACT_NONE, 0, 1, 2, 3] {
        // Outputs of the activation: in (0, 1) for logistic, (−1, 1) for tanh, ≥ 0 for
        // ReLU (with exact zeros), {0, 1} for heaviside.
        let y: Vec<f32> = (0..n)
            .map(|i| match act {
                0 => rng.random::<f32>(),
                1 => (rng.random::<f32>() - 0.3).max(0.0),
                2 => rng.random::<f32>() * 2.0 - 1.0,
                3 => f32::from(u8::from(i % 3 == 0)),
                _ => rng.random::<f32>(),
            })
            .collect();
        let mut want = g0.clone();
        spec_act_backward_f32(&mut want, &y, act);
        if act == ACT_NONE {
            assert_bits("no activation", &want, &g0);
        }
        for cfg in stride_configs(n) {
            let runs = ORDERS
                .iter()
                .map(|&order| {
                    let (mut gg, yg) = (Guarded::new(&g0), Guarded::new(&y));
                    // SAFETY: g and y hold n values.
                    let rc =
                        unsafe { k(&launch(&cfg, order), gg.mut_ptr(), yg.ptr(), n as i64, act) };
                    e.result(rc).expect("spec_act_backward_f32");
                    gg.get("spec_act_backward_f32")
                })
                .collect();
            let got = same_in_both_orders("spec_act_backward_f32", runs);
            assert_bits(&format!("act {act}"), &got, &want);
        }
    }
}

#[test]
fn spec_conv2d_dgrad_and_wgrad_equal_their_twins() {
    let Some(e) = emu() else { return };
    let dgrad = e.entry::<ConvFn>("spec_conv2d_dgrad_f32");
    let wgrad = e.entry::<ConvFn>("spec_conv2d_wgrad_f32");
    let mut rng = ChaCha8Rng::seed_from_u64(202);
    for (case, &(c, h, wd, co, k, stride, pad)) in CONVS.iter().enumerate() {
        let (oh, ow) = (out_side(h, k, stride, pad), out_side(wd, k, stride, pad));
        let images = 3;
        let (n_in, n_g, n_w) = (images * c * h * wd, images * co * oh * ow, co * c * k * k);
        let input = normals32(&mut rng, n_in, 1.0);
        let g = normals32(&mut rng, n_g, 1.0);
        let w = normals32(&mut rng, n_w, 1.0);
        let dims = [c, h, wd, co, oh, ow, k, stride, pad].map(|v| v as i32);
        let geom = ((c, h, wd), (co, oh, ow), (k, stride, pad));

        let mut want = vec![0.0f32; n_in];
        spec_conv2d_dgrad_f32(&g, &w, &mut want, images, geom.0, geom.1, geom.2);
        for cfg in stride_configs(n_in) {
            let runs = ORDERS
                .iter()
                .map(|&order| {
                    let (gg, wg) = (Guarded::new(&g), Guarded::new(&w));
                    let mut og = Guarded::<f32>::output(n_in);
                    // SAFETY: g, w and din are the lengths the kernel indexes here.
                    let rc = unsafe {
                        dgrad(
                            &launch(&cfg, order),
                            gg.ptr(),
                            wg.ptr(),
                            og.mut_ptr(),
                            images as i32,
                            dims[0],
                            dims[1],
                            dims[2],
                            dims[3],
                            dims[4],
                            dims[5],
                            dims[6],
                            dims[7],
                            dims[8],
                        )
                    };
                    e.result(rc).expect("spec_conv2d_dgrad_f32");
                    og.written("spec_conv2d_dgrad_f32")
                })
                .collect();
            let got = same_in_both_orders("spec_conv2d_dgrad_f32", runs);
            assert_bits(&format!("dgrad case {case}"), &got, &want);
        }

        let mut want = vec![0.0f32; n_w];
        spec_conv2d_wgrad_f32(&input, &g, &mut want, images, geom.0, geom.1, geom.2);
        for cfg in reduce_configs(n_w) {
            let runs = ORDERS
                .iter()
                .map(|&order| {
                    let (ig, gg) = (Guarded::new(&input), Guarded::new(&g));
                    let mut og = Guarded::<f32>::output(n_w);
                    // SAFETY: input, g and dw are the lengths the kernel indexes here.
                    let rc = unsafe {
                        wgrad(
                            &launch(&cfg, order),
                            ig.ptr(),
                            gg.ptr(),
                            og.mut_ptr(),
                            images as i32,
                            dims[0],
                            dims[1],
                            dims[2],
                            dims[3],
                            dims[4],
                            dims[5],
                            dims[6],
                            dims[7],
                            dims[8],
                        )
                    };
                    e.result(rc).expect("spec_conv2d_wgrad_f32");
                    og.written("spec_conv2d_wgrad_f32")
                })
                .collect();
            let got = same_in_both_orders("spec_conv2d_wgrad_f32", runs);
            assert_bits(&format!("wgrad case {case}"), &got, &want);
        }
    }
}

#[test]
fn spec_bias_grad_equals_its_twin() {
    let Some(e) = emu() else { return };
    let k = e.entry::<BiasFn>("spec_bias_grad_f32");
    let mut rng = ChaCha8Rng::seed_from_u64(203);
    // (images, channels, plane): a linear bias (plane 1), conv planes, more terms per
    // channel than threads in a block.
    for &(images, channels, plane) in &[(5, 7, 1), (3, 4, 36), (4, 2, 100)] {
        let g = normals32(&mut rng, images * channels * plane, 1.0);
        let mut want = vec![0.0f32; channels];
        spec_bias_grad_f32(&g, &mut want, images, channels, plane);
        for cfg in reduce_configs(channels) {
            let runs = ORDERS
                .iter()
                .map(|&order| {
                    let gg = Guarded::new(&g);
                    let mut og = Guarded::<f32>::output(channels);
                    // SAFETY: g holds images·channels·plane values, db channels.
                    let rc = unsafe {
                        k(
                            &launch(&cfg, order),
                            gg.ptr(),
                            og.mut_ptr(),
                            images as i32,
                            channels as i32,
                            plane as i32,
                        )
                    };
                    e.result(rc).expect("spec_bias_grad_f32");
                    og.written("spec_bias_grad_f32")
                })
                .collect();
            let got = same_in_both_orders("spec_bias_grad_f32", runs);
            assert_bits(&format!("bias {images}×{channels}×{plane}"), &got, &want);
        }
    }
}

#[test]
fn spec_pool2d_backward_equals_its_twin_and_routes_to_the_first_maximum() {
    let Some(e) = emu() else { return };
    let k = e.entry::<PoolFn>("spec_pool2d_backward_f32");
    let mut rng = ChaCha8Rng::seed_from_u64(204);
    // (planes, h, w, k): floored outputs (odd sides leave inputs outside every window).
    for &(planes, h, wd, kk) in &[(4, 8, 8, 2), (3, 7, 9, 2), (2, 9, 10, 3)] {
        let (oh, ow) = (h / kk, wd / kk);
        let mut input = normals32(&mut rng, planes * h * wd, 1.0);
        // A tie keeps the first maximum; a NaN wins its window.
        input[1] = input[0].abs() + 5.0;
        input[wd] = input[1];
        input[2 * kk + 1] = f32::NAN;
        let g = normals32(&mut rng, planes * oh * ow, 1.0);
        let n = planes * h * wd;
        for mode in [PoolMode::Max, PoolMode::Avg] {
            let mut want = vec![0.0f32; n];
            spec_pool2d_backward_f32(&input, &g, &mut want, planes, (h, wd), (oh, ow), kk, mode);
            if mode == PoolMode::Max {
                assert_eq!(
                    want[1].to_bits(),
                    g[0].to_bits(),
                    "the first maximum takes g"
                );
                assert_eq!(want[wd], 0.0, "the tie after it gets nothing");
                assert_eq!(want[2 * kk + 1].to_bits(), g[2].to_bits(), "the NaN wins");
                // Each window's gradient goes to exactly one input.
                let nonzero = want.iter().filter(|v| **v != 0.0).count();
                assert_eq!(nonzero, planes * oh * ow);
            }
            for cfg in stride_configs(n) {
                let runs = ORDERS
                    .iter()
                    .map(|&order| {
                        let (ig, gg) = (Guarded::new(&input), Guarded::new(&g));
                        let mut og = Guarded::<f32>::output(n);
                        // SAFETY: input and din hold planes·h·w values, g planes·oh·ow.
                        let rc = unsafe {
                            k(
                                &launch(&cfg, order),
                                ig.ptr(),
                                gg.ptr(),
                                og.mut_ptr(),
                                planes as i64,
                                h as i32,
                                wd as i32,
                                oh as i32,
                                ow as i32,
                                kk as i32,
                                mode.code(),
                            )
                        };
                        e.result(rc).expect("spec_pool2d_backward_f32");
                        og.written("spec_pool2d_backward_f32")
                    })
                    .collect();
                let got = same_in_both_orders("spec_pool2d_backward_f32", runs);
                assert_bits(
                    &format!("pool back {planes}×{h}×{wd}/{kk} {mode:?}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
fn spec_softmax_xent_and_mse_equal_their_twins() {
    let Some(e) = emu() else { return };
    let xent = e.entry::<XentFn>("spec_softmax_xent_f32");
    let mse = e.entry::<MseFn>("spec_mse_backward_f32");
    let mut rng = ChaCha8Rng::seed_from_u64(205);
    for &(images, classes) in &[(9, 10), (5, 3), (40, 1)] {
        let logits = normals32(&mut rng, images * classes, 3.0);
        let labels: Vec<i32> = (0..images)
            .map(|_| rng.random_range(0..classes) as i32)
            .collect();
        let scale = 1.0f32 / images as f32;
        let (mut loss, mut ok, mut g) = (
            vec![0.0f64; images],
            vec![0i32; images],
            vec![0.0f32; images * classes],
        );
        spec_softmax_xent_f32(&logits, &labels, classes, scale, &mut loss, &mut ok, &mut g);
        // Σ_k g[d, k] = (1 − 1)·scale up to rounding: the softmax sums to one.
        for row in g.chunks_exact(classes) {
            assert!(row.iter().sum::<f32>().abs() < 1e-6);
        }
        let cfg = elementwise_launch(images);
        let runs: Vec<(Vec<f64>, Vec<i32>, Vec<f32>)> = ORDERS
            .iter()
            .map(|&order| {
                let (zg, lg) = (Guarded::new(&logits), Guarded::new(&labels));
                let mut lo = Guarded::<f64>::output(images);
                let mut co = Guarded::<i32>::output(images);
                let mut go = Guarded::<f32>::output(images * classes);
                // SAFETY: logits and g hold images·classes values, the rest `images`.
                let rc = unsafe {
                    xent(
                        &launch(&cfg, order),
                        zg.ptr(),
                        lg.ptr(),
                        images as i32,
                        classes as i32,
                        scale,
                        lo.mut_ptr(),
                        co.mut_ptr(),
                        go.mut_ptr(),
                    )
                };
                e.result(rc).expect("spec_softmax_xent_f32");
                (lo.written("loss"), co.get("correct"), go.written("dlogits"))
            })
            .collect();
        for (got_loss, got_ok, got_g) in &runs {
            assert_eq!(
                got_loss.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                loss.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "xent loss {images}×{classes}"
            );
            assert_eq!(got_ok, &ok, "xent correct {images}×{classes}");
            assert_bits(&format!("xent g {images}×{classes}"), got_g, &g);
        }

        let targets = normals32(&mut rng, images * classes, 1.0);
        let scale = (2.0 / (images * classes) as f64) as f32;
        let (mut loss, mut g) = (vec![0.0f64; images], vec![0.0f32; images * classes]);
        spec_mse_backward_f32(&logits, &targets, classes, scale, &mut loss, &mut g);
        for &order in &ORDERS {
            let (og, tg) = (Guarded::new(&logits), Guarded::new(&targets));
            let mut lo = Guarded::<f64>::output(images);
            let mut go = Guarded::<f32>::output(images * classes);
            // SAFETY: out, targets and g hold images·k values, loss `images`.
            let rc = unsafe {
                mse(
                    &launch(&cfg, order),
                    og.ptr(),
                    tg.ptr(),
                    images as i32,
                    classes as i32,
                    scale,
                    lo.mut_ptr(),
                    go.mut_ptr(),
                )
            };
            e.result(rc).expect("spec_mse_backward_f32");
            let got_loss = lo.written("mse loss");
            assert_eq!(
                got_loss.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                loss.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "mse loss {images}×{classes}"
            );
            assert_bits("mse g", &go.written("mse g"), &g);
        }
    }
}
