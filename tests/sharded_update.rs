//! The EnKF update with the ensemble sharded over ranks (`enkf::dist`, issue 14) against
//! the single-process update (`EnkfWorkspace`, parameter-space order): one rank bit for
//! bit; 2 and 3 ranks (threads of a `ThreadGroup`) to the tolerance below, and bit for
//! bit when repeated; a shard that does not match its rank is refused.
//!
//! Tolerance: the ranks add A_rᵀU_r (f32, J_r terms each) in another grouping than one
//! J-term sum, and centre A by a correction instead of the global mean (f64): ~J·eps32
//! relative to Σ|terms| in T, which cancellation can make ~100× |ΔU|. 1e-4·max|ΔU|
//! absolute plus 4·eps32·|U| relative, against an error of order max|ΔU| for a wrong
//! centring, a missing sum or a wrong shard offset.

mod common;

use enkf_dnn::backend::Backend;
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::dist::{Comm, Shard, Solo, ThreadGroup};
use enkf_dnn::enkf::dist::{exchanged_bytes, ShardedWorkspace};
use enkf_dnn::enkf::UpdateRule;

use common::sharded::{assert_sharded_close, problem, reference, B, GAMMA, J, M, P};

/// The update on `ranks` ranks (threads), gathered back into J × P.
fn sharded(rule: UpdateRule, ranks: usize, seed: u64) -> Vec<f32> {
    let (u, g, y) = problem(seed);
    let group = ThreadGroup::new(ranks).unwrap();
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| {
                let (u, g, y) = (&u, &g, &y);
                s.spawn(move || {
                    let be = CpuBackend::new();
                    let shard = Shard::of(J, comm.rank(), comm.size()).unwrap();
                    let mut ws = ShardedWorkspace::new(&be, shard, P, B, 10).unwrap();
                    let mut ur = u[shard.first * P..shard.range().end * P].to_vec();
                    let gr = g[shard.first * M..shard.range().end * M].to_vec();
                    ws.update(&be, comm, rule, GAMMA, &mut ur, &gr, y).unwrap();
                    ur
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    parts.concat()
}

#[test]
fn one_rank_is_the_single_process_update_bit_for_bit() {
    for rule in [
        UpdateRule::Sequential,
        UpdateRule::Batch,
        UpdateRule::Transform,
    ] {
        let (u0, want) = reference(rule, 1);
        let (_, g, y) = problem(1);
        let be = CpuBackend::new();
        let shard = Shard::of(J, 0, 1).unwrap();
        let mut ws = ShardedWorkspace::new(&be, shard, P, B, 10).unwrap();
        let mut u = u0.clone();
        ws.update(&be, &Solo, rule, GAMMA, &mut u, &g, &y).unwrap();
        assert_eq!(u, want, "{rule:?}");
        assert_ne!(u, u0, "the update moves the members");
        assert_eq!(sharded(rule, 1, 1), want, "{rule:?} on a group of one");
    }
}

#[test]
fn two_and_three_ranks_agree_with_one_and_repeat_exactly() {
    for rule in [
        UpdateRule::Sequential,
        UpdateRule::Batch,
        UpdateRule::Transform,
    ] {
        let (u0, want) = reference(rule, 2);
        for ranks in [2, 3] {
            let got = sharded(rule, ranks, 2);
            assert_sharded_close(&format!("{rule:?}, {ranks} ranks"), &got, &want, &u0);
            assert_eq!(
                sharded(rule, ranks, 2),
                got,
                "{rule:?}: {ranks} ranks repeat"
            );
        }
    }
}

#[test]
fn a_shard_that_is_not_its_ranks_and_a_perturbed_transform_are_refused() {
    let be = CpuBackend::new();
    let (u, g, y) = problem(3);
    let shard = Shard::of(J, 1, 2).unwrap();
    let mut ws = ShardedWorkspace::new(&be, shard, P, B, 10).unwrap();
    let (mut ur, gr) = (u[..shard.count * P].to_vec(), g[..shard.count * M].to_vec());
    let e = ws
        .update(&be, &Solo, UpdateRule::Batch, GAMMA, &mut ur, &gr, &y)
        .expect_err("rank 1 of 2 on a group of one");
    assert!(e.to_string().contains("this rank (0 of 1)"), "{e}");
    let mut ws = ShardedWorkspace::new(&be, Shard::of(J, 0, 1).unwrap(), P, B, 10).unwrap();
    let mut u = u.clone();
    let before = u.clone();
    let noise = vec![0.01; J * M];
    let e = ws
        .update_perturbed(
            &be,
            &Solo,
            UpdateRule::Transform,
            GAMMA,
            (&mut u, &g, &y),
            Some(&noise),
        )
        .expect_err("transform with perturbed observations");
    assert!(e.to_string().contains("deterministic"), "{e}");
    assert_eq!(u, before, "a refused update leaves the members");
}

/// The paper's network and batch: 5 KB + 2 · 3.3 MB + 46.2 MB per rank and update
/// (sequential rule).
#[test]
fn exchanged_bytes_per_update() {
    let m = 640u64;
    assert_eq!(
        exchanged_bytes(UpdateRule::Sequential, 18_050, 640),
        8 * m + 16 * m * m + 4 * m * 18_050
    );
    assert_eq!(
        exchanged_bytes(UpdateRule::Batch, 18_050, 640),
        8 * m + 8 * m * m + 4 * m * 18_050
    );
}

/// Member j's initial weights do not depend on the rank count: the shards of 1, 2 and 3
/// ranks join to the single-process ensemble, bit for bit.
#[test]
fn initial_members_depend_only_on_the_seed_and_their_index() {
    use enkf_dnn::enkf::dist::init_shard;
    use enkf_dnn::enkf::init_ensemble;
    use rand::SeedableRng;
    let (members, params) = (11, 7);
    let whole = init_ensemble(
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(9),
        members,
        params,
        0.5,
    );
    for ranks in [1, 2, 3] {
        let joined: Vec<f32> = (0..ranks)
            .flat_map(|r| {
                let shard = Shard::of(members, r, ranks).unwrap();
                init_shard(
                    &mut rand_chacha::ChaCha8Rng::seed_from_u64(9),
                    shard,
                    params,
                    0.5,
                )
            })
            .collect();
        assert_eq!(joined, whole, "{ranks} ranks");
    }
}

/// The ensemble mean over 3 ranks (the network the evaluation scores) equals the
/// single-process mean to f32 rounding of the per-rank means (3 ulps of the largest
/// value), against an error of order the spread for a mean of one shard only.
#[test]
fn the_sharded_mean_is_the_ensemble_mean() {
    use enkf_dnn::enkf::dist::sharded_mean;
    let (u, _, _) = problem(4);
    let be = CpuBackend::new();
    let mut want = vec![0.0f32; P];
    be.row_mean(&u, J, P, &mut want).unwrap();
    let group = ThreadGroup::new(3).unwrap();
    let means: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| {
                let u = &u;
                s.spawn(move || {
                    let be = CpuBackend::new();
                    let shard = Shard::of(J, comm.rank(), comm.size()).unwrap();
                    let ur = u[shard.first * P..shard.range().end * P].to_vec();
                    let mut mean = vec![0.0f32; P];
                    sharded_mean(&be, comm, shard, &ur, P, &mut mean).unwrap();
                    mean
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for mean in &means {
        assert_eq!(mean, &means[0], "every rank gets the same mean");
        for (g, w) in mean.iter().zip(&want) {
            assert!((g - w).abs() <= 3.0 * f32::EPSILON * scale, "{g} vs {w}");
        }
    }
}

/// One rank with a wrong buffer: every rank returns an error (that rank its own, the
/// others the count of refusals) instead of the others waiting for it in a collective,
/// and no rank's members move.
#[test]
fn a_rank_that_refuses_stops_every_rank_without_a_hang() {
    let (u, g, y) = problem(5);
    let group = ThreadGroup::new(3).unwrap();
    let out: Vec<(String, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| {
                let (u, g, y) = (&u, &g, &y);
                s.spawn(move || {
                    let be = CpuBackend::new();
                    let shard = Shard::of(J, comm.rank(), comm.size()).unwrap();
                    let mut ws = ShardedWorkspace::new(&be, shard, P, B, 10).unwrap();
                    let mut ur = u[shard.first * P..shard.range().end * P].to_vec();
                    let before = ur.clone();
                    let mut gr = g[shard.first * M..shard.range().end * M].to_vec();
                    if comm.rank() == 1 {
                        gr.pop();
                    }
                    let e = ws
                        .update(&be, comm, UpdateRule::Batch, GAMMA, &mut ur, &gr, y)
                        .expect_err("a rank refused");
                    (e.to_string(), ur == before)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(out[1].0.contains("outputs g"), "{}", out[1].0);
    for r in [0, 2] {
        assert!(out[r].0.contains("1 of 3 ranks refused"), "{}", out[r].0);
    }
    assert!(out.iter().all(|(_, unchanged)| *unchanged));
}
