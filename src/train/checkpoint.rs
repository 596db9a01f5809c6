//! Checkpoints: the full state of an EnKF run in one file, written atomically.
//!
//! Layout of `checkpoint.bin`: the 8-byte magic `ENKFCKP1`, the JSON length (u64 LE),
//! the JSON [`CheckpointState`], the ensemble (members × params f32 LE), and a CRC-32 of
//! everything before it (u32 LE). It is written to `checkpoint.bin.tmp`, fsynced, and
//! renamed over `checkpoint.bin`, so a crash leaves either the old or the new file.

use super::adaptive::AdaptiveLogRow;
use super::config::TrainConfig;
use super::metrics::MetricsRow;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
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
    /// The run's configuration.
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
}

/// Path of the checkpoint in an output folder.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Writes the checkpoint atomically.
pub fn write(path: &Path, state: &CheckpointState, ensemble: &[f32]) -> Result<()> {
    if ensemble.len() != state.members * state.params {
        return Err(Error::Checkpoint {
            path: path.into(),
            msg: format!(
                "ensemble has {} values, expected {} × {}",
                ensemble.len(),
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
    let tmp = path.with_extension("bin.tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(&buf).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
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
    let jlen = u64::from_le_bytes(len8) as usize;
    let json = buf
        .get(16..16 + jlen)
        .ok_or_else(|| bad("header length exceeds the file".into()))?;
    let state: CheckpointState =
        serde_json::from_slice(json).map_err(|e| bad(format!("unreadable state: {e}")))?;
    let data = &buf[16 + jlen..body];
    if data.len() != 4 * state.members * state.params {
        return Err(bad(format!(
            "ensemble holds {} bytes, expected {} members × {} weights × 4",
            data.len(),
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
