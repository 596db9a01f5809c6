//! Changing a sharded ensemble (`enkf_dnn::enkf::dist_resize`) on 1, 2 and 3 thread
//! ranks against the one-process `resize` functions with the same generator: dropped
//! members are the same rows exactly (only copies), added and redrawn members agree to
//! f32 reordering (each rank's partial sum of R U, then a sum over the ranks: a few
//! roundings of values of order 1, so 1e-5 absolute), and every rank ends with the rows
//! `Shard::of` the new J gives it.

mod common;
use common::twins::normals32;

use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::dist::{Comm, Shard, ThreadGroup};
use enkf_dnn::enkf::{dist_resize, resize};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const J: usize = 23;
const P: usize = 17;

fn ensemble() -> Vec<f32> {
    normals32(&mut ChaCha8Rng::seed_from_u64(5), J * P, 1.0)
}

/// Runs `op` on `ranks` thread ranks, each with its shard of [`ensemble`]; returns each
/// rank's (rows, shard) in rank order.
fn on_ranks<F>(ranks: usize, op: F) -> Vec<(Vec<f32>, Shard)>
where
    F: Fn(&CpuBackend, &dyn Comm, Vec<f32>, Shard) -> (Vec<f32>, Shard) + Sync,
{
    let u = ensemble();
    let group = ThreadGroup::new(ranks).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| {
                let (u, op) = (&u, &op);
                s.spawn(move || {
                    let shard = Shard::of(J, comm.rank(), comm.size()).unwrap();
                    let rows = u[shard.first * P..shard.range().end * P].to_vec();
                    op(&CpuBackend::new(), comm, rows, shard)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The joined rows, after checking that each rank holds `Shard::of(members)`.
fn joined(parts: &[(Vec<f32>, Shard)], members: usize) -> Vec<f32> {
    let ranks = parts.len();
    let mut out = Vec::new();
    for (r, (rows, shard)) in parts.iter().enumerate() {
        assert_eq!(
            *shard,
            Shard::of(members, r, ranks).unwrap(),
            "rank {r}'s shard"
        );
        assert_eq!(rows.len(), shard.count * P, "rank {r}'s rows");
        out.extend_from_slice(rows);
    }
    out
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5, "{what}, element {i}: {g} vs {w}");
    }
}

#[test]
fn dropped_members_are_the_one_process_draw_rebalanced() {
    let be = CpuBackend::new();
    for count in [1, 7, 20] {
        let (want, _) = resize::drop_members(
            &be,
            &ensemble(),
            J,
            P,
            count,
            &mut ChaCha8Rng::seed_from_u64(9),
        )
        .unwrap();
        for ranks in [1, 2, 3] {
            let parts = on_ranks(ranks, |be, comm, rows, shard| {
                let mut rng = ChaCha8Rng::seed_from_u64(9);
                dist_resize::drop_members(be, comm, &rows, shard, P, count, &mut rng).unwrap()
            });
            assert_eq!(
                joined(&parts, J - count),
                want,
                "drop {count} on {ranks} ranks"
            );
        }
    }
}

#[test]
fn added_members_are_the_one_process_draw_rebalanced() {
    let be = CpuBackend::new();
    for count in [1, 5, 30] {
        let want = resize::add_members(
            &be,
            &ensemble(),
            J,
            P,
            count,
            &mut ChaCha8Rng::seed_from_u64(4),
        )
        .unwrap();
        for ranks in [1, 2, 3] {
            let parts = on_ranks(ranks, |be, comm, rows, shard| {
                let mut rng = ChaCha8Rng::seed_from_u64(4);
                dist_resize::add_members(be, comm, &rows, shard, P, count, &mut rng).unwrap()
            });
            let got = joined(&parts, J + count);
            // The old members are copied exactly; the fresh ones are sums.
            assert_eq!(
                got[..J * P],
                want[..J * P],
                "add {count} on {ranks}: old rows"
            );
            assert_close(&format!("add {count} on {ranks} ranks"), &got, &want);
        }
    }
}

#[test]
fn failed_members_are_redrawn_as_in_one_process() {
    let be = CpuBackend::new();
    let failed = [0, 3, 11, 12, 22];
    let mut want = ensemble();
    resize::resample_members(
        &be,
        &mut want,
        J,
        P,
        &failed,
        &mut ChaCha8Rng::seed_from_u64(2),
    )
    .unwrap();
    for ranks in [1, 2, 3] {
        let parts = on_ranks(ranks, |be, comm, mut rows, shard| {
            // Each rank knows only its own failures; `global_rows` joins them.
            let local: Vec<usize> = failed
                .iter()
                .filter(|g| shard.range().contains(g))
                .map(|g| g - shard.first)
                .collect();
            let global = dist_resize::global_rows(comm, shard, &local).unwrap();
            assert_eq!(global, failed);
            let mut rng = ChaCha8Rng::seed_from_u64(2);
            dist_resize::resample_members(be, comm, &mut rows, shard, P, &global, &mut rng)
                .unwrap();
            (rows, shard)
        });
        let got = joined(&parts, J);
        assert_close(&format!("resample on {ranks} ranks"), &got, &want);
        assert_ne!(got, ensemble(), "the failed rows changed");
    }
    // Too few survivors is the typed error on every rank.
    let res = std::thread::scope(|s| {
        let group = ThreadGroup::new(2).unwrap();
        let hs: Vec<_> = group
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let shard = Shard::of(3, comm.rank(), 2).unwrap();
                    let mut rows = vec![0.0f32; shard.count * P];
                    let mut rng = ChaCha8Rng::seed_from_u64(0);
                    dist_resize::resample_members(
                        &CpuBackend::new(),
                        &comm,
                        &mut rows,
                        shard,
                        P,
                        &[0, 2],
                        &mut rng,
                    )
                    .is_err()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(res, [true, true]);
}
