//! The CUDA kernels of `kernels/*.cu`, unchanged, run on the CPU by the emulation of
//! `tests/emu/cuda_emu.hpp`, launched with the geometry the CUDA backend uses
//! (`enkf_dnn::gpu::geometry`), against their CPU twins at the tolerances of the GPU twin
//! tests (`tests/common/twins.rs`). This runs everywhere, GPU or not, so a kernel's
//! indexing, loop bounds, shared-memory layout, barriers and shuffles are checked in CI.
//!
//! Every launch runs twice, with threads and blocks scheduled in ascending and in
//! descending order, and both results must be bit-identical: a missing barrier or an
//! order-dependent write shows up as a difference (or as NaN, the fill of fresh shared
//! memory and of output buffers). Every buffer is fenced by guard elements that must be
//! untouched afterwards. The last tests run deliberately faulty kernels
//! (`tests/emu/selftest.cu`) to show that each such fault is caught.
//!
//! Not covered here (GPU only, `tests/gpu_*.rs`): cuBLAS, cuSOLVER, the driver, the
//! device's expf/tanhf rounding, timing, resource limits.
//!
//! Needs a C++17 compiler (`CXX`, else `c++`, `g++`, `clang++`): without one the tests
//! skip with a printed reason, or fail when `REQUIRE_EMU=1` (CI sets it). A kernel that
//! does not compile as C++ fails the tests.

mod common;
use common::twins::{
    assert_bits, assert_moved, case_inputs, cholesky_inputs, compare_cache, nets, normals,
    normals32, optimizer_inputs, reduce_inputs, twin_case, B, EPS32, EPS64, FORWARD_TOL, GRAD_TOL,
    LOGIT_TOL, SOLVE_TOL,
};
use common::{assert_close, max_abs, up};

use common::emu::{
    emu, launch, same_in_both_orders, to_i32, Emu, Guarded, Launch, Order, Sentinel, ORDERS,
};

use enkf_dnn::backend::{Backend, Substitution};
use enkf_dnn::cpu::backprop::{backprop, ForwardCache};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::error::LinalgError;
use enkf_dnn::gpu::backprop::sgd_mode;
use enkf_dnn::gpu::geometry::{self, grid_1d, FORWARD_WARPS};
use enkf_dnn::model::{Activation, Arch, Net, CLASSES, IMG_PIXELS};
use enkf_dnn::train::optim::{Adam, GradOptimizer, Sgd};
use enkf_dnn::Error;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------
// forward.cu

type ForwardFn = unsafe extern "C" fn(
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
) -> i32;

/// Emulated `ensemble_forward_f32` against `CpuBackend::ensemble_forward` on a GPU with
/// `sm_count` SMs (which sets the images per block, so the image-group split), with the
/// H100/H200 geometry of 8 warps per block.
fn forward_case(e: &Emu, net: Net, members: usize, images: usize, sm_count: u32, seed: u64) {
    forward_case_warps(e, net, members, images, sm_count, FORWARD_WARPS, seed);
}

/// [`forward_case`] with blocks of `warps` warps (the geometry of a device with less
/// shared memory, `geometry::forward_geometry`).
fn forward_case_warps(
    e: &Emu,
    net: Net,
    members: usize,
    images: usize,
    sm_count: u32,
    warps: u32,
    seed: u64,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = normals32(&mut rng, members * net.n_params(), 1.0);
    let x: Vec<f32> = normals(&mut rng, images * IMG_PIXELS, 1.0)
        .iter()
        .map(|v| (v.abs() as f32).min(1.0))
        .collect();
    let mut want = vec![0.0f32; members * images * CLASSES];
    CpuBackend::new()
        .ensemble_forward(&net, &w, members, &x, images, &mut want)
        .expect("cpu forward");
    let (cfg, ipb) = geometry::forward_launch(members, images, sm_count, warps).expect("geometry");
    let what = format!("forward {net:?} J={members} B={images} ipb={ipb} warps={warps}");
    let f = e.entry::<ForwardFn>("ensemble_forward_f32");
    let runs = ORDERS
        .iter()
        .map(|&order| {
            let (wg, xg) = (Guarded::new(&w), Guarded::new(&x));
            let mut out = Guarded::<f32>::output(want.len());
            // SAFETY: the buffers hold members·P, images·784 and members·images·10
            // elements, the extents the kernel indexes under this geometry.
            let rc = unsafe {
                f(
                    &launch(&cfg, order),
                    wg.ptr(),
                    xg.ptr(),
                    out.mut_ptr(),
                    to_i32(members),
                    to_i32(images),
                    to_i32(net.n_params()),
                    net.arch.code(),
                    net.act.code(),
                    to_i32(ipb),
                )
            };
            e.result(rc).unwrap_or_else(|m| panic!("{what}: {m}"));
            wg.get("weights");
            xg.get("images");
            out.written(&what)
        })
        .collect();
    let got = same_in_both_orders(&what, runs);
    let want = up(&want);
    assert_close(
        &what,
        &up(&got),
        &want,
        FORWARD_TOL * max_abs(&want),
        FORWARD_TOL,
    );
}

#[test]
fn forward_kernel_matches_cpu_for_every_arch_and_activation() {
    let Some(e) = emu() else { return };
    let mut seed = 1;
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Relu, Activation::Tanh] {
            // H200 (132 SMs) at 3 members: 8 images per block, 3 groups, the last one
            // holding 4 images (warps 4–7 idle).
            forward_case(e, Net::new(arch, act), 3, 20, 132, seed);
            seed += 1;
        }
    }
}

#[test]
fn forward_kernel_runs_several_images_per_warp_and_partial_groups() {
    let Some(e) = emu() else { return };
    // One SM: 64 images per block, so each warp loops over images (d += 8); 70 images
    // make a full group of 64 and one of 6. 13 images: groups of 8 and 5.
    forward_case(e, Net::new(Arch::Paper, Activation::Logistic), 2, 70, 1, 11);
    forward_case(e, Net::new(Arch::Pooled, Activation::Relu), 2, 13, 1, 12);
    // 32 and 16 images per block (groups of 32 + 8, and 16 + 16 + 8).
    forward_case(e, Net::new(Arch::Paper, Activation::Tanh), 2, 40, 1, 13);
    forward_case(
        e,
        Net::new(Arch::Pooled, Activation::Logistic),
        3,
        40,
        2,
        14,
    );
}

#[test]
fn forward_kernel_runs_the_geometry_of_every_architecture() {
    use geometry::{forward_geometry, SharedMemoryLimits as L};
    let Some(e) = emu() else { return };
    // The warps per block chosen for A100 (5), sm_86/sm_89 (7) and Turing (3): the image
    // loop d += warps leaves uneven rounds (64 images over 5 warps: 13, 13, 13, 13, 12),
    // and the weights sit after `warps` per-warp regions. 70 images at one SM: groups of
    // 64 and 6.
    let mut seed = 21;
    for limits in [L::SM80, L::SM86, L::SM75] {
        let warps = forward_geometry(limits).expect("geometry").warps;
        for net in [
            Net::new(Arch::Paper, Activation::Logistic),
            Net::new(Arch::Pooled, Activation::Tanh),
        ] {
            forward_case_warps(e, net, 2, 70, 1, warps, seed);
            seed += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------
// reduce.cu

type RowMeanF32Fn = unsafe extern "C" fn(*const Launch, *const f32, i32, i32, *mut f32) -> i32;
type RowMeanF64Fn = unsafe extern "C" fn(*const Launch, *const f32, i32, i32, *mut f64) -> i32;
type CenterFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    *const f32,
    *const f64,
    i32,
    i32,
    *mut f64,
    *mut f64,
) -> i32;
type ToF32Fn = unsafe extern "C" fn(*const Launch, *const f64, *mut f32, i64) -> i32;

#[test]
fn reduction_kernels_match_cpu() {
    let Some(e) = emu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // Neither a multiple of the 16 row slices nor of the 32 columns of a block.
    let (rows, cols) = (37, 70);
    let (g, y) = reduce_inputs(&mut rng, rows, cols);
    let (ri, ci) = (to_i32(rows), to_i32(cols));

    let mut want = vec![0.0f32; cols];
    cpu.row_mean(&g, rows, cols, &mut want).unwrap();
    let f32_mean = e.entry::<RowMeanF32Fn>("row_mean_f32");
    let f64_mean = e.entry::<RowMeanF64Fn>("row_mean_f64");
    let center = e.entry::<CenterFn>("center_and_innovate_f64");
    let runs = ORDERS
        .iter()
        .map(|&order| {
            let gg = Guarded::new(&g);
            let mut out = Guarded::<f32>::output(cols);
            // SAFETY: g holds rows·cols and out cols elements.
            let rc = unsafe {
                f32_mean(
                    &launch(&geometry::mean_launch(cols), order),
                    gg.ptr(),
                    ri,
                    ci,
                    out.mut_ptr(),
                )
            };
            e.result(rc).expect("row_mean_f32");
            out.written("row_mean_f32")
        })
        .collect();
    let got = same_in_both_orders("row_mean_f32", runs);
    // Both sum in f64 and round once to f32: the last f32 bit at most.
    assert_close("row_mean_f32", &up(&got), &up(&want), 0.0, EPS32);

    let (mut cc, mut ic) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
    cpu.center_and_innovate(&g, &y, rows, cols, &mut cc, &mut ic)
        .unwrap();
    // The element-wise kernel with its own geometry and with a 2-block grid that makes
    // the grid-stride loop go round (the kernel must be right for any grid).
    let strided = grid_1d(rows * cols, 64, 2);
    for cfg in [geometry::elementwise_stride_launch(rows * cols), strided] {
        let runs: Vec<(Vec<f64>, Vec<f64>)> = ORDERS
            .iter()
            .map(|&order| {
                let (gg, yg) = (Guarded::new(&g), Guarded::new(&y));
                let mut mean = Guarded::<f64>::output(cols);
                let mut c = Guarded::<f64>::output(rows * cols);
                let mut i = Guarded::<f64>::output(rows * cols);
                // SAFETY: g, c, i hold rows·cols, y and mean cols elements.
                let rc = unsafe {
                    f64_mean(
                        &launch(&geometry::mean_launch(cols), order),
                        gg.ptr(),
                        ri,
                        ci,
                        mean.mut_ptr(),
                    )
                };
                e.result(rc).expect("row_mean_f64");
                // SAFETY: as above.
                let rc = unsafe {
                    center(
                        &launch(&cfg, order),
                        gg.ptr(),
                        yg.ptr(),
                        mean.ptr(),
                        ri,
                        ci,
                        c.mut_ptr(),
                        i.mut_ptr(),
                    )
                };
                e.result(rc).expect("center_and_innovate_f64");
                mean.written("row_mean_f64");
                (c.written("centred"), i.written("innovations"))
            })
            .collect();
        let (c, i): (Vec<_>, Vec<_>) = runs.into_iter().unzip();
        let c = same_in_both_orders("centred", c);
        let i = same_in_both_orders("innovations", i);
        // The f64 means differ only by summation order: rows·eps64·max|g| bounds it.
        let g_max = max_abs(&up(&g));
        assert_close("centred", &c, &cc, rows as f64 * EPS64 * g_max, 0.0);
        // y − g of two f32 values in f64 is one correctly rounded operation: exact.
        assert_close("innovations", &i, &ic, 0.0, 0.0);
    }

    let src = normals(&mut rng, 1000, 1e3);
    let mut want = vec![0.0f32; src.len()];
    cpu.f64_to_f32(&src, &mut want).unwrap();
    let conv = e.entry::<ToF32Fn>("f64_to_f32");
    for cfg in [
        geometry::elementwise_stride_launch(src.len()),
        grid_1d(src.len(), 32, 3),
    ] {
        let sg = Guarded::new(&src);
        let mut dg = Guarded::<f32>::output(src.len());
        // SAFETY: both hold src.len() elements.
        let rc = unsafe {
            conv(
                &launch(&cfg, Order::Descending),
                sg.ptr(),
                dg.mut_ptr(),
                1000,
            )
        };
        e.result(rc).expect("f64_to_f32");
        let got = dg.written("f64_to_f32");
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "f64_to_f32 rounds to nearest on both"
        );
    }
}

type AddF64Fn = unsafe extern "C" fn(*const Launch, *const f64, *mut f64, i64) -> i32;
type InflateFn = unsafe extern "C" fn(*const Launch, *mut f32, *const f32, i32, i32, f32) -> i32;

/// The stochastic EnKF's `add_f64` and multiplicative inflation's `inflate_rows_f32`
/// equal their CPU twins bit for bit (one f64 add; one fmaf against `mul_add`) under the
/// backend's grid and a small grid, in both scheduling orders.
#[test]
fn add_and_inflation_kernels_are_exact() {
    let Some(e) = emu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(72);
    let n = 1000;
    let x = normals(&mut rng, n, 1.0);
    let y = normals(&mut rng, n, 3.0);
    let mut want = y.clone();
    cpu.add_host_f64(&x, &mut want).unwrap();
    let add = e.entry::<AddF64Fn>("add_f64");
    let (rows, cols) = (37, 53);
    let u = normals32(&mut rng, rows * cols, 2.0);
    let mean = normals32(&mut rng, cols, 1.0);
    let lambda = 1.0625f32;
    let mut want_u = u.clone();
    cpu.inflate_rows_f32(&mut want_u, &mean, rows, cols, lambda)
        .unwrap();
    assert!(want_u != u, "inflation must move the members");
    let inflate = e.entry::<InflateFn>("inflate_rows_f32");
    for order in [Order::Ascending, Order::Descending] {
        for cfg in [geometry::elementwise_stride_launch(n), grid_1d(n, 32, 3)] {
            let xg = Guarded::new(&x);
            let mut yg = Guarded::new(&y);
            // SAFETY: both hold n elements.
            let rc = unsafe { add(&launch(&cfg, order), xg.ptr(), yg.mut_ptr(), n as i64) };
            e.result(rc).expect("add_f64");
            assert_eq!(yg.get("add_f64"), want);

            let mut ug = Guarded::new(&u);
            let mg = Guarded::new(&mean);
            // SAFETY: u holds rows·cols, mean cols elements.
            let rc = unsafe {
                inflate(
                    &launch(&cfg, order),
                    ug.mut_ptr(),
                    mg.ptr(),
                    rows as i32,
                    cols as i32,
                    lambda,
                )
            };
            e.result(rc).expect("inflate_rows_f32");
            let got = ug.get("inflate_rows_f32");
            assert!(
                got.iter()
                    .zip(&want_u)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "inflate_rows_f32 is one fmaf on both"
            );
        }
    }
}

type NesterovFn = unsafe extern "C" fn(*const Launch, *mut f32, *mut f32, i64, f32) -> i32;
type AddScaledFn = unsafe extern "C" fn(*const Launch, *const f32, f64, *mut f64, i64) -> i32;
type AddNormalFn = unsafe extern "C" fn(
    *const Launch,
    *mut f32,
    i64,
    i64,
    i32,
    *const f32,
    f32,
    u32,
    u32,
    u32,
) -> i32;
type RowStdFn =
    unsafe extern "C" fn(*const Launch, *const f32, *const f32, i32, i32, *mut f32) -> i32;
type ScaleRowsFn = unsafe extern "C" fn(*const Launch, *mut f64, *const f64, i32, i32) -> i32;
type RowSqFn = unsafe extern "C" fn(*const Launch, *const f64, i32, i32, *mut f64) -> i32;

/// The EKI variants' kernels equal their CPU twins bit for bit: `nesterov_f32` and
/// `add_scaled_f32_f64` (one fma each, against `mul_add`) under the backend's grid and a
/// small grid, and `row_sq_norms_f64` (the twin sums in the kernel's order) at row
/// lengths below, at and past the block's 256 threads.
#[test]
fn eki_variant_kernels_are_exact() {
    let Some(e) = emu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(74);
    let n = 1000;
    let u = normals32(&mut rng, n, 2.0);
    let prev = normals32(&mut rng, n, 2.0);
    let beta = 0.8125f32;
    let (mut want_u, mut want_p) = (u.clone(), prev.clone());
    cpu.nesterov_f32(&mut want_u, &mut want_p, beta).unwrap();
    assert!(
        want_u != u && want_p == u,
        "momentum moves u and keeps the old u"
    );
    let x = normals32(&mut rng, n, 1.0);
    let y = normals(&mut rng, n, 3.0);
    let alpha = -0.3;
    let mut want_y = y.clone();
    cpu.add_scaled_f32_f64(&x, alpha, &mut want_y).unwrap();
    let nesterov = e.entry::<NesterovFn>("nesterov_f32");
    let add = e.entry::<AddScaledFn>("add_scaled_f32_f64");
    for order in ORDERS {
        for cfg in [geometry::elementwise_stride_launch(n), grid_1d(n, 32, 3)] {
            let mut ug = Guarded::new(&u);
            let mut pg = Guarded::new(&prev);
            // SAFETY: u and prev hold n elements each.
            let rc = unsafe {
                nesterov(
                    &launch(&cfg, order),
                    ug.mut_ptr(),
                    pg.mut_ptr(),
                    n as i64,
                    beta,
                )
            };
            e.result(rc).expect("nesterov_f32");
            assert_bits("nesterov_f32 u", &ug.get("nesterov_f32"), &want_u);
            assert_bits("nesterov_f32 prev", &pg.get("nesterov_f32 prev"), &want_p);
            let xg = Guarded::new(&x);
            let mut yg = Guarded::new(&y);
            // SAFETY: x and y hold n elements each.
            let rc = unsafe {
                add(
                    &launch(&cfg, order),
                    xg.ptr(),
                    alpha,
                    yg.mut_ptr(),
                    n as i64,
                )
            };
            e.result(rc).expect("add_scaled_f32_f64");
            assert_eq!(yg.get("add_scaled_f32_f64"), want_y);
        }
    }
    // Additive inflation: the same Philox draws; f64 transcendentals round to the same
    // f32 almost always, so the twins agree to 1 ulp of f32.
    let add_normal = e.entry::<AddNormalFn>("add_normal_f32");
    let row_std = e.entry::<RowStdFn>("row_std_f32");
    let (rows, cols) = (37, 53); // rows·cols = 1961: a partial last group of 4
    let u = normals32(&mut rng, rows * cols, 1.0);
    let scale: Vec<f32> = (0..cols).map(|c| 0.1 + c as f32 / 10.0).collect();
    let key = [0x1234_5678, 0x9abc_def0];
    // Offsets: a whole ensemble, and a rank's rows from global row 3 (3·53 = 159, not a
    // multiple of 4: its first and last groups are partial).
    let wants: Vec<(usize, Vec<f32>)> = [0, 3 * cols]
        .iter()
        .map(|&offset| {
            let mut want = u.clone();
            cpu.add_normal_f32(&mut want, offset, cols, &scale, 0.5, key, 7)
                .unwrap();
            (offset, want)
        })
        .collect();
    let mut mean = vec![0.0f32; cols];
    cpu.row_mean(&u, rows, cols, &mut mean).unwrap();
    let mut want_std = vec![0.0f32; cols];
    cpu.row_std_f32(&u, &mean, rows, cols, &mut want_std)
        .unwrap();
    for order in ORDERS {
        let n = rows * cols;
        for (cfg, (offset, want)) in [
            geometry::elementwise_stride_launch(n.div_ceil(4)),
            grid_1d(n.div_ceil(4), 32, 3),
        ]
        .iter()
        .flat_map(|c| wants.iter().map(move |w| (c, w)))
        {
            let mut ug = Guarded::new(&u);
            let sg = Guarded::new(&scale);
            // SAFETY: u holds rows·cols elements, scale cols.
            let rc = unsafe {
                add_normal(
                    &launch(cfg, order),
                    ug.mut_ptr(),
                    n as i64,
                    *offset as i64,
                    cols as i32,
                    sg.ptr(),
                    0.5,
                    key[0],
                    key[1],
                    7,
                )
            };
            e.result(rc).expect("add_normal_f32");
            let got = ug.get("add_normal_f32");
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1,
                    "add_normal_f32 value {i}: {a} vs {b}"
                );
            }
        }
        let ag = Guarded::new(&u);
        let mg = Guarded::new(&mean);
        let mut og = Guarded::new(&vec![f32::MARK; cols]);
        // SAFETY: a holds rows·cols elements, mean and out cols.
        let rc = unsafe {
            row_std(
                &launch(&geometry::mean_launch(cols), order),
                ag.ptr(),
                mg.ptr(),
                rows as i32,
                cols as i32,
                og.mut_ptr(),
            )
        };
        e.result(rc).expect("row_std_f32");
        let got = up(&og.get("row_std_f32"));
        assert_close("row_std_f32", &got, &up(&want_std), 0.0, EPS32);
    }
    let scale_rows = e.entry::<ScaleRowsFn>("scale_rows_f64");
    let (rows, cols) = (13, 77);
    let a = normals(&mut rng, rows * cols, 1.0);
    let w = normals(&mut rng, rows, 2.0);
    let mut want = a.clone();
    cpu.scale_rows_f64(&mut want, rows, cols, &w).unwrap();
    for order in ORDERS {
        for cfg in [
            geometry::elementwise_stride_launch(rows * cols),
            grid_1d(rows * cols, 32, 3),
        ] {
            let mut ag = Guarded::new(&a);
            let wg = Guarded::new(&w);
            // SAFETY: a holds rows·cols elements, w rows.
            let rc = unsafe {
                scale_rows(
                    &launch(&cfg, order),
                    ag.mut_ptr(),
                    wg.ptr(),
                    rows as i32,
                    cols as i32,
                )
            };
            e.result(rc).expect("scale_rows_f64");
            assert_eq!(ag.get("scale_rows_f64"), want);
        }
    }
    let rowsq = e.entry::<RowSqFn>("row_sq_norms_f64");
    for (rows, cols) in [(5, 7), (3, 256), (9, 640), (2, 1001)] {
        let a = normals(&mut rng, rows * cols, 1.5);
        let want = cpu.row_sq_norms_f64(&a, rows, cols).unwrap();
        let naive: Vec<f64> = a
            .chunks_exact(cols)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        assert_close("row_sq_norms_f64 vs naive", &want, &naive, 0.0, 1e-13);
        for order in ORDERS {
            let ag = Guarded::new(&a);
            let mut og = Guarded::new(&vec![f64::MARK; rows]);
            // SAFETY: a holds rows·cols elements, out rows.
            let rc = unsafe {
                rowsq(
                    &launch(&geometry::row_sq_launch(rows), order),
                    ag.ptr(),
                    rows as i32,
                    cols as i32,
                    og.mut_ptr(),
                )
            };
            e.result(rc).expect("row_sq_norms_f64");
            assert_eq!(og.get("row_sq_norms_f64"), want, "{rows} × {cols}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// linalg.cu

type AddDiagFn = unsafe extern "C" fn(*const Launch, *mut f64, i32, f64) -> i32;
type UnitLowerFn = unsafe extern "C" fn(*const Launch, *mut f64, i32, i32) -> i32;
type CholFn = unsafe extern "C" fn(
    *const Launch,
    *const f64,
    i32,
    i32,
    *mut f64,
    i32,
    *mut i32,
    *mut f64,
    i32,
) -> i32;

#[test]
fn diagonal_and_block_lower_kernels_are_exact() {
    let Some(e) = emu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    let n = 33;
    let a = normals(&mut rng, n * n, 1.0);
    let mut want = a.clone();
    cpu.add_diagonal_f64(&mut want, n, 0.25).unwrap();
    let add = e.entry::<AddDiagFn>("add_diagonal_f64");
    let mut ag = Guarded::new(&a);
    // SAFETY: a holds n² elements.
    let rc = unsafe {
        add(
            &launch(&geometry::add_diagonal_launch(n), Order::Ascending),
            ag.mut_ptr(),
            33,
            0.25,
        )
    };
    e.result(rc).expect("add_diagonal_f64");
    assert_eq!(ag.get("add_diagonal_f64"), want);

    let (n, bs) = (60, 10);
    let a = normals(&mut rng, n * n, 1.0);
    let mut want = a.clone();
    cpu.unit_block_lower_f64(&mut want, n, bs).unwrap();
    let lower = e.entry::<UnitLowerFn>("unit_block_lower_f64");
    for cfg in [
        geometry::elementwise_stride_launch(n * n),
        grid_1d(n * n, 128, 5),
    ] {
        let mut ag = Guarded::new(&a);
        // SAFETY: a holds n² elements.
        let rc = unsafe { lower(&launch(&cfg, Order::Descending), ag.mut_ptr(), 60, 10) };
        e.result(rc).expect("unit_block_lower_f64");
        // Negation and constants only: bit-identical.
        assert_eq!(ag.get("unit_block_lower_f64"), want);
    }
}

/// Emulated small-block Cholesky solve against the CPU's, then with block `blocks / 2`
/// made indefinite: the kernel must report that block and the CPU's pivot.
fn cholesky_case(e: &Emu, blocks: usize, bs: usize, nrhs: usize, seed: u64) {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = blocks * bs;
    let (a, rhs, want) = cholesky_inputs(&mut rng, blocks, bs, nrhs);
    let what = format!("block_cholesky_solve_small blocks={blocks} bs={bs} nrhs={nrhs}");
    let cfg = geometry::small_cholesky_launch(blocks, nrhs).expect("geometry");
    let f = e.entry::<CholFn>("block_cholesky_solve_small_f64");
    let run_mode =
        |a: &[f64], order: Order, mode: Substitution| -> (Vec<f64>, Vec<i32>, Vec<f64>) {
            let ag = Guarded::new(a);
            let mut rg = Guarded::new(&rhs);
            let mut info = Guarded::<i32>::output(blocks);
            let mut bad = Guarded::<f64>::output(blocks);
            // SAFETY: a holds n², rhs nrhs·n, info and bad `blocks` elements.
            let rc = unsafe {
                f(
                    &launch(&cfg, order),
                    ag.ptr(),
                    to_i32(n),
                    to_i32(bs),
                    rg.mut_ptr(),
                    to_i32(nrhs),
                    info.mut_ptr(),
                    bad.mut_ptr(),
                    mode as i32,
                )
            };
            e.result(rc).unwrap_or_else(|m| panic!("{what}: {m}"));
            assert_eq!(ag.get("a"), a, "{what}: the kernel leaves `a` unchanged");
            (rg.get("rhs"), info.written("info"), bad.written("pivots"))
        };
    let run = |a: &[f64], order: Order| run_mode(a, order, Substitution::Inverse);

    // Mode 1 (whitening, rhs · L⁻ᵀ) against the CPU's, which whitens two matrices at once.
    let whitened: Vec<_> = ORDERS
        .iter()
        .map(|&o| run_mode(&a, o, Substitution::Whiten).0)
        .collect();
    let got_w = same_in_both_orders(&format!("{what} (whiten)"), whitened);
    let (mut ac, mut want_w, mut other) = (a.clone(), rhs.clone(), rhs.clone());
    cpu.block_cholesky_whiten_f64(&mut ac, blocks, bs, &mut want_w, &mut other, nrhs)
        .expect("cpu whitening of SPD blocks");
    assert_eq!(want_w, other, "{what}: the CPU whitens both matrices alike");
    assert_close(
        &format!("{what} (whiten)"),
        &got_w,
        &want_w,
        SOLVE_TOL * max_abs(&want_w),
        SOLVE_TOL,
    );

    let runs: Vec<_> = ORDERS.iter().map(|&o| run(&a, o)).collect();
    let (r, info): (Vec<_>, Vec<_>) = runs.into_iter().map(|(r, i, _)| (r, i)).unzip();
    let got = same_in_both_orders(&what, r);
    assert!(
        info[0].iter().all(|&i| i == 0),
        "{what}: info {:?}",
        info[0]
    );
    let scale = max_abs(&want);
    assert_close(&what, &got, &want, SOLVE_TOL * scale, SOLVE_TOL);

    let bad_block = blocks / 2;
    let mut a_bad = a.clone();
    a_bad[(bad_block * bs + 1) * n + bad_block * bs + 1] = -1.0;
    let (mut ac, mut rc) = (a_bad.clone(), rhs.clone());
    let Err(Error::Linalg(LinalgError::NotPositiveDefinite {
        block,
        pivot,
        value,
        ..
    })) = cpu.block_cholesky_solve_f64(&mut ac, blocks, bs, &mut rc, nrhs)
    else {
        panic!("{what}: the CPU accepted an indefinite block");
    };
    for order in ORDERS {
        let (r, info, bad) = run(&a_bad, order);
        // The failing block's columns stay as they were in every row.
        let touched = (0..nrhs * n)
            .filter(|i| (i % n) / bs == block)
            .find(|&i| r[i].to_bits() != rhs[i].to_bits());
        assert_eq!(
            touched, None,
            "{what}: the indefinite block's columns were written"
        );
        for (d, &i) in info.iter().enumerate() {
            let expect = if d == block { pivot as i32 + 1 } else { 0 };
            assert_eq!(
                i, expect,
                "{what}: info of block {d} (indefinite: {bad_block})"
            );
        }
        assert!(
            (bad[block] - value).abs() <= SOLVE_TOL * value.abs().max(1.0),
            "{what}: failing pivot {} vs cpu {value}",
            bad[block]
        );
    }
}

#[test]
fn small_block_cholesky_kernel_matches_cpu() {
    let Some(e) = emu() else { return };
    cholesky_case(e, 64, 10, 300, 41); // the sequential rule's shape (J = 300): 3 CTAs a block
    cholesky_case(e, 3, 32, 129, 42); // largest kernel block, rows spill into 2 CTAs
    cholesky_case(e, 1, 7, 5, 43);
}

// ---------------------------------------------------------------------------------------
// backprop.cu

type BpForwardFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    *const f32,
    i32,
    i32,
    i32,
    *mut f32,
    *mut f32,
    *mut u32,
    *mut f32,
    *mut f32,
    *mut u32,
    *mut f32,
    *mut f32,
) -> i32;
type SoftmaxFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    *const f32,
    *const i32,
    i32,
    f32,
    *mut f64,
    *mut i32,
    *mut f32,
) -> i32;
type BpBackwardFn = unsafe extern "C" fn(
    *const Launch,
    *const f32,
    *const f32,
    i32,
    i32,
    i32,
    i32,
    *const f32,
    *const f32,
    *const u32,
    *const f32,
    *const f32,
    *const u32,
    *const f32,
    *mut f32,
) -> i32;
type GradReduceFn = unsafe extern "C" fn(*const Launch, *const f32, i32, i32, *mut f32) -> i32;

/// The forward cache as guarded device-side buffers.
struct CacheBufs {
    a1: Guarded<f32>,
    p1: Guarded<f32>,
    arg1: Guarded<u32>,
    a2: Guarded<f32>,
    p2: Guarded<f32>,
    arg2: Guarded<u32>,
    logits: Guarded<f32>,
    probs: Guarded<f32>,
}

impl CacheBufs {
    fn new(net: &Net, images: usize) -> Self {
        let z = ForwardCache::<f32>::zeros(net, images);
        CacheBufs {
            a1: Guarded::output(z.a1.len()),
            p1: Guarded::output(z.p1.len()),
            arg1: Guarded::output(z.arg1.len()),
            a2: Guarded::output(z.a2.len()),
            p2: Guarded::output(z.p2.len()),
            arg2: Guarded::output(z.arg2.len()),
            logits: Guarded::output(z.logits.len()),
            probs: Guarded::output(z.probs.len()),
        }
    }

    fn cache(&self, images: usize) -> ForwardCache<f32> {
        ForwardCache {
            images,
            a1: self.a1.written("a1"),
            p1: self.p1.written("p1"),
            arg1: self.arg1.written("arg1"),
            a2: self.a2.written("a2"),
            p2: self.p2.written("p2"),
            arg2: self.arg2.written("arg2"),
            logits: self.logits.written("logits"),
            probs: self.probs.written("probs"),
        }
    }
}

/// What the emulated backprop kernels produce for one schedule.
struct BpRun {
    cache: ForwardCache<f32>,
    loss: Vec<f64>,
    correct: Vec<i32>,
    grad: Vec<f32>,
}

/// The kernel sequence of `gpu::backprop::backprop`: forward with caches, softmax
/// backward (scale 1/B), per-image backward, gradient reduction.
fn emulated_backprop(
    e: &Emu,
    net: &Net,
    w: &[f32],
    x: &[f32],
    labels: &[u8],
    order: Order,
) -> BpRun {
    let images = labels.len();
    let (ii, pi) = (to_i32(images), to_i32(net.n_params()));
    let (arch, act) = (net.arch.code(), net.act.code());
    let (wg, xg) = (Guarded::new(w), Guarded::new(x));
    let mut c = CacheBufs::new(net, images);
    let per_image = launch(&geometry::per_image_launch(images), order);
    let fwd = e.entry::<BpForwardFn>("backprop_forward_f32");
    // SAFETY: the cache buffers have the CPU cache's sizes for `images` images, which are
    // the kernel's per-image extents; w holds P and x images·784 elements.
    let rc = unsafe {
        fwd(
            &per_image,
            wg.ptr(),
            xg.ptr(),
            ii,
            arch,
            act,
            c.a1.mut_ptr(),
            c.p1.mut_ptr(),
            c.arg1.mut_ptr(),
            c.a2.mut_ptr(),
            c.p2.mut_ptr(),
            c.arg2.mut_ptr(),
            c.logits.mut_ptr(),
            c.probs.mut_ptr(),
        )
    };
    e.result(rc).expect("backprop_forward_f32");

    let labels_i: Vec<i32> = labels.iter().map(|&l| i32::from(l)).collect();
    let lg = Guarded::new(&labels_i);
    let mut loss = Guarded::<f64>::output(images);
    let mut correct = Guarded::<i32>::output(images);
    let mut dlogits = Guarded::<f32>::output(images * CLASSES);
    let soft = e.entry::<SoftmaxFn>("softmax_xent_backward_f32");
    // SAFETY: logits, probs, dlogits hold images·10; labels, loss, correct `images`.
    let rc = unsafe {
        soft(
            &launch(&geometry::elementwise_launch(images), order),
            c.logits.ptr(),
            c.probs.ptr(),
            lg.ptr(),
            ii,
            1.0f32 / images as f32,
            loss.mut_ptr(),
            correct.mut_ptr(),
            dlogits.mut_ptr(),
        )
    };
    e.result(rc).expect("softmax_xent_backward_f32");

    let mut gimg = Guarded::<f32>::output(images * net.n_params());
    let bwd = e.entry::<BpBackwardFn>("backprop_backward_f32");
    // SAFETY: as for the forward kernel; dlogits images·10, gimg images·P.
    let rc = unsafe {
        bwd(
            &per_image,
            wg.ptr(),
            xg.ptr(),
            ii,
            pi,
            arch,
            act,
            c.a1.ptr(),
            c.p1.ptr(),
            c.arg1.ptr(),
            c.a2.ptr(),
            c.p2.ptr(),
            c.arg2.ptr(),
            dlogits.ptr(),
            gimg.mut_ptr(),
        )
    };
    e.result(rc).expect("backprop_backward_f32");
    let mut grad = Guarded::<f32>::output(net.n_params());
    let red = e.entry::<GradReduceFn>("grad_reduce_f32");
    // SAFETY: gimg holds images·P and grad P elements.
    let rc = unsafe {
        red(
            &launch(&geometry::elementwise_launch(net.n_params()), order),
            gimg.ptr(),
            ii,
            pi,
            grad.mut_ptr(),
        )
    };
    e.result(rc).expect("grad_reduce_f32");
    gimg.written("per-image gradients");
    dlogits.written("dlogits");
    BpRun {
        cache: c.cache(images),
        loss: loss.written("loss"),
        correct: correct.written("correct"),
        grad: grad.written("gradient"),
    }
}

/// [`same_in_both_orders`] for every buffer of two caches.
fn same_cache_in_both_orders(what: &str, a: &ForwardCache<f32>, b: &ForwardCache<f32>) {
    for (name, x, y) in [
        ("a1", &a.a1, &b.a1),
        ("p1", &a.p1, &b.p1),
        ("a2", &a.a2, &b.a2),
        ("p2", &a.p2, &b.p2),
        ("logits", &a.logits, &b.logits),
        ("probs", &a.probs, &b.probs),
    ] {
        same_in_both_orders(&format!("{what} {name}"), vec![x.clone(), y.clone()]);
    }
    same_in_both_orders(
        &format!("{what} arg1"),
        vec![a.arg1.clone(), b.arg1.clone()],
    );
    same_in_both_orders(
        &format!("{what} arg2"),
        vec![a.arg2.clone(), b.arg2.clone()],
    );
}

#[test]
fn backprop_kernels_match_cpu_for_every_arch_and_activation() {
    let Some(e) = emu() else { return };
    for (i, net) in nets().into_iter().enumerate() {
        let what = format!("{net:?}");
        let (w, x, labels) = twin_case(&net, i);
        let want = backprop(&net, &w, &x, &labels).expect("cpu backprop");
        let runs: Vec<BpRun> = ORDERS
            .iter()
            .map(|&o| emulated_backprop(e, &net, &w, &x, &labels, o))
            .collect();
        same_cache_in_both_orders(&what, &runs[0].cache, &runs[1].cache);
        let grad = same_in_both_orders(&what, runs.iter().map(|r| r.grad.clone()).collect());
        let r = &runs[0];
        // As the host: the mean of the per-image losses, the count of correct images.
        let loss = r.loss.iter().sum::<f64>() / B as f64;
        assert!(
            (loss - want.loss).abs() <= LOGIT_TOL * 0.1 * want.loss.abs(),
            "{what}: loss {loss} vs cpu {}",
            want.loss
        );
        assert_eq!(
            r.correct.iter().filter(|&&c| c != 0).count(),
            want.correct,
            "{what}: correct count"
        );
        compare_cache(&what, &r.cache, &want.cache);
        for spec in net.tensors() {
            let wg = up(&want.grad[spec.range()]);
            assert_close(
                &format!("{what} d/d {}", spec.name),
                &up(&grad[spec.range()]),
                &wg,
                GRAD_TOL * max_abs(&wg),
                GRAD_TOL,
            );
        }
    }
}

#[test]
fn backprop_kernels_handle_a_batch_of_one_and_of_many() {
    let Some(e) = emu() else { return };
    // Inputs of case_inputs (B images); the sub-batches below use their first images.
    let net = Net::new(Arch::Pooled, Activation::Relu);
    let (w, x, labels) = case_inputs(&net, 5);
    for images in [1, B] {
        let (x, labels) = (&x[..images * IMG_PIXELS], &labels[..images]);
        let want = backprop(&net, &w, x, labels).expect("cpu backprop");
        let got = emulated_backprop(e, &net, &w, x, labels, Order::Descending);
        let loss = got.loss.iter().sum::<f64>() / images as f64;
        assert!((loss - want.loss).abs() <= LOGIT_TOL * 0.1 * want.loss.abs());
        let wg = up(&want.grad);
        assert_close(
            &format!("{net:?} gradient over {images} image(s)"),
            &up(&got.grad),
            &wg,
            GRAD_TOL * max_abs(&wg),
            GRAD_TOL,
        );
    }
}

type SgdFn =
    unsafe extern "C" fn(*const Launch, *mut f32, *const f32, *mut f32, i32, f32, f32, i32) -> i32;
type AdamFn = unsafe extern "C" fn(
    *const Launch,
    *mut f32,
    *const f32,
    *mut f32,
    *mut f32,
    i32,
    f32,
    f32,
    f32,
    f32,
    f32,
    f32,
) -> i32;

/// `steps` updates of the CPU optimizer and the emulated kernel on the same seeded
/// parameters and gradients: bit-identical after each (the kernels round as the CPU).
fn optimizer_case(e: &Emu, what: &str, mut cpu: GradOptimizer, seed: u64) {
    let n = 1000;
    let (start, grads) = optimizer_inputs(seed, n, 4);
    let mut p = start.clone();
    let mut pg = Guarded::new(&start);
    let (mut m, mut v) = (
        Guarded::new(&vec![0.0f32; n]),
        Guarded::new(&vec![0.0f32; n]),
    );
    let mut has_buf = false;
    let cfg = launch(&geometry::elementwise_launch(n), Order::Descending);
    for (s, g) in grads.iter().enumerate() {
        let gg = Guarded::new(g);
        let rc = match &mut cpu {
            GradOptimizer::Sgd(sgd) => {
                let (lr, mu) = (sgd.lr as f32, sgd.momentum as f32);
                let mode = sgd_mode(mu, has_buf);
                has_buf = mode != 0;
                sgd.step(&mut p, g).expect("cpu step");
                let f = e.entry::<SgdFn>("sgd_step_f32");
                // SAFETY: params, grad and the buffer hold n elements.
                unsafe {
                    f(
                        &cfg,
                        pg.mut_ptr(),
                        gg.ptr(),
                        m.mut_ptr(),
                        1000,
                        lr,
                        mu,
                        mode,
                    )
                }
            }
            GradOptimizer::Adam(adam) => {
                adam.step(&mut p, g).expect("cpu step");
                // The scalars of the step just taken (Adam::step incremented t).
                let k = adam.scalars();
                let f = e.entry::<AdamFn>("adam_step_f32");
                // SAFETY: params, grad, m and v hold n elements.
                unsafe {
                    f(
                        &cfg,
                        pg.mut_ptr(),
                        gg.ptr(),
                        m.mut_ptr(),
                        v.mut_ptr(),
                        1000,
                        k.step_size,
                        k.bc2_sqrt,
                        k.w1,
                        k.b2,
                        k.w2,
                        k.eps,
                    )
                }
            }
        };
        e.result(rc).unwrap_or_else(|msg| panic!("{what}: {msg}"));
        assert_bits(
            &format!("{what} step {s} (kernel vs cpu)"),
            &pg.get(what),
            &p,
        );
    }
    assert_moved(what, &p, &start);
}

#[test]
fn optimizer_kernels_are_bit_identical_to_cpu() {
    let Some(e) = emu() else { return };
    optimizer_case(
        e,
        "sgd momentum 0.9",
        GradOptimizer::Sgd(Sgd::new(0.1, 0.9).unwrap()),
        1,
    );
    optimizer_case(
        e,
        "sgd no momentum",
        GradOptimizer::Sgd(Sgd::new(0.05, 0.0).unwrap()),
        2,
    );
    optimizer_case(
        e,
        "adam defaults",
        GradOptimizer::Adam(Adam::new(1e-3).unwrap()),
        3,
    );
    optimizer_case(
        e,
        "adam custom",
        GradOptimizer::Adam(Adam::with_params(3e-2, 0.8, 0.99, 1e-6).unwrap()),
        4,
    );
}

// ---------------------------------------------------------------------------------------
// The emulation catches faults (tests/emu/selftest.cu)

type OutFn = unsafe extern "C" fn(*const Launch, *mut f32) -> i32;
type OutIntFn = unsafe extern "C" fn(*const Launch, *mut f32, i32) -> i32;
type IntFn = unsafe extern "C" fn(*const Launch, i32) -> i32;

/// One block of 64 threads with 64 floats of dynamic shared memory.
fn selftest_launch(order: Order) -> Launch {
    Launch {
        grid: [1, 1, 1],
        block: [64, 1, 1],
        shared_mem_bytes: 64 * 4,
        reverse: i32::from(order == Order::Descending),
    }
}

#[test]
fn emulation_exposes_a_missing_barrier() {
    let Some(e) = emu() else { return };
    let f = e.entry::<OutIntFn>("selftest_exchange");
    for order in ORDERS {
        let mut out = Guarded::<f32>::output(64);
        // SAFETY: out holds 64 floats, one per thread.
        e.result(unsafe { f(&selftest_launch(order), out.mut_ptr(), 1) })
            .unwrap();
        let want: Vec<f32> = (0..64).rev().map(|t| t as f32).collect();
        assert_eq!(out.get("with barrier"), want, "{order:?}");
        let mut out = Guarded::<f32>::output(64);
        // SAFETY: as above.
        e.result(unsafe { f(&selftest_launch(order), out.mut_ptr(), 0) })
            .unwrap();
        let got = out.get("without barrier");
        let stale = got.iter().filter(|v| v.is_nan()).count();
        assert!(
            stale >= 32,
            "{order:?}: only {stale} threads read unwritten shared memory"
        );
    }
}

#[test]
fn emulation_rejects_divergent_barriers_and_partial_shuffles() {
    let Some(e) = emu() else { return };
    let mut out = Guarded::<f32>::output(64);
    let f = e.entry::<OutFn>("selftest_divergent_barrier");
    // SAFETY: out holds 64 floats.
    let r = e.result(unsafe { f(&selftest_launch(Order::Ascending), out.mut_ptr()) });
    assert!(
        matches!(&r, Err(m) if m.contains("already returned")),
        "{r:?}"
    );
    let f = e.entry::<OutFn>("selftest_partial_shuffle");
    // SAFETY: as above.
    let r = e.result(unsafe { f(&selftest_launch(Order::Descending), out.mut_ptr()) });
    assert!(
        matches!(&r, Err(m) if m.contains("only some lanes")),
        "{r:?}"
    );
}

#[test]
fn emulation_rejects_shared_memory_overruns() {
    let Some(e) = emu() else { return };
    let f = e.entry::<IntFn>("selftest_shared_write");
    // SAFETY: the kernel touches shared memory only.
    e.result(unsafe { f(&selftest_launch(Order::Ascending), 63) })
        .expect("last element");
    // SAFETY: as above (the emulation's guard absorbs the overrun).
    let r = e.result(unsafe { f(&selftest_launch(Order::Ascending), 64) });
    assert!(matches!(&r, Err(m) if m.contains("outside")), "{r:?}");
}

type VectorLoadFn = unsafe extern "C" fn(*const Launch, *const f32, i32, *mut f32) -> i32;

#[test]
fn emulation_rejects_misaligned_vector_loads() {
    let Some(e) = emu() else { return };
    let f = e.entry::<VectorLoadFn>("selftest_vector_load");
    // A 16-byte aligned buffer (GUARD = 64 floats of guard in front keeps the Vec's
    // alignment, which the allocator gives f32 Vecs of this size at 16 bytes or more).
    let data = Guarded::new(&[1.0f32; 16]);
    assert_eq!(data.ptr() as usize % 16, 0, "test buffer alignment");
    let mut out = Guarded::<f32>::output(64);
    // SAFETY: reads 4 floats at data + offset (offset ≤ 5 < 16 − 4), writes 64 floats.
    e.result(unsafe {
        f(
            &selftest_launch(Order::Ascending),
            data.ptr(),
            4,
            out.mut_ptr(),
        )
    })
    .expect("aligned float4 load");
    assert!(out.written("sums").iter().all(|&v| v == 4.0));
    // SAFETY: as above.
    let r = e.result(unsafe {
        f(
            &selftest_launch(Order::Ascending),
            data.ptr(),
            5,
            out.mut_ptr(),
        )
    });
    assert!(
        matches!(&r, Err(m) if m.contains("misaligned float4")),
        "{r:?}"
    );
}

#[test]
fn emulated_shuffles_follow_cuda_semantics() {
    let Some(e) = emu() else { return };
    let f = e.entry::<OutFn>("selftest_shuffles");
    let mut out = Guarded::<f32>::output(128);
    // SAFETY: out holds two floats per thread.
    e.result(unsafe { f(&selftest_launch(Order::Descending), out.mut_ptr()) })
        .unwrap();
    let got = out.written("shuffles");
    for t in 0..64usize {
        let (warp, lane) = (t / 32 * 32, t % 32);
        assert_eq!(got[2 * t], (warp + (lane ^ 5)) as f32, "xor, thread {t}");
        let down = if lane + 3 < 32 { lane + 3 } else { lane };
        assert_eq!(got[2 * t + 1], (warp + down) as f32, "down, thread {t}");
    }
}
