//! `.safetensors` writer and reader for the network's weights, so a PyTorch user loads
//! them into the authors' `ConvNet`:
//!
//! ```python
//! from safetensors.torch import load_file
//! model.load_state_dict(load_file("runs/x/model.safetensors"))
//! ```
//!
//! Layout (the safetensors specification):
//! - bytes 0..8: N, the header length, unsigned 64-bit little-endian;
//! - bytes 8..8+N: a UTF-8 JSON object, padded at the end with spaces (0x20) so that
//!   8 + N is a multiple of 8. Per tensor `"name": {"dtype": "F32", "shape": [...],
//!   "data_offsets": [begin, end]}` (byte offsets into the data buffer, end exclusive),
//!   plus `"__metadata__": {"format": "pt"}`;
//! - bytes 8+N..: the data buffer, every tensor row-major, little-endian, back to back
//!   with no gaps, in the order of the offsets.
//!
//! We write `conv1.weight` [10,1,5,5], `conv2.weight` [20,10,5,5], `fc1.weight` [10,F]
//! in `state_dict` order ([`Net::tensors`]); the flat weight vector is already that
//! layout, so the data buffer is the vector's bytes.

use crate::model::Net;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// One tensor read from a `.safetensors` file (F32 only).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Key, e.g. `conv1.weight`.
    pub name: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Values, row-major, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

fn bad(path: &Path, expected: impl Into<String>, found: impl Into<String>) -> Error {
    Error::Shape {
        what: format!("safetensors file {}", path.display()),
        expected: expected.into(),
        found: found.into(),
    }
}

/// Serialises the network `net` with flat weights `weights` (P values, `state_dict`
/// order) to safetensors bytes (see the module docs).
/// Errors: [`Error::Shape`] when `weights.len()` is not P.
pub fn to_bytes(net: &Net, weights: &[f32]) -> Result<Vec<u8>> {
    if weights.len() != net.n_params() {
        return Err(Error::Shape {
            what: "weights to export as safetensors".into(),
            expected: format!("{} values (P of {:?})", net.n_params(), net),
            found: format!("{} values", weights.len()),
        });
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    for t in net.tensors() {
        let begin = t.offset * 4;
        let end = begin + t.len() * 4;
        header.insert(
            t.name,
            serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [begin, end] }),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + weights.len() * 4);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for v in weights {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Writes `model.safetensors`-style bytes for `net` and `weights` to `path`, through a
/// temporary file in the same folder that is synced and renamed (no half-written file
/// is ever left under `path`, and no temporary file after a failure: [`super::atomic_write`]).
/// Errors: as [`to_bytes`], and [`Error::Io`] naming the file.
pub fn write_net(path: &Path, net: &Net, weights: &[f32]) -> Result<()> {
    super::atomic_write(path, &to_bytes(net, weights)?)
}

/// Parses safetensors bytes; `path` only names the source in errors. Tensors are
/// returned in the order of their data offsets. Only F32 tensors are accepted.
///
/// Errors: [`Error::Shape`] when the file is shorter than its header length says, the
/// header is not a JSON object, a tensor is not F32, its offsets do not match its
/// shape, or the tensors do not tile the data buffer exactly.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Vec<Tensor>> {
    if bytes.len() < 8 {
        return Err(bad(
            path,
            "at least 8 bytes (header length)",
            format!("{} bytes", bytes.len()),
        ));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    let avail = (bytes.len() - 8) as u64;
    if n > avail {
        return Err(bad(
            path,
            format!("a header of {n} bytes after the 8-byte length"),
            format!("only {avail} bytes after the length (truncated, or not safetensors)"),
        ));
    }
    let n = n as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| {
        bad(
            path,
            "a JSON object as header",
            format!("invalid JSON: {e}"),
        )
    })?;
    let serde_json::Value::Object(map) = header else {
        return Err(bad(path, "a JSON object as header", "another JSON value"));
    };
    let data = &bytes[8 + n..];
    let mut tensors: BTreeMap<usize, (usize, Tensor)> = BTreeMap::new();
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|v| v.as_str()).unwrap_or("");
        if dtype != "F32" {
            return Err(bad(
                path,
                format!("dtype F32 for {name}"),
                format!("dtype '{dtype}'"),
            ));
        }
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or_else(|| bad(path, format!("a shape for {name}"), "none or not integers"))?;
        let offs: [usize; 2] = info
            .get("data_offsets")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or_else(|| {
                bad(
                    path,
                    format!("data_offsets [begin, end] for {name}"),
                    "none",
                )
            })?;
        let count: usize = shape.iter().product();
        if offs[1] < offs[0] || offs[1] - offs[0] != count * 4 || offs[1] > data.len() {
            return Err(bad(
                path,
                format!(
                    "{name}: {} bytes for shape {shape:?} within a {}-byte buffer",
                    count * 4,
                    data.len()
                ),
                format!("data_offsets {offs:?}"),
            ));
        }
        let values = data[offs[0]..offs[1]]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.insert(
            offs[0],
            (
                offs[1],
                Tensor {
                    name,
                    shape,
                    data: values,
                },
            ),
        );
    }
    let mut next = 0;
    for (&begin, (end, t)) in &tensors {
        if begin != next {
            return Err(bad(
                path,
                format!("{} to start at byte {next} (no gaps or overlaps)", t.name),
                format!("byte {begin}"),
            ));
        }
        next = *end;
    }
    if next != data.len() {
        return Err(bad(
            path,
            format!("a data buffer of {next} bytes (the tensors' extent)"),
            format!("{} bytes", data.len()),
        ));
    }
    Ok(tensors.into_values().map(|(_, t)| t).collect())
}

/// Reads every tensor of a `.safetensors` file (see [`from_bytes`]).
/// Errors: [`Error::Io`] naming the file, or the faults of [`from_bytes`].
pub fn read(path: &Path) -> Result<Vec<Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path)
}

/// Reads the weights of `net` from a `.safetensors` file into the flat vector
/// (P values, `state_dict` order). Every key of [`Net::tensors`] must be present with
/// its exact shape; extra keys are an error too (another network).
/// Errors: [`Error::Shape`] naming the key and the shapes, or those of [`read`].
pub fn read_net(path: &Path, net: &Net) -> Result<Vec<f32>> {
    let tensors = read(path)?;
    let specs = net.tensors();
    let mut out = vec![0.0f32; net.n_params()];
    for spec in &specs {
        let t = tensors
            .iter()
            .find(|t| t.name == spec.name)
            .ok_or_else(|| bad(path, format!("a tensor {}", spec.name), "none"))?;
        if t.shape != spec.shape {
            return Err(bad(
                path,
                format!("{} of shape {:?} ({net:?})", spec.name, spec.shape),
                format!("shape {:?}", t.shape),
            ));
        }
        out[spec.range()].copy_from_slice(&t.data);
    }
    if let Some(extra) = tensors
        .iter()
        .find(|t| !specs.iter().any(|s| s.name == t.name))
    {
        return Err(bad(
            path,
            "only conv1.weight, conv2.weight, fc1.weight",
            format!("also {}", extra.name),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, Arch};

    fn weights(net: &Net) -> Vec<f32> {
        (0..net.n_params())
            .map(|i| (i as f32 * 0.37).sin() * 1e-3 * (i % 97) as f32)
            .collect()
    }

    #[test]
    fn round_trip_is_exact_for_both_arches() {
        for arch in [Arch::Paper, Arch::Pooled] {
            let net = Net::new(arch, Activation::Logistic);
            let w = weights(&net);
            let bytes = to_bytes(&net, &w).expect("serialise");
            let back = from_bytes(&bytes, Path::new("mem")).expect("parse");
            let names: Vec<_> = back.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["conv1.weight", "conv2.weight", "fc1.weight"]);
            assert_eq!(back[2].shape, vec![10, net.fc_in()]);
            let flat: Vec<f32> = back.iter().flat_map(|t| t.data.clone()).collect();
            // Bit-exact: the format stores the f32 bytes unchanged.
            assert!(flat.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn header_bytes_follow_the_specification() {
        let net = Net::default();
        let w = weights(&net);
        let bytes = to_bytes(&net, &w).expect("serialise");
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        assert_eq!((8 + n) % 8, 0, "header must be padded to 8 bytes");
        assert_eq!(bytes[8], b'{');
        let text = std::str::from_utf8(&bytes[8..8 + n]).expect("utf-8");
        let trimmed = text.trim_end_matches(' ');
        assert!(trimmed.ends_with('}'), "padding must be spaces: {text:?}");
        assert!(text.len() - trimmed.len() < 8);
        let v: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(v["__metadata__"]["format"], "pt");
        assert_eq!(v["conv1.weight"]["dtype"], "F32");
        assert_eq!(v["conv1.weight"]["shape"], serde_json::json!([10, 1, 5, 5]));
        assert_eq!(
            v["conv1.weight"]["data_offsets"],
            serde_json::json!([0, 1000])
        );
        assert_eq!(
            v["conv2.weight"]["shape"],
            serde_json::json!([20, 10, 5, 5])
        );
        assert_eq!(
            v["conv2.weight"]["data_offsets"],
            serde_json::json!([1000, 21000])
        );
        assert_eq!(v["fc1.weight"]["shape"], serde_json::json!([10, 1280]));
        assert_eq!(
            v["fc1.weight"]["data_offsets"],
            serde_json::json!([21000, 72200])
        );
        assert_eq!(bytes.len(), 8 + n + 18_050 * 4);
        // First data value, little-endian.
        assert_eq!(&bytes[8 + n..8 + n + 4], &w[0].to_le_bytes());
        let last = &bytes[bytes.len() - 4..];
        assert_eq!(last, &w[w.len() - 1].to_le_bytes());
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let net = Net::default();
        assert!(matches!(
            to_bytes(&net, &[0.0; 10]),
            Err(Error::Shape { .. })
        ));
        let bytes = to_bytes(&net, &weights(&net)).expect("serialise");
        let p = Path::new("x.safetensors");
        let err = from_bytes(&bytes[..bytes.len() - 4], p).expect_err("truncated data");
        assert!(err.to_string().contains("x.safetensors"), "{err}");
        let err = from_bytes(&bytes[..20], p).expect_err("truncated header");
        assert!(err.to_string().contains("header of"), "{err}");
        let err = from_bytes(&bytes[..5], p).expect_err("no length");
        assert!(err.to_string().contains("8 bytes"), "{err}");
    }

    #[test]
    fn read_net_rejects_another_network() {
        let dir = std::env::temp_dir().join(format!("enkf-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let path = dir.join("model.safetensors");
        let pooled = Net::new(Arch::Pooled, Activation::Relu);
        let w = weights(&pooled);
        write_net(&path, &pooled, &w).expect("write");
        assert_eq!(read_net(&path, &pooled).expect("read"), w);
        let err = read_net(&path, &Net::default()).expect_err("paper arch");
        assert!(err.to_string().contains("fc1.weight"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
