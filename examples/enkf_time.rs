use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::enkf::{init_ensemble, one_hot, ApplyOrder, EnkfWorkspace, UpdateRule};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() {
    let (j, p, b) = (1000usize, 18050usize, 64usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let u0 = init_ensemble(&mut rng, j, p, 1.0);
    let g = init_ensemble(&mut rng, j, b * 10, 10.0);
    let labels: Vec<u8> = (0..b).map(|_| rng.random_range(0..10u8)).collect();
    let y = one_hot(&labels, 10);
    let be = CpuBackend::new();
    for order in [ApplyOrder::Auto, ApplyOrder::Params, ApplyOrder::Members] {
        let mut ws = EnkfWorkspace::with_order(&be, j, p, b, order).unwrap();
        for rule in [UpdateRule::Sequential, UpdateRule::Batch] {
            let mut u = u0.clone();
            ws.update(&be, rule, 0.01, &mut u, &g, &y).unwrap();
            let reps = 5;
            let (mut tg, mut ta) = (0.0, 0.0);
            for _ in 0..reps {
                let t0 = Instant::now();
                ws.gain(&be, rule, 0.01, &g, &y).unwrap();
                let t1 = Instant::now();
                ws.apply(&be, &mut u).unwrap();
                let t2 = Instant::now();
                tg += (t1 - t0).as_secs_f64();
                ta += (t2 - t1).as_secs_f64();
            }
            println!(
                "{order:?}->{:?} {rule:?}: gain {:.1} ms, apply {:.1} ms, total {:.1} ms",
                ws.order(),
                tg / reps as f64 * 1e3,
                ta / reps as f64 * 1e3,
                (tg + ta) / reps as f64 * 1e3
            );
        }
    }
}
