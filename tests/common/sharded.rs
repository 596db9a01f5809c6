//! The shared problem of the sharded-update tests (`tests/sharded_update.rs` with
//! threads, `tests/mpi_ranks.rs` with MPI processes) and its single-process reference.

use super::twins::normals32;
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::enkf::{ApplyOrder, EnkfWorkspace, UpdateRule};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub const J: usize = 61;
pub const P: usize = 45;
pub const B: usize = 3;
pub const M: usize = B * 10;
pub const GAMMA: f64 = 0.05;

/// U (J × P), G (J × m, with a different offset per member so shard means differ), y.
pub fn problem(seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let u = normals32(&mut rng, J * P, 1.0);
    let mut g = normals32(&mut rng, J * M, 0.3);
    for (j, row) in g.chunks_exact_mut(M).enumerate() {
        row.iter_mut().for_each(|v| *v += 0.02 * j as f32);
    }
    let y: Vec<f32> = (0..M).map(|i| f32::from(i % 10 == 3)).collect();
    (u, g, y)
}

/// The single-process update of [`problem`] (parameter-space order): (U before, U after).
pub fn reference(rule: UpdateRule, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (u0, g, y) = problem(seed);
    let be = CpuBackend::new();
    let mut ws = EnkfWorkspace::with_order(&be, J, P, B, ApplyOrder::Params).unwrap();
    let mut u = u0.clone();
    ws.update(&be, rule, GAMMA, &mut u, &g, &y).unwrap();
    (u0, u)
}

/// The tolerance of the sharded-update tests (see `tests/sharded_update.rs`): every
/// element of `got` within 1e-4·max|ΔU| + 4·eps32·|U| of `want`.
pub fn assert_sharded_close(what: &str, got: &[f32], want: &[f32], u0: &[f32]) {
    let step = want
        .iter()
        .zip(u0)
        .fold(0.0f64, |m, (a, b)| m.max(f64::from((a - b).abs())));
    assert!(step > 1e-3, "{what}: a real step: {step}");
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let allow = 1e-4 * step + 4.0 * f64::from(f32::EPSILON) * f64::from(w.abs());
        assert!(
            f64::from((g - w).abs()) <= allow,
            "{what}, element {i}: {g} vs {w} (allowed {allow:e})"
        );
    }
}
