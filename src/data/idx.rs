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
//!
//! A reader may ask for the first `n` records only (`--train-limit`): then only the
//! header and those `n` records are read and decompressed, and nothing past them is
//! looked at (a fault there, or trailing bytes, goes unseen; the records used are
//! checked as always). Memory: the data buffer holds what was read, never more than
//! twice that (it grows by doubling), whatever the header declares.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::DataError;

/// IDX data-type byte for unsigned bytes.
const UBYTE: u8 = 0x08;
/// Bytes read up front to sniff the gzip magic.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A parsed IDX file of unsigned bytes.
#[derive(Debug)]
pub(crate) struct Idx {
    /// The r dimensions from the header (`dims[0]` is the declared record count).
    pub dims: Vec<usize>,
    /// Records read: `dims[0]`, or fewer when a limit was given.
    pub records: usize,
    /// The data, `records · product(dims[1..])` bytes.
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
    /// Opens `path`; returns the source and the file's length in bytes.
    fn open(path: &Path) -> Result<(Source, u64), DataError> {
        let io_err = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Opening a FIFO would block, and a directory reads as an I/O error: say what
        // the path is instead.
        if let super::EntryKind::Other(what) = super::entry_kind(path)? {
            return Err(DataError::NotAFile {
                path: path.to_path_buf(),
                what,
            });
        }
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let mut file = BufReader::new(file);
        let mut head = [0u8; 2];
        let n = read_full(&mut file, &mut head).map_err(io_err)?;
        let gzip = n == 2 && head == GZIP_MAGIC;
        let replay = io::Cursor::new(head[..n].to_vec()).chain(file);
        let reader: Box<dyn Read> = if gzip {
            Box::new(MultiGzDecoder::new(replay))
        } else {
            Box::new(replay)
        };
        Ok((
            Source {
                path: path.to_path_buf(),
                gzip,
                reader,
            },
            len,
        ))
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

/// Reads an unsigned-byte IDX file of the given rank from `path` (raw or gzip): the
/// header and the first `min(limit, count)` records (`count` = the first dimension).
///
/// Errors: [`DataError::NotAFile`] when `path` is a directory, FIFO, dangling link, …,
/// [`DataError::Io`] / [`DataError::Gzip`] when the bytes cannot be read,
/// [`DataError::BadMagic`], [`DataError::DataType`], [`DataError::Rank`] for a wrong
/// header, [`DataError::Truncated`] when the content is shorter than the records read
/// need, and (when every record is read) [`DataError::TrailingBytes`] when it is
/// longer than the header declares.
pub(crate) fn read_idx(path: &Path, rank: u8, limit: usize) -> Result<Idx, DataError> {
    let (mut src, file_len) = Source::open(path)?;
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
    let record_len: u128 = dims32[1..].iter().map(|&d| u128::from(d)).product();
    let declared = u128::from(dims32[0]);
    let records = declared.min(limit as u128);
    let data_len = declared * record_len;
    let expected_total = u128::from(header_len) + data_len;
    let expected_u64 = u64::try_from(expected_total).unwrap_or(u64::MAX);
    let want_len = records * record_len;
    let want = u64::try_from(want_len).unwrap_or(u64::MAX);

    // A raw file cannot hold more than its length; a gzip stream's length is unknown
    // until it is read, so its buffer grows as data arrives.
    let reserve = if src.gzip {
        0
    } else {
        want.min(file_len.saturating_sub(header_len))
    };
    let mut data = Vec::new();
    data.try_reserve_exact(usize::try_from(reserve).unwrap_or(usize::MAX))
        .map_err(|e| src.err(io::Error::new(io::ErrorKind::OutOfMemory, e.to_string())))?;
    (&mut src.reader)
        .take(want)
        .read_to_end(&mut data)
        .map_err(|e| src.err(e))?;
    if (data.len() as u128) < want_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: expected_u64,
            found: header_len + data.len() as u64,
        });
    }
    if records == declared {
        let extra = io::copy(&mut src.reader, &mut io::sink()).map_err(|e| src.err(e))?;
        if extra > 0 {
            return Err(DataError::TrailingBytes {
                path: path.to_path_buf(),
                expected: expected_u64,
                found: expected_u64 + extra,
                extra,
            });
        }
    }
    // The data read fits in memory, so `records` and every factor but the first fit in
    // usize (a zero factor makes the product 0 whatever the others are, and u32 fits
    // usize on the 64-bit targets this crate supports).
    let dims = dims32.iter().map(|&d| d as usize).collect();
    Ok(Idx {
        dims,
        records: records as usize,
        data,
    })
}
