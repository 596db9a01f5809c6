//! IDX reader and data-folder loader: one test per fault on crafted files, gzip/raw
//! equivalence, Dataset helpers, and the bundled MNIST.

mod common;
use common::idx_bytes;

use std::io::Write;
use std::path::{Path, PathBuf};

use enkf_dnn::data::{
    default_mnist_dir, load_dir, read_images, read_labels, DataError, Dataset, TEST_IMAGES,
    TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS,
};

/// A fresh, empty folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("enkf-dnn-data-idx-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Image file bytes: `n` images of `rows × cols`, pixel j of the file = (j·7 + 3) mod 256.
fn image_file(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    let len = (n * rows * cols) as usize;
    let data: Vec<u8> = (0..len).map(|j| ((j * 7 + 3) % 256) as u8).collect();
    idx_bytes(&[n, rows, cols], &data)
}

/// Label file bytes: labels i mod 10.
fn label_file(n: u32) -> Vec<u8> {
    let data: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    idx_bytes(&[n], &data)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write test file");
    p
}

/// Writes a valid four-file folder: 3 training and 2 test images of `rows × cols`.
fn write_valid_dir(dir: &Path, rows: u32, cols: u32) {
    write(dir, TRAIN_IMAGES, &image_file(3, rows, cols));
    write(dir, TRAIN_LABELS, &label_file(3));
    write(dir, TEST_IMAGES, &image_file(2, rows, cols));
    write(dir, TEST_LABELS, &label_file(2));
}

/// Asserts that the error's message names `file` (its file name).
fn assert_names(err: &DataError, file: &str) {
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(file), "message does not name {file}: {msg}");
}

#[test]
fn bad_magic_is_rejected() {
    let t = TempDir::new("bad-magic");
    let mut bytes = image_file(2, 3, 3);
    bytes[0] = 0x12;
    bytes[1] = 0x34;
    let p = write(t.path(), "bad-magic-images", &bytes);
    let err = read_images(&p).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::BadMagic {
                found: 0x1234_0803,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "bad-magic-images");
}

#[test]
fn wrong_data_type_byte_is_rejected() {
    let t = TempDir::new("bad-dtype");
    let mut bytes = image_file(2, 3, 3);
    bytes[2] = 0x0d; // float
    let p = write(t.path(), "float-images", &bytes);
    let err = read_images(&p).unwrap_err();
    assert!(
        matches!(err, DataError::DataType { found: 0x0d, .. }),
        "{err:?}"
    );
    assert_names(&err, "float-images");
}

#[test]
fn bad_rank_is_rejected_both_ways() {
    let t = TempDir::new("bad-rank");
    let labels = write(t.path(), "labels-as-images", &label_file(4));
    let err = read_images(&labels).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Rank {
                expected: 3,
                found: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "labels-as-images");
    assert!(err.to_string().contains("label file"), "{err}");

    let images = write(t.path(), "images-as-labels", &image_file(2, 2, 2));
    let err = read_labels(&images).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Rank {
                expected: 1,
                found: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "images-as-labels");
}

#[test]
fn truncated_images_are_rejected() {
    let t = TempDir::new("trunc-images");
    let full = image_file(4, 5, 5); // 16 + 100 bytes
    let p = write(t.path(), TRAIN_IMAGES, &full[..full.len() - 1]);
    let err = read_images(&p).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Truncated {
                expected: 116,
                found: 115,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, TRAIN_IMAGES);

    // Cut inside the header: dims incomplete.
    let p = write(t.path(), "short-header", &full[..10]);
    let err = read_images(&p).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Truncated {
                expected: 16,
                found: 10,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "short-header");
}

#[test]
fn over_long_images_are_rejected() {
    let t = TempDir::new("long-images");
    let mut bytes = image_file(4, 5, 5);
    bytes.extend_from_slice(&[0, 0, 0]);
    let p = write(t.path(), TEST_IMAGES, &bytes);
    let err = read_images(&p).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TrailingBytes {
                expected: 116,
                found: 119,
                extra: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, TEST_IMAGES);
}

#[test]
fn truncated_labels_are_rejected() {
    let t = TempDir::new("trunc-labels");
    let full = label_file(20); // 8 + 20 bytes
    let p = write(t.path(), TRAIN_LABELS, &gzip(&full[..25]));
    let err = read_labels(&p).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Truncated {
                expected: 28,
                found: 25,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, TRAIN_LABELS);
}

#[test]
fn over_long_labels_are_rejected() {
    let t = TempDir::new("long-labels");
    let mut bytes = label_file(20);
    bytes.push(1);
    let p = write(t.path(), "t10k-labels-idx1-ubyte.gz", &gzip(&bytes));
    let err = read_labels(&p).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TrailingBytes {
                expected: 28,
                found: 29,
                extra: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "t10k-labels-idx1-ubyte.gz");
}

#[test]
fn corrupt_gzip_is_rejected() {
    let t = TempDir::new("corrupt-gzip");
    let z = gzip(&image_file(50, 4, 4));
    // Keep the gzip magic and cut the stream in the middle.
    let p = write(t.path(), "cut.gz", &z[..z.len() / 2]);
    let err = read_images(&p).unwrap_err();
    assert!(matches!(err, DataError::Gzip { .. }), "{err:?}");
    assert_names(&err, "cut.gz");
}

#[test]
fn count_mismatch_between_images_and_labels_is_rejected() {
    let t = TempDir::new("count-mismatch");
    write_valid_dir(t.path(), 2, 2);
    write(t.path(), TEST_LABELS, &label_file(3));
    let err = load_dir(t.path()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::CountMismatch {
                n_images: 2,
                n_labels: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, TEST_IMAGES);
    assert_names(&err, TEST_LABELS);
}

#[test]
fn image_size_mismatch_between_train_and_test_is_rejected() {
    let t = TempDir::new("size-mismatch");
    write_valid_dir(t.path(), 3, 4);
    write(t.path(), TEST_IMAGES, &image_file(2, 4, 3));
    let err = load_dir(t.path()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::SizeMismatch {
                train_rows: 3,
                train_cols: 4,
                test_rows: 4,
                test_cols: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, TRAIN_IMAGES);
    assert_names(&err, TEST_IMAGES);
}

#[test]
fn label_out_of_range_is_rejected() {
    let t = TempDir::new("label-range");
    let mut labels: Vec<u8> = (0..400u32).map(|i| (i % 10) as u8).collect();
    labels[345] = 12;
    labels[346] = 200; // only the first offender is reported
    let name = "t10k-labels-idx1-ubyte.gz";
    let p = write(t.path(), name, &gzip(&idx_bytes(&[400], &labels)));
    let err = read_labels(&p).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                index: 345,
                label: 12,
                classes: 10,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, name);
    assert!(
        err.to_string()
            .ends_with("t10k-labels-idx1-ubyte.gz: label 12 at index 345 is outside 0..10"),
        "{err}"
    );
}

#[test]
fn missing_file_names_path_and_lists_folder() {
    let t = TempDir::new("missing");
    write_valid_dir(t.path(), 2, 2);
    std::fs::remove_file(t.path().join(TEST_LABELS)).expect("remove");
    let err = load_dir(t.path()).unwrap_err();
    match &err {
        DataError::MissingFile { path, contents } => {
            assert_eq!(path, &t.path().join(TEST_LABELS));
            let listed = contents.as_ref().expect("folder is listable");
            assert_eq!(listed, &[TEST_IMAGES, TRAIN_IMAGES, TRAIN_LABELS]);
        }
        other => panic!("expected MissingFile, got {other:?}"),
    }
    let msg = err.to_string();
    assert_names(&err, TEST_LABELS);
    assert!(
        msg.contains(TRAIN_IMAGES),
        "folder contents not listed: {msg}"
    );

    let err = load_dir(&t.path().join("no-such-folder")).unwrap_err();
    assert!(
        matches!(err, DataError::MissingFile { contents: None, .. }),
        "{err:?}"
    );
    assert_names(&err, "no-such-folder");
}

#[test]
fn gzip_and_raw_give_identical_results() {
    let raw = TempDir::new("raw");
    let gz = TempDir::new("gz");
    write_valid_dir(raw.path(), 5, 3);
    for name in [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS] {
        let bytes = std::fs::read(raw.path().join(name)).expect("read");
        write(gz.path(), &format!("{name}.gz"), &gzip(&bytes));
    }
    // Detection is by content: a gzip stream under a raw name still reads.
    let bytes = std::fs::read(raw.path().join(TEST_IMAGES)).expect("read");
    let disguised = write(gz.path(), "gzip-without-suffix", &gzip(&bytes));

    let a = load_dir(raw.path()).expect("raw loads");
    let b = load_dir(gz.path()).expect("gzip loads");
    assert_eq!(a.train, b.train);
    assert_eq!(a.test, b.test);
    assert_eq!(
        read_images(&disguised).expect("disguised").pixels,
        a.test.images
    );
    assert_eq!((a.train.len(), a.test.len()), (3, 2));
    assert_eq!((a.train.rows, a.train.cols), (5, 3));
    assert_eq!(a.train.labels, [0, 1, 2]);
}

#[test]
fn gz_is_preferred_when_both_exist() {
    let t = TempDir::new("prefer-gz");
    write_valid_dir(t.path(), 2, 2);
    // The .gz copy has different labels; it must be the one read.
    let mut alt = label_file(3);
    alt[8..].copy_from_slice(&[9, 8, 7]);
    write(t.path(), &format!("{TRAIN_LABELS}.gz"), &gzip(&alt));
    let split = load_dir(t.path()).expect("loads");
    assert_eq!(split.train.labels, [9, 8, 7]);
}

#[test]
fn pixels_scale_exactly_like_totensor() {
    let t = TempDir::new("scale");
    let data: Vec<u8> = (0..=255u8).collect();
    let p = write(t.path(), "all-bytes", &idx_bytes(&[1, 16, 16], &data));
    let img = read_images(&p).expect("reads");
    assert_eq!((img.count, img.rows, img.cols), (1, 16, 16));
    // torchvision ToTensor: byte tensor .float().div(255), i.e. an f32 division
    // (not a multiply by 1/255, which differs in the last bit for some bytes).
    for (b, &v) in img.pixels.iter().enumerate() {
        assert_eq!(v.to_bits(), (b as f32 / 255.0).to_bits(), "byte {b}");
    }
    assert_eq!(img.pixels[255], 1.0);
    assert_eq!(img.pixels[0], 0.0);
}

#[test]
fn dataset_helpers_index_correctly() {
    // 4 images of 1×2 pixels: image i = [i, 10 + i] (as f32), labels 3 − i.
    let set = Dataset::images(
        vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0],
        vec![3, 2, 1, 0],
        1,
        2,
    );
    assert_eq!((set.len(), set.pixels(), set.is_empty()), (4, 2, false));
    assert_eq!(set.image(2), &[2.0, 12.0]);

    let mut out = vec![99.0; 7]; // stale content must be replaced
    let labels = set.gather(&[3, 0, 3], &mut out);
    assert_eq!(out, [3.0, 13.0, 0.0, 10.0, 3.0, 13.0]);
    assert_eq!(labels, [0, 3, 0]);

    let sub = set.subset(2);
    assert_eq!(sub.images, [0.0, 10.0, 1.0, 11.0]);
    assert_eq!(sub.labels, [3, 2]);
    assert_eq!(set.subset(10), set);
    assert!(set.subset(0).is_empty());
}

fn class_counts(labels: &[u8]) -> [usize; 10] {
    let mut c = [0; 10];
    for &l in labels {
        c[usize::from(l)] += 1;
    }
    c
}

#[test]
fn bundled_mnist_loads_with_known_statistics() {
    let dir = default_mnist_dir();
    let split = load_dir(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let (train, test) = (&split.train, &split.test);
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!((train.rows, train.cols), (28, 28));
    assert_eq!(train.images.len(), 60_000 * 784);
    assert_eq!(test.images.len(), 10_000 * 784);
    // Counts published with the data set (shared/data/README.md).
    assert_eq!(
        class_counts(&train.labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        class_counts(&test.labels),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(train.labels[0], 5);
    for set in [train, test] {
        let (lo, hi) = set
            .images
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        assert_eq!((lo, hi), (0.0, 1.0));
    }
}

#[test]
fn fetched_fashion_mnist_loads_when_present() {
    let dir = enkf_dnn::data::dataset_dir("fashion-mnist");
    if !dir.is_dir() {
        eprintln!(
            "skipping: {} not present (run scripts/fetch-data.sh)",
            dir.display()
        );
        return;
    }
    let split = load_dir(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    assert_eq!((split.train.len(), split.test.len()), (60_000, 10_000));
    assert_eq!((split.train.rows, split.train.cols), (28, 28));
    // Fashion-MNIST is balanced: 6000 per class in train, 1000 in test.
    assert_eq!(class_counts(&split.train.labels), [6000; 10]);
    assert_eq!(class_counts(&split.test.labels), [1000; 10]);
}
