//! `.npy` reading and writing through the `npyz` crate (every format version, both
//! byte orders, C and Fortran order): ensembles (J × P) and weight vectors exchanged
//! with NumPy and PyTorch. We write little-endian `<f4` / `<f8` in C order and read any
//! float32 or float64 array (a Fortran-order array is reordered to C order on reading).

use crate::{Error, Result};
use npyz::{DType, Order, TypeChar, WriterBuilder};
use std::path::Path;

/// An array read from an `.npy` file, converted to f64 for the caller to narrow.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The shape, outermost first (empty for a scalar).
    pub shape: Vec<usize>,
    /// The values in C order.
    pub data: Vec<f64>,
    /// The stored element type as NumPy writes it, e.g. "<f4" or ">f8".
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
    write_any(path, shape, data)
}

/// Writes `data` (C order) with the given shape as float64.
pub fn write_f64(path: &Path, shape: &[usize], data: &[f64]) -> Result<()> {
    write_any(path, shape, data)
}

fn write_any<T: npyz::AutoSerialize + Copy>(
    path: &Path,
    shape: &[usize],
    data: &[T],
) -> Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(npy_err(
            path,
            format!(
                "shape {shape:?} holds {count} values but {} were given",
                data.len()
            ),
        ));
    }
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut bytes = Vec::with_capacity(128 + std::mem::size_of_val(data));
    let encode = |bytes: &mut Vec<u8>| -> std::io::Result<()> {
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&dims)
            .writer(bytes)
            .begin_nd()?;
        w.extend(data.iter().copied())?;
        w.finish()
    };
    encode(&mut bytes).map_err(|e| npy_err(path, format!("encoding: {e}")))?;
    super::atomic_write(path, &bytes)
}

/// The values of an array as stored (integers of any width are widened to `i64`).
#[derive(Debug, Clone, PartialEq)]
pub enum NpyValues {
    /// `float32`.
    F32(Vec<f32>),
    /// `float64`.
    F64(Vec<f64>),
    /// `uint8`.
    U8(Vec<u8>),
    /// Any other signed or unsigned integer type (`int8` … `int64`, `uint16` … `uint64`).
    Int(Vec<i64>),
}

/// An array read from an `.npy` file with its own element type.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyTyped {
    /// The shape, outermost first (empty for a scalar).
    pub shape: Vec<usize>,
    /// The values in C order.
    pub values: NpyValues,
    /// The stored element type as NumPy writes it, e.g. "<f4" or "|u1".
    pub dtype: String,
}

/// What the header of an `.npy` file declares, read without its data.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeaderInfo {
    /// The shape, outermost first.
    pub shape: Vec<usize>,
    /// The element type as NumPy writes it.
    pub dtype: String,
    /// Kind of element (float, signed or unsigned integer, other).
    pub kind: TypeChar,
    /// Bytes per element.
    pub width: usize,
    /// Where the data start in the file (the header's length).
    pub data_offset: u64,
    /// Whether the data are in Fortran (column-major) order.
    pub fortran_order: bool,
}

/// Reads an `.npy` file of float32 or float64 values (either byte order, C or Fortran
/// order). Errors name the file and the fault (not an .npy file, another dtype, a
/// length that does not match the shape).
pub fn read(path: &Path) -> Result<NpyArray> {
    let a = read_typed(path)?;
    let data = match a.values {
        NpyValues::F32(v) => v.into_iter().map(f64::from).collect(),
        NpyValues::F64(v) => v,
        NpyValues::U8(_) | NpyValues::Int(_) => {
            return Err(npy_err(
                path,
                format!(
                    "dtype {} is not supported: save as float32 or float64",
                    a.dtype
                ),
            ))
        }
    };
    Ok(NpyArray {
        shape: a.shape,
        data,
        dtype: a.dtype,
    })
}

/// Reads only the header of an `.npy` file (the data are not read) and checks that the
/// file is as long as the header declares. Errors: as [`read_typed`].
pub fn read_header(path: &Path) -> Result<NpyHeaderInfo> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let total = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut prefix = vec![0u8; 12];
    let got = read_up_to(&mut f, &mut prefix).map_err(|e| Error::io(path, e))?;
    prefix.truncate(got);
    if !prefix.starts_with(b"\x93NUMPY") {
        return Err(npy_err(path, "not an .npy file (magic \\x93NUMPY missing)"));
    }
    let (len, start) = match prefix.get(6) {
        Some(1) if prefix.len() >= 10 => (u16::from_le_bytes([prefix[8], prefix[9]]) as usize, 10),
        Some(2 | 3) if prefix.len() >= 12 => (
            u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]) as usize,
            12,
        ),
        _ => return Err(npy_err(path, "truncated or unknown .npy header")),
    };
    let mut header = vec![0u8; (start + len).saturating_sub(prefix.len())];
    let got = read_up_to(&mut f, &mut header).map_err(|e| Error::io(path, e))?;
    prefix.extend_from_slice(&header[..got]);
    check_shape_size(&prefix).map_err(|msg| npy_err(path, msg))?;
    let mut rest: &[u8] = &prefix;
    let h = npyz::NpyHeader::from_reader(&mut rest).map_err(|e| npy_err(path, e.to_string()))?;
    let body = total.saturating_sub(prefix.len() as u64);
    let npy = npyz::NpyFile::with_header(h, rest);
    let (shape, info) = header_info(path, &npy)?;
    check_body(path, &shape, info.1, body)?;
    Ok(NpyHeaderInfo {
        shape,
        dtype: info.0,
        kind: info.2,
        width: info.1,
        data_offset: prefix.len() as u64,
        fortran_order: npy.order() == Order::Fortran,
    })
}

/// Rows `rows` of a 2-D float32 or float64 array (either byte order) of `cols` columns,
/// as f32, with the array's shape: a C-order file is read only where those rows are (a
/// rank of a sharded run reads its members of `--init-ensemble`); a Fortran-order one
/// is read whole and sliced. Errors: as [`read_header`]; a shape that is not 2-D with
/// `cols` columns and at least `rows.end` rows, or another dtype, naming the file.
pub fn read_rows_f32(
    path: &Path,
    rows: std::ops::Range<usize>,
    cols: usize,
) -> Result<(Vec<usize>, Vec<f32>)> {
    use std::io::{Read, Seek, SeekFrom};
    let h = read_header(path)?;
    if h.shape.len() != 2 || h.shape[1] != cols || h.shape[0] < rows.end {
        return Err(npy_err(
            path,
            format!(
                "shape {:?}: expected 2-D with {cols} columns and at least {} rows",
                h.shape, rows.end
            ),
        ));
    }
    if h.kind != TypeChar::Float || !(h.width == 4 || h.width == 8) {
        return Err(npy_err(
            path,
            format!(
                "dtype {} is not supported: save as float32 or float64",
                h.dtype
            ),
        ));
    }
    if h.fortran_order {
        let all = read(path)?;
        let data = all.data[rows.start * cols..rows.end * cols]
            .iter()
            .map(|&v| v as f32)
            .collect();
        return Ok((h.shape, data));
    }
    let n = (rows.end - rows.start) * cols;
    let mut bytes = vec![0u8; n * h.width];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let at = h.data_offset + (rows.start * cols * h.width) as u64;
    f.seek(SeekFrom::Start(at))
        .and_then(|_| f.read_exact(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    let big = h.dtype.starts_with('>');
    let data = match h.width {
        4 => bytes
            .chunks_exact(4)
            .map(|b| {
                let b = [b[0], b[1], b[2], b[3]];
                if big {
                    f32::from_be_bytes(b)
                } else {
                    f32::from_le_bytes(b)
                }
            })
            .collect(),
        _ => bytes
            .chunks_exact(8)
            .map(|b| {
                let b = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
                (if big {
                    f64::from_be_bytes(b)
                } else {
                    f64::from_le_bytes(b)
                }) as f32
            })
            .collect(),
    };
    Ok((h.shape, data))
}

/// The header of a little-endian float32 C-order `.npy` file of `shape` (format 1.0, the
/// header padded to a multiple of 64 bytes as NumPy and npyz write it): the bytes before
/// the data.
pub fn f32_header(shape: &[usize]) -> Vec<u8> {
    // npyz's layout: every dimension followed by ", ".
    let shape_text: String = shape.iter().map(|d| format!("{d}, ")).collect();
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape_text}), }}");
    let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
    dict.push_str(&" ".repeat(pad));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// A float32 C-order `.npy` file of `shape` (rows × cols) written by several writers,
/// the ranks of a sharded run: [`shared_begin`] (one writer) makes `PATH.tmp` with the
/// header and the whole length, each writer then writes its rows
/// ([`shared_write_rows`]), and [`shared_finish`] (one writer, after all) renames it
/// over PATH. Until then PATH keeps its old content. Errors: I/O naming the file.
pub fn shared_begin(path: &Path, shape: [usize; 2]) -> Result<()> {
    let tmp = super::tmp_path(path);
    let header = f32_header(&shape);
    let len = header.len() as u64 + (shape[0] * shape[1] * 4) as u64;
    let made = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&header)?;
        f.set_len(len)?;
        f.sync_all()
    })();
    made.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes rows `first ..` (`data`, whole rows of `cols`) into the file [`shared_begin`]
/// made for `path` (of `shape`), and syncs them. Errors: rows past the shape, I/O.
pub fn shared_write_rows(path: &Path, shape: [usize; 2], first: usize, data: &[f32]) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let cols = shape[1];
    if cols == 0 || !data.len().is_multiple_of(cols) || first + data.len() / cols > shape[0] {
        return Err(npy_err(
            path,
            format!(
                "{} values from row {first} do not fit whole rows of {shape:?}",
                data.len()
            ),
        ));
    }
    let tmp = super::tmp_path(path);
    let at = f32_header(&shape).len() as u64 + (first * cols * 4) as u64;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).open(&tmp)?;
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    written.map_err(|e| Error::io(path, e))
}

/// Renames the file of [`shared_begin`] over `path` (after every writer wrote its rows);
/// `keep = false` removes it instead (a writer failed). Errors: I/O naming the file.
pub fn shared_finish(path: &Path, keep: bool) -> Result<()> {
    let tmp = super::tmp_path(path);
    if keep {
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    } else {
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
            _ => Ok(()),
        }
    }
}

/// Fills `buf` as far as the file allows; returns the bytes read.
fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The shape and (dtype text, element width, kind) of a plain (non-structured) array.
fn header_info<R: std::io::Read>(
    path: &Path,
    npy: &npyz::NpyFile<R>,
) -> Result<(Vec<usize>, (String, usize, TypeChar))> {
    let shape: Vec<usize> = npy
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| npy_err(path, format!("shape {:?} is too large", npy.shape())))?;
    match npy.dtype() {
        DType::Plain(ts) => Ok((
            shape,
            (ts.to_string(), ts.size_field() as usize, ts.type_char()),
        )),
        other => Err(npy_err(
            path,
            format!(
                "dtype {} (a structured or array dtype) is not supported",
                other.descr()
            ),
        )),
    }
}

/// Checks that `body` bytes hold exactly the values `shape` declares.
fn check_body(path: &Path, shape: &[usize], width: usize, body: u64) -> Result<()> {
    let needed = shape
        .iter()
        .try_fold(width, |acc: usize, &d| acc.checked_mul(d));
    // npyz reads lazily; check the length first so a truncated file names its size.
    if needed.map(|n| n as u64) != Some(body) {
        let needed = needed.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(npy_err(
            path,
            format!("shape {shape:?} needs {needed} data bytes but the file has {body}"),
        ));
    }
    Ok(())
}

/// Reads an `.npy` file of float32, float64 or integer values (either byte order, C or
/// Fortran order), keeping the element type. Errors name the file and the fault (not an
/// .npy file, another dtype such as bool, complex or a structured type, a length that
/// does not match the shape).
pub fn read_typed(path: &Path) -> Result<NpyTyped> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if !bytes.starts_with(b"\x93NUMPY") {
        return Err(npy_err(path, "not an .npy file (magic \\x93NUMPY missing)"));
    }
    check_shape_size(&bytes).map_err(|msg| npy_err(path, msg))?;
    let mut rest: &[u8] = &bytes;
    let header =
        npyz::NpyHeader::from_reader(&mut rest).map_err(|e| npy_err(path, e.to_string()))?;
    let body = rest.len();
    let npy = npyz::NpyFile::with_header(header, rest);
    let (shape, (dtype, width, kind)) = header_info(path, &npy)?;
    let unsupported = || {
        npy_err(
            path,
            format!("dtype {dtype} is not supported: save as float32, float64 or an integer type"),
        )
    };
    if !matches!(kind, TypeChar::Float | TypeChar::Int | TypeChar::Uint) {
        return Err(unsupported());
    }
    check_body(path, &shape, width, body as u64)?;
    let order = npy.order();
    let err = |e: std::io::Error| npy_err(path, e.to_string());
    let widen = |v: Vec<i64>| NpyValues::Int(reorder(v, &shape, order));
    let values = match (kind, width) {
        (TypeChar::Float, 4) => {
            NpyValues::F32(reorder(npy.into_vec::<f32>().map_err(err)?, &shape, order))
        }
        (TypeChar::Float, 8) => {
            NpyValues::F64(reorder(npy.into_vec::<f64>().map_err(err)?, &shape, order))
        }
        (TypeChar::Uint, 1) => {
            NpyValues::U8(reorder(npy.into_vec::<u8>().map_err(err)?, &shape, order))
        }
        (TypeChar::Uint, 2) => widen(int_vec::<u16, _>(npy, err)?),
        (TypeChar::Uint, 4) => widen(int_vec::<u32, _>(npy, err)?),
        (TypeChar::Uint, 8) => {
            let v = npy.into_vec::<u64>().map_err(err)?;
            let v: Option<Vec<i64>> = v.into_iter().map(|x| i64::try_from(x).ok()).collect();
            widen(v.ok_or_else(|| npy_err(path, "a uint64 value is above 2^63"))?)
        }
        (TypeChar::Int, 1) => widen(int_vec::<i8, _>(npy, err)?),
        (TypeChar::Int, 2) => widen(int_vec::<i16, _>(npy, err)?),
        (TypeChar::Int, 4) => widen(int_vec::<i32, _>(npy, err)?),
        (TypeChar::Int, 8) => widen(npy.into_vec::<i64>().map_err(err)?),
        _ => return Err(unsupported()),
    };
    Ok(NpyTyped {
        shape,
        values,
        dtype,
    })
}

/// The values of an integer array, widened to `i64`.
fn int_vec<T, E>(
    npy: npyz::NpyFile<&[u8]>,
    err: impl Fn(std::io::Error) -> E,
) -> std::result::Result<Vec<i64>, E>
where
    T: npyz::Deserialize + Into<i64>,
{
    Ok(npy
        .into_vec::<T>()
        .map_err(err)?
        .into_iter()
        .map(Into::into)
        .collect())
}

/// `data` in C order (a Fortran-order array is reordered).
fn reorder<T: Copy>(data: Vec<T>, shape: &[usize], order: Order) -> Vec<T> {
    match order {
        Order::C => data,
        Order::Fortran => fortran_to_c(&data, shape),
    }
}

/// Refuses a header whose shape holds more than 2^64 values before npyz sees it:
/// npyz 0.9.1 multiplies the dimensions unchecked (`NpyHeader::read_and_interpret`), which
/// panics in a build with overflow checks (found by `tests/fuzz_parsers.rs`). Only the
/// `'shape': (...)` entry is looked at; anything it cannot read is left to npyz.
fn check_shape_size(bytes: &[u8]) -> std::result::Result<(), String> {
    let (len, start) = match bytes.get(6) {
        Some(1) if bytes.len() >= 10 => {
            (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize)
        }
        Some(2 | 3) if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Ok(()),
    };
    let Some(text) = bytes
        .get(start..start.saturating_add(len))
        .and_then(|h| std::str::from_utf8(h).ok())
    else {
        return Ok(());
    };
    let Some(at) = text.find("'shape'").or_else(|| text.find("\"shape\"")) else {
        return Ok(());
    };
    let rest = &text[at..];
    let (Some(open), Some(close)) = (rest.find('('), rest.find(')')) else {
        return Ok(());
    };
    if close < open {
        return Ok(());
    }
    let mut count: u64 = 1;
    for part in rest[open + 1..close].split(',').map(str::trim) {
        if let Ok(d) = part.parse::<u64>() {
            count = count.checked_mul(d).ok_or_else(|| {
                format!("shape {} holds more than 2^64 values", &rest[open..=close])
            })?;
        }
    }
    Ok(())
}

/// Reorders the values of an array stored in Fortran order (first index fastest) into C
/// order (last index fastest).
fn fortran_to_c<T: Copy>(data: &[T], shape: &[usize]) -> Vec<T> {
    let n = data.len();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        // Fortran offset of the C-order position `idx`.
        let (mut off, mut stride) = (0, 1);
        for (i, &d) in idx.iter().zip(shape) {
            off += i * stride;
            stride *= d;
        }
        out.push(data[off]);
        for (i, &d) in idx.iter_mut().zip(shape).rev() {
            *i += 1;
            if *i < d {
                break;
            }
            *i = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("enkf-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join(name)
    }

    /// The hand-made header is byte for byte npyz's (NumPy's layout), for 1-D and 2-D
    /// shapes and for header lengths on both sides of a 64-byte boundary.
    #[test]
    fn the_f32_header_is_the_one_npyz_writes() {
        for shape in [
            vec![7usize],
            vec![3, 4],
            vec![1000, 18_050],
            vec![123_456_789, 1],
        ] {
            let p = tmp("hdr.npy");
            let n: usize = shape.iter().product::<usize>().min(64);
            // Write a small array of the same header length: npyz's header for `shape`
            // is read back from a file of that shape built with the real data size.
            if n == shape.iter().product::<usize>() {
                write_f32(&p, &shape, &vec![0.5; n]).unwrap();
                let bytes = std::fs::read(&p).unwrap();
                let h = f32_header(&shape);
                assert_eq!(&bytes[..h.len()], &h[..], "{shape:?}");
                assert_eq!(bytes.len(), h.len() + 4 * n);
            }
            let h = f32_header(&shape);
            assert_eq!(h.len() % 64, 0, "{shape:?}: padded to 64");
            assert_eq!(*h.last().unwrap(), b'\n');
        }
    }

    /// Rows written by several writers into one shared file read back as the whole array,
    /// and a row range reads back from C-order f32, f64, big-endian and Fortran files.
    #[test]
    fn shared_writes_and_row_reads() {
        let p = tmp("shared.npy");
        let (rows, cols) = (7usize, 5usize);
        let data: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 3.0).collect();
        std::fs::write(&p, b"old").unwrap();
        shared_begin(&p, [rows, cols]).unwrap();
        for (first, count) in [(4, 3), (0, 2), (2, 2)] {
            let part = &data[first * cols..(first + count) * cols];
            shared_write_rows(&p, [rows, cols], first, part).unwrap();
        }
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"old",
            "the old file until the rename"
        );
        shared_finish(&p, true).unwrap();
        let back = read(&p).unwrap();
        assert_eq!(back.shape, [rows, cols]);
        assert_eq!(
            back.data,
            data.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()
        );
        assert!(!super::super::tmp_path(&p).exists());
        let e = shared_write_rows(&p, [rows, cols], 6, &data[..2 * cols]).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");

        let (shape, got) = read_rows_f32(&p, 2..5, cols).unwrap();
        assert_eq!(shape, [rows, cols]);
        assert_eq!(got, data[2 * cols..5 * cols]);
        let d64: Vec<f64> = data.iter().map(|&v| f64::from(v)).collect();
        write_f64(&p, &[rows, cols], &d64).unwrap();
        assert_eq!(
            read_rows_f32(&p, 2..5, cols).unwrap().1,
            data[2 * cols..5 * cols]
        );
        // Big-endian and Fortran order (hand-made files, as NumPy writes them).
        for (descr, fortran) in [("'>f4'", false), ("'<f4'", true)] {
            let mut h = format!(
                "{{'descr': {descr}, 'fortran_order': {}, 'shape': ({rows}, {cols}), }}",
                if fortran { "True" } else { "False" }
            );
            h.push('\n');
            let mut raw = b"\x93NUMPY\x01\x00".to_vec();
            raw.extend_from_slice(&(h.len() as u16).to_le_bytes());
            raw.extend_from_slice(h.as_bytes());
            for k in 0..rows * cols {
                let v = if fortran {
                    data[(k % rows) * cols + k / rows]
                } else {
                    data[k]
                };
                raw.extend_from_slice(&if fortran {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                });
            }
            std::fs::write(&p, &raw).unwrap();
            let (_, got) = read_rows_f32(&p, 1..4, cols).unwrap();
            assert_eq!(got, data[cols..4 * cols], "{descr}, fortran {fortran}");
        }
        let e = read_rows_f32(&p, 0..8, cols).unwrap_err();
        assert!(e.to_string().contains("at least 8 rows"), "{e}");
        let e = read_rows_f32(&p, 0..1, cols + 1).unwrap_err();
        assert!(e.to_string().contains("6 columns"), "{e}");
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

    /// A Fortran-order float64 file as NumPy writes it (`np.save(f, np.asfortranarray(
    /// np.arange(6.).reshape(2, 3)))`): read back in C order.
    #[test]
    fn fortran_order_is_reordered() {
        let p = tmp("f.npy");
        let header = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }";
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut raw = b"\x93NUMPY\x01\x00".to_vec();
        raw.extend((h.len() as u16).to_le_bytes());
        raw.extend(h.as_bytes());
        // Column-major storage of [[0, 1, 2], [3, 4, 5]].
        for v in [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0] {
            raw.extend(v.to_le_bytes());
        }
        std::fs::write(&p, &raw).expect("write");
        let a = read(&p).expect("read");
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(fortran_to_c(&[0.0, 1.0], &[2]), vec![0.0, 1.0]);
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
