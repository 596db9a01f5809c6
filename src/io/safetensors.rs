//! `.safetensors` export and import of the network's weights through the Hugging Face
//! `safetensors` crate (the format's reference implementation), so a PyTorch user loads
//! them into the same network:
//!
//! ```python
//! from safetensors.torch import load_file
//! model.load_state_dict(load_file("runs/x/model.safetensors"))
//! ```
//!
//! One F32 tensor per [`Net::tensors`] entry with PyTorch's shape (`conv1.weight` ...
//! for the presets, `"<i>.weight"` / `"<i>.bias"` for layer specs), and
//! `"__metadata__": {"format": "pt"}`. The crate lays the data buffer out sorted by
//! name (the header's offsets say where each tensor is); readers go by name.

use crate::model::Net;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
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
/// Errors: [`Error::Shape`] when `weights.len()` is not P (or the crate refuses the
/// tensors, not expected).
pub fn to_bytes(net: &Net, weights: &[f32]) -> Result<Vec<u8>> {
    if weights.len() != net.n_params() {
        return Err(Error::Shape {
            what: "weights to export as safetensors".into(),
            expected: format!("{} values (P of {})", net.n_params(), net.describe()),
            found: format!("{} values", weights.len()),
        });
    }
    let bytes: Vec<u8> = weights.iter().flat_map(|v| v.to_le_bytes()).collect();
    let refused = |e: safetensors::SafeTensorError| Error::Shape {
        what: "weights to export as safetensors".into(),
        expected: "tensors the safetensors crate accepts".into(),
        found: e.to_string(),
    };
    let views = net
        .tensors()
        .into_iter()
        .map(|t| {
            let data = &bytes[t.offset * 4..(t.offset + t.len()) * 4];
            TensorView::new(Dtype::F32, t.shape.clone(), data).map(|v| (t.name, v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(refused)?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(refused)
}

/// Writes `model.safetensors`-style bytes for `net` and `weights` to `path`, through a
/// temporary file in the same folder that is synced and renamed (no half-written file
/// is ever left under `path`, and no temporary file after a failure: [`super::atomic_write`]).
/// Errors: as [`to_bytes`], and [`Error::Io`] naming the file.
pub fn write_net(path: &Path, net: &Net, weights: &[f32]) -> Result<()> {
    super::atomic_write(path, &to_bytes(net, weights)?)
}

/// Parses safetensors bytes with the crate (which checks the header, the offsets and
/// that the tensors tile the data buffer); `path` only names the source in errors.
/// Tensors are returned in the order of their data offsets. Only F32 is accepted.
///
/// Errors: [`Error::Shape`] naming the file and the crate's reason, or a tensor that is
/// not F32.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Vec<Tensor>> {
    let invalid =
        |e: safetensors::SafeTensorError| bad(path, "a valid safetensors file", e.to_string());
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let st = SafeTensors::deserialize(bytes).map_err(invalid)?;
    meta.offset_keys()
        .into_iter()
        .map(|name| {
            let view = st.tensor(&name).map_err(invalid)?;
            if view.dtype() != Dtype::F32 {
                return Err(bad(
                    path,
                    format!("dtype F32 for {name}"),
                    format!("dtype {:?}", view.dtype()),
                ));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(Tensor {
                name,
                shape: view.shape().to_vec(),
                data,
            })
        })
        .collect()
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
                format!(
                    "{} of shape {:?} ({})",
                    spec.name,
                    spec.shape,
                    net.describe()
                ),
                format!("shape {:?}", t.shape),
            ));
        }
        out[spec.range()].copy_from_slice(&t.data);
    }
    if let Some(extra) = tensors
        .iter()
        .find(|t| !specs.iter().any(|s| s.name == t.name))
    {
        let keys: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        return Err(bad(
            path,
            format!("only {}", keys.join(", ")),
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
        assert!(err.to_string().contains("x.safetensors"), "{err}");
        let err = from_bytes(&bytes[..5], p).expect_err("no length");
        assert!(err.to_string().contains("x.safetensors"), "{err}");
    }

    /// A spec network's keys: PyTorch's `Sequential` names, read back by name
    /// whatever order the crate stored them in (it sorts: "0.bias" before "0.weight").
    #[test]
    fn spec_networks_round_trip_by_name() {
        let spec = crate::model::spec::NetSetting::parse(
            "conv2d(2,3) relu flatten linear(4) tanh linear(10,bias=false)",
        )
        .expect("spec");
        let net = Net::from_spec(spec.0);
        let w = weights(&net);
        let back =
            from_bytes(&to_bytes(&net, &w).expect("serialise"), Path::new("m")).expect("parse");
        let mut names: Vec<_> = back.iter().map(|t| t.name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            ["0.bias", "0.weight", "3.bias", "3.weight", "5.weight"]
        );
        for t in net.tensors() {
            let b = back.iter().find(|b| b.name == t.name).expect("key");
            assert_eq!(b.shape, t.shape);
            assert_eq!(b.data, w[t.range()]);
        }
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
