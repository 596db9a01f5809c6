//! An EnKF run sharded over ranks (`mpirun -np N enkf-dnn train`, issue 14).
//!
//! Rank r holds the members [`Shard::of`]`(J, r, N)` of the global ensemble of J =
//! `members`: their rows of U, their forward pass and their part of the update
//! ([`crate::enkf::dist::ShardedWorkspace`]: the sums of the update exchanged over the
//! [`Comm`]). Member j's initial weights depend only on (seed, j)
//! ([`crate::enkf::dist::init_shard`]), so runs on 1, 2 or 3 ranks start from the same
//! ensemble and differ only by the order of floating-point sums. The ensemble mean
//! (mini-batch scores, test evaluation, `mean.npy`) is one more sum over the ranks, as
//! are `eval = last` (the last rank's last row) and `eval = ensemble` (each rank's
//! members' averaged predictions);
//! every rank evaluates, so the metrics rows are the same on every rank, and rank 0
//! writes them.
//!
//! Failed members are found by every rank (their flags summed before the update) and
//! redrawn, or stop the run, on every rank alike; Algorithm 1's dropped and added
//! members are the one-process run's, with the shards rebalanced to the new J
//! ([`crate::enkf::dist_resize`]). A stop signal on any rank is summed the same way after
//! each iteration, so every rank checkpoints at the same iteration and stops.
//!
//! Checkpoints: every rank writes its rows to its own shard file (temp + fsync +
//! rename, named by rank, rank count and iteration), the ranks sum the files' CRCs, and
//! rank 0 then writes `checkpoint.bin` as a manifest (the run's state and one
//! [`ShardEntry`] per rank, no ensemble); only after that does each rank delete its older
//! shard files, so a crash at any point leaves a complete checkpoint. A resume needs the
//! same rank count; a missing shard, or one whose CRC or rows do not match the manifest,
//! is an error naming the file.
//!
//! Nesterov momentum acts on each member's rows alone; its previous ensemble travels in
//! the shard files as a second block. The transform update (ETKI) needs only the sums the
//! other rules exchange ([`crate::enkf::dist`]). Additive inflation draws member j's noise
//! by its global index (`Backend::add_normal_f32`'s offset), so a rank's rows get the
//! one-process run's draws; its "spread" scale is the standard deviation over every
//! rank's members ([`crate::enkf::dist::sharded_std`]).
//!
//! The data-misfit step takes every member's misfit (a sum over the ranks of each one's
//! rows), so every rank takes the one-process step; a fixed `dt` scales γ as there.
//!
//! `--init-ensemble`: each rank reads only its rows of the file; `--save-ensemble`: each
//! rank writes its rows into one file that rank 0 made and renames
//! ([`save_sharded_ensemble`]).
//!
//! Not sharded yet (refused by [`check_config`] with the setting named): the Tikhonov
//! update (its member-space system needs E Eᵀ over every pair of members) and
//! `apply_order = members` (S = I + XAᵀ/J needs every rank's A; ranks apply in
//! parameter order, which `auto` and `params` are).

use super::checkpoint::{self, ShardEntry};
use super::{rng, TrainConfig, Trainer, STREAM_INIT};
use crate::backend::Backend;
use crate::data::DataSplit;
use crate::dist::{Comm, Shard};
use crate::{Error, Result};
use std::path::Path;
use std::time::Instant;

/// The ranks of a sharded run as one rank sees them.
#[derive(Clone, Copy)]
pub struct Ranks<'a> {
    /// The group the run is sharded over.
    pub comm: &'a dyn Comm,
    /// This rank's members.
    pub shard: Shard,
}

/// Refuses, naming the setting, what a run sharded over `ranks` ranks does not do yet
/// (module docs), and a J that cannot give every rank a member.
///
/// Errors: [`Error::Config`].
pub fn check_config(cfg: &TrainConfig, ranks: usize) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::Config(format!(
            "{what} is not built for a run sharded over ranks yet (this run has {ranks}); \
             run it in one process"
        )))
    };
    if cfg.optimizer != crate::train::optim::Optimizer::Enkf {
        return refuse(&format!("optimizer = {:?}", cfg.optimizer).to_lowercase());
    }
    if cfg.members < ranks {
        return Err(Error::Config(format!(
            "members = {} cannot be shared by {ranks} ranks: every rank needs at least one",
            cfg.members
        )));
    }
    if cfg.tikhonov > 0.0 {
        return refuse(&format!("tikhonov = {}", cfg.tikhonov));
    }
    if cfg.apply_order == crate::enkf::ApplyOrder::Members {
        // The member-space S = I + XAᵀ/J would need every rank's A (enkf module docs).
        return refuse("apply_order = members");
    }
    Ok(())
}

/// Rows `shard.range()` of the `--init-ensemble` file, which must hold J × P.
fn read_init_rows(path: &Path, shard: Shard, params: usize) -> Result<Vec<f32>> {
    let (shape, rows) = crate::io::npy::read_rows_f32(path, shard.range(), params)?;
    if shape != [shard.members, params] {
        return Err(Error::Shape {
            what: format!("initial ensemble {}", path.display()),
            expected: format!(
                "[{}, {params}] (members × weights of this network)",
                shard.members
            ),
            found: format!("{shape:?}"),
        });
    }
    Ok(rows)
}

/// Writes the whole sharded ensemble (J × P, float32) to `path` as `--save-ensemble`
/// does in one process: rank 0 makes the file, every rank writes its rows in place, and
/// rank 0 renames it over `path` once all have (each step agreed over the ranks, so a
/// failure on one stops all and leaves `path` as it was). The folder must be shared by
/// the ranks, as the checkpoints' is. A collective: every rank calls it.
///
/// Errors: I/O naming the file, on every rank when one failed.
pub fn save_sharded_ensemble(
    comm: &dyn Comm,
    shard: Shard,
    rows: &[f32],
    params: usize,
    path: &Path,
) -> Result<()> {
    let shape = [shard.members, params];
    let agree = |local: Result<()>, step: &str| -> Result<()> {
        let failed = any_rank(comm, local.is_err())?;
        match local {
            Ok(()) if failed => Err(Error::Config(format!(
                "--save-ensemble {}: another rank failed to {step} (see its error)",
                path.display()
            ))),
            other => other,
        }
    };
    let begun = match comm.rank() {
        0 => crate::io::npy::shared_begin(path, shape),
        _ => Ok(()),
    };
    agree(begun, "create the file")?;
    let written = crate::io::npy::shared_write_rows(path, shape, shard.first, rows);
    if let Err(e) = agree(written, "write its rows") {
        if comm.rank() == 0 {
            let _ = crate::io::npy::shared_finish(path, false);
        }
        return Err(e);
    }
    let done = match comm.rank() {
        0 => crate::io::npy::shared_finish(path, true),
        _ => Ok(()),
    };
    agree(done, "rename the file")
}

/// The sum over the ranks of one flag per rank: whether any rank raised it.
///
/// Errors: the transport's.
pub fn any_rank(comm: &dyn Comm, flag: bool) -> Result<bool> {
    let mut v = [f64::from(u8::from(flag))];
    comm.allreduce_sum_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// This rank's part of a fresh run of `cfg` sharded over `comm` (module docs).
    ///
    /// Errors: as [`check_config`] and [`Trainer::new`].
    pub fn new_on_ranks(
        backend: &'a B,
        cfg: &TrainConfig,
        data: &'a DataSplit,
        comm: &'a dyn Comm,
    ) -> Result<Self> {
        cfg.validate()?;
        check_config(cfg, comm.size())?;
        let shard = Shard::of(cfg.members, comm.rank(), comm.size())?;
        let net = cfg.net();
        let params = net.n_params();
        let rows = match &cfg.init_ensemble {
            // This rank's rows of the file (every rank reads its own; they agree).
            Some(path) => {
                let local = read_init_rows(path, shard, params);
                let failed = any_rank(comm, local.is_err())?;
                match local {
                    Ok(_) if failed => {
                        return Err(Error::Config(format!(
                            "another rank could not read --init-ensemble {} (see its error)",
                            path.display()
                        )))
                    }
                    other => other?,
                }
            }
            None => {
                let mut rows = crate::enkf::dist::init_shard(
                    &mut rng(cfg.seed, STREAM_INIT),
                    shard,
                    params,
                    cfg.sigma,
                );
                if cfg.bias_init == super::BiasInit::Zero {
                    net.zero_biases(&mut rows);
                }
                rows
            }
        };
        let mut t = Self::build(backend, cfg, data, &rows, shard.count)?;
        t.ranks = Some(Ranks { comm, shard });
        t.order = (0..data.train.len()).collect();
        if cfg.order == super::BatchOrder::Shuffle {
            use rand::seq::SliceRandom;
            t.order.shuffle(&mut t.shuffle_rng);
        }
        Ok(t)
    }

    /// This rank's part of the sharded run whose manifest is `path` (`checkpoint.bin`),
    /// on the same number of ranks that wrote it. Every rank checks and reads its own
    /// shard; the ranks then agree, so one missing file stops all of them.
    ///
    /// Errors: [`Error::Checkpoint`] for a manifest of another rank count or of a
    /// one-process run, and naming a missing or mismatched shard; as [`Trainer::resume`].
    pub fn resume_on_ranks(
        backend: &'a B,
        cfg: &TrainConfig,
        data: &'a DataSplit,
        path: &Path,
        comm: &'a dyn Comm,
    ) -> Result<Self> {
        let local = Self::resume_rank(backend, cfg, data, path, comm);
        let failed = any_rank(comm, local.is_err())?;
        match local {
            Ok(_) if failed => Err(Error::Checkpoint {
                path: path.into(),
                msg: "another rank could not resume (see its error)".into(),
            }),
            other => other,
        }
    }

    fn resume_rank(
        backend: &'a B,
        cfg: &TrainConfig,
        data: &'a DataSplit,
        path: &Path,
        comm: &'a dyn Comm,
    ) -> Result<Self> {
        cfg.validate()?;
        check_config(cfg, comm.size())?;
        let bad = |msg: String| Error::Checkpoint {
            path: path.into(),
            msg,
        };
        let (state, _) = checkpoint::read(path)?;
        super::resume::check_resume_config(&state.config, cfg).map_err(|e| bad(e.to_string()))?;
        let Some(shards) = &state.shards else {
            return Err(bad(format!(
                "it is a one-process run's checkpoint; resume it without mpirun (this run \
                 has {} ranks)",
                comm.size()
            )));
        };
        if shards.len() != comm.size() {
            return Err(bad(format!(
                "it was written by {} ranks, this run has {}: resume on {} ranks",
                shards.len(),
                comm.size(),
                shards.len()
            )));
        }
        let params = cfg.net().n_params();
        if state.params != params || state.order.len() != data.train.len() {
            return Err(bad(format!(
                "it holds networks of P = {} trained on {} images; this run has P = {params} \
                 and {} images",
                state.params,
                state.order.len(),
                data.train.len()
            )));
        }
        let shard = Shard::of(state.members, comm.rank(), comm.size())?;
        let entry = &shards[comm.rank()];
        if (entry.first, entry.count) != (shard.first, shard.count) {
            return Err(bad(format!(
                "its entry for rank {} holds members {}.. ({}), the shard of J = {} is {}.. ({})",
                comm.rank(),
                entry.first,
                entry.count,
                state.members,
                shard.first,
                shard.count
            )));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let blocks = 1 + usize::from(state.nesterov_theta.is_some());
        let rows = checkpoint::read_shard(dir, entry, params, blocks)?;
        let (members, momentum) = rows.split_at(shard.count * params);
        let mut t = Self::build(backend, cfg, data, members, shard.count)?;
        t.ranks = Some(Ranks { comm, shard });
        t.restore(cfg, path, state, momentum)
    }

    /// Whether any rank was asked to stop (one sum per iteration on a sharded run).
    pub(super) fn agree_interrupt(&self, local: bool) -> Result<bool> {
        match self.ranks {
            None => Ok(local),
            Some(r) => any_rank(r.comm, local),
        }
    }

    /// The sharded checkpoint (module docs): shards, then rank 0's manifest, then the
    /// older shards removed. A failure on any rank is an error on every rank.
    pub(super) fn save_sharded_checkpoint(&mut self) -> Result<()> {
        let Some(r) = self.ranks else {
            return Err(Error::Config("internal: no ranks to checkpoint".into()));
        };
        let (comm, rank, size) = (r.comm, r.comm.rank(), r.comm.size());
        let dir = self
            .cfg
            .out
            .clone()
            .ok_or_else(|| Error::Config("checkpoints need an output folder (--out)".into()))?;
        let t0 = Instant::now();
        if let Some(sink) = &self.stats {
            sink.sync()?;
        }
        let name = checkpoint::shard_file_name(rank, size, self.t);
        let be = self.backend;
        let written = be.download_f32(&self.u).and_then(|mut rows| {
            if let Some(m) = &self.momentum {
                rows.extend(be.download_f32(&m.prev)?);
            }
            let blocks = 1 + usize::from(self.momentum.is_some());
            let dims = (r.shard.count, self.params, blocks);
            checkpoint::write_shard(&dir.join(&name), r.shard.first, dims, &rows)
        });
        // The CRCs travel as exact f64 (u32), each rank's in its own slot.
        let mut crcs = vec![0.0f64; size];
        if let Ok(crc) = &written {
            crcs[rank] = f64::from(*crc);
        }
        let failed = any_rank(comm, written.is_err())?;
        comm.allreduce_sum_f64(&mut crcs)?;
        match written {
            Err(e) => return Err(e),
            Ok(_) if failed => {
                return Err(Error::Config(
                    "another rank could not write its checkpoint shard (see its error)".into(),
                ))
            }
            Ok(_) => {}
        }
        let manifest = if rank == 0 {
            let mut state = self.checkpoint_state();
            let shards = (0..size)
                .map(|q| {
                    let s = Shard::of(r.shard.members, q, size)?;
                    Ok(ShardEntry {
                        file: checkpoint::shard_file_name(q, size, self.t),
                        first: s.first,
                        count: s.count,
                        crc: crcs[q] as u32,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            state.shards = Some(shards);
            checkpoint::write(&checkpoint::path_in(&dir), &state, &[])
        } else {
            Ok(())
        };
        let failed = any_rank(comm, manifest.is_err())?;
        manifest?;
        if failed {
            return Err(Error::Config(
                "rank 0 could not write the checkpoint manifest (see its error)".into(),
            ));
        }
        remove_older_shards(&dir, rank, size, &name);
        self.times.other += t0.elapsed().as_secs_f64();
        Ok(())
    }
}

/// Deletes this rank's shard files in `dir` other than `keep` (those of earlier
/// checkpoints, no longer named by the manifest). Best effort: a file left behind is
/// only disk space.
fn remove_older_shards(dir: &Path, rank: usize, ranks: usize, keep: &str) {
    let prefix = format!("checkpoint.rank{rank}-of-{ranks}.it");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".bin") && name != keep {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
