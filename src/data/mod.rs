//! MNIST-style data sets in IDX files: reading, validation, and the in-memory split.
//!
//! A data folder holds four files, each raw IDX or gzip-compressed IDX
//! (the format is described in `src/data/idx.rs`):
//! [`TRAIN_IMAGES`], [`TRAIN_LABELS`], [`TEST_IMAGES`], [`TEST_LABELS`].
//! Each may be present as `NAME.gz` or as `NAME`; when both exist **`NAME.gz` is used**
//! (the bundled, checksummed copy; see `data/mnist/README.md`). Compression is detected
//! from the content (gzip magic `1f 8b`), not from the name.
//!
//! Pixels become `f32` in [0, 1] exactly as torchvision's `ToTensor` does: `u8 as f32 / 255.0`.
//! Every fault is a [`DataError`] that names the file and the values found.
//!
//! [`load_dir_limited`] reads only the first N images of a split (`--train-limit`,
//! `--test-limit`): the rest of the file is neither decompressed nor held in memory.

mod idx;
pub mod letters;
pub mod npy;

use std::path::{Path, PathBuf};

use crate::model::CLASSES;

/// Training images (rank-3 IDX: count, rows, cols).
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// Training labels (rank-1 IDX: count).
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// Test images (rank-3 IDX: count, rows, cols).
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// Test labels (rank-1 IDX: count).
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";
/// The four file names a data folder must hold (each raw or with `.gz`).
pub const FILE_NAMES: [&str; 4] = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];
/// Environment variable that overrides the data root (see [`data_root`]).
pub const DATA_DIR_ENV: &str = "ENKF_DATA_DIR";

/// A fault in a data file or folder. Every variant names the file(s) concerned.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file starts with the gzip magic but does not decompress.
    #[error("{path}: corrupt or truncated gzip stream: {source}; re-fetch the file")]
    Gzip {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// The first two bytes of the (decompressed) content are not zero: not an IDX file.
    #[error("{path}: not an IDX file: magic is {found:#010x}, but IDX magics start with two zero bytes (0x0000TTRR)")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The 4-byte magic found, big-endian.
        found: u32,
    },
    /// The IDX data-type byte is not `0x08` (unsigned byte).
    #[error("{path}: IDX data type is {found:#04x}, expected 0x08 (unsigned byte)")]
    DataType {
        /// The file.
        path: PathBuf,
        /// The data-type byte found.
        found: u8,
    },
    /// The IDX rank does not match the file's role (3 for images, 1 for labels).
    #[error("{path}: IDX rank is {found}, expected {expected}{}", rank_hint(*.expected, *.found))]
    Rank {
        /// The file.
        path: PathBuf,
        /// The rank required: 3 for images, 1 for labels.
        expected: u8,
        /// The rank in the header.
        found: u8,
    },
    /// The (decompressed) content is shorter than its header declares.
    #[error(
        "{path}: truncated: needs {expected} bytes (IDX header and the data it declares) \
         but holds only {found} (after gunzip if compressed); re-fetch the file"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes needed, header included.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The (decompressed) content is longer than its header declares.
    #[error(
        "{path}: {found} bytes (after gunzip if compressed) but the IDX header declares \
         {expected}: {extra} trailing bytes; is the header or the file wrong?"
    )]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Bytes declared, header included.
        expected: u64,
        /// Bytes present.
        found: u64,
        /// `found - expected`.
        extra: u64,
    },
    /// An image file and its label file hold different numbers of samples.
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch {
        /// The image file.
        images: PathBuf,
        /// The label file.
        labels: PathBuf,
        /// Images in the image file.
        n_images: usize,
        /// Labels in the label file.
        n_labels: usize,
    },
    /// The training and test images have different sizes.
    #[error(
        "image size differs between splits: {train} has {train_rows}×{train_cols}, \
         {test} has {test_rows}×{test_cols}"
    )]
    SizeMismatch {
        /// The training image file.
        train: PathBuf,
        /// The test image file.
        test: PathBuf,
        /// Rows of a training image.
        train_rows: usize,
        /// Columns of a training image.
        train_cols: usize,
        /// Rows of a test image.
        test_rows: usize,
        /// Columns of a test image.
        test_cols: usize,
    },
    /// A label is not a valid class index.
    #[error("{path}: label {label} at index {index} is outside 0..{classes}")]
    LabelOutOfRange {
        /// The label file.
        path: PathBuf,
        /// Index of the first offending label.
        index: usize,
        /// Its value.
        label: u8,
        /// The number of classes.
        classes: usize,
    },
    /// A data path exists but is not a regular file (a directory, FIFO, socket, device,
    /// or a symbolic link whose target is missing).
    #[error("{path}: is {what}, not a regular file; an IDX file (raw or .gz) is expected here")]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is, in words ("a directory", "a dangling symbolic link to …").
        what: String,
    },
    /// A split's image file declares no images: nothing to train on or to score.
    #[error("{path}: the header declares 0 images; the {split} split needs at least one")]
    Empty {
        /// The image file.
        path: PathBuf,
        /// "training" or "test".
        split: &'static str,
    },
    /// A required file is in the folder neither as `NAME` nor as `NAME.gz`.
    #[error(
        "{path}: not found (nor its .gz); {}; expected {} (each raw or .gz); \
         run scripts/fetch-data.sh or set ENKF_DATA_DIR",
        contents_text(.contents),
        FILE_NAMES.join(", ")
    )]
    MissingFile {
        /// The path looked for (without `.gz`).
        path: PathBuf,
        /// The folder's entries, sorted; `None` when the folder cannot be listed.
        contents: Option<Vec<String>>,
    },
}

fn rank_hint(expected: u8, found: u8) -> &'static str {
    match (expected, found) {
        (3, 1) => " (count, rows, cols); this looks like a label file",
        (1, 3) => " (count); this looks like an image file",
        (3, _) => " (count, rows, cols)",
        (1, _) => " (count)",
        _ => "",
    }
}

fn contents_text(contents: &Option<Vec<String>>) -> String {
    match contents {
        None => "the folder does not exist or cannot be listed".to_string(),
        Some(c) if c.is_empty() => "the folder is empty".to_string(),
        Some(c) => format!("the folder holds [{}]", c.join(", ")),
    }
}

/// How the values of one sample are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SampleKind {
    /// channels × rows × cols (IDX images, NumPy N × C × H × W or N × H × W).
    #[default]
    Image,
    /// A flat vector of `cols` features (NumPy N × F; `channels` = `rows` = 1).
    Vector,
}

/// What the targets of a data set are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Class labels in `0..classes`: one-hot targets, test error in %, cross-entropy.
    Classify {
        /// Number of classes (the network's outputs).
        classes: usize,
    },
    /// Real targets, `outputs` per sample: fitted directly, scored by mean squared error.
    Regress {
        /// Targets per sample (the network's outputs).
        outputs: usize,
    },
}

impl Default for Task {
    fn default() -> Self {
        Task::Classify { classes: CLASSES }
    }
}

impl Task {
    /// Values the network must give per sample.
    pub fn outputs(self) -> usize {
        match self {
            Task::Classify { classes } => classes,
            Task::Regress { outputs } => outputs,
        }
    }

    /// A test score for logs: `test error 3.06 %  test loss 0.1234`, or for real
    /// targets `test MSE 0.4266` (`err` and `loss` both hold it).
    pub fn score_text(self, err: f64, loss: f64) -> String {
        match self {
            Task::Classify { .. } => format!("test error {err:.2} %  test loss {loss:.4}"),
            Task::Regress { .. } => format!("test MSE {loss:.4}"),
        }
    }

    /// The task in words, e.g. "10 classes" or "3 real targets".
    pub fn describe(self) -> String {
        match self {
            Task::Classify { classes } => format!("{classes} classes"),
            Task::Regress { outputs: 1 } => "1 real target (regression)".into(),
            Task::Regress { outputs } => format!("{outputs} real targets (regression)"),
        }
    }
}

/// One split: n samples of channels × rows × cols values, values in [0, 1] for images
/// read from bytes.
///
/// Invariant (kept by every constructor here): `images.len() == len() * pixels()`; a
/// classification split holds `len()` labels (below the task's classes) and no
/// `values`, a regression split `len() × k` values and no labels.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    /// n × channels × rows × cols values, sample-major then C order.
    pub images: Vec<f32>,
    /// n class labels (classification; empty for regression).
    pub labels: Vec<u8>,
    /// n × k real targets, row-major (regression; empty for classification).
    pub values: Vec<f32>,
    /// Channels of a sample (1 for IDX images and vectors).
    pub channels: usize,
    /// Rows of an image (1 for vectors).
    pub rows: usize,
    /// Columns of an image (the features of a vector).
    pub cols: usize,
    /// Image or flat vector.
    pub kind: SampleKind,
}

impl Dataset {
    /// A classification split of one-channel images (IDX files, notMNIST folders).
    pub fn images(images: Vec<f32>, labels: Vec<u8>, rows: usize, cols: usize) -> Self {
        Dataset {
            images,
            labels,
            values: Vec::new(),
            channels: 1,
            rows,
            cols,
            kind: SampleKind::Image,
        }
    }

    /// Number of samples n.
    pub fn len(&self) -> usize {
        match self.pixels() {
            0 => self.labels.len(),
            p => self.images.len() / p,
        }
    }

    /// Whether the split holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per sample, channels × rows × cols.
    pub fn pixels(&self) -> usize {
        self.channels * self.rows * self.cols
    }

    /// The shape of one sample, as the network's first layer sees it.
    pub fn input_shape(&self) -> crate::model::spec::Shape {
        match self.kind {
            SampleKind::Image => crate::model::spec::Shape::Image {
                c: self.channels,
                h: self.rows,
                w: self.cols,
            },
            SampleKind::Vector => crate::model::spec::Shape::Vector(self.cols),
        }
    }

    /// The shape of one sample in words: "28×28" for one channel, "3×32×32", "8 features".
    pub fn shape_text(&self) -> String {
        match (self.kind, self.channels) {
            (SampleKind::Vector, _) => format!("{} features", self.cols),
            (SampleKind::Image, 1) => format!("{}×{}", self.rows, self.cols),
            (SampleKind::Image, c) => format!("{c}×{}×{}", self.rows, self.cols),
        }
    }

    /// Real targets per sample (0 for a classification split).
    pub fn value_len(&self) -> usize {
        match self.len() {
            0 => 0,
            n => self.values.len() / n,
        }
    }

    /// Image `i`: `pixels()` values. Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[f32] {
        let p = self.pixels();
        &self.images[i * p..(i + 1) * p]
    }

    /// The first `min(n, len())` samples and their targets, copied.
    pub fn subset(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        let k = self.value_len();
        Dataset {
            images: self.images[..n * self.pixels()].to_vec(),
            labels: self.labels[..n.min(self.labels.len())].to_vec(),
            values: self.values[..n * k].to_vec(),
            channels: self.channels,
            rows: self.rows,
            cols: self.cols,
            kind: self.kind,
        }
    }

    /// Gathers the images at `indices` into `out` (cleared first; afterwards
    /// `indices.len() × pixels()` values, in the order of `indices`) and returns their
    /// labels (`indices.len()`; empty for a regression split). Panics if an index is
    /// `>= len()`.
    pub fn gather(&self, indices: &[usize], out: &mut Vec<f32>) -> Vec<u8> {
        out.clear();
        out.reserve(indices.len() * self.pixels());
        for &i in indices {
            out.extend_from_slice(self.image(i));
        }
        if self.labels.is_empty() {
            return Vec::new();
        }
        indices.iter().map(|&i| self.labels[i]).collect()
    }

    /// The targets of the samples at `indices`, `indices.len() × task.outputs()`
    /// row-major: one-hot rows of the labels, or the real targets.
    pub fn targets(&self, indices: &[usize], task: Task) -> Vec<f32> {
        match task {
            Task::Classify { classes } => {
                let labels: Vec<u8> = indices.iter().map(|&i| self.labels[i]).collect();
                crate::enkf::one_hot(&labels, classes)
            }
            Task::Regress { outputs } => {
                let mut y = Vec::with_capacity(indices.len() * outputs);
                for &i in indices {
                    y.extend_from_slice(&self.values[i * outputs..(i + 1) * outputs]);
                }
                y
            }
        }
    }
}

/// The images of one IDX file (all of them, or the first N).
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// count × rows × cols pixels, row-major, each `u8 / 255` in [0, 1].
    pub pixels: Vec<f32>,
    /// Number of images read.
    pub count: usize,
    /// Number of images the header declares (≥ `count`; more when a limit cut the read).
    pub declared: usize,
    /// Rows of an image.
    pub rows: usize,
    /// Columns of an image.
    pub cols: usize,
}

/// Both splits of a data set, as loaded by [`load_dir`] or [`npy::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct DataSplit {
    /// The training split.
    pub train: Dataset,
    /// The test split (same sample shape and targets as `train`).
    pub test: Dataset,
    /// The folder the files came from.
    pub dir: PathBuf,
    /// Class labels (IDX files are always [`Task::default`], 10 classes) or real targets.
    pub task: Task,
}

/// Reads a rank-3 IDX image file (raw or gzip) and scales its pixels to [0, 1]
/// (`u8 as f32 / 255.0`, as torchvision's `ToTensor`). Any image size is accepted.
///
/// Errors: the header and length faults of [`DataError`] (`NotAFile`, `Io`, `Gzip`,
/// `BadMagic`, `DataType`, `Rank`, `Truncated`, `TrailingBytes`), each naming `path`.
pub fn read_images(path: &Path) -> Result<Images, DataError> {
    read_images_first(path, usize::MAX)
}

/// As [`read_images`], but reads (and decompresses) only the first `min(n, count)`
/// images; nothing past them is read or checked. `Images::declared` is the header's count.
///
/// Errors: as [`read_images`]; `TrailingBytes` only when every image is read.
pub fn read_images_first(path: &Path, n: usize) -> Result<Images, DataError> {
    let idx = idx::read_idx(path, 3, n)?;
    let lut: [f32; 256] = std::array::from_fn(|b| b as f32 / 255.0);
    Ok(Images {
        pixels: idx.data.iter().map(|&b| lut[usize::from(b)]).collect(),
        count: idx.records,
        declared: idx.dims[0],
        rows: idx.dims[1],
        cols: idx.dims[2],
    })
}

/// Reads a rank-1 IDX label file (raw or gzip); every label must be below [`CLASSES`].
///
/// Errors: as [`read_images`], plus [`DataError::LabelOutOfRange`] for the first bad label.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    read_labels_first(path, usize::MAX).map(|(labels, _)| labels)
}

/// As [`read_labels`], but reads only the first `min(n, count)` labels (and checks only
/// those); returns them and the header's count.
///
/// Errors: as [`read_labels`]; `TrailingBytes` only when every label is read.
pub fn read_labels_first(path: &Path, n: usize) -> Result<(Vec<u8>, usize), DataError> {
    let idx = idx::read_idx(path, 1, n)?;
    let declared = idx.dims[0];
    let labels = idx.data;
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= CLASSES)
    {
        return Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label,
            classes: CLASSES,
        });
    }
    Ok((labels, declared))
}

/// What a path in a data folder is.
pub(crate) enum EntryKind {
    /// Nothing there.
    Missing,
    /// A regular file (or a link to one).
    File,
    /// Something else, in words.
    Other(String),
}

/// Classifies `path` without opening it. Errors: [`DataError::Io`] when its metadata
/// cannot be read for another reason than its absence (e.g. permission denied).
pub(crate) fn entry_kind(path: &Path) -> Result<EntryKind, DataError> {
    let io_err = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let link = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(EntryKind::Missing),
        Err(e) => return Err(io_err(e)),
    };
    let meta = if link.file_type().is_symlink() {
        match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                let target = std::fs::read_link(path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                return Ok(EntryKind::Other(
                    if e.kind() == std::io::ErrorKind::NotFound {
                        format!("a dangling symbolic link (to {target}, which does not exist)")
                    } else {
                        format!("a symbolic link to {target} that cannot be followed ({e})")
                    },
                ));
            }
        }
    } else {
        link
    };
    let t = meta.file_type();
    if t.is_file() {
        return Ok(EntryKind::File);
    }
    let what = if t.is_dir() {
        "a directory"
    } else {
        special_kind(&t)
    };
    Ok(EntryKind::Other(what.to_string()))
}

#[cfg(unix)]
fn special_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "neither a file nor a directory"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "neither a file nor a directory"
}

/// Finds `name` in `dir`: `dir/name.gz` if it exists, else `dir/name`.
///
/// Errors: [`DataError::NotAFile`] when the path found is not a regular file (the
/// `.gz` is looked at first: when it exists, it is the one used),
/// [`DataError::MissingFile`] listing the folder's contents when neither exists,
/// [`DataError::Io`] when a path cannot be examined.
pub fn find_file(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    for candidate in [dir.join(format!("{name}.gz")), dir.join(name)] {
        match entry_kind(&candidate)? {
            EntryKind::Missing => {}
            EntryKind::File => return Ok(candidate),
            EntryKind::Other(what) => {
                return Err(DataError::NotAFile {
                    path: candidate,
                    what,
                })
            }
        }
    }
    let contents = std::fs::read_dir(dir).ok().map(|entries| {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    });
    Err(DataError::MissingFile {
        path: dir.join(name),
        contents,
    })
}

/// One split, with at most `limit` images read.
fn load_split(
    split: &'static str,
    images_name: &str,
    labels_name: &str,
    dir: &Path,
    limit: usize,
) -> Result<(Dataset, PathBuf), DataError> {
    let images_path = find_file(dir, images_name)?;
    let labels_path = find_file(dir, labels_name)?;
    let images = read_images_first(&images_path, limit)?;
    let (labels, n_labels) = read_labels_first(&labels_path, limit)?;
    // The headers' counts, so that a limit does not hide a mismatch.
    if images.declared != n_labels {
        return Err(DataError::CountMismatch {
            images: images_path,
            labels: labels_path,
            n_images: images.declared,
            n_labels,
        });
    }
    if images.declared == 0 {
        return Err(DataError::Empty {
            path: images_path,
            split,
        });
    }
    let set = Dataset::images(images.pixels, labels, images.rows, images.cols);
    Ok((set, images_path))
}

/// Loads the four standard files from `dir` (each `NAME.gz` if present, else `NAME`).
///
/// Checks each file (see [`read_images`], [`read_labels`]), that each split has as many
/// labels as images and at least one, and that train and test images have the same
/// size. The size need not be 28 × 28; the trainer checks that.
///
/// Errors: [`DataError::MissingFile`], [`DataError::NotAFile`],
/// [`DataError::CountMismatch`], [`DataError::Empty`], [`DataError::SizeMismatch`], or
/// any fault of a single file.
pub fn load_dir(dir: &Path) -> Result<DataSplit, DataError> {
    load_dir_limited(dir, None, None)
}

/// As [`load_dir`], reading only the first `train_limit` training and `test_limit` test
/// images (all when `None`): the rest of each file is not read, decompressed or checked
/// (see `src/data/idx.rs`), so memory and time follow the limit, not the header. The
/// headers' counts are still compared between images and labels.
///
/// Errors: as [`load_dir`].
pub fn load_dir_limited(
    dir: &Path,
    train_limit: Option<usize>,
    test_limit: Option<usize>,
) -> Result<DataSplit, DataError> {
    let all = usize::MAX;
    let (train, train_path) = load_split(
        "training",
        TRAIN_IMAGES,
        TRAIN_LABELS,
        dir,
        train_limit.unwrap_or(all),
    )?;
    let (test, test_path) = load_split(
        "test",
        TEST_IMAGES,
        TEST_LABELS,
        dir,
        test_limit.unwrap_or(all),
    )?;
    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(DataError::SizeMismatch {
            train: train_path,
            test: test_path,
            train_rows: train.rows,
            train_cols: train.cols,
            test_rows: test.rows,
            test_cols: test.cols,
        });
    }
    Ok(DataSplit {
        train,
        test,
        dir: dir.to_path_buf(),
        task: Task::default(),
    })
}

/// The root of all data folders: `$ENKF_DATA_DIR` if set and non-empty, else `data`
/// (relative to the current directory, i.e. the crate root under `cargo run`/`cargo test`).
pub fn data_root() -> PathBuf {
    match std::env::var_os(DATA_DIR_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("data"),
    }
}

/// The folder of data set `name` under [`data_root`], e.g. `data/fashion-mnist`.
pub fn dataset_dir(name: &str) -> PathBuf {
    data_root().join(name)
}

/// The default MNIST folder: `$ENKF_DATA_DIR/mnist`, else `data/mnist`.
pub fn default_mnist_dir() -> PathBuf {
    dataset_dir("mnist")
}
