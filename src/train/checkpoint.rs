//! Checkpoints: the full state of an EnKF run in one file, written atomically.
//!
//! Layout of `checkpoint.bin`: the 8-byte magic `ENKFCKP1`, the JSON length (u64 LE),
//! the JSON [`CheckpointState`], the ensemble (members × params f32 LE; under Nesterov
//! momentum followed by the previous ensemble, [`CheckpointState::blocks`]), and a CRC-32 of
//! everything before it (u32 LE). It is written to `checkpoint.bin.tmp`, fsynced, and
//! renamed over `checkpoint.bin`, so a crash leaves either the old or the new file; a
//! failed write (a full disk) removes the `.tmp` and reports the OS error with the file.
//!
//! Output files on resume. `metrics.csv` and `adaptive.csv` are rewritten whole from the
//! rows stored in the checkpoint (`crate::app`), which are the run's in-memory rows from
//! then on. `stats.csv` and `hist.csv` (the statistics worker's) are appended to; a
//! process killed after the checkpoint at iteration c has already written rows past c
//! (possibly a torn last line), so [`rewind_outputs`] cuts them back to c first. The
//! rows up to c are on disk: the trainer waits for the worker to write and sync them
//! before it writes a checkpoint (`StatsSink::sync`).

use super::adaptive::AdaptiveLogRow;
use super::config::TrainConfig;
use super::metrics::MetricsRow;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"ENKFCKP1";

/// File name of the checkpoint inside the output folder.
pub const FILE_NAME: &str = "checkpoint.bin";

/// A ChaCha stream position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Stream id.
    pub stream: u64,
    /// Word position, as a decimal string (u128 does not survive JSON numbers).
    pub word_pos: String,
}

/// Everything but the ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The run's configuration (its network built for the run's data when read back).
    #[serde(deserialize_with = "super::config::deserialize_stored")]
    pub config: TrainConfig,
    /// Weights per member (identifies the network).
    pub params: usize,
    /// Current ensemble size.
    pub members: usize,
    /// Current repetitions r.
    pub repetitions: usize,
    /// Updates done.
    pub t: usize,
    /// Index of the current mini-batch counted over all epochs.
    pub batch_global: usize,
    /// Repetitions already done on the current mini-batch.
    pub rep: usize,
    /// The current epoch's image order.
    pub order: Vec<usize>,
    /// Shuffling stream.
    pub shuffle_rng: RngState,
    /// Stream of the adaptive resizing.
    pub adapt_rng: RngState,
    /// Stream of failed-member resampling.
    pub resample_rng: RngState,
    /// Test error at the previous adaptive comparison.
    pub adapt_prev: Option<f64>,
    /// Metrics rows so far.
    pub rows: Vec<MetricsRow>,
    /// Adaptive changes so far.
    pub adaptive_log: Vec<AdaptiveLogRow>,
    /// Members resampled so far.
    pub resampled: usize,
    /// `step = dmc`: the algorithm time reached on the current mini-batch (absent in
    /// older checkpoints: 0).
    #[serde(default)]
    pub algorithm_time: f64,
    /// `accelerator = nesterov`: the schedule's θ; the file then holds a second
    /// members × params block after the ensemble, the un-accelerated members of the last
    /// update (absent in older checkpoints and without momentum).
    #[serde(default)]
    pub nesterov_theta: Option<f64>,
    /// A run sharded over ranks (`mpirun -np N`): the shard files that hold the
    /// ensemble, one per rank in rank order; this file (rank 0's manifest) then holds no
    /// ensemble. Absent for a one-process run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<Vec<ShardEntry>>,
}

/// One rank's part of a sharded checkpoint (see [`write_shard`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the output folder.
    pub file: String,
    /// First global member of the shard.
    pub first: usize,
    /// Members in the shard.
    pub count: usize,
    /// CRC-32 of the shard file's body (as stored at its end).
    pub crc: u32,
}

impl CheckpointState {
    /// Members × params blocks the file holds: the ensemble, and the momentum's previous
    /// ensemble when there is one; none in a sharded run's manifest.
    pub fn blocks(&self) -> usize {
        if self.shards.is_some() {
            return 0;
        }
        1 + usize::from(self.nesterov_theta.is_some())
    }
}

const SHARD_MAGIC: &[u8; 8] = b"ENKFSHD1";

/// The shard file name of `rank` of `ranks` at iteration `t` (the iteration in the name
/// keeps the previous checkpoint's shards intact until the new manifest is written).
pub fn shard_file_name(rank: usize, ranks: usize, t: usize) -> String {
    format!("checkpoint.rank{rank}-of-{ranks}.it{t}.bin")
}

/// Writes one rank's members atomically (temp + fsync + rename): the magic `ENKFSHD1`,
/// first member, count, params and blocks (u64 LE each), the rows (blocks × count ×
/// params f32 LE: the members, then under Nesterov momentum their previous rows, as
/// [`CheckpointState::blocks`]), and a CRC-32 of everything before it; returns that CRC
/// for the manifest.
///
/// Errors: [`Error::Checkpoint`] when `rows` is not blocks × count × params; [`Error::Io`].
pub fn write_shard(
    path: &Path,
    first: usize,
    (count, params, blocks): (usize, usize, usize),
    rows: &[f32],
) -> Result<u32> {
    if rows.len() != blocks * count * params {
        return Err(Error::Checkpoint {
            path: path.into(),
            msg: format!(
                "shard has {} values, expected {blocks} × {count} × {params}",
                rows.len()
            ),
        });
    }
    let mut buf = Vec::with_capacity(44 + 4 * rows.len());
    buf.extend_from_slice(SHARD_MAGIC);
    for v in [first, count, params, blocks] {
        buf.extend_from_slice(&(v as u64).to_le_bytes());
    }
    for v in rows {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let mut crc = flate2::Crc::new();
    crc.update(&buf);
    let sum = crc.sum();
    buf.extend_from_slice(&sum.to_le_bytes());
    crate::io::atomic_write(path, &buf)?;
    Ok(sum)
}

/// Reads the shard `entry` of a manifest from `dir` and checks it against the entry
/// (CRC, first member, count), `params` and `blocks`; returns its rows.
///
/// Errors: [`Error::Checkpoint`] naming the shard file when it is missing, corrupt or
/// does not match the manifest.
pub fn read_shard(
    dir: &Path,
    entry: &ShardEntry,
    params: usize,
    blocks: usize,
) -> Result<Vec<f32>> {
    let path = dir.join(&entry.file);
    let bad = |msg: String| Error::Checkpoint {
        path: path.clone(),
        msg,
    };
    let buf = std::fs::read(&path).map_err(|e| {
        bad(format!(
            "the shard named by the manifest cannot be read ({e}); every rank's shard file \
             must be in the folder"
        ))
    })?;
    if buf.len() < 44 || &buf[..8] != SHARD_MAGIC {
        return Err(bad(
            "not an enkf-dnn checkpoint shard (magic ENKFSHD1 missing)".into(),
        ));
    }
    let body = buf.len() - 4;
    let mut crc = flate2::Crc::new();
    crc.update(&buf[..body]);
    let stored = u32::from_le_bytes([buf[body], buf[body + 1], buf[body + 2], buf[body + 3]]);
    if crc.sum() != stored || stored != entry.crc {
        return Err(bad(format!(
            "checksum mismatch (manifest {:08x}, stored {stored:08x}, computed {:08x}): the \
             shard is truncated, corrupt or from another checkpoint",
            entry.crc,
            crc.sum()
        )));
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[8 + 8 * i..16 + 8 * i]);
        u64::from_le_bytes(b)
    };
    let (first, count, p, b) = (word(0), word(1), word(2), word(3));
    let want = (entry.first, entry.count, params, blocks);
    if (first, count, p, b) != (want.0 as u64, want.1 as u64, want.2 as u64, want.3 as u64)
        || (body - 40) as u64 != 4 * count * p * b
    {
        return Err(bad(format!(
            "it holds members {first}.. ({count} of P = {p}, {b} block(s), {} bytes), the \
             manifest says {}.. ({} of P = {params}, {blocks} block(s))",
            body - 40,
            entry.first,
            entry.count
        )));
    }
    Ok(buf[40..body]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Path of the checkpoint in an output folder.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Writes the checkpoint atomically.
pub fn write(path: &Path, state: &CheckpointState, ensemble: &[f32]) -> Result<()> {
    if ensemble.len() != state.members * state.params * state.blocks() {
        return Err(Error::Checkpoint {
            path: path.into(),
            msg: format!(
                "ensemble has {} values, expected {} × {} × {}",
                ensemble.len(),
                state.blocks(),
                state.members,
                state.params
            ),
        });
    }
    let json = serde_json::to_vec(state)?;
    let mut buf = Vec::with_capacity(20 + json.len() + 4 * ensemble.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(json.len() as u64).to_le_bytes());
    buf.extend_from_slice(&json);
    for v in ensemble {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let mut crc = flate2::Crc::new();
    crc.update(&buf);
    buf.extend_from_slice(&crc.sum().to_le_bytes());
    crate::io::atomic_write(path, &buf)?;
    if let Some(dir) = path.parent() {
        // Make the rename durable; not every file system supports syncing a directory.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads and verifies a checkpoint: magic, lengths, CRC, and the ensemble's shape.
pub fn read(path: &Path) -> Result<(CheckpointState, Vec<f32>)> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.into(),
        msg,
    };
    let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if buf.len() < 20 || &buf[..8] != MAGIC {
        return Err(bad(
            "not an enkf-dnn checkpoint (magic ENKFCKP1 missing)".into()
        ));
    }
    let body = buf.len() - 4;
    let mut crc = flate2::Crc::new();
    crc.update(&buf[..body]);
    let stored = u32::from_le_bytes([buf[body], buf[body + 1], buf[body + 2], buf[body + 3]]);
    if crc.sum() != stored {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:08x}, computed {:08x}): the file is truncated or corrupt",
            crc.sum()
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&buf[8..16]);
    let jlen = u64::from_le_bytes(len8);
    let json_end = usize::try_from(jlen)
        .ok()
        .and_then(|n| n.checked_add(16))
        .filter(|&end| end <= body)
        .ok_or_else(|| {
            bad(format!(
                "header length {jlen} exceeds the file ({} bytes)",
                buf.len()
            ))
        })?;
    let state: CheckpointState = serde_json::from_slice(&buf[16..json_end])
        .map_err(|e| bad(format!("unreadable state: {e}")))?;
    let data = &buf[json_end..body];
    let expected = state
        .members
        .checked_mul(state.params)
        .and_then(|n| n.checked_mul(4 * state.blocks()));
    if expected != Some(data.len()) {
        return Err(bad(format!(
            "ensemble holds {} bytes, expected {} block(s) of {} members × {} weights × 4",
            data.len(),
            state.blocks(),
            state.members,
            state.params
        )));
    }
    let ensemble = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((state, ensemble))
}

/// Output files, in the output folder, that a resumed run appends to.
pub const APPENDED_OUTPUTS: [&str; 2] = ["stats.csv", "hist.csv"];

/// Cuts each of [`APPENDED_OUTPUTS`] that exists in `dir` back to the rows of iterations
/// ≤ `last` (see [`truncate_csv_after`]); missing files are left for the writer to create.
///
/// Errors: as [`truncate_csv_after`].
pub fn rewind_outputs(dir: &Path, last: usize) -> Result<()> {
    for name in APPENDED_OUTPUTS {
        let path = dir.join(name);
        if path.is_file() {
            truncate_csv_after(&path, last)?;
        }
    }
    Ok(())
}

/// Truncates, in place, a CSV file whose first column is `iteration` (non-decreasing
/// down the file) to its header and the rows with iteration ≤ `last`, and syncs it.
/// Everything from the first row past `last` goes, as does an unterminated last line
/// (a row torn by a kill) and an unterminated header (the file is emptied; the writer
/// then writes a new header). Returns the number of bytes removed.
///
/// Errors: [`Error::Io`] when the file cannot be read or truncated, or (kind
/// `InvalidData`) when the header does not start with `iteration`, a row's first field
/// is not an integer, or iterations decrease: the file is not one this run wrote.
pub fn truncate_csv_after(path: &Path, last: usize) -> Result<u64> {
    let invalid = |msg: String| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{msg}; move the file away to resume (a new one is started)"),
            ),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    // Byte offset of the end of the last line kept.
    let mut keep = 0u64;
    let mut previous = 0usize;
    for number in 1.. {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let first = line.split(|&b| b == b',').next().unwrap_or_default();
        let first = String::from_utf8_lossy(first);
        let first = first.trim();
        if number == 1 {
            if first != "iteration" {
                return Err(invalid(format!(
                    "header starts with {first:?}, expected \"iteration\""
                )));
            }
        } else {
            let t: usize = first.parse().map_err(|_| {
                invalid(format!(
                    "line {number}: first field {first:?} is not an iteration number"
                ))
            })?;
            if t > last {
                break;
            }
            if t < previous {
                return Err(invalid(format!(
                    "line {number}: iteration {t} follows iteration {previous}"
                )));
            }
            previous = t;
        }
        keep += n as u64;
    }
    if keep < len {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        f.set_len(keep).map_err(|e| Error::io(path, e))?;
        f.sync_all().map_err(|e| Error::io(path, e))?;
    }
    Ok(len - keep)
}

impl RngState {
    /// Captures a ChaCha8 generator's position.
    pub fn of(rng: &rand_chacha::ChaCha8Rng) -> Self {
        RngState {
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// Re-creates the generator of `seed` at this position.
    pub fn restore(&self, seed: u64, path: &Path) -> Result<rand_chacha::ChaCha8Rng> {
        use rand::SeedableRng;
        let pos: u128 = self.word_pos.parse().map_err(|_| Error::Checkpoint {
            path: path.into(),
            msg: format!("bad generator position {}", self.word_pos),
        })?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("enkf-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    const HEAD: &str = "iteration,layer,mean\n";

    #[test]
    fn cuts_rows_past_the_checkpoint_and_torn_lines() {
        let kept = format!("{HEAD}0,1,0.5\n0,2,0.25\n5,1,0.5\n5,2,0.1\n");
        let path = scratch("rows.csv", &format!("{kept}6,1,0.5\n6,2,0.1\n7,1,0.3"));
        assert_eq!(truncate_csv_after(&path, 5).expect("cut"), 8 + 8 + 7);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), kept);
        // Idempotent; a cut at an iteration between rows keeps those before it.
        assert_eq!(truncate_csv_after(&path, 5).expect("again"), 0);
        truncate_csv_after(&path, 4).expect("cut");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{HEAD}0,1,0.5\n0,2,0.25\n")
        );
        // The rows of an earlier, duplicated resume go with the rest.
        let path = scratch(
            "dup.csv",
            &format!("{HEAD}0,1,1\n3,1,1\n4,1,1\n3,1,1\n4,1,1\n"),
        );
        truncate_csv_after(&path, 3).expect("cut");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{HEAD}0,1,1\n3,1,1\n")
        );
        // A torn header empties the file.
        let path = scratch("torn.csv", "iterat");
        truncate_csv_after(&path, 3).expect("cut");
        assert_eq!(std::fs::read(&path).expect("read").len(), 0);
    }

    #[test]
    fn foreign_files_are_refused_untouched() {
        for (name, text, why) in [
            ("head.csv", "step,mean\n0,1\n", "header starts with"),
            ("field.csv", "iteration,mean\n0,1\nx,2\n9,1\n", "line 3"),
            (
                "order.csv",
                "iteration,mean\n2,1\n1,2\n9,1\n",
                "follows iteration 2",
            ),
        ] {
            let path = scratch(name, text);
            let e = truncate_csv_after(&path, 5).expect_err(name).to_string();
            assert!(
                e.contains(why) && e.contains("move the file away"),
                "{name}: {e}"
            );
            assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
        }
    }
}
