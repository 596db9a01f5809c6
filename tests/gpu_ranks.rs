//! EnKF training sharded over ranks on GPUs (one CUDA backend per rank,
//! `app::open_rank_backend`; the ranks as threads of this process, all on the visible
//! devices in turn): 2 GPU ranks against one GPU process over 20 iterations, and the
//! backend choice of the ranks without a GPU (every rank errs with `--backend cuda`,
//! every rank takes the CPU with `auto`, and none waits for another). The GPU part
//! skips with a printed reason when no usable GPU is present; fails instead when
//! `REQUIRE_GPU=1`.
//!
//! Tolerance: as `tests/sharded_train.rs` for the sequential rule (5e-4 of the largest
//! mean weight): the ranks add their partial sums on the host in another order than one
//! process; the GPU adds nothing rank-specific. The thread ranks share one GPU, so their
//! sums go through the host (NCCL refuses two ranks on one device); NCCL itself is
//! tested on one rank. Several GPUs are not tested here.

mod common;
use common::{gpu, limited};

use enkf_dnn::app::{open_rank_backend, Opened};
use enkf_dnn::backend::{BackendKind, MathMode};
use enkf_dnn::dist::ThreadGroup;
use enkf_dnn::enkf::UpdateRule;
use enkf_dnn::train::{PartialConfig, TrainConfig, Trainer};

const J: usize = 48;

fn config() -> TrainConfig {
    let mut cfg = PartialConfig {
        members: Some(J),
        iterations: Some(20),
        backend: Some(BackendKind::Cuda),
        ..Default::default()
    }
    .resolve()
    .expect("valid config");
    cfg.update = UpdateRule::Sequential;
    cfg.eval_every = 10;
    cfg.batch = 4;
    cfg
}

/// Every rank of a group of 2 opens its backend: Ok(true) for a GPU, Ok(false) for the
/// CPU, or the error's text.
fn open_on_ranks(kind: BackendKind) -> Vec<Result<bool, String>> {
    let group = ThreadGroup::new(2).expect("group");
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| {
                s.spawn(
                    move || match open_rank_backend(kind, MathMode::Fp32, comm) {
                        Ok(Opened::Cuda(..)) => Ok(true),
                        Ok(Opened::Cpu(_)) => Ok(false),
                        Err(e) => Err(e.to_string()),
                    },
                )
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn the_ranks_agree_on_their_backend() {
    let cpu = open_on_ranks(BackendKind::Cpu);
    assert_eq!(cpu, [Ok(false), Ok(false)]);
    let auto = open_on_ranks(BackendKind::Auto);
    let cuda = open_on_ranks(BackendKind::Cuda);
    if enkf_dnn::gpu::CudaBackend::device_count().is_ok() {
        assert_eq!(auto, [Ok(true), Ok(true)], "auto with GPUs");
        assert_eq!(cuda, [Ok(true), Ok(true)], "cuda with GPUs");
    } else {
        assert_eq!(
            auto,
            [Ok(false), Ok(false)],
            "auto without a GPU: all on the CPU"
        );
        for (r, res) in cuda.iter().enumerate() {
            let e = res.as_ref().expect_err("cuda without a GPU");
            assert!(
                e.contains(&format!("rank {r} of 2 has no usable GPU")),
                "rank {r}: {e}"
            );
        }
    }
}

#[test]
fn two_gpu_ranks_agree_with_one_gpu_process() {
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let data = limited(640, 200);
    let cfg = config();
    let mut t = Trainer::new(&be, &cfg, &data).expect("one-process trainer");
    let want_rows = t.run(&mut ()).expect("one-process run");
    let want = t.mean_host().expect("mean");
    drop(t);
    let group = ThreadGroup::new(2).expect("group");
    let got: Vec<(Vec<f32>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| {
                let (cfg, data) = (&cfg, &data);
                s.spawn(move || {
                    let Opened::Cuda(be, desc) =
                        open_rank_backend(BackendKind::Cuda, MathMode::Fp32, comm).expect("open")
                    else {
                        panic!("a GPU rank expected");
                    };
                    println!("{desc}");
                    let mut t = Trainer::new_on_ranks(&*be, cfg, data, comm).expect("trainer");
                    let rows = t.run(&mut ()).expect("run");
                    (t.mean_host().expect("mean"), rows.len())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (r, (mean, rows)) in got.iter().enumerate() {
        assert_eq!(*rows, want_rows.len(), "rank {r}: rows");
        let worst = mean
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("rank {r}: max |Δ mean| {worst:e} (scale {scale})");
        assert!(
            worst <= 5e-4 * scale,
            "rank {r}: mean weights differ by {worst} (scale {scale})"
        );
        assert_eq!(mean, &got[0].0, "every rank holds the same mean");
    }
}

/// NCCL on one rank (the path a GPU session can test): attached where libnccl loads,
/// an identity sum of f64 and f32 device buffers either way; where it is not usable,
/// the reason is named.
#[test]
fn nccl_on_one_rank_sums_to_itself_or_says_why_not() {
    use enkf_dnn::backend::Backend;
    match enkf_dnn::gpu::nccl::usable() {
        Ok(()) => println!("libnccl loads"),
        Err(why) => assert!(
            why.contains("libnccl is not installed") || why.contains("ENKF_NCCL=0"),
            "{why}"
        ),
    }
    let Some(be) = gpu(MathMode::Fp32) else {
        return;
    };
    let how = be.attach_nccl(&enkf_dnn::dist::Solo).expect("attach");
    println!("sums through {how}");
    assert!(how == "NCCL" || how.starts_with("the host ("), "{how}");
    let v64: Vec<f64> = (0..1000).map(|i| f64::from(i) * 0.5 - 7.0).collect();
    let mut d64 = be.zeros_f64(v64.len()).unwrap();
    be.write_f64(&v64, &mut d64).unwrap();
    be.allreduce_sum_f64(&enkf_dnn::dist::Solo, &mut d64)
        .expect("f64 sum");
    assert_eq!(be.download_f64(&d64).unwrap(), v64);
    let v32: Vec<f32> = v64.iter().map(|&v| v as f32).collect();
    let mut d32 = be.upload_f32(&v32).unwrap();
    be.allreduce_sum_f32(&enkf_dnn::dist::Solo, &mut d32)
        .expect("f32 sum");
    assert_eq!(be.download_f32(&d32).unwrap(), v32);
}
