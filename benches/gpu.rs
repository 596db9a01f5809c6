//! GPU benchmarks: `cargo bench --bench gpu`. Without a usable GPU they print why and
//! measure nothing.
//!
//! Each phase of an EnKF iteration at J = 1000 and 5000, B = 64, the paper's network:
//! the ensemble forward pass, the reductions, the gain (small f64 phase) and the apply
//! (the two large products), timed with CUDA events around `iters` repetitions
//! (`iter_custom`), so criterion reports device time. Throughput is in FLOP, so
//! criterion's "elem/s" reads as FLOP/s. `enkf-dnn bench` prints the same phases as a
//! table with the fractions of the measured ceilings.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use enkf_dnn::backend::{Backend, MathMode};
use enkf_dnn::enkf::{init_ensemble, one_hot, ApplyOrder, EnkfWorkspace, UpdateRule};
use enkf_dnn::gpu::CudaBackend;
use enkf_dnn::model::{Net, CLASSES, IMG_PIXELS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

const B: usize = 64;

/// Device time of `iters` runs of `f`, as criterion's measurement.
fn device_time(be: &CudaBackend, iters: u64, mut f: impl FnMut()) -> Duration {
    let ms = be
        .time_ms(|| {
            for _ in 0..iters {
                f();
            }
            Ok(())
        })
        .expect("CUDA event timing");
    Duration::from_secs_f64(ms / 1e3)
}

fn phases(c: &mut Criterion) {
    let be = match CudaBackend::open(MathMode::Fp32) {
        Ok((be, desc)) => {
            eprintln!("GPU: {desc}");
            be
        }
        Err(why) => {
            eprintln!("skipped: no usable GPU: {why}");
            return;
        }
    };
    let net = Net::default();
    let p = net.n_params();
    let m = B * CLASSES;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let hx: Vec<f32> = (0..B * IMG_PIXELS).map(|_| rng.random::<f32>()).collect();
    let labels: Vec<u8> = (0..B).map(|i| (i % CLASSES) as u8).collect();
    let x = be.upload_f32(&hx).expect("upload");
    let y = be.upload_f32(&one_hot(&labels, CLASSES)).expect("upload");
    let mut g = c.benchmark_group("gpu");
    g.sample_size(20);
    for j in [1000, 5000] {
        let mut u = be
            .upload_f32(&init_ensemble(&mut rng, j, p, 1.0))
            .expect("upload");
        let mut out = be.zeros_f32(j * m).expect("alloc");
        let mut ws = EnkfWorkspace::with_order(&be, j, p, B, ApplyOrder::Auto).expect("workspace");
        let (mut a, mut d) = (
            be.zeros_f64(j * m).expect("alloc"),
            be.zeros_f64(j * m).expect("alloc"),
        );
        be.ensemble_forward(&net, &u, j, &x, B, &mut out)
            .expect("forward");

        g.throughput(Throughput::Elements(
            2 * net.macs_per_image() as u64 * (j * B) as u64,
        ));
        g.bench_function(format!("forward/J={j}"), |bch| {
            bch.iter_custom(|iters| {
                device_time(&be, iters, || {
                    be.ensemble_forward(&net, &u, j, &x, B, &mut out)
                        .expect("forward")
                })
            })
        });
        g.throughput(Throughput::Elements((j * m) as u64));
        g.bench_function(format!("reductions/J={j}"), |bch| {
            bch.iter_custom(|iters| {
                device_time(&be, iters, || {
                    be.center_and_innovate(&out, &y, j, m, &mut a, &mut d)
                        .expect("reductions")
                })
            })
        });
        g.bench_function(format!("gain/J={j}"), |bch| {
            bch.iter_custom(|iters| {
                device_time(&be, iters, || {
                    ws.gain(&be, UpdateRule::Sequential, 0.01, &out, &y)
                        .expect("gain")
                })
            })
        });
        // The apply moves U; repeated applies keep the work identical (same X, A). FLOP of
        // the association the workspace chose.
        let (jf, pf, mf) = (j as u64, p as u64, m as u64);
        g.throughput(Throughput::Elements(match ws.order() {
            ApplyOrder::Members => 2 * jf * jf * mf + 2 * jf * jf * pf,
            _ => 4 * mf * jf * pf,
        }));
        g.bench_function(format!("apply/J={j}"), |bch| {
            bch.iter_custom(|iters| {
                device_time(&be, iters, || ws.apply(&be, &mut u).expect("apply"))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, phases);
criterion_main!(benches);
