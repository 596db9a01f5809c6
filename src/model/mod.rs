//! The authors' network: its architectures, activations and the flat parameter layout.
//!
//! Input images are 1 × 28 × 28. Layers (no biases anywhere):
//! - `conv1`: 5×5, stride 1, 1 → 10 channels, output 10 × 24 × 24;
//! - activation, max-pool 2×2 stride 2 → 10 × 12 × 12;
//! - `conv2`: 5×5, stride 1, 10 → 20 channels, output 20 × 8 × 8;
//! - activation; in [`Arch::Pooled`] also max-pool 2×2 → 20 × 4 × 4;
//! - flatten (channel-major, as `torch.flatten`) → 1280 (or 320);
//! - `fc1`: linear → 10 raw logits.
//!
//! The flat parameter vector is PyTorch `state_dict` order, each tensor row-major:
//! `conv1.weight [10,1,5,5]`, `conv2.weight [20,10,5,5]`, `fc1.weight [10, F]`.

use serde::{Deserialize, Serialize};

pub mod spec;

/// Side of an input image.
pub const IMG: usize = 28;
/// Pixels per input image.
pub const IMG_PIXELS: usize = IMG * IMG;
/// Number of output classes.
pub const CLASSES: usize = 10;
/// Convolution kernel side.
pub const KSIZE: usize = 5;
/// conv1 output channels.
pub const C1: usize = 10;
/// conv1 output side (28 − 5 + 1).
pub const H1: usize = 24;
/// Side after the first max-pool.
pub const P1: usize = 12;
/// conv2 output channels.
pub const C2: usize = 20;
/// conv2 output side (12 − 5 + 1).
pub const H2: usize = 8;
/// Side after the optional second max-pool.
pub const P2: usize = 4;

/// Network architecture.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// The authors' code: no pooling after conv2, linear 1280 → 10, P = 18,050.
    #[default]
    Paper,
    /// The paper's text: a second max-pool after conv2, linear 320 → 10, P = 8,450.
    Pooled,
}

impl Arch {
    /// Integer code shared with the CUDA kernels (`ENKF_ARCH_*` in `common.cuh`).
    pub fn code(self) -> i32 {
        match self {
            Arch::Paper => 0,
            Arch::Pooled => 1,
        }
    }
}

/// Element-wise activation after each convolution.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// 1 / (1 + e^−x), the paper's default.
    #[default]
    Logistic,
    /// max(0, x).
    Relu,
    /// tanh(x).
    Tanh,
}

impl Activation {
    /// Applies the activation to one value.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Logistic => 1.0 / (1.0 + (-x).exp()),
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
        }
    }

    /// Derivative expressed through the activation's output `y = apply(x)`.
    #[inline(always)]
    pub fn derivative_from_output(self, y: f32) -> f32 {
        match self {
            Activation::Logistic => y * (1.0 - y),
            Activation::Relu => {
                if y > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Tanh => 1.0 - y * y,
        }
    }

    /// Integer code shared with the CUDA kernels (`common.cuh`).
    pub fn code(self) -> i32 {
        match self {
            Activation::Logistic => 0,
            Activation::Relu => 1,
            Activation::Tanh => 2,
        }
    }
}

/// A network: one of the authors' architectures with an activation (the fused
/// kernels), or a layer-spec network ([`spec::NetSpec`], when built by
/// [`Net::from_spec`]; `arch` and `act` then mean nothing). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Net {
    /// Architecture (fused networks).
    pub arch: Arch,
    /// Activation after each convolution (fused networks).
    pub act: Activation,
    spec: Option<std::sync::Arc<spec::NetSpec>>,
}

/// Where one tensor lives in the flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// PyTorch `state_dict` key.
    pub name: String,
    /// PyTorch shape.
    pub shape: Vec<usize>,
    /// First index in the flat vector.
    pub offset: usize,
}

impl TensorSpec {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the tensor has no elements (never, for this network).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Index range in the flat vector.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

impl Net {
    /// One of the authors' networks (the fused kernels).
    pub fn new(arch: Arch, act: Activation) -> Self {
        Net {
            arch,
            act,
            spec: None,
        }
    }

    /// A layer-spec network.
    pub fn from_spec(spec: std::sync::Arc<spec::NetSpec>) -> Self {
        Net {
            arch: Arch::default(),
            act: Activation::default(),
            spec: Some(spec),
        }
    }

    /// The layer spec, for a layer-spec network; `None` for the fused networks.
    pub fn spec(&self) -> Option<&spec::NetSpec> {
        self.spec.as_deref()
    }

    /// Errors with [`crate::Error::Config`] naming `what` for a layer-spec network:
    /// the code paths that call this exist only for the authors' fused networks so far.
    pub fn require_fused(&self, what: &str) -> crate::Result<()> {
        match self.spec() {
            None => Ok(()),
            Some(s) => Err(crate::Error::Config(format!(
                "{what} is not available for layer-spec networks yet (net = {}); it runs \
                 the paper's networks (--arch paper or pooled)",
                s.short_form()
            ))),
        }
    }

    /// The layer spec of a network trained on real targets: [`crate::Error::Config`] for
    /// the fused networks, whose 10 outputs are classes.
    pub fn require_spec_for_real_targets(&self) -> crate::Result<&spec::NetSpec> {
        self.spec().ok_or_else(|| {
            crate::Error::Config(format!(
                "real targets need a layer-spec network (--net); {} has 10 class outputs",
                self.describe()
            ))
        })
    }

    /// A description for logs: `paper/logistic`, or the spec's short form.
    pub fn describe(&self) -> String {
        match self.spec() {
            Some(s) => s.short_form(),
            None => format!(
                "{}/{}",
                serde_json::to_value(self.arch)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                serde_json::to_value(self.act)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
        }
    }

    /// The shape of one input sample: 1 × 28 × 28 for the fused networks.
    pub fn input_shape(&self) -> spec::Shape {
        match self.spec() {
            Some(s) => s.input(),
            None => spec::IDX_INPUT,
        }
    }

    /// Values the network gives per sample: the classes (10 for the fused networks) or
    /// the regression targets.
    pub fn outputs(&self) -> usize {
        match self.spec() {
            Some(s) => s.outputs(),
            None => CLASSES,
        }
    }

    /// Side of the feature map that enters `fc1` (8 for Paper, 4 for Pooled).
    pub fn feature_side(&self) -> usize {
        match self.arch {
            Arch::Paper => H2,
            Arch::Pooled => P2,
        }
    }

    /// Inputs of `fc1`: 20·8·8 = 1280 or 20·4·4 = 320.
    pub fn fc_in(&self) -> usize {
        C2 * self.feature_side() * self.feature_side()
    }

    /// Offset of `conv1.weight` (always 0); 250 elements.
    pub const CONV1_OFFSET: usize = 0;
    /// Elements of `conv1.weight`.
    pub const CONV1_LEN: usize = C1 * KSIZE * KSIZE;
    /// Offset of `conv2.weight`; 5000 elements.
    pub const CONV2_OFFSET: usize = Self::CONV1_LEN;
    /// Elements of `conv2.weight`.
    pub const CONV2_LEN: usize = C2 * C1 * KSIZE * KSIZE;
    /// Offset of `fc1.weight`.
    pub const FC_OFFSET: usize = Self::CONV1_LEN + Self::CONV2_LEN;

    /// Elements of `fc1.weight`.
    pub fn fc_len(&self) -> usize {
        CLASSES * self.fc_in()
    }

    /// Total number of weights P (18,050 or 8,450 for the fused networks).
    pub fn n_params(&self) -> usize {
        match self.spec() {
            Some(s) => s.n_params(),
            None => Self::FC_OFFSET + self.fc_len(),
        }
    }

    /// The tensors in `state_dict` order (a spec's `"<i>.weight"`, `"<i>.bias"`).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        if let Some(s) = self.spec() {
            return s.tensors();
        }
        vec![
            TensorSpec {
                name: "conv1.weight".into(),
                shape: vec![C1, 1, KSIZE, KSIZE],
                offset: Self::CONV1_OFFSET,
            },
            TensorSpec {
                name: "conv2.weight".into(),
                shape: vec![C2, C1, KSIZE, KSIZE],
                offset: Self::CONV2_OFFSET,
            },
            TensorSpec {
                name: "fc1.weight".into(),
                shape: vec![CLASSES, self.fc_in()],
                offset: Self::FC_OFFSET,
            },
        ]
    }

    /// The bias tensors' index ranges in the flat vector (none for the fused presets).
    pub fn bias_ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.tensors()
            .iter()
            .filter(|t| t.name.ends_with(".bias"))
            .map(TensorSpec::range)
            .collect()
    }

    /// Sets every bias of `members` weight vectors (`weights`: members × P) to 0.
    pub fn zero_biases(&self, weights: &mut [f32]) {
        let (p, ranges) = (self.n_params(), self.bias_ranges());
        if p == 0 || ranges.is_empty() {
            return;
        }
        for row in weights.chunks_exact_mut(p) {
            for r in &ranges {
                row[r.clone()].fill(0.0);
            }
        }
    }

    /// Multiply-adds of one forward pass of one image.
    pub fn macs_per_image(&self) -> usize {
        if let Some(s) = self.spec() {
            return s.macs_per_image();
        }
        C1 * H1 * H1 * KSIZE * KSIZE + C2 * H2 * H2 * C1 * KSIZE * KSIZE + self.fc_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_paper() {
        assert_eq!(
            Net::new(Arch::Paper, Activation::Logistic).n_params(),
            18_050
        );
        assert_eq!(
            Net::new(Arch::Pooled, Activation::Logistic).n_params(),
            8_450
        );
    }

    #[test]
    fn tensors_tile_the_vector_in_state_dict_order() {
        for arch in [Arch::Paper, Arch::Pooled] {
            let net = Net::new(arch, Activation::Relu);
            let t = net.tensors();
            let names: Vec<_> = t.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["conv1.weight", "conv2.weight", "fc1.weight"]);
            let mut next = 0;
            for s in &t {
                assert_eq!(s.offset, next);
                next += s.len();
            }
            assert_eq!(next, net.n_params());
        }
    }

    #[test]
    fn macs_per_image_matches_design_notes() {
        assert_eq!(Net::default().macs_per_image(), 476_800);
    }
}
