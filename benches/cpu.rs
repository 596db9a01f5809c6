//! CPU benchmarks. `cargo bench --bench cpu -- forward`.
//!
//! Forward: the EnKF case (J members × B = 64 images) and evaluation (1 member × N
//! images). Throughput is reported in FLOP (2 · `Net::macs_per_image` per image and
//! member), so criterion's "elem/s" reads as FLOP/s.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use enkf_dnn::cpu::forward::{
    ensemble_forward, ensemble_forward_with, forward_impl_name, ForwardImpl,
};
use enkf_dnn::model::Net;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::hint::black_box;

fn inputs(net: &Net, members: usize, images: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let w = (0..members * net.n_params())
        .map(|_| {
            let z: f32 = StandardNormal.sample(&mut rng);
            z
        })
        .collect();
    let x = (0..images * 784).map(|_| rng.random::<f32>()).collect();
    (w, x)
}

fn forward(c: &mut Criterion) {
    let net = Net::default();
    eprintln!(
        "forward implementation: {}, {} rayon threads",
        forward_impl_name(),
        rayon::current_num_threads()
    );
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    let cases = [
        ("J=250/B=64", 250, 64),
        ("J=1000/B=64", 1000, 64),
        ("eval/N=64", 1, 64),
        ("eval/N=10000", 1, 10_000),
    ];
    for (name, members, images) in cases {
        let (w, x) = inputs(&net, members, images);
        let mut out = vec![0.0f32; members * images * 10];
        let flops = 2 * net.macs_per_image() as u64 * (members * images) as u64;
        g.throughput(Throughput::Elements(flops));
        g.bench_function(name, |b| {
            b.iter(|| {
                ensemble_forward(
                    &net,
                    black_box(&w),
                    members,
                    black_box(&x),
                    images,
                    &mut out,
                )
                .expect("shapes are consistent")
            })
        });
    }
    // Every implementation this CPU runs, on the same J = 250 case.
    let (w, x) = inputs(&net, 250, 64);
    let mut out = vec![0.0f32; 250 * 64 * 10];
    g.throughput(Throughput::Elements(
        2 * net.macs_per_image() as u64 * 250 * 64,
    ));
    for imp in ForwardImpl::ALL.into_iter().filter(|i| i.is_available()) {
        g.bench_function(format!("{}/J=250/B=64", imp.name()), |b| {
            b.iter(|| {
                ensemble_forward_with(imp, &net, black_box(&w), 250, black_box(&x), 64, &mut out)
                    .expect("shapes are consistent")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
