//! Seeded mutation tests of every parser of untrusted bytes (issue 10, item 11): IDX
//! (raw and gzip), `.npy`, `checkpoint.bin`, config JSON, notMNIST PNG folders and
//! `summary.csv` for `plot`.
//!
//! Each case starts from a valid file and applies one seeded mutation: byte flips, a
//! truncation, an insertion, or a huge value written over a header field (a declared
//! size); formats with a checksum (checkpoint, PNG chunks) get it recomputed in half the
//! cases so that the parser behind the checksum is reached. Every case must
//! - not panic;
//! - on error, return a typed error whose message names the mutated file;
//! - on success, return data consistent with itself (lengths match the shapes);
//! - allocate, at its peak, no more than a small multiple of what the file holds
//!   (decompressed, for gzip) plus a constant: a header that declares gigabytes must not
//!   reserve them. The peak is measured per thread by a counting global allocator.
//!
//! Case counts are the constants below (3,500 in all); a failing case prints its seed,
//! case number and mutation, so it can be replayed alone.

mod common;
use common::idx_bytes;

use enkf_dnn::data::letters::{load_letters, LETTERS};
use enkf_dnn::data::{load_dir_limited, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS};
use enkf_dnn::model::IMG_PIXELS;
use enkf_dnn::train::checkpoint::{self, CheckpointState, RngState};
use enkf_dnn::train::{MetricsRow, PartialConfig, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

const IDX_CASES: usize = 1200;
const NPY_CASES: usize = 500;
const CHECKPOINT_CASES: usize = 600;
const CONFIG_CASES: usize = 600;
const PNG_CASES: usize = 400;
const SUMMARY_CASES: usize = 200;

/// Allocation allowed besides the multiple of the file size: buffers of the readers
/// (BufReader 8 KiB, the inflate window 32 KiB), lookup tables, error strings.
const SLACK: usize = 1 << 20;

mod meter {
    //! A global allocator that counts, per thread, the bytes live and their peak.
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    pub struct Counting;

    fn grow(n: usize) {
        // try_with: nothing to count while the thread's locals are being torn down.
        let _ = LIVE.try_with(|live| {
            let v = live.get().saturating_add(n);
            live.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    fn shrink(n: usize) {
        // Saturating: memory allocated on another thread may be freed on this one.
        let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
    }

    // SAFETY: every call is forwarded to the system allocator unchanged; the counters
    // are plain thread-local integers that never allocate.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grow(layout.size());
            }
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                grow(layout.size());
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            shrink(layout.size());
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                shrink(layout.size());
                grow(new_size);
            }
            p
        }
    }

    /// Runs `f` and returns its result and the peak of the bytes it had live at once on
    /// this thread (above what was live when it started).
    pub fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        let peak = PEAK.with(Cell::get).saturating_sub(base);
        (out, peak)
    }
}

#[global_allocator]
static ALLOC: meter::Counting = meter::Counting;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("enkf-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Values written over header fields: sizes that overflow, or that declare far more
/// than any test file holds.
const HUGE: [u64; 6] = [
    u32::MAX as u64,
    0x7fff_ffff,
    0x8000_0000,
    1 << 24,
    u64::MAX,
    u64::MAX / 3,
];

/// One seeded mutation of `valid`; `header` is the length of its header region (where
/// a huge value is written). Returns the bytes and a description of the mutation.
fn mutate(rng: &mut ChaCha8Rng, valid: &[u8], header: usize) -> (Vec<u8>, String) {
    let mut b = valid.to_vec();
    let desc = match rng.random_range(0..4) {
        0 => {
            let k = rng.random_range(1..=4);
            let mut at = Vec::new();
            for _ in 0..k {
                let i = rng.random_range(0..b.len());
                b[i] ^= rng.random_range(1..=255u8);
                at.push(i);
            }
            format!("flip bytes {at:?}")
        }
        1 => {
            let n = rng.random_range(0..b.len());
            b.truncate(n);
            format!("truncate to {n} bytes")
        }
        2 => {
            let at = rng.random_range(0..=b.len());
            let n = rng.random_range(1..=16);
            let ins: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            b.splice(at..at, ins);
            format!("insert {n} bytes at {at}")
        }
        _ => {
            let v = HUGE[rng.random_range(0..HUGE.len())];
            let wide = rng.random_bool(0.5);
            let width = if wide { 8 } else { 4 };
            let end = header.min(b.len()).saturating_sub(width);
            let at = rng.random_range(0..=end);
            let bytes: Vec<u8> = match (wide, rng.random_bool(0.5)) {
                (true, true) => v.to_be_bytes().to_vec(),
                (true, false) => v.to_le_bytes().to_vec(),
                (false, true) => (v as u32).to_be_bytes().to_vec(),
                (false, false) => (v as u32).to_le_bytes().to_vec(),
            };
            let n = bytes.len().min(b.len() - at);
            b[at..at + n].copy_from_slice(&bytes[..n]);
            format!("write {v:#x} ({width} bytes) at {at}")
        }
    };
    (b, desc)
}

/// Runs one case: `parse` must not panic, must stay within `budget` bytes at its peak,
/// and an error must name `file`. `parse` returns `Err(message)` for the parser's error
/// and panics itself when a successful result is inconsistent.
fn check(
    what: &str,
    case: usize,
    desc: &str,
    file: &str,
    budget: usize,
    parse: impl FnOnce() -> Result<(), String>,
) -> bool {
    let (outcome, peak) = meter::peak(|| std::panic::catch_unwind(AssertUnwindSafe(parse)));
    let ok = match outcome {
        Err(_) => panic!("{what} case {case} ({desc}): the parser panicked"),
        Ok(Ok(())) => true,
        Ok(Err(msg)) => {
            assert!(
                msg.contains(file),
                "{what} case {case} ({desc}): the error does not name {file}: {msg}"
            );
            false
        }
    };
    assert!(
        peak <= budget,
        "{what} case {case} ({desc}): peak allocation {peak} bytes > budget {budget}"
    );
    ok
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// Bytes a (possibly corrupt) gzip stream decompresses to, up to 64 MiB.
fn gunzip_len(bytes: &[u8]) -> usize {
    let mut d = flate2::read::MultiGzDecoder::new(bytes).take(64 << 20);
    let mut n = 0;
    let mut buf = [0u8; 1 << 16];
    while let Ok(k) = d.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

/// The four valid files: 20 training and 10 test images of 28 × 28 with labels.
fn idx_files() -> [(&'static str, Vec<u8>, usize); 4] {
    let images = |n: u32| {
        let px: Vec<u8> = (0..n as usize * IMG_PIXELS)
            .map(|i| (i * 31 % 256) as u8)
            .collect();
        idx_bytes(&[n, 28, 28], &px)
    };
    let labels = |n: u32| idx_bytes(&[n], &(0..n).map(|i| (i % 10) as u8).collect::<Vec<_>>());
    [
        (TRAIN_IMAGES, images(20), 16),
        (TRAIN_LABELS, labels(20), 8),
        (TEST_IMAGES, images(10), 16),
        (TEST_LABELS, labels(10), 8),
    ]
}

/// IDX raw and gzip through the folder loader, with and without limits.
#[test]
fn idx_files_survive_mutation() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x1d8);
    let dir = tmp("idx");
    let files = idx_files();
    for (name, bytes, _) in &files {
        write(&dir.join(name), bytes);
    }
    let mut loaded = 0;
    for case in 0..IDX_CASES {
        let (name, valid, header) = &files[rng.random_range(0..files.len())];
        // raw, gzip of a mutated content, or a mutated gzip stream.
        let (bytes, file, desc) = match rng.random_range(0..3) {
            0 => {
                let (b, d) = mutate(&mut rng, valid, *header);
                (b, name.to_string(), format!("{name}: {d}"))
            }
            1 => {
                let (b, d) = mutate(&mut rng, valid, *header);
                (
                    gzip(&b),
                    format!("{name}.gz"),
                    format!("{name}.gz content: {d}"),
                )
            }
            _ => {
                let gz = gzip(valid);
                // The gzip header (10 bytes) is where declared sizes would hide.
                let (b, d) = mutate(&mut rng, &gz, 10);
                (b, format!("{name}.gz"), format!("{name}.gz stream: {d}"))
            }
        };
        std::fs::remove_file(dir.join(name)).expect("rm");
        let path = dir.join(&file);
        write(&path, &bytes);
        let limit = |rng: &mut ChaCha8Rng| rng.random_bool(0.5).then(|| rng.random_range(1..=25));
        let (train_limit, test_limit) = (limit(&mut rng), limit(&mut rng));
        let others: usize = files
            .iter()
            .filter(|f| f.0 != *name)
            .map(|f| f.1.len())
            .sum();
        let justified = others + bytes.len().max(gunzip_len(&bytes));
        let desc = format!("{desc}; limits {train_limit:?}/{test_limit:?}");
        loaded += usize::from(check(
            "IDX",
            case,
            &desc,
            &file,
            8 * justified + SLACK,
            || {
                let split =
                    load_dir_limited(&dir, train_limit, test_limit).map_err(|e| e.to_string())?;
                for set in [&split.train, &split.test] {
                    assert_eq!(set.images.len(), set.len() * set.rows * set.cols);
                    assert!(set.labels.iter().all(|&l| l < 10));
                }
                assert!(train_limit.is_none_or(|n| split.train.len() <= n));
                Ok(())
            },
        ));
        std::fs::remove_file(&path).expect("rm");
        write(&dir.join(name), valid);
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("IDX: {IDX_CASES} cases, {loaded} loaded");
    // Most mutations must be caught; a few (a flipped pixel) are valid files.
    assert!(loaded < IDX_CASES / 2, "{loaded} of {IDX_CASES} loaded");
}

/// A header declaring 5 million images (3.9 GB) read with a limit of 500: the peak
/// allocation follows the 500 images, not the header.
#[test]
fn a_limited_read_allocates_for_the_limit_only() {
    let dir = tmp("idx-limit");
    for (name, bytes, _) in idx_files() {
        write(&dir.join(name), &bytes);
    }
    let present = 1000usize;
    let mut images = idx_bytes(&[5_000_000, 28, 28], &[]);
    images.extend((0..present * IMG_PIXELS).map(|i| (i % 255) as u8));
    let labels = idx_bytes(&[5_000_000], &vec![3u8; present]);
    std::fs::remove_file(dir.join(TRAIN_IMAGES)).expect("rm");
    std::fs::remove_file(dir.join(TRAIN_LABELS)).expect("rm");
    write(&dir.join(format!("{TRAIN_IMAGES}.gz")), &gzip(&images));
    write(&dir.join(format!("{TRAIN_LABELS}.gz")), &gzip(&labels));
    let (split, peak) = meter::peak(|| load_dir_limited(&dir, Some(500), None));
    let split = split.expect("limited load");
    assert_eq!(split.train.len(), 500);
    // 500 images as bytes (≤ 2× by doubling) and as f32, the test split, readers.
    let used = 500 * IMG_PIXELS;
    assert!(
        peak <= 6 * used + SLACK,
        "peak {peak} bytes for {used} bytes used"
    );
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("limited read: peak {peak} bytes for 500 images ({used} bytes)");
}

/// `.npy`: f32 and f64, 1-D and 2-D, with header text edits as well as byte mutations.
#[test]
fn npy_files_survive_mutation() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x4e59);
    let dir = tmp("npy");
    let a = dir.join("a.npy");
    enkf_dnn::io::npy::write_f32(&a, &[3, 5], &(0..15).map(|i| i as f32).collect::<Vec<_>>())
        .expect("write");
    let b = dir.join("b.npy");
    enkf_dnn::io::npy::write_f64(&b, &[7], &[0.5; 7]).expect("write");
    let valid = [
        std::fs::read(&a).expect("read"),
        std::fs::read(&b).expect("read"),
    ];
    let shapes = [
        "(18446744073709551615, 2)",
        "(4294967296, 4294967296)",
        "(-1,)",
        "()",
        "(3, 5, 0)",
        "(99999999999999999999,)",
        "(3 5)",
    ];
    let path = dir.join("case.npy");
    let mut read_ok = 0;
    for case in 0..NPY_CASES {
        let v = &valid[rng.random_range(0..2)];
        let hlen = 10 + u16::from_le_bytes([v[8], v[9]]) as usize;
        let (bytes, desc) = if rng.random_bool(0.2) {
            let text = String::from_utf8_lossy(&v[10..hlen]).into_owned();
            let shape = shapes[rng.random_range(0..shapes.len())];
            let start = text.find("'shape': ").map_or(0, |i| i + 9);
            let end = text[start..]
                .find(')')
                .map_or(text.len(), |i| start + i + 1);
            let new = format!("{}{shape}{}", &text[..start], &text[end..]);
            let mut b = v[..8].to_vec();
            b.extend_from_slice(&(new.len() as u16).to_le_bytes());
            b.extend_from_slice(new.as_bytes());
            b.extend_from_slice(&v[hlen..]);
            (b, format!("shape {shape}"))
        } else {
            mutate(&mut rng, v, hlen)
        };
        write(&path, &bytes);
        read_ok += usize::from(check(
            "npy",
            case,
            &desc,
            "case.npy",
            8 * bytes.len() + SLACK,
            || {
                let arr = enkf_dnn::io::npy::read(&path).map_err(|e| e.to_string())?;
                assert_eq!(arr.data.len(), arr.shape.iter().product::<usize>());
                Ok(())
            },
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("npy: {NPY_CASES} cases, {read_ok} read");
    assert!(read_ok < NPY_CASES / 2);
}

fn checkpoint_state() -> CheckpointState {
    let rng = ChaCha8Rng::seed_from_u64(1);
    CheckpointState {
        config: TrainConfig::default(),
        params: 7,
        members: 3,
        repetitions: 2,
        t: 9,
        batch_global: 4,
        rep: 1,
        order: (0..50).collect(),
        shuffle_rng: RngState::of(&rng),
        adapt_rng: RngState::of(&rng),
        resample_rng: RngState::of(&rng),
        adapt_prev: Some(12.5),
        rows: (0..5)
            .map(|t| MetricsRow::training(t, t as f64 / 10.0, 3, 2, 2.0, 0.2))
            .collect(),
        adaptive_log: Vec::new(),
        resampled: 0,
        algorithm_time: 0.0,
        nesterov_theta: None,
        shards: None,
    }
}

/// Replaces the trailing CRC-32 of a checkpoint with the one of its (mutated) body.
fn fix_crc(b: &mut [u8]) {
    if b.len() < 4 {
        return;
    }
    let body = b.len() - 4;
    let mut crc = flate2::Crc::new();
    crc.update(&b[..body]);
    b[body..].copy_from_slice(&crc.sum().to_le_bytes());
}

/// `checkpoint.bin`: byte mutations, and edits of the JSON state's sizes, with the CRC
/// recomputed in half the cases so that the reader behind the checksum is exercised.
#[test]
fn checkpoints_survive_mutation() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xc4c4);
    let dir = tmp("ckpt");
    let path = dir.join("checkpoint.bin");
    let ensemble: Vec<f32> = (0..21).map(|i| i as f32 * 0.1).collect();
    checkpoint::write(&path, &checkpoint_state(), &ensemble).expect("write");
    let valid = std::fs::read(&path).expect("read");
    let edits = [
        ("\"members\":3", "\"members\":18446744073709551615"),
        ("\"params\":7", "\"params\":4611686018427387904"),
        ("\"members\":3", "\"members\":0"),
        ("\"t\":9", "\"t\":-1"),
        ("\"order\":[0,", "\"order\":[18446744073709551615,"),
        (
            "\"word_pos\":\"",
            "\"word_pos\":\"99999999999999999999999999999999999999999",
        ),
    ];
    let mut read_ok = 0;
    for case in 0..CHECKPOINT_CASES {
        let (mut bytes, mut desc) = if rng.random_bool(0.25) {
            let (from, to) = edits[rng.random_range(0..edits.len())];
            let text = String::from_utf8_lossy(&valid[16..]).into_owned();
            assert!(text.contains(from), "{from} not in the checkpoint JSON");
            let jlen = u64::from_le_bytes(valid[8..16].try_into().expect("8 bytes")) as usize;
            let json = std::str::from_utf8(&valid[16..16 + jlen]).expect("utf-8");
            let new = json.replacen(from, to, 1);
            let mut b = valid[..8].to_vec();
            b.extend_from_slice(&(new.len() as u64).to_le_bytes());
            b.extend_from_slice(new.as_bytes());
            b.extend_from_slice(&valid[16 + jlen..]);
            (b, format!("edit {to}"))
        } else {
            mutate(&mut rng, &valid, 16)
        };
        if rng.random_bool(0.5) {
            fix_crc(&mut bytes);
            desc.push_str(", CRC fixed");
        }
        write(&path, &bytes);
        read_ok += usize::from(check(
            "checkpoint",
            case,
            &desc,
            "checkpoint.bin",
            16 * bytes.len() + SLACK,
            || {
                let (state, u) = checkpoint::read(&path).map_err(|e| e.to_string())?;
                assert_eq!(u.len(), state.members * state.params);
                Ok(())
            },
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("checkpoint: {CHECKPOINT_CASES} cases, {read_ok} read");
    assert!(read_ok < CHECKPOINT_CASES / 2);
}

/// Config JSON as a run writes it: byte mutations of the text, and values of every kind
/// put under its keys. Reading must name the file; resolving must not panic.
#[test]
fn config_files_survive_mutation() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xc0f);
    let dir = tmp("config");
    let path = dir.join("config.json");
    let mut value = serde_json::to_value(TrainConfig::default()).expect("json");
    if let serde_json::Value::Object(m) = &mut value {
        m.insert("program".into(), "enkf-dnn".into());
        m.insert("iterations_total".into(), 7504.into());
        m.insert("n_ensembles".into(), 5000.into());
        m.remove("members");
    }
    let valid = serde_json::to_string_pretty(&value).expect("json");
    let keys: Vec<String> = match &value {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let values = [
        "\"sixteen\"",
        "-1",
        "1e999",
        "1e308",
        "-1e308",
        "18446744073709551616",
        "18446744073709551615",
        "null",
        "[]",
        "{}",
        "true",
        "0",
        "0.5",
        "NaN",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        "\"\"",
    ];
    let mut parsed = 0;
    for case in 0..CONFIG_CASES {
        let (text, desc) = if rng.random_bool(0.5) {
            let key = &keys[rng.random_range(0..keys.len())];
            let v = values[rng.random_range(0..values.len())];
            let mut obj: serde_json::Map<String, serde_json::Value> = match &value {
                serde_json::Value::Object(m) => m.clone(),
                _ => serde_json::Map::new(),
            };
            obj.remove(key);
            let rest = serde_json::to_string(&obj).expect("json");
            let text = format!("{{\"{key}\": {v}, {}", &rest[1..]);
            (text.into_bytes(), format!("{key} = {v}"))
        } else {
            mutate(&mut rng, valid.as_bytes(), 0)
        };
        write(&path, &text);
        parsed += usize::from(check(
            "config",
            case,
            &desc,
            "config.json",
            64 * text.len() + SLACK,
            || {
                let (p, _) = PartialConfig::from_file(&path).map_err(|e| e.to_string())?;
                // Resolving may refuse a value (naming its key); it must not panic.
                let _ = p.resolve();
                Ok(())
            },
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("config: {CONFIG_CASES} cases, {parsed} parsed");
    assert!(parsed < CONFIG_CASES);
}

/// A PNG of 28 × 28 gray pixels.
fn png_bytes(seed: usize) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 28, 28);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("header");
        let px: Vec<u8> = (0..IMG_PIXELS)
            .map(|i| ((i * 7 + seed * 13) % 256) as u8)
            .collect();
        w.write_image_data(&px).expect("data");
    }
    out
}

/// Recomputes the CRC of every chunk of a PNG whose chunk lengths still fit the file.
fn fix_png_crcs(b: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= b.len() {
        let len = u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e + 4 <= b.len()) else {
            return;
        };
        let mut crc = flate2::Crc::new();
        crc.update(&b[at + 4..end]);
        b[end..end + 4].copy_from_slice(&crc.sum().to_be_bytes());
        at = end + 4;
    }
}

/// notMNIST folders: one PNG of a 20-image folder mutated per case (the IHDR width and
/// height are in the header region), chunk CRCs fixed in half the cases.
#[test]
fn letter_folders_survive_mutation() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x9e7);
    let dir = tmp("letters");
    let mut files = Vec::new();
    for (l, letter) in LETTERS.iter().enumerate() {
        std::fs::create_dir_all(dir.join(letter)).expect("mkdir");
        for k in 0..2 {
            let path = dir.join(letter).join(format!("img{k}.png"));
            let bytes = png_bytes(l * 2 + k);
            write(&path, &bytes);
            files.push((path, bytes));
        }
    }
    let total: usize = files.iter().map(|f| f.1.len()).sum();
    let mut loaded_all = 0;
    for case in 0..PNG_CASES {
        let (path, valid) = &files[rng.random_range(0..files.len())];
        // Signature (8) + IHDR length, type and data (8 + 13).
        let (mut bytes, mut desc) = mutate(&mut rng, valid, 29);
        if rng.random_bool(0.5) {
            fix_png_crcs(&mut bytes);
            desc.push_str(", CRCs fixed");
        }
        write(path, &bytes);
        let name = format!(
            "{}/{}",
            path.parent()
                .and_then(Path::file_name)
                .map_or("".into(), |n| n.to_string_lossy()),
            path.file_name().map_or("".into(), |n| n.to_string_lossy())
        );
        let desc = format!("{name}: {desc}");
        let justified = total + bytes.len();
        loaded_all += usize::from(check(
            "PNG",
            case,
            &desc,
            &name,
            16 * justified + 2 * SLACK,
            || {
                let (split, report) = load_letters(&dir, 0.25, 3).map_err(|e| e.to_string())?;
                assert_eq!(report.loaded + report.skipped.len(), files.len());
                for set in [&split.train, &split.test] {
                    assert_eq!(set.images.len(), set.len() * IMG_PIXELS);
                }
                Ok(())
            },
        ));
        write(path, valid);
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("PNG: {PNG_CASES} cases, {loaded_all} folders loaded (corrupt files skipped)");
}

const PLOT_JSON: &str = r#"{"experiment": "figx", "title": "T", "x": "iteration",
  "x_label": "iteration", "y_label": "test error (%)", "log_y": false,
  "runs": [{"name": "a", "label": "A"}, {"name": "b", "label": "B"}], "stats": []}"#;

/// `summary.csv` under `plot`: byte mutations and extreme values in its fields.
#[test]
fn summary_csv_survives_mutation() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5c5);
    let dir = tmp("summary");
    write(&dir.join("plot.json"), PLOT_JSON.as_bytes());
    let mut valid =
        String::from("run,label,iteration,epoch,test_error_mean,test_error_std,seeds\n");
    for run in ["a", "b"] {
        for i in 0..6 {
            valid.push_str(&format!(
                "{run},{run} label,{},{},{},{},3\n",
                i * 100,
                i as f64 * 0.1,
                90.0 - 10.0 * i as f64,
                0.5 * i as f64
            ));
        }
    }
    // Values out of range, and in range but at the edges of what f64 and the axes hold.
    let extremes = [
        "NaN",
        "inf",
        "-inf",
        "1e308",
        "-1e308",
        "18446744073709551615",
        "-1",
        "",
        "0",
        "100",
        "1e-320",
        "5e-324",
        "99.99999999999999",
        "4503599627370497",
        "0.1",
        "50",
    ];
    let path = dir.join("summary.csv");
    let mut drawn = 0;
    for case in 0..SUMMARY_CASES {
        let (bytes, desc) = if rng.random_bool(0.5) {
            let mut lines: Vec<Vec<String>> = valid
                .lines()
                .map(|l| l.split(',').map(str::to_string).collect())
                .collect();
            let mut edits = Vec::new();
            for _ in 0..rng.random_range(1..=2) {
                let row = rng.random_range(1..lines.len());
                let col = rng.random_range(2..7);
                let v = extremes[rng.random_range(0..extremes.len())];
                lines[row][col] = v.to_string();
                edits.push(format!("row {row} col {col} = {v:?}"));
            }
            let text: String = lines.iter().map(|l| l.join(",") + "\n").collect();
            (text.into_bytes(), edits.join(", "))
        } else {
            mutate(&mut rng, valid.as_bytes(), 0)
        };
        write(&path, &bytes);
        // Drawing two 1024 × 640 charts (bitmap and SVG) costs a few MiB whatever the file.
        drawn += usize::from(check(
            "summary.csv",
            case,
            &desc,
            "summary.csv",
            64 * bytes.len() + 64 * SLACK,
            || enkf_dnn::reproduce::plot_dir(&dir).map_err(|e| e.to_string()),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("summary.csv: {SUMMARY_CASES} cases, {drawn} drawn");
}
