//! What the CUDA backend chooses for the device it opens, checked on that device: the
//! forward geometry from its shared-memory limits, the kernel code (which PTX, or
//! NVRTC), the forward kernel at the geometries other architectures get, the NVRTC route
//! against the PTX route, and zero-length buffers. Skips with a printed reason when no
//! usable GPU is present; fails instead when `REQUIRE_GPU=1`.

mod common;
use common::twins::{normals32, FORWARD_TOL};
use common::{assert_close, gpu, max_abs, up};

use enkf_dnn::backend::{Backend, MathMode};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::gpu::forward::ensemble_forward_with_warps;
use enkf_dnn::gpu::geometry::{forward_geometry, SharedMemoryLimits};
use enkf_dnn::gpu::module::{embedded_ptx_archs, KernelSource};
use enkf_dnn::gpu::{CudaBackend, KernelRoute};
use enkf_dnn::model::{Activation, Arch, Net, CLASSES, IMG_PIXELS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn inputs(net: &Net, members: usize, images: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = normals32(&mut rng, members * net.n_params(), 1.0);
    let x = (0..images * IMG_PIXELS)
        .map(|_| rng.random_range(0..=255u8) as f32 / 255.0)
        .collect();
    (w, x)
}

fn cpu_forward(net: &Net, w: &[f32], members: usize, x: &[f32], images: usize) -> Vec<f64> {
    let mut want = vec![0.0f32; members * images * CLASSES];
    CpuBackend::new()
        .ensemble_forward(net, &w.to_vec(), members, &x.to_vec(), images, &mut want)
        .expect("cpu forward");
    up(&want)
}

#[test]
fn the_backend_uses_the_geometry_and_kernels_chosen_for_its_device() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let limits = be.shared_memory_limits();
    println!(
        "{limits:?} → {}; kernels {}",
        be.forward_geometry(),
        be.kernel_route()
    );
    assert_eq!(Some(be.forward_geometry()), forward_geometry(limits));
    let desc = be.name();
    assert!(
        desc.contains("forward: ") && desc.contains("kernels: "),
        "{desc}"
    );
    let archs = embedded_ptx_archs();
    if std::env::var("ENKF_KERNELS").is_err() && !archs.is_empty() {
        match be.kernel_route() {
            KernelRoute::Ptx(cc) => assert!(archs.contains(&cc), "{cc} not embedded"),
            other => panic!("PTX is embedded ({archs:?}) but the backend used {other}"),
        }
    }
    // An H100/H200 (sm_90) gets the Hopper PTX and 8 warps, two blocks per SM.
    if desc.contains("cc 9.0") {
        assert_eq!(
            limits,
            SharedMemoryLimits::SM90,
            "an sm_90 part with other limits"
        );
        assert_eq!(be.forward_geometry().warps, 8);
        if !archs.is_empty() && std::env::var("ENKF_KERNELS").is_err() {
            assert_eq!(be.kernel_route(), KernelRoute::Ptx(90));
        }
    }
}

#[test]
fn forward_matches_cpu_at_the_geometry_of_every_architecture() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let max = be.forward_geometry().warps;
    let mut seed = 31;
    for limits in [
        SharedMemoryLimits::SM75,
        SharedMemoryLimits::SM80,
        SharedMemoryLimits::SM86,
        SharedMemoryLimits::SM90,
    ] {
        let warps = forward_geometry(limits).expect("geometry").warps;
        if warps > max {
            println!("skipped {warps} warps: this device allows {max}");
            continue;
        }
        for net in [
            Net::new(Arch::Paper, Activation::Logistic),
            Net::new(Arch::Pooled, Activation::Tanh),
        ] {
            // 70 images: a full group of 64 (uneven rounds over `warps` warps) and one of 6.
            let (members, images) = (5, 70);
            let (w, x) = inputs(&net, members, images, seed);
            seed += 1;
            let want = cpu_forward(&net, &w, members, &x, images);
            let (wg, xg) = (be.upload_f32(&w).unwrap(), be.upload_f32(&x).unwrap());
            let mut out = be.zeros_f32(members * images * CLASSES).unwrap();
            ensemble_forward_with_warps(&be, warps, &net, &wg, members, &xg, images, &mut out)
                .expect("forward");
            assert_close(
                &format!("forward {net:?} at {warps} warps/block"),
                &up(&be.download_f32(&out).unwrap()),
                &want,
                FORWARD_TOL * max_abs(&want),
                FORWARD_TOL,
            );
        }
    }
    let w = be.zeros_f32(Net::default().n_params()).unwrap();
    let x = be.zeros_f32(IMG_PIXELS).unwrap();
    let mut out = be.zeros_f32(CLASSES).unwrap();
    let r = ensemble_forward_with_warps(&be, max + 1, &Net::default(), &w, 1, &x, 1, &mut out);
    assert!(r.is_err(), "more warps than the kernel was configured for");
}

#[test]
fn the_nvrtc_route_matches_the_embedded_ptx() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        assert!(
            std::env::var("REQUIRE_NVRTC").is_err(),
            "REQUIRE_NVRTC=1 but libnvrtc is missing"
        );
        println!("skipped: libnvrtc not found");
        return;
    }
    let nv = CudaBackend::with_kernels(0, MathMode::Fp32, KernelSource::Nvrtc).expect("nvrtc");
    assert!(
        matches!(nv.kernel_route(), KernelRoute::Nvrtc(_)),
        "{}",
        nv.name()
    );
    let net = Net::new(Arch::Paper, Activation::Relu);
    let (members, images) = (9, 64);
    let (w, x) = inputs(&net, members, images, 41);
    let want = cpu_forward(&net, &w, members, &x, images);
    for b in [&be, &nv] {
        let (wg, xg) = (b.upload_f32(&w).unwrap(), b.upload_f32(&x).unwrap());
        let mut out = b.zeros_f32(members * images * CLASSES).unwrap();
        b.ensemble_forward(&net, &wg, members, &xg, images, &mut out)
            .expect("forward");
        assert_close(
            &format!("forward, kernels {}", b.kernel_route()),
            &up(&b.download_f32(&out).unwrap()),
            &want,
            FORWARD_TOL * max_abs(&want),
            FORWARD_TOL,
        );
        let mut mean = b.zeros_f32(net.n_params()).unwrap();
        b.row_mean(&wg, members, net.n_params(), &mut mean)
            .expect("row mean");
        assert!(b.download_f32(&mean).unwrap().iter().all(|v| v.is_finite()));
    }
}

#[test]
fn zero_length_buffers_leave_no_error_behind() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    // The paper net's unused pool buffers, SGD without momentum: zero-length buffers
    // are made, used and dropped; the next, unrelated call must still succeed.
    for _ in 0..3 {
        let a = be.zeros_f32(0).unwrap();
        let b = be.zeros_f64(0).unwrap();
        let mut c = be.upload_f32(&[]).unwrap();
        assert_eq!((be.len_f32(&a), b.len(), be.len_f32(&c)), (0, 0, 0));
        assert!(be.download_f32(&a).unwrap().is_empty());
        assert!(be.download_f64(&b).unwrap().is_empty());
        be.write_f32(&[], &mut c).unwrap();
        be.copy_f32(&a, &mut c).unwrap();
    }
    let x = be.upload_f32(&[1.0, 2.0, 3.0]).unwrap();
    let mut y = be.zeros_f32(3).unwrap();
    be.copy_f32(&x, &mut y).unwrap();
    be.synchronize()
        .expect("no error stored by the zero-length buffers");
    assert_eq!(be.download_f32(&y).unwrap(), [1.0, 2.0, 3.0]);
}
