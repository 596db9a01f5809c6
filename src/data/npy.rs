//! NumPy data sets (`--data-npy`): four `.npy` files, read through `npyz`
//! ([`crate::io::npy::read_typed`]: every format version, byte order and memory order).
//!
//! The files are given as a folder holding [`NPY_NAMES`] (`train_x.npy`, `train_y.npy`,
//! `test_x.npy`, `test_y.npy`) or as the four paths in that order.
//!
//! - **X**: `N × C × H × W` (images, what `conv2d` takes), `N × H × W` (one-channel
//!   images) or `N × F` (feature vectors, what `linear` takes), of dtype `uint8` (scaled to
//!   [0, 1] as `u8 / 255`, as torchvision's `ToTensor`) or `float32` (used as stored;
//!   every value must be finite).
//! - **Y**: class labels, `N` integers of any integer dtype, each in `0..256`: the task is
//!   classification with `1 + the largest label of either split` classes (one-hot targets,
//!   test error in %); or real targets, `float32` of shape `N × k` (or `N`, meaning k = 1):
//!   regression, fitted directly, scored by the mean squared error.
//!
//! Both splits must agree in sample shape and in the kind (and k) of their targets. Every
//! fault is an [`Error::Npy`] naming the file.

use super::{DataSplit, Dataset, SampleKind, Task};
use crate::io::npy::{read_header, read_typed, NpyValues};
use crate::model::spec::Shape;
use crate::{Error, Result};
use npyz::TypeChar;
use std::path::{Path, PathBuf};

/// The four file names a NumPy data folder holds, in the order of the four-path form.
pub const NPY_NAMES: [&str; 4] = ["train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy"];

/// Most classes a label file may hold (labels are stored as bytes).
pub const MAX_CLASSES: usize = 256;

fn npy_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Npy {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The four files of a `--data-npy` setting: one folder (holding [`NPY_NAMES`]) or four
/// paths (train X, train Y, test X, test Y). Errors: [`Error::Config`] for another count,
/// a folder that does not exist or lacks a file.
pub fn files(paths: &[PathBuf]) -> Result<[PathBuf; 4]> {
    match paths {
        [dir] => {
            if !dir.is_dir() {
                return Err(Error::Config(format!(
                    "data_npy = {}: not a folder; give a folder holding {} or the four \
                     files TRAIN_X,TRAIN_Y,TEST_X,TEST_Y",
                    dir.display(),
                    NPY_NAMES.join(", ")
                )));
            }
            let all = NPY_NAMES.map(|n| dir.join(n));
            if let Some(missing) = all.iter().find(|p| !p.is_file()) {
                return Err(Error::Config(format!(
                    "data_npy = {}: {} is missing (the folder must hold {})",
                    dir.display(),
                    missing.display(),
                    NPY_NAMES.join(", ")
                )));
            }
            Ok(all)
        }
        [a, b, c, d] => Ok([a.clone(), b.clone(), c.clone(), d.clone()]),
        other => Err(Error::Config(format!(
            "data_npy: {} path(s) given ({}); give one folder holding {} or four files \
             TRAIN_X,TRAIN_Y,TEST_X,TEST_Y (a test split is needed for the test error)",
            other.len(),
            other
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(","),
            NPY_NAMES.join(", ")
        ))),
    }
}

/// The sample shape an X header declares: (N, kind, channels, rows, cols).
fn x_layout(path: &Path, shape: &[usize]) -> Result<(usize, SampleKind, usize, usize, usize)> {
    let layout = match *shape {
        [n, f] => (n, SampleKind::Vector, 1, 1, f),
        [n, h, w] => (n, SampleKind::Image, 1, h, w),
        [n, c, h, w] => (n, SampleKind::Image, c, h, w),
        _ => {
            return Err(npy_err(
                path,
                format!(
                    "shape {shape:?}: samples must be N × C × H × W, N × H × W (images) or \
                     N × F (vectors)"
                ),
            ))
        }
    };
    if layout.2 * layout.3 * layout.4 == 0 {
        return Err(npy_err(
            path,
            format!("shape {shape:?}: a sample holds no values"),
        ));
    }
    if layout.0 == 0 {
        return Err(npy_err(path, format!("shape {shape:?}: no samples")));
    }
    Ok(layout)
}

/// What the files declare: the sample shape and the task. Reads the two X headers only and the two Y files whole (labels
/// are needed for the number of classes). Errors: as [`load`].
pub fn probe(paths: &[PathBuf]) -> Result<(Shape, Task)> {
    let [tx, ty, vx, vy] = files(paths)?;
    let mut shapes = Vec::new();
    for x in [&tx, &vx] {
        let h = read_header(x)?;
        check_x_dtype(x, &h.dtype, h.kind, h.width)?;
        shapes.push((x_layout(x, &h.shape)?, h.shape));
    }
    check_same_shape(&tx, &vx, &shapes[0].1, &shapes[1].1)?;
    let (train_y, test_y) = (read_targets(&ty)?, read_targets(&vy)?);
    for (x, y, (layout, _)) in [
        (&tx, (&ty, &train_y), &shapes[0]),
        (&vx, (&vy, &test_y), &shapes[1]),
    ] {
        check_count(x, y.0, layout.0, y.1.count())?;
    }
    let task = task_of(&ty, &vy, &train_y, &test_y)?;
    let (_, kind, channels, rows, cols) = shapes[0].0;
    let empty = Dataset {
        channels,
        rows,
        cols,
        kind,
        ..Dataset::default()
    };
    Ok((empty.input_shape(), task))
}

fn check_x_dtype(path: &Path, dtype: &str, kind: TypeChar, width: usize) -> Result<()> {
    match (kind, width) {
        (TypeChar::Uint, 1) | (TypeChar::Float, 4) => Ok(()),
        _ => Err(npy_err(
            path,
            format!(
                "dtype {dtype}: samples must be uint8 (scaled to [0, 1]) or float32; convert \
                 with x.astype(np.float32)"
            ),
        )),
    }
}

fn check_same_shape(a: &Path, b: &Path, sa: &[usize], sb: &[usize]) -> Result<()> {
    if sa.get(1..) != sb.get(1..) {
        return Err(npy_err(
            b,
            format!(
                "samples of shape {:?} differ from those of {} ({:?})",
                sb.get(1..).unwrap_or_default(),
                a.display(),
                sa.get(1..).unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

fn check_count(x: &Path, y: &Path, nx: usize, ny: usize) -> Result<()> {
    if nx != ny {
        return Err(npy_err(
            y,
            format!("holds {ny} targets but {} holds {nx} samples", x.display()),
        ));
    }
    Ok(())
}

/// The targets of one Y file.
enum Targets {
    Labels(Vec<u8>),
    Values { values: Vec<f32>, k: usize },
}

impl Targets {
    fn count(&self) -> usize {
        match self {
            Targets::Labels(l) => l.len(),
            Targets::Values { values, k } => values.len() / k,
        }
    }
}

fn read_targets(path: &Path) -> Result<Targets> {
    let a = read_typed(path)?;
    let ints = match a.values {
        NpyValues::U8(v) => Ok(v.into_iter().map(i64::from).collect::<Vec<_>>()),
        NpyValues::Int(v) => Ok(v),
        other => Err(other),
    };
    match (a.shape.as_slice(), ints) {
        ([_], Ok(labels)) => {
            let mut out = Vec::with_capacity(labels.len());
            for (i, &l) in labels.iter().enumerate() {
                match u8::try_from(l) {
                    Ok(b) => out.push(b),
                    Err(_) => {
                        return Err(npy_err(
                            path,
                            format!(
                                "label {l} at index {i} is outside 0..{MAX_CLASSES} (class \
                                 labels are integers from 0; real targets must be float32)"
                            ),
                        ))
                    }
                }
            }
            Ok(Targets::Labels(out))
        }
        (shape, Err(NpyValues::F32(values)))
            if matches!(shape.len(), 1 | 2) && shape.get(1).is_none_or(|&k| k > 0) =>
        {
            let k = shape.get(1).copied().unwrap_or(1);
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(npy_err(
                    path,
                    format!("target {} at index {i} is not finite", values[i]),
                ));
            }
            Ok(Targets::Values { values, k })
        }
        (shape, Ok(_)) => Err(npy_err(
            path,
            format!("shape {shape:?}: class labels must be one integer per sample (shape N)"),
        )),
        (shape, Err(_)) => Err(npy_err(
            path,
            format!(
                "dtype {} with shape {shape:?}: targets must be integer class labels \
                 (shape N) or float32 real targets (shape N × k or N)",
                a.dtype
            ),
        )),
    }
}

fn task_of(train: &Path, test: &Path, a: &Targets, b: &Targets) -> Result<Task> {
    match (a, b) {
        (Targets::Labels(x), Targets::Labels(y)) => {
            let max = x.iter().chain(y).copied().max().unwrap_or(0);
            Ok(Task::Classify {
                classes: usize::from(max) + 1,
            })
        }
        (Targets::Values { k: ka, .. }, Targets::Values { k: kb, .. }) if ka == kb => {
            Ok(Task::Regress { outputs: *ka })
        }
        (Targets::Values { k: ka, .. }, Targets::Values { k: kb, .. }) => Err(npy_err(
            test,
            format!(
                "holds {kb} targets per sample, {} holds {ka}",
                train.display()
            ),
        )),
        _ => Err(npy_err(
            test,
            format!(
                "its targets are {} but those of {} are {}: both splits need class labels \
                 or both real targets",
                kind_word(b),
                train.display(),
                kind_word(a)
            ),
        )),
    }
}

fn kind_word(t: &Targets) -> &'static str {
    match t {
        Targets::Labels(_) => "integer class labels",
        Targets::Values { .. } => "float32 real targets",
    }
}

/// The samples of one X file as f32 (`u8 / 255`, or float32 as stored, finite).
fn read_samples(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let a = read_typed(path)?;
    let values = match a.values {
        NpyValues::U8(v) => {
            let lut: [f32; 256] = std::array::from_fn(|b| b as f32 / 255.0);
            v.iter().map(|&b| lut[usize::from(b)]).collect()
        }
        NpyValues::F32(v) => {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(npy_err(
                    path,
                    format!("value {} at flat index {i} is not finite", v[i]),
                ));
            }
            v
        }
        _ => {
            return Err(npy_err(
                path,
                format!(
                    "dtype {}: samples must be uint8 (scaled to [0, 1]) or float32; \
                     convert with x.astype(np.float32)",
                    a.dtype
                ),
            ))
        }
    };
    Ok((values, a.shape))
}

/// One split: X read, its sample shape, and its Y, checked against each other.
fn load_split(x: &Path, y: &Path) -> Result<(Dataset, Vec<usize>, Targets)> {
    let (images, shape) = read_samples(x)?;
    let (n, kind, channels, rows, cols) = x_layout(x, &shape)?;
    let targets = read_targets(y)?;
    check_count(x, y, n, targets.count())?;
    let set = Dataset {
        images,
        channels,
        rows,
        cols,
        kind,
        ..Dataset::default()
    };
    Ok((set, shape, targets))
}

/// Keeps the first `limit` samples of `set` and gives it its targets.
fn cut(mut set: Dataset, targets: Targets, limit: usize) -> Dataset {
    let keep = set.len().min(limit);
    set.images.truncate(keep * set.pixels());
    match targets {
        Targets::Labels(mut l) => {
            l.truncate(keep);
            set.labels = l;
        }
        Targets::Values { mut values, k } => {
            values.truncate(keep * k);
            set.values = values;
        }
    }
    set
}

/// Loads a NumPy data set (see the module documentation), keeping the first
/// `train_limit` / `test_limit` samples of each split (all when `None`; the files are
/// read whole either way, and the classes are those of the whole files, as [`probe`]
/// finds them).
///
/// Errors: [`Error::Config`] for the paths ([`files`]), [`Error::Npy`] naming the file for
/// every fault of a file or between two files, [`Error::Io`] when a file cannot be read.
pub fn load(
    paths: &[PathBuf],
    train_limit: Option<usize>,
    test_limit: Option<usize>,
) -> Result<DataSplit> {
    let [tx, ty, vx, vy] = files(paths)?;
    let (train, train_shape, train_y) = load_split(&tx, &ty)?;
    let (test, test_shape, test_y) = load_split(&vx, &vy)?;
    check_same_shape(&tx, &vx, &train_shape, &test_shape)?;
    let task = task_of(&ty, &vy, &train_y, &test_y)?;
    let train = cut(train, train_y, train_limit.unwrap_or(usize::MAX));
    let test = cut(test, test_y, test_limit.unwrap_or(usize::MAX));
    let dir = match paths {
        [dir] => dir.clone(),
        _ => tx.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    for (set, path) in [(&train, &tx), (&test, &vx)] {
        if set.is_empty() {
            return Err(npy_err(path, "no samples are left after the limit"));
        }
    }
    Ok(DataSplit {
        train,
        test,
        dir,
        task,
    })
}
