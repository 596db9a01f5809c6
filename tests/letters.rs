//! notMNIST-style letter folders: generated PNGs in a temporary folder.

use enkf_dnn::data::letters::{load_letters, LETTERS};
use enkf_dnn::Error;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("enkf-letters-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// Writes a w × h PNG of `color` type with every channel byte from `px(i)` (pixel index).
fn write_png(path: &Path, w: u32, h: u32, color: png::ColorType, px: impl Fn(usize) -> Vec<u8>) {
    let f = std::fs::File::create(path).expect("create png");
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().expect("header");
    let data: Vec<u8> = (0..(w * h) as usize).flat_map(&px).collect();
    wr.write_image_data(&data).expect("data");
}

/// Folder with `per` gray images per letter; pixel i of image k of letter l is
/// (l·20 + k + i) mod 256, so every image is distinguishable.
fn make_dataset(root: &Path, per: usize) {
    for (l, letter) in LETTERS.iter().enumerate() {
        let d = root.join(letter);
        std::fs::create_dir_all(&d).expect("letter dir");
        for k in 0..per {
            write_png(
                &d.join(format!("img{k}.png")),
                28,
                28,
                png::ColorType::Grayscale,
                |i| vec![((l * 20 + k + i) % 256) as u8],
            );
        }
    }
}

#[test]
fn gray_folders_load_with_labels_and_seeded_split() {
    let root = tmp("gray");
    make_dataset(&root, 3);
    let (split, report) = load_letters(&root, 0.2, 7).expect("load");
    assert_eq!(report.loaded, 30);
    assert!(report.skipped.is_empty());
    assert_eq!(split.test.len(), 6, "round(30 · 0.2)");
    assert_eq!(split.train.len(), 24);
    assert_eq!((split.train.rows, split.train.cols), (28, 28));
    // Every image keeps its label: pixel 0 is (20·label + k)/255 with k < 3.
    for set in [&split.train, &split.test] {
        for i in 0..set.len() {
            let p0 = (set.image(i)[0] * 255.0).round() as usize;
            assert_eq!(p0 / 20, set.labels[i] as usize, "image {i}");
        }
    }
    // Same seed, same split; another seed, another split.
    let (again, _) = load_letters(&root, 0.2, 7).expect("load");
    assert_eq!(again, split);
    let (other, _) = load_letters(&root, 0.2, 8).expect("load");
    assert_ne!(other.test.images, split.test.images);
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn rgb_is_converted_by_luminance_and_corrupt_files_are_skipped() {
    let root = tmp("rgb");
    make_dataset(&root, 1);
    // An RGB(A) image in B: (R, G, B) = (200, 100, 50) → (299·200 + 587·100 + 114·50 + 500)/1000 = 124.
    write_png(
        &root.join("B").join("rgb.png"),
        28,
        28,
        png::ColorType::Rgba,
        |_| vec![200, 100, 50, 255],
    );
    std::fs::write(root.join("C").join("broken.png"), b"\x89PNG not really").expect("write");
    std::fs::write(root.join("C").join("notes.txt"), b"ignored").expect("write");
    let dir = root.join("train");
    std::fs::create_dir_all(&dir).expect("a lone train folder does not switch the layout");
    let (split, report) = load_letters(&root, 0.5, 1).expect("load");
    assert_eq!(report.loaded, 11);
    assert_eq!(report.skipped.len(), 1);
    assert!(report.skipped[0].ends_with("C/broken.png"));
    let all: Vec<(u8, f32)> = [&split.train, &split.test]
        .iter()
        .flat_map(|s| (0..s.len()).map(move |i| (s.labels[i], s.image(i)[5])))
        .collect();
    let rgb: Vec<_> = all
        .iter()
        .filter(|(_, p)| (p * 255.0).round() == 124.0)
        .collect();
    assert_eq!(rgb.len(), 1, "{all:?}");
    assert_eq!(rgb[0].0, 1, "the RGB image is in folder B");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn wrong_size_names_the_file_and_presplit_folders_are_kept() {
    let root = tmp("size");
    make_dataset(&root.join("train"), 2);
    make_dataset(&root.join("test"), 1);
    let (split, _) = load_letters(&root, 0.9, 0).expect("presplit");
    assert_eq!((split.train.len(), split.test.len()), (20, 10));
    write_png(
        &root.join("test").join("J").join("big.png"),
        32,
        28,
        png::ColorType::Grayscale,
        |_| vec![0],
    );
    let err = load_letters(&root, 0.5, 0).expect_err("32×28 image");
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(
        err.to_string().contains("big.png") && err.to_string().contains("32×28"),
        "{err}"
    );
    std::fs::remove_dir_all(root.join("test").join("J")).expect("rm");
    let err = load_letters(&root, 0.5, 0).expect_err("missing J");
    assert!(err.to_string().contains("J"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}
