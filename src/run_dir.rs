//! The output folder of a run, guarded: one run at a time (an advisory lock held for the
//! life of the run), no earlier run overwritten unless the user says so, and every output
//! path checked writable before any work starts.
//!
//! The lock is `flock(2)` on `DIR/.enkf-dnn.lock` (through `File::try_lock`), so the
//! kernel releases it when the process ends in any way, a `kill -9` included: a stale lock
//! file never blocks a later run. The file holds the owner's process id, which a refused
//! second run names. It is left in place when the run ends (removing it would let a run
//! that opened it just before lock a file no later run can see).

use crate::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file inside an output folder.
pub const LOCK_FILE: &str = ".enkf-dnn.lock";

/// Files a run writes into its output folder: a folder holding any of them holds a run,
/// and `--overwrite` removes exactly these (nothing else in the folder is touched).
pub const RUN_FILES: &[&str] = &[
    "config.json",
    "metrics.csv",
    "stats.csv",
    "hist.csv",
    "adaptive.csv",
    "mean.npy",
    "model.safetensors",
    "checkpoint.bin",
    "checkpoint.bin.tmp",
    "model.safetensors.tmp",
    "mean.npy.tmp",
];

/// What to do with an output folder that already holds a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse it (the default: nothing is lost by a reused `--out`).
    Refuse,
    /// Remove the earlier run's files first (`--overwrite`).
    Overwrite,
    /// Continue the run in it (`--resume`).
    Resume,
}

/// An output folder locked for this process; unlocked when dropped or when the process
/// ends.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    lock: File,
}

impl RunDir {
    /// Creates `dir` if needed, locks it, applies `existing` to an earlier run in it, and
    /// checks that files can be written there.
    ///
    /// Errors: [`Error::Config`] when another process holds the folder (naming its
    /// process id) or when the folder holds a run and `existing` is [`Existing::Refuse`];
    /// [`Error::Io`] naming the path when the folder cannot be created, locked, cleared
    /// or written.
    pub fn open(dir: &Path, existing: Existing) -> Result<RunDir> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Config(format!(
                "output folder {}: exists and is not a folder",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = lock.read_to_string(&mut owner);
                let owner = owner.trim();
                return Err(Error::Config(format!(
                    "output folder {} is in use by another enkf-dnn run (process {}); wait \
                     for it to end, or choose another --out",
                    dir.display(),
                    if owner.is_empty() { "unknown" } else { owner }
                )));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        lock.set_len(0)
            .and_then(|()| lock.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(lock, "{}", std::process::id()))
            .and_then(|()| lock.flush())
            .map_err(|e| Error::io(&lock_path, e))?;
        let present = run_files_in(dir);
        match existing {
            Existing::Refuse if !present.is_empty() => {
                return Err(Error::Config(format!(
                    "output folder {} already holds a run ({}): continue it with --resume {0}, \
                     replace it with --overwrite, or choose another --out",
                    dir.display(),
                    present.join(", ")
                )));
            }
            Existing::Overwrite => {
                for name in &present {
                    let p = dir.join(name);
                    std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
            _ => {}
        }
        check_dir_writable(dir)?;
        Ok(RunDir {
            path: dir.to_path_buf(),
            lock,
        })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    /// Releases the lock explicitly. Closing our descriptor alone is not enough: a child
    /// process forked by another thread (between its `fork` and `exec`) shares the open
    /// file description, and an `flock` lock lives until every copy is closed. Unlocking
    /// releases it for all of them at once.
    fn drop(&mut self) {
        let _ = self.lock.unlock();
    }
}

/// The names of [`RUN_FILES`] present in `dir`.
pub fn run_files_in(dir: &Path) -> Vec<&'static str> {
    RUN_FILES
        .iter()
        .copied()
        .filter(|f| dir.join(f).exists())
        .collect()
}

/// Checks that a file can be created in the folder `dir` (creates and removes a probe).
///
/// Errors: [`Error::Io`] naming the folder.
pub fn check_dir_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".enkf-dnn-write-probe-{}", std::process::id()));
    let written = File::create(&probe).and_then(|mut f| f.write_all(b"probe"));
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| Error::io(dir, e))
}

/// Checks, before any work, that an output file such as `--save-ensemble FILE` can be
/// written: it is not a folder, its folder exists and accepts files, and an existing
/// file can be opened for writing (it is not truncated here).
///
/// Errors: [`Error::Config`] naming `what` and the path when it is a folder or its
/// folder is missing; [`Error::Io`] naming the path when it cannot be written.
pub fn check_output_file(what: &str, path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::Config(format!(
            "{what} {}: is a folder, not a file",
            path.display()
        )));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::Config(format!(
            "{what} {}: the folder {} does not exist",
            path.display(),
            parent.display()
        )));
    }
    if path.exists() {
        OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
    }
    check_dir_writable(parent).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(path, source),
        other => other,
    })
}
