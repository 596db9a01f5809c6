//! The layer-spec kernels of `kernels/spec.cu`, unchanged, in the CPU emulation
//! (`tests/emu/`, see `tests/kernel_emu.rs`), against their CPU twins of the same names
//! (`enkf_dnn::cpu::spec_kernels`): bit for bit (both use fused multiply-adds in the
//! convolution and the same libm expf/tanhf), in both schedules, guards intact, every
//! output written. The GPU twin of the whole pass is `tests/gpu_twins.rs`.

mod common;
use common::emu::{emu, launch, same_in_both_orders, Guarded, Launch, ORDERS};
use common::twins::{assert_bits, normals32};

use enkf_dnn::cpu::spec_kernels::{spec_bias_act_f32, spec_conv2d_f32, spec_pool2d_f32};
use enkf_dnn::gpu::geometry::{elementwise_stride_launch, grid_1d};
use enkf_dnn::gpu::spec_plan::{PoolMode, ACT_NONE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type ConvFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    i64,
    *const f32,
    i64,
    i64,
    i64,
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
    i32,
    i32,
) -> i32;
type PoolFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    i64,
    *mut f32,
    i64,
    i64,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
) -> i32;
type BiasActFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    i64,
    *mut f32,
    *const f32,
    i64,
    i64,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
) -> i32;

/// Every activation code and none.
const ACTS: [i32; 5] = [ACT_NONE, 0, 1, 2, 3];

/// Launch geometries: the backend's, and a small grid that makes every thread loop.
fn configs(n: usize) -> [cudarc::driver::LaunchConfig; 2] {
    [elementwise_stride_launch(n), grid_1d(n, 32, 3)]
}

#[test]
fn spec_conv2d_equals_its_twin() {
    let Some(e) = emu() else { return };
    let conv = e.entry::<ConvFn>("spec_conv2d_f32");
    let mut rng = ChaCha8Rng::seed_from_u64(91);
    // (c, h, w, co, k, stride, pad): padding larger than needed, strides that leave
    // columns unread, a 1 × 1 kernel.
    for (case, &(c, h, wd, co, k, stride, pad)) in [
        (1, 9, 8, 3, 3, 1, 0),
        (2, 7, 9, 2, 3, 2, 1),
        (3, 6, 6, 4, 1, 1, 0),
        (2, 5, 7, 3, 4, 1, 2),
    ]
    .iter()
    .enumerate()
    {
        let (oh, ow) = (
            (h + 2 * pad - k) / stride + 1,
            (wd + 2 * pad - k) / stride + 1,
        );
        let (members, images) = (3, 2);
        let in_len = c * h * wd;
        let wlen = co * c * k * k;
        let p = wlen + co + 5; // the layer's weight and bias inside a longer member row
        let w = normals32(&mut rng, members * p, 1.0);
        for shared in [true, false] {
            let input = if shared {
                normals32(&mut rng, images * in_len, 1.0)
            } else {
                normals32(&mut rng, members * images * in_len, 1.0)
            };
            let in_mstride = if shared { 0 } else { images * in_len };
            let bias = [None, Some(wlen)][case % 2];
            let act = ACTS[(case + usize::from(shared)) % ACTS.len()];
            let n = members * images * co * oh * ow;
            let w_base = 2; // the layer starts 2 values into each member's row
            let mut want = vec![0.0f32; n];
            spec_conv2d_f32(
                &input,
                in_mstride,
                &w,
                w_base,
                p,
                bias,
                &mut want,
                (members, images),
                (c, h, wd),
                (co, oh, ow),
                (k, stride, pad),
                act,
            );
            for cfg in configs(n) {
                let runs = ORDERS
                    .iter()
                    .map(|&order| {
                        let (ig, wg) = (Guarded::new(&input), Guarded::new(&w));
                        let mut og = Guarded::<f32>::output(n);
                        let d = [c, h, wd, co, oh, ow, k, stride, pad].map(|v| v as i32);
                        // SAFETY: input, weights (w_base + (members − 1)·p + the layer's
                        // weight and bias < members·p) and output are the lengths the
                        // kernel indexes for these sizes.
                        let rc = unsafe {
                            conv(
                                &launch(&cfg, order),
                                ig.ptr(),
                                in_mstride as i64,
                                wg.ptr(),
                                w_base as i64,
                                p as i64,
                                bias.map_or(-1, |b| b as i64),
                                og.mut_ptr(),
                                members as i32,
                                images as i32,
                                d[0],
                                d[1],
                                d[2],
                                d[3],
                                d[4],
                                d[5],
                                d[6],
                                d[7],
                                d[8],
                                act,
                            )
                        };
                        e.result(rc).expect("spec_conv2d_f32");
                        og.written("spec_conv2d_f32")
                    })
                    .collect();
                let got = same_in_both_orders("spec_conv2d_f32", runs);
                assert_bits(&format!("conv case {case}, shared {shared}"), &got, &want);
            }
        }
    }
}

#[test]
fn spec_pool2d_equals_its_twin_and_lets_nan_win() {
    let Some(e) = emu() else { return };
    let pool = e.entry::<PoolFn>("spec_pool2d_f32");
    let mut rng = ChaCha8Rng::seed_from_u64(92);
    // (channels, h, w, k): floored outputs (odd sides), a 3 × 3 window.
    for (case, &(ch, h, wd, k)) in [(2, 8, 8, 2), (3, 7, 9, 2), (1, 9, 10, 3)]
        .iter()
        .enumerate()
    {
        let (oh, ow) = (h / k, wd / k);
        let (members, images) = (2, 3);
        for shared in [true, false] {
            let copies = if shared { 1 } else { members };
            let mut input = normals32(&mut rng, copies * images * ch * h * wd, 1.0);
            // A NaN inside a window wins it; ties (equal values) keep the first.
            input[wd + 1] = f32::NAN;
            input[3] = input[2];
            let in_mstride = if shared { 0 } else { images * ch * h * wd };
            for mode in [PoolMode::Max, PoolMode::Avg] {
                let act = ACTS[(case + usize::from(shared)) % ACTS.len()];
                let planes = members * images * ch;
                let n = planes * oh * ow;
                let mut want = vec![0.0f32; n];
                spec_pool2d_f32(
                    &input,
                    in_mstride,
                    &mut want,
                    (planes, images * ch),
                    (h, wd),
                    (oh, ow),
                    k,
                    mode,
                    act,
                );
                // relu maps NaN to 0 (fmaxf, as `f32::max`); every other code keeps it.
                assert_eq!(want[0].is_nan(), act != 1, "the NaN wins its window");
                for cfg in configs(n) {
                    let runs = ORDERS
                        .iter()
                        .map(|&order| {
                            let ig = Guarded::new(&input);
                            let mut og = Guarded::<f32>::output(n);
                            // SAFETY: the input holds every plane the kernel reads for
                            // these sizes, the output n values.
                            let rc = unsafe {
                                pool(
                                    &launch(&cfg, order),
                                    ig.ptr(),
                                    in_mstride as i64,
                                    og.mut_ptr(),
                                    planes as i64,
                                    (images * ch) as i64,
                                    h as i32,
                                    wd as i32,
                                    oh as i32,
                                    ow as i32,
                                    k as i32,
                                    mode.code(),
                                    act,
                                )
                            };
                            e.result(rc).expect("spec_pool2d_f32");
                            og.get("spec_pool2d_f32")
                        })
                        .collect();
                    let got = same_in_both_orders("spec_pool2d_f32", runs);
                    assert_bits(
                        &format!("pool case {case}, {mode:?}, shared {shared}"),
                        &got,
                        &want,
                    );
                }
            }
        }
    }
}

#[test]
fn spec_bias_act_equals_its_twin() {
    let Some(e) = emu() else { return };
    let bias_act = e.entry::<BiasActFn>("spec_bias_act_f32");
    let mut rng = ChaCha8Rng::seed_from_u64(93);
    let (members, images) = (3, 4);
    for (len, plane) in [(7, 1), (12, 4)] {
        let p = 20;
        let w = normals32(&mut rng, members * p, 1.0);
        for act in ACTS {
            let has_bias = rng.random_bool(0.5) || act == ACT_NONE;
            for shared in [true, false] {
                let copies = if shared { 1 } else { members };
                let mut input = normals32(&mut rng, copies * images * len, 2.0);
                input[1] = 0.0;
                input[2] = -0.0;
                let in_mstride = if shared { 0 } else { images * len };
                let n = members * images * len;
                let w_base = 3;
                let mut want = vec![0.0f32; n];
                spec_bias_act_f32(
                    &input,
                    in_mstride,
                    &mut want,
                    &w,
                    w_base,
                    p,
                    has_bias,
                    (members, images),
                    (len, plane),
                    act,
                );
                for cfg in configs(n) {
                    let runs = ORDERS
                        .iter()
                        .map(|&order| {
                            let (ig, wg) = (Guarded::new(&input), Guarded::new(&w));
                            let mut og = Guarded::<f32>::output(n);
                            // SAFETY: input, weights and output hold what the kernel
                            // indexes for these sizes.
                            let rc = unsafe {
                                bias_act(
                                    &launch(&cfg, order),
                                    ig.ptr(),
                                    in_mstride as i64,
                                    og.mut_ptr(),
                                    wg.ptr(),
                                    w_base as i64,
                                    p as i64,
                                    i32::from(has_bias),
                                    members as i32,
                                    images as i32,
                                    len as i32,
                                    plane as i32,
                                    act,
                                )
                            };
                            e.result(rc).expect("spec_bias_act_f32");
                            og.written("spec_bias_act_f32")
                        })
                        .collect();
                    let got = same_in_both_orders("spec_bias_act_f32", runs);
                    assert_bits(
                        &format!("bias/act {len}/{plane}, act {act}, bias {has_bias}"),
                        &got,
                        &want,
                    );
                }
            }
        }
    }
}
