//! Ranks that share one ensemble (issue 14): the communicator the sharded EnKF update
//! needs ([`Comm`]), the members each rank holds ([`Shard`]), and two communicators:
//! [`Solo`] (one rank, nothing to exchange) and [`ThreadGroup`] (ranks as threads of one
//! process, for the tests and for checking the algebra without MPI), and with
//! `--features mpi` [`mpi_comm::MpiComm`] (rsmpi over the system's MPI: ranks are
//! processes started by `mpirun` or `srun`).
//!
//! `ThreadGroup` adds the ranks' buffers in rank order (rank 0's values first); MPI adds
//! them in the order of its allreduce algorithm, which OpenMPI picks from the message
//! size and the rank count (the same for the same run: `tests/mpi_ranks.rs` checks
//! that repeated runs agree bit for bit). Runs on different N differ only in the order
//! of floating-point sums.

use std::sync::{Arc, Barrier, Mutex};

use crate::{Error, Result};

/// A group of ranks that add buffers together. Every rank calls each collective in the
/// same order with buffers of the same length.
pub trait Comm {
    /// This rank, 0 … size − 1.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in rank order; every rank gets the result.
    ///
    /// Errors: [`Error::Shape`] when the ranks' lengths differ; the transport's errors.
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// As [`Comm::allreduce_sum_f64`], in f32.
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
}

/// One rank: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Comm for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn allreduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn allreduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// The buffers the ranks of a [`ThreadGroup`] deposit for one collective.
#[derive(Debug, Default)]
struct Slots {
    f64s: Vec<Vec<f64>>,
    f32s: Vec<Vec<f32>>,
}

/// Ranks as threads of one process: rank r of [`ThreadGroup::new`]'s result is used by
/// one thread; a collective waits until every rank has deposited its buffer, then each
/// rank adds them up in rank order.
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    size: usize,
    slots: Arc<Mutex<Slots>>,
    barrier: Arc<Barrier>,
}

impl ThreadGroup {
    /// The `size` ranks of one group (hand one to each thread).
    ///
    /// Errors: [`Error::Config`] for `size` = 0.
    pub fn new(size: usize) -> Result<Vec<ThreadGroup>> {
        if size == 0 {
            return Err(Error::Config("a group needs at least one rank".into()));
        }
        let slots = Arc::new(Mutex::new(Slots {
            f64s: vec![Vec::new(); size],
            f32s: vec![Vec::new(); size],
        }));
        let barrier = Arc::new(Barrier::new(size));
        Ok((0..size)
            .map(|rank| ThreadGroup {
                rank,
                size,
                slots: slots.clone(),
                barrier: barrier.clone(),
            })
            .collect())
    }

    /// Deposits `buf`, waits for every rank, sums all deposits in rank order into `buf`,
    /// and waits again (so no deposit is replaced before every rank has read it).
    fn allreduce<T: Copy + std::ops::AddAssign + Default>(
        &self,
        buf: &mut [T],
        pick: impl Fn(&mut Slots) -> &mut Vec<Vec<T>>,
    ) -> Result<()> {
        let lock = || self.slots.lock().unwrap_or_else(|p| p.into_inner());
        pick(&mut lock())[self.rank] = buf.to_vec();
        self.barrier.wait();
        let result = {
            let mut slots = lock();
            let all = pick(&mut slots);
            if let Some(other) = all.iter().find(|v| v.len() != buf.len()) {
                Err(Error::Shape {
                    what: "allreduce buffer".into(),
                    expected: format!("{} values on every rank", buf.len()),
                    found: format!("{} on another rank", other.len()),
                })
            } else {
                let mut sum = vec![T::default(); buf.len()];
                for v in all.iter() {
                    for (s, &x) in sum.iter_mut().zip(v) {
                        *s += x;
                    }
                }
                buf.copy_from_slice(&sum);
                Ok(())
            }
        };
        self.barrier.wait();
        result
    }
}

impl Comm for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.allreduce(buf, |s| &mut s.f64s)
    }
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.allreduce(buf, |s| &mut s.f32s)
    }
}

/// The members rank `rank` of `ranks` holds of a global ensemble of `members`: a
/// contiguous range, the first `members mod ranks` ranks one more than the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Global ensemble size J.
    pub members: usize,
    /// First global member index of this rank.
    pub first: usize,
    /// Members of this rank, J_r.
    pub count: usize,
}

impl Shard {
    /// Rank `rank`'s share of `members` over `ranks` ranks.
    ///
    /// Errors: [`Error::Config`] when there are fewer members than ranks or `rank` is
    /// not below `ranks`.
    pub fn of(members: usize, rank: usize, ranks: usize) -> Result<Shard> {
        if ranks == 0 || rank >= ranks || members < ranks {
            return Err(Error::Config(format!(
                "{members} members cannot be shared by {ranks} ranks as rank {rank}: every \
                 rank needs at least one member"
            )));
        }
        let (base, extra) = (members / ranks, members % ranks);
        let count = base + usize::from(rank < extra);
        let first = rank * base + rank.min(extra);
        Ok(Shard {
            members,
            first,
            count,
        })
    }

    /// The global member indices of this shard.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.count
    }
}

/// The launchers' variables that give the number of ranks, in the order they are read.
const RANK_COUNT_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_SIZE",
    "SLURM_STEP_NUM_TASKS",
];

/// The number of ranks a launcher (OpenMPI's or MPICH's `mpirun`, Slurm's `srun`)
/// started this process among, with the variable that says so; `None` when no launcher
/// variable is set (started on its own).
pub fn launched_ranks() -> Option<(usize, &'static str)> {
    RANK_COUNT_VARS.iter().find_map(|&var| {
        let n = std::env::var(var).ok()?.trim().parse::<usize>().ok()?;
        Some((n, var))
    })
}

/// Variables in which launchers give a rank's index among the ranks on its node: Open
/// MPI, MPICH / Intel MPI, MVAPICH2, Slurm's `srun`, in that order.
pub const LOCAL_RANK_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID",
];

/// This process's index among the ranks on its node, from the first of
/// [`LOCAL_RANK_VARS`] that `lookup` (e.g. `std::env::var(..).ok()`) holds as a number;
/// `None` when none does.
pub fn local_rank_from(lookup: impl Fn(&str) -> Option<String>) -> Option<usize> {
    LOCAL_RANK_VARS
        .iter()
        .find_map(|&var| lookup(var)?.trim().parse::<usize>().ok())
}

/// This process's node-local rank as its launcher set it ([`local_rank_from`] on the
/// environment).
pub fn local_rank() -> Option<usize> {
    local_rank_from(|v| std::env::var(v).ok())
}

/// The CUDA device a rank uses, one GPU per rank: its node-local rank (else its global
/// rank, when no launcher says) modulo the `devices` it sees. More ranks on a node than
/// GPUs share them in turn; a launcher that gives each rank one device through
/// `CUDA_VISIBLE_DEVICES` makes `devices` 1 and every rank device 0.
pub fn rank_device(local: Option<usize>, rank: usize, devices: usize) -> usize {
    local.unwrap_or(rank) % devices.max(1)
}

/// The ranks this process trains with: itself alone, or (`--features mpi`) the MPI world
/// its launcher started it in.
pub enum World {
    /// One process.
    Solo,
    /// The MPI world (more than one rank).
    #[cfg(feature = "mpi")]
    Mpi(mpi_comm::MpiComm),
}

impl World {
    /// The communicator of the world.
    pub fn comm(&self) -> &dyn Comm {
        match self {
            World::Solo => &Solo,
            #[cfg(feature = "mpi")]
            World::Mpi(c) => c,
        }
    }

    /// Stops every rank of a multi-rank world with `code` (after a failure on this rank
    /// the others could wait in a collective for ever); returns on one process.
    pub fn abort(&self, code: i32) {
        match self {
            World::Solo => {
                let _ = code;
            }
            #[cfg(feature = "mpi")]
            World::Mpi(c) => c.abort(code),
        }
    }
}

/// The world of this process ([`launched_ranks`]): one process when no launcher started
/// it or it started one rank; else MPI.
///
/// Errors: [`Error::Config`] when a launcher started several ranks but the binary was
/// built without MPI (each rank would otherwise train its own copy of the ensemble); MPI
/// initialisation errors.
pub fn world() -> Result<World> {
    match launched_ranks() {
        None | Some((1, _)) => Ok(World::Solo),
        #[cfg(feature = "mpi")]
        Some(_) => Ok(World::Mpi(mpi_comm::MpiComm::init()?)),
        #[cfg(not(feature = "mpi"))]
        Some((n, var)) => Err(Error::Config(format!(
            "this process is one of {n} ranks ({var} = {n}), but this binary was built \
             without MPI, so each rank would train its own copy of the ensemble: build with \
             `cargo build --release --features mpi` (OpenMPI: Debian libopenmpi-dev \
             openmpi-bin libclang-dev), or start one process"
        ))),
    }
}

/// MPI ranks (`--features mpi`).
#[cfg(feature = "mpi")]
pub mod mpi_comm {
    use super::Comm;
    use crate::{Error, Result};
    use mpi::collective::SystemOperation;
    use mpi::traits::{Communicator, CommunicatorCollectives};

    /// The world communicator of this MPI process; MPI is finalised when it is dropped.
    pub struct MpiComm {
        world: mpi::topology::SimpleCommunicator,
        _universe: mpi::environment::Universe,
    }

    impl MpiComm {
        /// Initialises MPI (once per process) and takes its world.
        ///
        /// Errors: [`Error::Config`] when MPI was initialised already in this process.
        pub fn init() -> Result<MpiComm> {
            let universe = mpi::initialize().ok_or_else(|| {
                Error::Config("MPI is initialised already in this process".into())
            })?;
            Ok(MpiComm {
                world: universe.world(),
                _universe: universe,
            })
        }

        /// Every rank's buffer length must be the same: checked with one small
        /// reduction (max of len and of −len), so a mismatch is an error on every rank
        /// instead of undefined behaviour inside MPI.
        fn check_len(&self, len: usize) -> Result<()> {
            let l = len as i64;
            let mine = [l, -l];
            let mut ext = [0i64; 2];
            self.world
                .all_reduce_into(&mine[..], &mut ext[..], SystemOperation::max());
            if ext[0] != l || ext[1] != -l {
                return Err(Error::Shape {
                    what: "allreduce buffer".into(),
                    expected: format!("{len} values on every rank"),
                    found: format!("lengths {} … {} across the ranks", -ext[1], ext[0]),
                });
            }
            Ok(())
        }
    }

    impl MpiComm {
        /// Ends every rank of the world with `code` (`MPI_Abort`).
        pub fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }

    impl Comm for MpiComm {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            self.check_len(buf.len())?;
            let local = buf.to_vec();
            self.world
                .all_reduce_into(&local[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            self.check_len(buf.len())?;
            let local = buf.to_vec();
            self.world
                .all_reduce_into(&local[..], buf, SystemOperation::sum());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_rank_comes_from_the_first_launcher_variable_that_holds_a_number() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(local_rank_from(env(&[])), None);
        assert_eq!(local_rank_from(env(&[("SLURM_LOCALID", "3")])), Some(3));
        // Open MPI's variable comes first; one that is not a number is passed over.
        let both = env(&[
            ("SLURM_LOCALID", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", " 1 "),
        ]);
        assert_eq!(local_rank_from(both), Some(1));
        let bad = env(&[
            ("OMPI_COMM_WORLD_LOCAL_RANK", "x"),
            ("MPI_LOCALRANKID", "2"),
        ]);
        assert_eq!(local_rank_from(bad), Some(2));
    }

    #[test]
    fn each_rank_takes_its_local_device_and_ranks_beyond_the_gpus_share_them() {
        // Four ranks per node on a 4-GPU node: one device each, on every node.
        let devices: Vec<usize> = (0..8).map(|r| rank_device(Some(r % 4), r, 4)).collect();
        assert_eq!(devices, [0, 1, 2, 3, 0, 1, 2, 3]);
        // No launcher variable: the global rank decides.
        assert_eq!(rank_device(None, 5, 4), 1);
        // One visible device per rank (CUDA_VISIBLE_DEVICES set by the launcher).
        assert_eq!(rank_device(Some(3), 3, 1), 0);
        // More local ranks than GPUs share them in turn.
        assert_eq!(rank_device(Some(5), 5, 2), 1);
    }

    #[test]
    fn shards_tile_the_ensemble_in_order() {
        for (members, ranks) in [(10, 3), (9, 3), (5, 5), (1000, 7)] {
            let mut next = 0;
            for r in 0..ranks {
                let s = Shard::of(members, r, ranks).unwrap();
                assert_eq!(s.first, next);
                assert!(s.count == members / ranks || s.count == members / ranks + 1);
                next = s.range().end;
            }
            assert_eq!(next, members);
        }
        assert!(Shard::of(2, 0, 3).is_err());
        assert!(Shard::of(9, 3, 3).is_err());
    }

    /// Sums in rank order on every rank, repeatably; unequal lengths are an error on
    /// every rank (none hangs).
    #[test]
    fn thread_group_sums_in_rank_order() {
        let ranks = ThreadGroup::new(3).unwrap();
        let out: Vec<(Vec<f64>, Vec<f32>, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f64;
                        let mut a = vec![r, 1e16, -1e16 * (r - 1.0)];
                        g.allreduce_sum_f64(&mut a).unwrap();
                        let mut b = vec![g.rank() as f32 + 0.5; 2];
                        g.allreduce_sum_f32(&mut b).unwrap();
                        let mut bad = vec![0.0f64; 1 + g.rank()];
                        let failed = g.allreduce_sum_f64(&mut bad).is_err();
                        (a, b, failed)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Rank order: ((0 + 1) + 2); (1e16 + 1e16) + 1e16; (1e16 + 0) + −1e16.
        let want = vec![3.0, 3e16, 0.0];
        for (a, b, failed) in out {
            assert_eq!(a, want);
            assert_eq!(b, vec![4.5f32, 4.5]);
            assert!(failed, "unequal lengths must fail");
        }
    }
}
