//! Minimal `.npy` reader and writer: format versions 1.0–3.0, little-endian `<f4` / `<f8`,
//! C order, 1-D or 2-D. Enough to exchange ensembles (J × P) and weight vectors with NumPy
//! and PyTorch without another dependency.

use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// An array read from an `.npy` file, converted to f64 for the caller to narrow.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The shape, outermost first (empty for a scalar).
    pub shape: Vec<usize>,
    /// The values in C order.
    pub data: Vec<f64>,
    /// The stored element type: "<f4" or "<f8".
    pub dtype: String,
}

fn npy_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Npy {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Writes `data` (C order) with the given shape as float32, atomically
/// ([`super::atomic_write`]: no partial file, and no `.tmp` left after a failure).
/// Errors: shape product ≠ `data.len()`, or I/O naming the file.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_raw(path, shape, "<f4", data.len(), &bytes)
}

/// Writes `data` (C order) with the given shape as float64.
pub fn write_f64(path: &Path, shape: &[usize], data: &[f64]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_raw(path, shape, "<f8", data.len(), &bytes)
}

fn write_raw(path: &Path, shape: &[usize], descr: &str, n: usize, bytes: &[u8]) -> Result<()> {
    let count: usize = shape.iter().product();
    if count != n {
        return Err(npy_err(
            path,
            format!("shape {shape:?} holds {count} values but {n} were given"),
        ));
    }
    let shape_txt = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + bytes.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(bytes);
    super::atomic_write(path, &out)
}

/// Reads an `.npy` file of `<f4` or `<f8` values in C order.
/// Errors name the file and the fault (bad magic, unsupported dtype, Fortran order, length).
pub fn read(path: &Path) -> Result<NpyArray> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| Error::io(path, e))?;
    if buf.len() < 10 || &buf[..6] != MAGIC {
        return Err(npy_err(path, "not an .npy file (magic \\x93NUMPY missing)"));
    }
    let (hlen, hstart) = match buf[6] {
        1 => (u16::from_le_bytes([buf[8], buf[9]]) as usize, 10),
        2 | 3 if buf.len() >= 12 => (
            u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize,
            12,
        ),
        v => {
            return Err(npy_err(
                path,
                format!("unsupported .npy format version {v}"),
            ))
        }
    };
    let header = buf
        .get(hstart..hstart + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| npy_err(path, "truncated or non-text header"))?;
    let descr =
        dict_value(header, "descr").ok_or_else(|| npy_err(path, "header has no 'descr'"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"').to_string();
    let width = match descr.as_str() {
        "<f4" => 4,
        "<f8" => 8,
        d => {
            return Err(npy_err(
                path,
                format!("dtype {d} is not supported: save as float32 or float64"),
            ))
        }
    };
    let fortran = dict_value(header, "fortran_order")
        .ok_or_else(|| npy_err(path, "header has no 'fortran_order'"))?;
    if fortran.trim() != "False" {
        return Err(npy_err(
            path,
            "Fortran-order arrays are not supported: save with np.ascontiguousarray",
        ));
    }
    let shape_txt =
        dict_value(header, "shape").ok_or_else(|| npy_err(path, "header has no 'shape'"))?;
    let shape = shape_txt
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| npy_err(path, format!("cannot parse shape {shape_txt}")))?;
    let body = &buf[hstart + hlen..];
    let needed = shape
        .iter()
        .try_fold(width, |acc: usize, &d| acc.checked_mul(d));
    if needed != Some(body.len()) {
        let needed = needed.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(npy_err(
            path,
            format!(
                "shape {shape:?} needs {needed} data bytes but the file has {}",
                body.len()
            ),
        ));
    }
    let data = if width == 4 {
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    };
    Ok(NpyArray {
        shape,
        data,
        dtype: descr,
    })
}

/// The raw text of `key`'s value in a Python dict literal (up to the next top-level comma).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[pos + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("enkf-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join(name)
    }

    #[test]
    fn round_trip_f32_and_f64() {
        let p = tmp("a.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_f32(&p, &[3, 4], &data).expect("write");
        let a = read(&p).expect("read");
        assert_eq!(a.shape, vec![3, 4]);
        assert_eq!(a.dtype, "<f4");
        assert_eq!(a.data, data.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let raw = std::fs::read(&p).expect("bytes");
        let hlen = u16::from_le_bytes([raw[8], raw[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0, "header must be padded to 64 bytes");

        let q = tmp("b.npy");
        let d64 = vec![1.0f64 / 3.0, -2.5, 7.0];
        write_f64(&q, &[3], &d64).expect("write");
        let b = read(&q).expect("read");
        assert_eq!(b.shape, vec![3]);
        assert_eq!(b.data, d64);
    }

    #[test]
    fn rejects_bad_files() {
        let p = tmp("bad.npy");
        std::fs::write(&p, b"hello world, not numpy").expect("write");
        assert!(read(&p).unwrap_err().to_string().contains("magic"));
        write_f32(&p, &[2, 2], &[1.0, 2.0, 3.0, 4.0]).expect("write");
        let mut raw = std::fs::read(&p).expect("read");
        raw.truncate(raw.len() - 4);
        std::fs::write(&p, &raw).expect("write");
        let msg = read(&p).unwrap_err().to_string();
        assert!(
            msg.contains("needs 16 data bytes but the file has 12"),
            "{msg}"
        );
        assert!(write_f32(&p, &[3, 2], &[1.0; 4]).is_err());
    }
}
