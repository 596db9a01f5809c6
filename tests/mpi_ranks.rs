//! The sharded EnKF update over real MPI ranks (`--features mpi`): the test starts
//! itself under `mpirun -np N` (N = 2, 3; `--oversubscribe`, shared memory only), each
//! rank updates its shard of the problem of `tests/common/sharded.rs` through
//! `MpiComm` and writes its rows; the parent joins them in rank order and holds them to
//! the single-process update (the tolerance of `tests/sharded_update.rs`) and to a
//! repeated run (bit for bit). Skips with a printed reason when `mpirun` is missing;
//! fails instead when `REQUIRE_MPI=1` (CI installs OpenMPI).
#![cfg(feature = "mpi")]

mod common;
use common::sharded::{assert_sharded_close, problem, reference, B, GAMMA, J, M, P};

use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::dist::mpi_comm::MpiComm;
use enkf_dnn::dist::{Comm, Shard};
use enkf_dnn::enkf::dist::ShardedWorkspace;
use enkf_dnn::enkf::UpdateRule;
use std::path::Path;
use std::process::Command;

/// Where a rank writes its rows (set by the parent for the child processes).
const OUT_VAR: &str = "ENKF_MPI_TEST_OUT";

fn rule_of(name: &str) -> UpdateRule {
    match name {
        "batch" => UpdateRule::Batch,
        _ => UpdateRule::Sequential,
    }
}

/// One rank (run by `mpirun`, never by a plain `cargo test`: ignored, and it returns at
/// once without the variable): its shard of the update, written as raw f32 to
/// `$ENKF_MPI_TEST_OUT/<rule>-rank<r>.bin`.
#[test]
#[ignore = "a rank of mpi_ranks_match_one_process, started by mpirun"]
fn rank() {
    let Ok(dir) = std::env::var(OUT_VAR) else {
        return;
    };
    let comm = MpiComm::init().expect("MPI init");
    let be = CpuBackend::new();
    for name in ["sequential", "batch"] {
        let (u, g, y) = problem(2);
        let shard = Shard::of(J, comm.rank(), comm.size()).expect("shard");
        let mut ws = ShardedWorkspace::new(&be, shard, P, B, 10).expect("workspace");
        let mut ur = u[shard.first * P..shard.range().end * P].to_vec();
        let gr = g[shard.first * M..shard.range().end * M].to_vec();
        ws.update(&be, &comm, rule_of(name), GAMMA, &mut ur, &gr, &y)
            .expect("update");
        let bytes: Vec<u8> = ur.iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = Path::new(&dir).join(format!("{name}-rank{}.bin", comm.rank()));
        std::fs::write(path, bytes).expect("write the rows");
    }
}

/// Runs `ranks` MPI processes of this test executable's `rank` test; returns each
/// rule's joined rows, or None when mpirun is missing.
fn run_ranks(ranks: usize, dir: &Path) -> Option<Vec<(String, Vec<f32>)>> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let exe = std::env::current_exe().expect("test executable");
    let out = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "--allow-run-as-root",
            "-np",
            &ranks.to_string(),
        ])
        .args(["--mca", "btl", "self,vader"])
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
        .arg(&exe)
        .args(["--exact", "rank", "--ignored", "--test-threads", "1"])
        .env(OUT_VAR, dir)
        .output();
    let out = match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("REQUIRE_MPI").as_deref() != Ok("1"),
                "REQUIRE_MPI=1 but mpirun is not installed"
            );
            println!("skipped: mpirun not found");
            return None;
        }
        other => other.expect("mpirun"),
    };
    assert!(
        out.status.success(),
        "mpirun -np {ranks}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let joined = ["sequential", "batch"]
        .iter()
        .map(|name| {
            let mut rows = Vec::new();
            for r in 0..ranks {
                let b = std::fs::read(dir.join(format!("{name}-rank{r}.bin"))).expect("rows");
                rows.extend(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            (name.to_string(), rows)
        })
        .collect();
    Some(joined)
}

#[test]
fn mpi_ranks_match_one_process() {
    let dir = common::tmpdir("mpi-ranks");
    for ranks in [2, 3] {
        let Some(first) = run_ranks(ranks, &dir) else {
            return;
        };
        for (name, got) in &first {
            let (u0, want) = reference(rule_of(name), 2);
            assert_sharded_close(&format!("{name}, {ranks} MPI ranks"), got, &want, &u0);
        }
        let again = run_ranks(ranks, &dir).expect("mpirun ran before");
        assert_eq!(again, first, "{ranks} MPI ranks repeat bit for bit");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
