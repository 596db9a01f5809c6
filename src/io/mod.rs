//! File formats (`.npy` arrays, `.safetensors` weights) and the atomic write they share.

pub mod npy;
pub mod safetensors;

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary file [`atomic_write`] writes before renaming: `PATH.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Writes `bytes` to `path` through [`tmp_path`] in the same folder: written, synced
/// and renamed over `path`, so that `path` holds either its old content or the new one,
/// never a part. On any failure the temporary file is removed (a full disk leaves
/// nothing behind).
///
/// Errors: [`Error::Io`] naming `path`, with the OS error (e.g. ENOSPC, "No space left
/// on device").
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let result = write_then_rename(&tmp, path, bytes);
    if result.is_err() {
        // The file may not exist (creation failed); nothing else to do then.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    drop(f);
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))
}
