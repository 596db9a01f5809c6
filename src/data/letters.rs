//! notMNIST as the authors had it: a folder per letter `A` … `J` of 28 × 28 PNG files.
//!
//! Two layouts are accepted:
//! - `DIR/A … DIR/J`: every image is loaded, then split by a seeded permutation
//!   (`ChaCha8Rng` seeded with `seed`): the first ⌊n · test_fraction⌉ images of the
//!   permutation form the test split, the rest the training split;
//! - `DIR/train/A … J` and `DIR/test/A … J` (when both `train` and `test` exist): the
//!   given split is kept; `test_fraction` is ignored.
//!
//! Letter `A` is label 0, …, `J` label 9. Files are the `*.png` entries of each folder
//! (any case), read in name order, then each split is put in a seeded random order (so
//! that file-order mini-batches mix the letters). Pixels become `u8 / 255` as
//! torchvision's `ToTensor`. 8-bit and 16-bit grayscale are used as they are (16-bit
//! reduced to 8); RGB, RGBA, palette and gray+alpha images are converted to luminance
//! `L = (299 R + 587 G + 114 B) / 1000` rounded to nearest (ITU-R 601, as PIL's
//! `convert("L")`), alpha ignored. An image of another size than 28 × 28 is an [`Error::Shape`] naming the
//! file. A file that does not decode as PNG (notMNIST has a few corrupt files) is
//! skipped and counted in [`LettersReport::skipped`].

use super::{DataSplit, Dataset};
use crate::model::{CLASSES, IMG, IMG_PIXELS};
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The folder names, in label order.
pub const LETTERS: [&str; CLASSES] = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];

/// What loading a letters folder found besides the images.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LettersReport {
    /// Images loaded (both splits).
    pub loaded: usize,
    /// Files that did not decode as PNG, in the order met.
    pub skipped: Vec<PathBuf>,
}

/// Loads a letters folder (see the module docs) and prints one warning line to stderr
/// when corrupt files were skipped. Errors: as [`load_letters`].
pub fn load_letters_dir(dir: &Path, test_fraction: f64, seed: u64) -> Result<DataSplit> {
    let (split, report) = load_letters(dir, test_fraction, seed)?;
    if !report.skipped.is_empty() {
        eprintln!(
            "warning: {}: skipped {} unreadable PNG file(s) (first: {}); loaded {}",
            dir.display(),
            report.skipped.len(),
            report.skipped[0].display(),
            report.loaded
        );
    }
    Ok(split)
}

/// Loads a letters folder (see the module docs): both splits, each n × 784 pixels in
/// [0, 1] with labels 0–9, and a report of the skipped files.
///
/// Errors: [`Error::Config`] when `test_fraction` is not in (0, 1) for a folder
/// without `train`/`test`, a letter folder is missing, or a split ends up empty;
/// [`Error::Io`] when a folder or file cannot be read; [`Error::Shape`] naming the
/// file for an image that is not 28 × 28.
pub fn load_letters(
    dir: &Path,
    test_fraction: f64,
    seed: u64,
) -> Result<(DataSplit, LettersReport)> {
    let mut report = LettersReport::default();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (train, test) = if dir.join("train").is_dir() && dir.join("test").is_dir() {
        let train = read_letter_folders(&dir.join("train"), &mut report)?;
        let test = read_letter_folders(&dir.join("test"), &mut report)?;
        (train, test)
    } else {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::Config(format!(
                "test_fraction must be in (0, 1) to split {}, got {test_fraction}",
                dir.display()
            )));
        }
        let all = read_letter_folders(dir, &mut report)?;
        let n = all.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let n_test = ((n as f64) * test_fraction).round() as usize;
        let test = order[..n_test].iter().map(|&i| all[i].clone()).collect();
        let train = order[n_test..].iter().map(|&i| all[i].clone()).collect();
        (train, test)
    };
    report.loaded = train.len() + test.len();
    let mut sets = Vec::with_capacity(2);
    for (name, mut items) in [("training", train), ("test", test)] {
        if items.is_empty() {
            return Err(Error::Config(format!(
                "the {name} split of {} is empty ({} images loaded in all); add images or change test_fraction",
                dir.display(),
                report.loaded
            )));
        }
        items.shuffle(&mut rng);
        let mut images = Vec::with_capacity(items.len() * IMG_PIXELS);
        let mut labels = Vec::with_capacity(items.len());
        for (label, px) in items {
            images.extend(px.iter().map(|&b| f32::from(b) / 255.0));
            labels.push(label);
        }
        sets.push(Dataset::images(images, labels, IMG, IMG));
    }
    let test = sets.pop();
    let train = sets.pop();
    match (train, test) {
        (Some(train), Some(test)) => Ok((
            DataSplit {
                train,
                test,
                dir: dir.to_path_buf(),
                task: crate::data::Task::default(),
            },
            report,
        )),
        _ => Err(Error::Config("internal: letters splits missing".into())),
    }
}

/// (label, 784 pixels) of every decodable PNG under `dir/A … dir/J`.
fn read_letter_folders(dir: &Path, report: &mut LettersReport) -> Result<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    for (label, letter) in LETTERS.iter().enumerate() {
        let folder = dir.join(letter);
        if !folder.is_dir() {
            return Err(Error::Config(format!(
                "{} is missing: a letters folder holds one sub-folder per letter A … J of 28×28 PNG files",
                folder.display()
            )));
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
            .map_err(|e| Error::io(&folder, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png")))
            .collect();
        files.sort();
        for path in files {
            match read_png_gray(&path)? {
                Some(px) => out.push((label as u8, px)),
                None => report.skipped.push(path),
            }
        }
    }
    Ok(out)
}

/// The 784 luminance bytes of a 28 × 28 PNG; `None` when the file does not decode.
/// Errors: [`Error::Io`] when the file cannot be opened, [`Error::Shape`] for another size.
pub fn read_png_gray(path: &Path) -> Result<Option<Vec<u8>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // A 28 × 28 image needs a few KiB; a corrupt header must not make the decoder
    // reserve more than this.
    let limits = png::Limits { bytes: 1 << 20 };
    let mut decoder = png::Decoder::new_with_limits(std::io::BufReader::new(file), limits);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let Ok(mut reader) = decoder.read_info() else {
        return Ok(None);
    };
    let (w, h) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    if (w, h) != (IMG, IMG) {
        return Err(Error::Shape {
            what: format!("letter image {}", path.display()),
            expected: format!("{IMG}×{IMG} pixels"),
            found: format!("{w}×{h} (width × height)"),
        });
    }
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let Ok(frame) = reader.next_frame(&mut buf) else {
        return Ok(None);
    };
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Ok(None),
    };
    if frame.bit_depth != png::BitDepth::Eight || frame.line_size < w * channels {
        return Ok(None);
    }
    let mut px = Vec::with_capacity(IMG_PIXELS);
    for row in buf.chunks(frame.line_size).take(h) {
        for p in row[..w * channels].chunks_exact(channels) {
            px.push(match channels {
                1 | 2 => p[0],
                _ => {
                    let l = (299 * u32::from(p[0])
                        + 587 * u32::from(p[1])
                        + 114 * u32::from(p[2])
                        + 500)
                        / 1000;
                    l as u8
                }
            });
        }
    }
    if px.len() != IMG_PIXELS {
        return Ok(None);
    }
    Ok(Some(px))
}
