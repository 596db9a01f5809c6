//! Every `Backend` operation of `CudaBackend` against its `CpuBackend` twin on seeded
//! random inputs. Skips with a printed reason when no usable GPU is present (probe
//! fails); fails instead when `REQUIRE_GPU=1`.

mod common;
use common::twins::{
    assert_bits, cholesky_inputs, normals, normals32, reduce_inputs, unit_lower_inputs, EPS32,
    EPS64, FORWARD_TOL, SOLVE_TOL,
};
use common::{assert_close, gpu, max_abs, up};

use enkf_dnn::backend::{Backend, MathMode, Trans};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::enkf::{one_hot, ApplyOrder, EnkfWorkspace, UpdateRule};
use enkf_dnn::error::LinalgError;
use enkf_dnn::gpu::CudaBackend;
use enkf_dnn::model::{Activation, Arch, Net, CLASSES, IMG_PIXELS};
use enkf_dnn::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Full EnKF update: both backends compute the same f64 gain and differ only in the f32
/// summation order of the two large products (≤ max(J, m) = 64 terms: ~4e-6 relative to
/// the sum of |terms|, which cancellation can make 100× larger than |ΔU|), plus the final
/// f32 rounding of U. Tolerance: 1e-3·max|ΔU| absolute, 2·eps32 relative to |U|.
const UPDATE_TOL: f64 = 1e-3;

fn upload64(be: &CudaBackend, host: &[f64]) -> <CudaBackend as Backend>::F64 {
    be.stream().clone_htod(host).expect("upload f64")
}

fn forward_case(be: &CudaBackend, net: Net, members: usize, images: usize, seed: u64) {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = normals32(&mut rng, members * net.n_params(), 1.0);
    let x: Vec<f32> = (0..images * IMG_PIXELS)
        .map(|_| rng.random_range(0..=255u8) as f32 / 255.0)
        .collect();
    let mut want = vec![0.0f32; members * images * CLASSES];
    cpu.ensemble_forward(&net, &w, members, &x, images, &mut want)
        .expect("cpu forward");
    let (wg, xg) = (be.upload_f32(&w).unwrap(), be.upload_f32(&x).unwrap());
    let mut out = be.zeros_f32(members * images * CLASSES).unwrap();
    be.ensemble_forward(&net, &wg, members, &xg, images, &mut out)
        .expect("gpu forward");
    let got = up(&be.download_f32(&out).unwrap());
    let want = up(&want);
    assert_close(
        &format!("forward {net:?} J={members} B={images}"),
        &got,
        &want,
        FORWARD_TOL * max_abs(&want),
        FORWARD_TOL,
    );
}

#[test]
fn forward_matches_cpu_for_every_arch_and_activation() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let mut seed = 1;
    for arch in [Arch::Paper, Arch::Pooled] {
        for act in [Activation::Logistic, Activation::Relu, Activation::Tanh] {
            forward_case(&be, Net::new(arch, act), 7, 64, seed);
            seed += 1;
        }
    }
}

#[test]
fn forward_matches_cpu_for_one_member_many_images() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    forward_case(
        &be,
        Net::new(Arch::Paper, Activation::Logistic),
        1,
        1000,
        11,
    );
    // 13 images: image groups and warps only partly filled.
    forward_case(&be, Net::new(Arch::Pooled, Activation::Relu), 3, 13, 12);
}

#[test]
fn forward_rejects_wrong_lengths() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let net = Net::default();
    let w = be.zeros_f32(2 * net.n_params()).unwrap();
    let x = be.zeros_f32(5 * IMG_PIXELS).unwrap();
    let mut out = be.zeros_f32(2 * 5 * CLASSES - 1).unwrap();
    let r = be.ensemble_forward(&net, &w, 2, &x, 5, &mut out);
    assert!(matches!(r, Err(Error::Shape { .. })), "got {r:?}");
}

#[test]
fn row_mean_and_center_and_innovate_match_cpu() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (rows, cols) = (777, 650);
    let (g, y) = reduce_inputs(&mut rng, rows, cols);
    let gg = be.upload_f32(&g).unwrap();
    let yg = be.upload_f32(&y).unwrap();

    let mut mean_c = vec![0.0f32; cols];
    cpu.row_mean(&g, rows, cols, &mut mean_c).unwrap();
    let mut mean_g = be.zeros_f32(cols).unwrap();
    be.row_mean(&gg, rows, cols, &mut mean_g).unwrap();
    // Both sum in f64 and round once to f32: they can differ by the last f32 bit only.
    assert_close(
        "row_mean",
        &up(&be.download_f32(&mean_g).unwrap()),
        &up(&mean_c),
        0.0,
        EPS32,
    );

    let (mut cc, mut ic) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
    cpu.center_and_innovate(&g, &y, rows, cols, &mut cc, &mut ic)
        .unwrap();
    let mut cg = be.zeros_f64(rows * cols).unwrap();
    let mut ig = be.zeros_f64(rows * cols).unwrap();
    be.center_and_innovate(&gg, &yg, rows, cols, &mut cg, &mut ig)
        .unwrap();
    // The f64 means differ only by summation order: rows·eps64·max|g| bounds it.
    let g_max = max_abs(&up(&g));
    assert_close(
        "centred",
        &be.download_f64(&cg).unwrap(),
        &cc,
        rows as f64 * EPS64 * g_max,
        0.0,
    );
    // y − g of two f32 values in f64 is one correctly rounded operation: bit-identical.
    assert_close("innovations", &be.download_f64(&ig).unwrap(), &ic, 0.0, 0.0);
}

#[test]
fn gemm_matches_cpu_for_all_transposes() {
    for math in [MathMode::Fp32, MathMode::Tf32] {
        let Some(be) = gpu(math) else { return };
        let cpu = CpuBackend::new();
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let (m, n, k) = (37, 53, 71);
        let (alpha, beta) = (0.7, -0.3);
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let a = normals(&mut rng, m * k, 1.0);
                let b = normals(&mut rng, k * n, 1.0);
                let c = normals(&mut rng, m * n, 1.0);
                // Size of the terms: |α|·Σ|a||b| + |β||c| ≤ |α|·k·max|a|·max|b| + |β|·max|c|.
                let terms =
                    alpha * k as f64 * max_abs(&a) * max_abs(&b) + f64::abs(beta) * max_abs(&c);
                let what = format!("{math:?} {ta:?}/{tb:?}");

                // f32 (TF32 rounds each input to 10 mantissa bits: 2^-10 per product).
                let (a32, b32, c32): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                    a.iter().map(|&v| v as f32).collect(),
                    b.iter().map(|&v| v as f32).collect(),
                    c.iter().map(|&v| v as f32).collect(),
                );
                let mut want = c32.clone();
                cpu.gemm_f32(
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha as f32,
                    &a32,
                    &b32,
                    beta as f32,
                    &mut want,
                )
                .unwrap();
                let (ag, bg) = (be.upload_f32(&a32).unwrap(), be.upload_f32(&b32).unwrap());
                let mut cg = be.upload_f32(&c32).unwrap();
                be.gemm_f32(
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha as f32,
                    &ag,
                    &bg,
                    beta as f32,
                    &mut cg,
                )
                .unwrap();
                let unit = match math {
                    MathMode::Fp32 => 2.0 * EPS32,
                    MathMode::Tf32 => 2.0f64.powi(-10),
                };
                // Each term is off by ≤ unit relative; the sums by k·eps32 at most.
                let atol = terms * (unit + k as f64 * EPS32);
                assert_close(
                    &format!("gemm_f32 {what}"),
                    &up(&be.download_f32(&cg).unwrap()),
                    &up(&want),
                    atol,
                    0.0,
                );

                if math == MathMode::Fp32 {
                    let mut want = c.clone();
                    cpu.gemm_f64(ta, tb, m, n, k, alpha, &a, &b, beta, &mut want)
                        .unwrap();
                    let (ag, bg) = (upload64(&be, &a), upload64(&be, &b));
                    let mut cg = upload64(&be, &c);
                    be.gemm_f64(ta, tb, m, n, k, alpha, &ag, &bg, beta, &mut cg)
                        .unwrap();
                    assert_close(
                        &format!("gemm_f64 {what}"),
                        &be.download_f64(&cg).unwrap(),
                        &want,
                        terms * 2.0 * k as f64 * EPS64,
                        0.0,
                    );
                }
            }
        }
    }
}

fn cholesky_case(be: &CudaBackend, blocks: usize, bs: usize, nrhs: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = blocks * bs;
    let (a, rhs, want) = cholesky_inputs(&mut rng, blocks, bs, nrhs);
    let mut ag = upload64(be, &a);
    let mut rg = upload64(be, &rhs);
    be.block_cholesky_solve_f64(&mut ag, blocks, bs, &mut rg, nrhs)
        .unwrap();
    let scale = max_abs(&want);
    assert_close(
        &format!("block_cholesky_solve blocks={blocks} bs={bs} nrhs={nrhs}"),
        &be.download_f64(&rg).unwrap(),
        &want,
        SOLVE_TOL * scale,
        SOLVE_TOL,
    );

    // Whitening, rhs · L_d⁻ᵀ, of two matrices (rhs and its negation) against the CPU's.
    let neg: Vec<f64> = rhs.iter().map(|v| -v).collect();
    let (mut ac, mut want_x, mut want_y) = (a.clone(), rhs.clone(), neg.clone());
    CpuBackend::new()
        .block_cholesky_whiten_f64(&mut ac, blocks, bs, &mut want_x, &mut want_y, nrhs)
        .unwrap();
    let (mut ag, mut xg, mut yg) = (upload64(be, &a), upload64(be, &rhs), upload64(be, &neg));
    be.block_cholesky_whiten_f64(&mut ag, blocks, bs, &mut xg, &mut yg, nrhs)
        .unwrap();
    for (name, g, w) in [("x", &xg, &want_x), ("y", &yg, &want_y)] {
        assert_close(
            &format!("block_cholesky_whiten {name} blocks={blocks} bs={bs} nrhs={nrhs}"),
            &be.download_f64(g).unwrap(),
            w,
            SOLVE_TOL * max_abs(w),
            SOLVE_TOL,
        );
    }

    // Make block `bad` indefinite: both backends must name it.
    let bad = blocks / 2;
    let mut a_bad = a.clone();
    a_bad[(bad * bs + 1) * n + bad * bs + 1] = -1.0;
    let mut ag = upload64(be, &a_bad);
    let mut rg = upload64(be, &rhs);
    let r = be.block_cholesky_solve_f64(&mut ag, blocks, bs, &mut rg, nrhs);
    match r {
        Err(Error::Linalg(LinalgError::NotPositiveDefinite { block, size, .. })) => {
            assert_eq!((block, size), (bad, bs), "failing block");
        }
        other => panic!("indefinite block {bad}: expected NotPositiveDefinite, got {other:?}"),
    }

    // A NaN below the diagonal of block `bad` (cuSOLVER may factor it "successfully"):
    // the same typed error, never Ok with NaN in the solution.
    let mut a_nan = a.clone();
    a_nan[(bad * bs + bs - 1) * n + bad * bs] = f64::NAN;
    a_nan[(bad * bs) * n + bad * bs + bs - 1] = f64::NAN; // both triangles: either is read
    let mut ag = upload64(be, &a_nan);
    let mut rg = upload64(be, &rhs);
    match be.block_cholesky_solve_f64(&mut ag, blocks, bs, &mut rg, nrhs) {
        Err(Error::Linalg(LinalgError::NotPositiveDefinite { block, size, .. })) => {
            assert_eq!((block, size), (bad, bs), "block with a NaN");
        }
        other => panic!("NaN in block {bad}: expected NotPositiveDefinite, got {other:?}"),
    }
}

#[test]
fn block_cholesky_small_blocks_match_cpu() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    cholesky_case(&be, 64, 10, 300, 41); // the sequential rule's shape (J = 300)
    cholesky_case(&be, 3, 32, 129, 42); // largest kernel block, rows spill into 2 CTAs
    cholesky_case(&be, 1, 7, 5, 43);
}

#[test]
fn block_cholesky_large_blocks_match_cpu() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    cholesky_case(&be, 1, 200, 150, 51); // the batch rule's shape: one dense solve
    cholesky_case(&be, 3, 40, 20, 52); // cuSOLVER per block
}

#[test]
fn unit_block_lower_and_solve_match_cpu() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    let (n, bs, rows) = (60, 10, 100);
    let a = normals(&mut rng, n * n, 1.0);
    let mut want = a.clone();
    cpu.unit_block_lower_f64(&mut want, n, bs).unwrap();
    let mut ag = upload64(&be, &a);
    be.unit_block_lower_f64(&mut ag, n, bs).unwrap();
    // Negation and constants only: bit-identical.
    assert_close(
        "unit_block_lower",
        &be.download_f64(&ag).unwrap(),
        &want,
        0.0,
        0.0,
    );

    let (t, b) = unit_lower_inputs(&mut rng, n, rows);
    let mut want = b.clone();
    cpu.solve_unit_lower_right_f64(&t, n, &mut want, rows)
        .unwrap();
    let tg = upload64(&be, &t);
    let mut bg = upload64(&be, &b);
    be.solve_unit_lower_right_f64(&tg, n, &mut bg, rows)
        .unwrap();
    let scale = max_abs(&want);
    assert_close(
        "solve_unit_lower_right",
        &be.download_f64(&bg).unwrap(),
        &want,
        SOLVE_TOL * scale,
        SOLVE_TOL,
    );
}

/// The EKI variants' kernels on the device equal their CPU twins bit for bit
/// (`nesterov_f32`, `add_scaled_f32_f64`: one fma each; `row_sq_norms_f64`: the same
/// order of sums), and the member-space Tikhonov update (cuBLAS and cuSOLVER against the
/// CPU's products) agrees to 1e-4 of each value (f32 J × P products).
#[test]
fn eki_variant_kernels_and_tikhonov_match() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(75);
    let n = 100_003;
    let u = normals32(&mut rng, n, 2.0);
    let prev = normals32(&mut rng, n, 2.0);
    let (mut want_u, mut want_p) = (u.clone(), prev.clone());
    cpu.nesterov_f32(&mut want_u, &mut want_p, 0.8125).unwrap();
    let (mut ug, mut pg) = (be.upload_f32(&u).unwrap(), be.upload_f32(&prev).unwrap());
    be.nesterov_f32(&mut ug, &mut pg, 0.8125).unwrap();
    assert_bits("nesterov_f32 u", &be.download_f32(&ug).unwrap(), &want_u);
    assert_bits("nesterov_f32 prev", &be.download_f32(&pg).unwrap(), &want_p);

    let y = normals(&mut rng, n, 3.0);
    let mut want = y.clone();
    cpu.add_scaled_f32_f64(&u, -0.3, &mut want).unwrap();
    let mut yg = upload64(&be, &y);
    let u0 = be.upload_f32(&u).unwrap();
    be.add_scaled_f32_f64(&u0, -0.3, &mut yg).unwrap();
    assert_eq!(be.download_f64(&yg).unwrap(), want);

    let (rows, cols) = (1000, 640);
    let a = normals(&mut rng, rows * cols, 1.5);
    let want = cpu.row_sq_norms_f64(&a, rows, cols).unwrap();
    let got = be.row_sq_norms_f64(&upload64(&be, &a), rows, cols).unwrap();
    assert_eq!(got, want);

    // Additive inflation: the same Philox draws (1 ulp of f32: the f64 transcendentals).
    let (rows, cols) = (501, 1003);
    let u = normals32(&mut rng, rows * cols, 1.0);
    let scale = normals32(&mut rng, cols, 1.0);
    let mut want = u.clone();
    // A rank's rows: the draws of global rows 3.. (an offset that is not a multiple of 4).
    let offset = 3 * cols;
    cpu.add_normal_f32(&mut want, offset, cols, &scale, 0.25, [7, 9], 123)
        .unwrap();
    let mut ug = be.upload_f32(&u).unwrap();
    be.add_normal_f32(
        &mut ug,
        offset,
        cols,
        &be.upload_f32(&scale).unwrap(),
        0.25,
        [7, 9],
        123,
    )
    .unwrap();
    for (i, (a, b)) in be.download_f32(&ug).unwrap().iter().zip(&want).enumerate() {
        assert!(
            (a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1,
            "add_normal_f32 value {i}: GPU {a} vs CPU {b}"
        );
    }

    // cuSOLVER syevd against the CPU's Householder + QL: the same eigenvalues, and
    // Qᵀ diag(λ) Q rebuilds the matrix (eigenvector signs may differ).
    let n = 200;
    let b = normals(&mut rng, n * n, 1.0);
    let sym: Vec<f64> = (0..n * n)
        .map(|i| {
            (0..n)
                .map(|k| b[(i / n) * n + k] * b[(i % n) * n + k])
                .sum::<f64>()
                / n as f64
        })
        .collect();
    let mut qc = sym.clone();
    let lc = cpu.sym_eigen_f64(&mut qc, n).unwrap();
    let mut qg = upload64(&be, &sym);
    let lg = be.sym_eigen_f64(&mut qg, n).unwrap();
    let qg = be.download_f64(&qg).unwrap();
    assert_close("syevd eigenvalues", &lg, &lc, 1e-12, 1e-10);
    for i in (0..n).step_by(7) {
        for jj in (0..n).step_by(11) {
            let r: f64 = (0..n).map(|k| qg[k * n + i] * lg[k] * qg[k * n + jj]).sum();
            assert!(
                (r - sym[i * n + jj]).abs() < 1e-10,
                "syevd rebuild ({i}, {jj})"
            );
        }
    }

    let (j, p, batch, outputs) = (300, 1000, 4, 10);
    let u = normals32(&mut rng, j * p, 1.0);
    let g = normals32(&mut rng, j * batch * outputs, 0.5);
    let y = normals32(&mut rng, batch * outputs, 1.0);
    let cpu_u = {
        let mut ws = EnkfWorkspace::with_tikhonov(&cpu, j, p, batch, outputs, 0.7).unwrap();
        let mut uc = u.clone();
        ws.innovate(&cpu, &g, &y).unwrap();
        ws.solve(&cpu, UpdateRule::Batch, 0.3, 0.5, None).unwrap();
        ws.apply(&cpu, &mut uc).unwrap();
        uc
    };
    let gpu_u = {
        let mut ws = EnkfWorkspace::with_tikhonov(&be, j, p, batch, outputs, 0.7).unwrap();
        let mut ud = be.upload_f32(&u).unwrap();
        let (gd, yd) = (be.upload_f32(&g).unwrap(), be.upload_f32(&y).unwrap());
        ws.innovate(&be, &gd, &yd).unwrap();
        ws.solve(&be, UpdateRule::Batch, 0.3, 0.5, None).unwrap();
        ws.apply(&be, &mut ud).unwrap();
        be.download_f32(&ud).unwrap()
    };
    assert!(cpu_u != u, "the update must move the members");
    // The transform update on the same inputs (eigenvector signs cancel in X).
    let transform = |b: &dyn Fn(&mut Vec<f32>)| {
        let mut out = u.clone();
        b(&mut out);
        out
    };
    let cpu_t = transform(&|uc| {
        let mut ws = EnkfWorkspace::with_outputs(&cpu, j, p, batch, outputs).unwrap();
        ws.gain(&cpu, UpdateRule::Transform, 0.3, &g, &y).unwrap();
        ws.apply(&cpu, uc).unwrap();
    });
    let gpu_t = {
        let mut ws = EnkfWorkspace::with_outputs(&be, j, p, batch, outputs).unwrap();
        let mut ud = be.upload_f32(&u).unwrap();
        let (gd, yd) = (be.upload_f32(&g).unwrap(), be.upload_f32(&y).unwrap());
        ws.gain(&be, UpdateRule::Transform, 0.3, &gd, &yd).unwrap();
        ws.apply(&be, &mut ud).unwrap();
        be.download_f32(&ud).unwrap()
    };
    for (i, (a, b)) in gpu_t.iter().zip(&cpu_t).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "transform member value {i}: GPU {a} vs CPU {b}"
        );
    }
    for (i, (a, b)) in gpu_u.iter().zip(&cpu_u).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "Tikhonov member value {i}: GPU {a} vs CPU {b}"
        );
    }
}

/// The stochastic EnKF's host-noise add and multiplicative inflation equal their CPU
/// twins bit for bit (one f64 add; one fmaf against `mul_add`).
#[test]
fn noise_add_and_inflation_are_exact() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(73);
    let x = normals(&mut rng, 10_007, 1.0);
    let y = normals(&mut rng, 10_007, 3.0);
    let mut want = y.clone();
    cpu.add_host_f64(&x, &mut want).unwrap();
    let mut yg = upload64(&be, &y);
    be.add_host_f64(&x, &mut yg).unwrap();
    assert_eq!(be.download_f64(&yg).unwrap(), want);

    let (rows, cols) = (101, 1003);
    let u = normals32(&mut rng, rows * cols, 2.0);
    let mean = normals32(&mut rng, cols, 1.0);
    let mut want = u.clone();
    cpu.inflate_rows_f32(&mut want, &mean, rows, cols, 1.0625)
        .unwrap();
    let mut ug = be.upload_f32(&u).unwrap();
    let mg = be.upload_f32(&mean).unwrap();
    be.inflate_rows_f32(&mut ug, &mg, rows, cols, 1.0625)
        .unwrap();
    let got = be.download_f32(&ug).unwrap();
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn conversions_copies_and_diagonal_are_exact() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    let src = normals(&mut rng, 10_007, 1e3);
    let mut want = vec![0.0f32; src.len()];
    cpu.f64_to_f32(&src, &mut want).unwrap();
    let sg = upload64(&be, &src);
    let mut dg = be.zeros_f32(src.len()).unwrap();
    be.f64_to_f32(&sg, &mut dg).unwrap();
    let got = be.download_f32(&dg).unwrap();
    assert_eq!(got, want, "f64_to_f32 rounds to nearest on both");

    let mut copy = be.zeros_f32(src.len()).unwrap();
    be.copy_f32(&dg, &mut copy).unwrap();
    assert_eq!(be.download_f32(&copy).unwrap(), want);
    let host: Vec<f32> = (0..src.len()).map(|i| i as f32).collect();
    be.write_f32(&host, &mut copy).unwrap();
    assert_eq!(be.download_f32(&copy).unwrap(), host);
    assert!(matches!(
        be.write_f32(&host[1..], &mut copy),
        Err(Error::Shape { .. })
    ));

    let n = 33;
    let a = normals(&mut rng, n * n, 1.0);
    let mut want = a.clone();
    cpu.add_diagonal_f64(&mut want, n, 0.25).unwrap();
    let mut ag = upload64(&be, &a);
    be.add_diagonal_f64(&mut ag, n, 0.25).unwrap();
    assert_eq!(be.download_f64(&ag).unwrap(), want);
}

/// copy_rows_f32 is a device copy of a row range, equal to the default host round trip of
/// the CPU backend; out-of-range rows are a shape error on both.
#[test]
fn copy_rows_matches_cpu() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(73);
    let (cols, src_rows, dst_rows) = (37, 11, 9);
    let src = normals32(&mut rng, src_rows * cols, 1.0);
    let dst = normals32(&mut rng, dst_rows * cols, 1.0);
    let mut want = dst.clone();
    cpu.copy_rows_f32(&src, 3, &mut want, 5, 4, cols).unwrap();
    let sg = be.upload_f32(&src).unwrap();
    let mut dg = be.upload_f32(&dst).unwrap();
    be.copy_rows_f32(&sg, 3, &mut dg, 5, 4, cols).unwrap();
    assert_eq!(be.download_f32(&dg).unwrap(), want);
    assert!(matches!(
        be.copy_rows_f32(&sg, 8, &mut dg, 0, 4, cols),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        be.copy_rows_f32(&sg, 0, &mut dg, 6, 4, cols),
        Err(Error::Shape { .. })
    ));
}

/// time_ms runs its closure once, brackets it with events (a finite, non-negative
/// duration) and passes its error through.
#[test]
fn event_timing_runs_the_work_once_and_passes_errors() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let mut a = be.zeros_f32(1 << 20).unwrap();
    let b = be.upload_f32(&vec![2.5f32; 1 << 20]).unwrap();
    let mut calls = 0;
    let ms = be
        .time_ms(|| {
            calls += 1;
            be.copy_f32(&b, &mut a)
        })
        .unwrap();
    assert_eq!(calls, 1);
    assert!(ms.is_finite() && ms >= 0.0, "{ms}");
    assert!(be.download_f32(&a).unwrap().iter().all(|&v| v == 2.5));
    let err = be.time_ms(|| be.copy_f32(&b, &mut be.zeros_f32(3).unwrap()));
    assert!(matches!(err, Err(Error::Shape { .. })));
    // The trait's entry point (what generic code calls) reaches the event timer too.
    let mut f = || be.copy_f32(&b, &mut a);
    let ms = Backend::time_ms(&be, &mut f).unwrap();
    assert!(ms.is_finite() && ms >= 0.0, "{ms}");
}

/// The memory check passes for J = 256 and refuses 10⁸ members (7.2 TB of U) with the
/// largest J that fits, checked against the estimate and the free memory reported.
#[test]
fn memory_check_names_the_largest_ensemble_that_fits() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    use enkf_dnn::gpu::memory::{largest_members, peak_bytes};
    use enkf_dnn::gpu::TrainShape;
    let shape = TrainShape {
        members: 256,
        params: 18_050,
        batches: vec![64, 32],
        test_images: 10_000,
        eval_last: false,
        eval_ensemble: false,
        second_ensemble: true,
        observations: enkf_dnn::train::Observations::Exact,
        tikhonov: false,
        momentum: false,
        transform: false,
        net: Default::default(),
        apply_order: Default::default(),
    };
    be.check_fits(&shape).expect("J = 256 fits any GPU");
    let huge = shape.with_members(100_000_000);
    let err = be.check_fits(&huge).expect_err("10^8 members cannot fit");
    let (free, total) = be.memory_info().unwrap();
    println!("free {free} of {total} bytes; {err}");
    let j = largest_members(&huge, free).expect("some J fits");
    assert!(peak_bytes(&huge.with_members(j)) <= free);
    assert!(err.to_string().contains(&format!("--members {j}")), "{err}");
}

#[test]
fn enkf_update_matches_cpu_for_both_rules_and_orders() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let cpu = CpuBackend::new();
    let (members, params, batch) = (64, 300, 4);
    let m = batch * CLASSES;
    for rule in [UpdateRule::Sequential, UpdateRule::Batch] {
        for order in [ApplyOrder::Params, ApplyOrder::Members] {
            let mut rng = ChaCha8Rng::seed_from_u64(81);
            let u0 = normals32(&mut rng, members * params, 1.0);
            let g = normals32(&mut rng, members * m, 3.0);
            let labels: Vec<u8> = (0..batch).map(|_| rng.random_range(0..10u8)).collect();
            let y = one_hot(&labels, CLASSES);
            let gamma = 0.5;

            let mut u_cpu = u0.clone();
            let mut ws = EnkfWorkspace::with_order(&cpu, members, params, batch, order).unwrap();
            ws.update(&cpu, rule, gamma, &mut u_cpu, &g, &y).unwrap();

            let mut ug = be.upload_f32(&u0).unwrap();
            let (gg, yg) = (be.upload_f32(&g).unwrap(), be.upload_f32(&y).unwrap());
            let mut wsg = EnkfWorkspace::with_order(&be, members, params, batch, order).unwrap();
            wsg.update(&be, rule, gamma, &mut ug, &gg, &yg).unwrap();
            let got = up(&be.download_f32(&ug).unwrap());

            let want = up(&u_cpu);
            let delta: Vec<f64> = want.iter().zip(&u0).map(|(&w, &u)| w - u as f64).collect();
            assert!(max_abs(&delta) > 1e-3, "the update must move U");
            assert_close(
                &format!("enkf update {rule:?} {order:?}"),
                &got,
                &want,
                UPDATE_TOL * max_abs(&delta),
                2.0 * EPS32,
            );
        }
    }
}
