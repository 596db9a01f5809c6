//! The IDX file format (LeCun's MNIST container), raw or gzip-compressed.
//!
//! Layout, all integers big-endian:
//! - magic, 4 bytes: `0x00`, `0x00`, data type (`0x08` = unsigned byte, the only one
//!   accepted here), rank r;
//! - r dimensions, 4 bytes each (`u32`);
//! - the data: product of the dimensions bytes, the last dimension varying fastest.
//!
//! Images are rank 3 (count, rows, cols); labels rank 1 (count). A file is gzip when
//! its first two bytes are `0x1f 0x8b`, whatever its name. Every length check counts
//! decompressed bytes, and the content must be exactly as long as the header declares.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::DataError;

/// IDX data-type byte for unsigned bytes.
const UBYTE: u8 = 0x08;
/// Bytes read up front to sniff the gzip magic.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Cap on the up-front allocation: a corrupt header must not reserve gigabytes.
const MAX_RESERVE: usize = 64 << 20;

/// A parsed IDX file of unsigned bytes.
#[derive(Debug)]
pub(crate) struct Idx {
    /// The r dimensions from the header.
    pub dims: Vec<usize>,
    /// The data, product(dims) bytes.
    pub data: Vec<u8>,
}

/// A byte source that remembers whether it decompresses, so that read failures
/// become [`DataError::Gzip`] or [`DataError::Io`] as appropriate.
struct Source {
    path: PathBuf,
    gzip: bool,
    reader: Box<dyn Read>,
}

impl Source {
    fn open(path: &Path) -> Result<Source, DataError> {
        let io_err = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = BufReader::new(File::open(path).map_err(io_err)?);
        let mut head = [0u8; 2];
        let n = read_full(&mut file, &mut head).map_err(io_err)?;
        let gzip = n == 2 && head == GZIP_MAGIC;
        let replay = io::Cursor::new(head[..n].to_vec()).chain(file);
        let reader: Box<dyn Read> = if gzip {
            Box::new(MultiGzDecoder::new(replay))
        } else {
            Box::new(replay)
        };
        Ok(Source {
            path: path.to_path_buf(),
            gzip,
            reader,
        })
    }

    fn err(&self, source: io::Error) -> DataError {
        let path = self.path.clone();
        if self.gzip {
            DataError::Gzip { path, source }
        } else {
            DataError::Io { path, source }
        }
    }

    /// Fills `buf` as far as the content allows; returns the bytes read.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize, DataError> {
        read_full(&mut self.reader, buf).map_err(|e| self.err(e))
    }
}

/// Reads until `buf` is full or the reader is exhausted; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads an unsigned-byte IDX file of the given rank from `path` (raw or gzip).
///
/// Errors: [`DataError::Io`] / [`DataError::Gzip`] when the bytes cannot be read,
/// [`DataError::BadMagic`], [`DataError::DataType`], [`DataError::Rank`] for a wrong
/// header, [`DataError::Truncated`] / [`DataError::TrailingBytes`] when the content is
/// shorter or longer than the header declares.
pub(crate) fn read_idx(path: &Path, rank: u8) -> Result<Idx, DataError> {
    let mut src = Source::open(path)?;
    let header_len = 4 + 4 * u64::from(rank);

    let mut magic = [0u8; 4];
    let n = src.read_full(&mut magic)?;
    if n < magic.len() {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header_len,
            found: n as u64,
        });
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found: u32::from_be_bytes(magic),
        });
    }
    if magic[2] != UBYTE {
        return Err(DataError::DataType {
            path: path.to_path_buf(),
            found: magic[2],
        });
    }
    if magic[3] != rank {
        return Err(DataError::Rank {
            path: path.to_path_buf(),
            expected: rank,
            found: magic[3],
        });
    }

    let mut dim_bytes = vec![0u8; 4 * usize::from(rank)];
    let n = src.read_full(&mut dim_bytes)?;
    if n < dim_bytes.len() {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header_len,
            found: 4 + n as u64,
        });
    }
    let dims32: Vec<u32> = dim_bytes
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    // Up to three u32 factors: the product can exceed u64, so count in u128.
    let data_len: u128 = dims32.iter().map(|&d| u128::from(d)).product();
    let expected_total = u128::from(header_len) + data_len;
    let expected_u64 = u64::try_from(expected_total).unwrap_or(u64::MAX);
    let want = u64::try_from(data_len).unwrap_or(u64::MAX);

    let reserve = usize::try_from(want).map_or(MAX_RESERVE, |w| w.min(MAX_RESERVE));
    let mut data = Vec::with_capacity(reserve);
    (&mut src.reader)
        .take(want)
        .read_to_end(&mut data)
        .map_err(|e| src.err(e))?;
    if (data.len() as u128) < data_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: expected_u64,
            found: header_len + data.len() as u64,
        });
    }
    let extra = io::copy(&mut src.reader, &mut io::sink()).map_err(|e| src.err(e))?;
    if extra > 0 {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            expected: expected_u64,
            found: expected_u64 + extra,
            extra,
        });
    }
    // data.len() == data_len fits in memory, so every factor fits in usize.
    let dims = dims32.iter().map(|&d| d as usize).collect();
    Ok(Idx { dims, data })
}
