//! Layer-spec networks: any feed-forward stack of the layer kinds below, described like
//! `torch.nn.Sequential` with PyTorch's own argument names.
//!
//! JSON form (what `config.json` records; every default written out):
//! `[{"type": "conv2d", "out_channels": 10, "kernel_size": 5, "stride": 1,
//! "padding": 0, "bias": false}, {"type": "logistic"}, {"type": "maxpool2d",
//! "kernel_size": 2}, {"type": "flatten"}, {"type": "linear", "out_features": 10,
//! "bias": false}]`. Short form (command line): `"conv2d(10,5,bias=false) logistic
//! maxpool2d(2) flatten linear(10,bias=false)"`, positional arguments in PyTorch's order
//! (conv2d: out_channels, kernel_size, stride, padding; linear: out_features; pools:
//! kernel_size), `key=value` for any of them.
//!
//! Defaults as in PyTorch: `stride` 1, `padding` 0, `bias` true; pools have stride =
//! kernel size and floor the output side (PyTorch's `ceil_mode=False`). `in_channels` /
//! `in_features` are inferred from the data's shape. Any other key, a missing required
//! one, a wrong type, or a layer that does not fit its input is an error naming the
//! layer index and the key.
//!
//! Parameters in `Sequential` order, each tensor row-major with PyTorch's shape: layer
//! `i`'s `"<i>.weight"` (conv2d: out × in × k × k; linear: out × in) then `"<i>.bias"`
//! (out), so a PyTorch user builds the same `nn.Sequential` and calls
//! `load_state_dict` directly.

use serde_json::{json, Map, Value};

use crate::model::{Activation, Arch, TensorSpec};
use crate::{Error, Result};

/// An element-wise activation of a layer spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecActivation {
    /// 1 / (1 + e^−x).
    Logistic,
    /// max(0, x).
    Relu,
    /// tanh(x).
    Tanh,
    /// 0 for x < 0, 1 otherwise (NaN stays NaN): no useful gradient, which the EnKF
    /// does not need.
    Heaviside,
}

impl SpecActivation {
    /// The spec's `type` name.
    pub fn name(self) -> &'static str {
        match self {
            SpecActivation::Logistic => "logistic",
            SpecActivation::Relu => "relu",
            SpecActivation::Tanh => "tanh",
            SpecActivation::Heaviside => "heaviside",
        }
    }

    /// The code of the CUDA kernels (`ENKF_ACT_*` in `kernels/common.cuh`; the first
    /// three equal [`Activation::code`]).
    pub fn code(self) -> i32 {
        match self {
            SpecActivation::Logistic => 0,
            SpecActivation::Relu => 1,
            SpecActivation::Tanh => 2,
            SpecActivation::Heaviside => 3,
        }
    }

    /// Applies the activation to one value (the first three exactly as
    /// [`Activation::apply`]).
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            SpecActivation::Logistic => Activation::Logistic.apply(x),
            SpecActivation::Relu => Activation::Relu.apply(x),
            SpecActivation::Tanh => Activation::Tanh.apply(x),
            SpecActivation::Heaviside => {
                if x < 0.0 {
                    0.0
                } else if x >= 0.0 {
                    1.0
                } else {
                    x
                }
            }
        }
    }
}

impl From<Activation> for SpecActivation {
    fn from(a: Activation) -> Self {
        match a {
            Activation::Logistic => SpecActivation::Logistic,
            Activation::Relu => SpecActivation::Relu,
            Activation::Tanh => SpecActivation::Tanh,
        }
    }
}

/// One layer of a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// 2-D cross-correlation (PyTorch `Conv2d`), square kernel, zero padding.
    Conv2d {
        /// Output channels.
        out_channels: usize,
        /// Kernel side.
        kernel_size: usize,
        /// Stride (both directions).
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
        /// Whether the layer has a bias per output channel.
        bias: bool,
    },
    /// Max-pool, window = stride = `kernel_size`, output side floored.
    MaxPool2d {
        /// Window side.
        kernel_size: usize,
    },
    /// Average-pool, window = stride = `kernel_size`, output side floored.
    AvgPool2d {
        /// Window side.
        kernel_size: usize,
    },
    /// C × H × W → C·H·W (channel-major, as `torch.flatten`).
    Flatten,
    /// Fully connected layer (PyTorch `Linear`).
    Linear {
        /// Outputs.
        out_features: usize,
        /// Whether the layer has a bias per output.
        bias: bool,
    },
    /// Element-wise activation.
    Act(SpecActivation),
}

/// The shape of the values between two layers (per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// Channels × height × width.
    Image {
        /// Channels.
        c: usize,
        /// Height.
        h: usize,
        /// Width.
        w: usize,
    },
    /// A flat vector of features.
    Vector(usize),
}

impl Shape {
    /// Number of values.
    pub fn len(self) -> usize {
        match self {
            Shape::Image { c, h, w } => c * h * w,
            Shape::Vector(f) => f,
        }
    }

    /// True when there are no values (never, for a built spec).
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shape::Image { c, h, w } => write!(f, "{c} × {h} × {w}"),
            Shape::Vector(n) => write!(f, "{n}"),
        }
    }
}

/// A layer with its input and output shapes and where its parameters live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BuiltLayer {
    /// The layer.
    pub layer: Layer,
    /// Input shape (per image).
    pub input: Shape,
    /// Output shape (per image).
    pub output: Shape,
    /// Offset of the weight in the flat vector (layers with parameters).
    pub weight_offset: usize,
    /// Offset of the bias, when the layer has one.
    pub bias_offset: Option<usize>,
}

/// A validated layer-spec network for one input shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetSpec {
    layers: Vec<BuiltLayer>,
    input: Shape,
    n_params: usize,
}

/// The error of layer `index`, naming its key.
fn layer_err(index: usize, kind: &str, msg: impl std::fmt::Display) -> Error {
    if kind.is_empty() {
        Error::Config(format!("net[{index}]: {msg}"))
    } else {
        Error::Config(format!("net[{index}] ({kind}): {msg}"))
    }
}

/// The keys each layer type accepts besides `type`.
fn allowed_keys(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "conv2d" => &["out_channels", "kernel_size", "stride", "padding", "bias"],
        "maxpool2d" | "avgpool2d" => &["kernel_size"],
        "linear" => &["out_features", "bias"],
        "flatten" | "logistic" | "relu" | "tanh" | "heaviside" => &[],
        _ => return None,
    })
}

const LAYER_TYPES: &str =
    "conv2d, maxpool2d, avgpool2d, flatten, linear, logistic, relu, tanh, heaviside";

/// Reads a positive integer key (`min` its smallest value), or `default` when absent.
fn int_key(
    obj: &Map<String, Value>,
    index: usize,
    kind: &str,
    key: &str,
    min: u64,
    default: Option<usize>,
) -> Result<usize> {
    match obj.get(key) {
        None => default.ok_or_else(|| layer_err(index, kind, format!("missing key `{key}`"))),
        Some(v) => match v.as_u64() {
            Some(n) if n >= min && n <= u32::MAX as u64 => Ok(n as usize),
            _ => Err(layer_err(
                index,
                kind,
                format!("`{key}` = {v}: must be an integer ≥ {min}"),
            )),
        },
    }
}

fn bool_key(obj: &Map<String, Value>, index: usize, kind: &str, key: &str) -> Result<bool> {
    match obj.get(key) {
        None => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(layer_err(
            index,
            kind,
            format!("`{key}` = {v}: must be true or false"),
        )),
    }
}

/// Parses one layer object of the JSON form.
fn parse_layer(index: usize, v: &Value) -> Result<Layer> {
    let obj = v
        .as_object()
        .ok_or_else(|| layer_err(index, "", format!("{v} is not an object with a `type`")))?;
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(layer_err(
                index,
                "",
                format!("`type` = {other}: must be a string, one of {LAYER_TYPES}"),
            ))
        }
        None => return Err(layer_err(index, "", "missing key `type`")),
    };
    let allowed = allowed_keys(kind).ok_or_else(|| {
        layer_err(
            index,
            "",
            format!("unknown `type` \"{kind}\" (one of {LAYER_TYPES})"),
        )
    })?;
    for key in obj.keys() {
        if key != "type" && !allowed.contains(&key.as_str()) {
            let hint = if allowed.is_empty() {
                "it takes no arguments".to_string()
            } else {
                format!("it takes {}", allowed.join(", "))
            };
            return Err(layer_err(
                index,
                kind,
                format!("unknown key `{key}` ({hint})"),
            ));
        }
    }
    Ok(match kind {
        "conv2d" => Layer::Conv2d {
            out_channels: int_key(obj, index, kind, "out_channels", 1, None)?,
            kernel_size: int_key(obj, index, kind, "kernel_size", 1, None)?,
            stride: int_key(obj, index, kind, "stride", 1, Some(1))?,
            padding: int_key(obj, index, kind, "padding", 0, Some(0))?,
            bias: bool_key(obj, index, kind, "bias")?,
        },
        "maxpool2d" => Layer::MaxPool2d {
            kernel_size: int_key(obj, index, kind, "kernel_size", 1, None)?,
        },
        "avgpool2d" => Layer::AvgPool2d {
            kernel_size: int_key(obj, index, kind, "kernel_size", 1, None)?,
        },
        "linear" => Layer::Linear {
            out_features: int_key(obj, index, kind, "out_features", 1, None)?,
            bias: bool_key(obj, index, kind, "bias")?,
        },
        "flatten" => Layer::Flatten,
        "logistic" => Layer::Act(SpecActivation::Logistic),
        "relu" => Layer::Act(SpecActivation::Relu),
        "tanh" => Layer::Act(SpecActivation::Tanh),
        "heaviside" => Layer::Act(SpecActivation::Heaviside),
        _ => unreachable!("allowed_keys knows every type"),
    })
}

/// Parses the JSON form (an array of layer objects; a string is read as the short
/// form, so a config file may use either). Errors: [`Error::Config`] naming the layer
/// index and key.
pub fn parse_json(v: &Value) -> Result<Vec<Layer>> {
    if let Value::String(text) = v {
        return parse_short(text);
    }
    let arr = v
        .as_array()
        .ok_or_else(|| Error::Config(format!("net: {v} is not a list of layers")))?;
    if arr.is_empty() {
        return Err(Error::Config("net: the list of layers is empty".into()));
    }
    arr.iter()
        .enumerate()
        .map(|(i, l)| parse_layer(i, l))
        .collect()
}

/// The positional argument names of each layer type in the short form.
fn positional(kind: &str) -> &'static [&'static str] {
    match kind {
        "conv2d" => &["out_channels", "kernel_size", "stride", "padding"],
        "maxpool2d" | "avgpool2d" => &["kernel_size"],
        "linear" => &["out_features"],
        _ => &[],
    }
}

/// Parses the short form (`"conv2d(10,5) logistic maxpool2d(2) flatten linear(10)"`)
/// into the JSON form, then as [`parse_json`]. Errors: [`Error::Config`] naming the
/// layer index (and the argument) that does not parse.
pub fn parse_short(text: &str) -> Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let index = layers.len();
        let name_end = rest
            .find(|c: char| c == '(' || c.is_whitespace())
            .unwrap_or(rest.len());
        let kind = &rest[..name_end];
        if kind.is_empty() {
            return Err(layer_err(
                index,
                "",
                format!("a layer name is missing at `{rest}`"),
            ));
        }
        if allowed_keys(kind).is_none() {
            return Err(layer_err(
                index,
                "",
                format!("unknown `type` \"{kind}\" (one of {LAYER_TYPES})"),
            ));
        }
        let mut obj = Map::new();
        obj.insert("type".into(), Value::String(kind.to_string()));
        // Arguments follow the name directly: `linear(10)`, not `linear (10)`.
        rest = &rest[name_end..];
        if let Some(after) = rest.strip_prefix('(') {
            let close = after
                .find(')')
                .ok_or_else(|| layer_err(index, kind, "`(` without a closing `)`"))?;
            let args = &after[..close];
            rest = after[close + 1..].trim_start();
            let names = positional(kind);
            for (pos, arg) in args.split(',').map(str::trim).enumerate() {
                if arg.is_empty() {
                    return Err(layer_err(
                        index,
                        kind,
                        format!("empty argument {}", pos + 1),
                    ));
                }
                let (key, value) = match arg.split_once('=') {
                    Some((k, v)) => (k.trim().to_string(), v.trim()),
                    None => match names.get(pos) {
                        Some(k) => (k.to_string(), arg),
                        None => {
                            return Err(layer_err(
                                index,
                                kind,
                                format!("too many positional arguments at `{arg}`"),
                            ))
                        }
                    },
                };
                let parsed = match value {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    v => match v.parse::<u64>() {
                        Ok(n) => Value::from(n),
                        Err(_) => {
                            return Err(layer_err(
                                index,
                                kind,
                                format!("`{key}` = `{v}`: not an integer or true/false"),
                            ))
                        }
                    },
                };
                if obj.insert(key.clone(), parsed).is_some() {
                    return Err(layer_err(index, kind, format!("`{key}` given twice")));
                }
            }
        }
        rest = rest.trim_start();
        layers.push(Value::Object(obj));
    }
    parse_json(&Value::Array(layers))
}

impl Layer {
    /// The JSON object of this layer, every default written out.
    pub fn to_json(&self) -> Value {
        match *self {
            Layer::Conv2d {
                out_channels,
                kernel_size,
                stride,
                padding,
                bias,
            } => json!({"type": "conv2d", "out_channels": out_channels,
                "kernel_size": kernel_size, "stride": stride, "padding": padding, "bias": bias}),
            Layer::MaxPool2d { kernel_size } => {
                json!({"type": "maxpool2d", "kernel_size": kernel_size})
            }
            Layer::AvgPool2d { kernel_size } => {
                json!({"type": "avgpool2d", "kernel_size": kernel_size})
            }
            Layer::Flatten => json!({"type": "flatten"}),
            Layer::Linear { out_features, bias } => {
                json!({"type": "linear", "out_features": out_features, "bias": bias})
            }
            Layer::Act(a) => json!({"type": a.name()}),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Layer::Conv2d { .. } => "conv2d",
            Layer::MaxPool2d { .. } => "maxpool2d",
            Layer::AvgPool2d { .. } => "avgpool2d",
            Layer::Flatten => "flatten",
            Layer::Linear { .. } => "linear",
            Layer::Act(a) => a.name(),
        }
    }
}

/// The authors' networks as specs: `conv2d(10,5) act maxpool2d(2) conv2d(20,5) act
/// [maxpool2d(2)] flatten linear(10)`, no biases. Same parameter layout (offsets and
/// shapes) as [`crate::model::Net`]; the fused kernels pool before the activation,
/// which is the same function because every activation here is monotone.
pub fn preset(arch: Arch, act: Activation) -> Vec<Layer> {
    let a = Layer::Act(act.into());
    let conv = |out_channels| Layer::Conv2d {
        out_channels,
        kernel_size: 5,
        stride: 1,
        padding: 0,
        bias: false,
    };
    let mut layers = vec![
        conv(10),
        a,
        Layer::MaxPool2d { kernel_size: 2 },
        conv(20),
        a,
    ];
    if arch == Arch::Pooled {
        layers.push(Layer::MaxPool2d { kernel_size: 2 });
    }
    layers.push(Layer::Flatten);
    layers.push(Layer::Linear {
        out_features: 10,
        bias: false,
    });
    layers
}

/// The most values one layer may give per image (the forward pass indexes them in i32
/// on the GPU).
const MAX_VALUES: usize = 1 << 31;

/// Output side of a convolution or pool, `None` when the window does not fit.
fn out_side(side: usize, k: usize, stride: usize, padding: usize) -> Option<usize> {
    (side + 2 * padding).checked_sub(k).map(|d| d / stride + 1)
}

impl NetSpec {
    /// Validates `layers` on inputs of shape `input` whose outputs must be `outputs`
    /// values (the classes, or the regression targets). Errors: [`Error::Config`]
    /// naming the layer index and the key whose value does not fit.
    pub fn build(layers: &[Layer], input: Shape, outputs: usize) -> Result<NetSpec> {
        if layers.is_empty() {
            return Err(Error::Config("net: the list of layers is empty".into()));
        }
        let mut shape = input;
        let mut offset = 0usize;
        let mut built = Vec::with_capacity(layers.len());
        for (i, &layer) in layers.iter().enumerate() {
            let kind = layer.kind();
            let (output, n_weight, n_bias) = match (layer, shape) {
                (
                    Layer::Conv2d {
                        out_channels,
                        kernel_size: k,
                        stride,
                        padding,
                        bias,
                    },
                    Shape::Image { c, h, w },
                ) => {
                    let (oh, ow) = match (
                        out_side(h, k, stride, padding),
                        out_side(w, k, stride, padding),
                    ) {
                        (Some(oh), Some(ow)) => (oh, ow),
                        _ => {
                            return Err(layer_err(
                                i,
                                kind,
                                format!(
                                    "`kernel_size` = {k} does not fit its input {shape} \
                                     with `padding` = {padding}"
                                ),
                            ))
                        }
                    };
                    (
                        Shape::Image {
                            c: out_channels,
                            h: oh,
                            w: ow,
                        },
                        out_channels
                            .saturating_mul(c)
                            .saturating_mul(k.saturating_mul(k)),
                        if bias { out_channels } else { 0 },
                    )
                }
                (
                    Layer::MaxPool2d { kernel_size: k } | Layer::AvgPool2d { kernel_size: k },
                    Shape::Image { c, h, w },
                ) => {
                    if k > h || k > w {
                        return Err(layer_err(
                            i,
                            kind,
                            format!("`kernel_size` = {k} is larger than its input {shape}"),
                        ));
                    }
                    (
                        Shape::Image {
                            c,
                            h: h / k,
                            w: w / k,
                        },
                        0,
                        0,
                    )
                }
                (Layer::Flatten, s) => (Shape::Vector(s.len()), 0, 0),
                (Layer::Linear { out_features, bias }, Shape::Vector(f)) => (
                    Shape::Vector(out_features),
                    out_features.saturating_mul(f),
                    if bias { out_features } else { 0 },
                ),
                (Layer::Act(_), s) => (s, 0, 0),
                (Layer::Linear { .. }, Shape::Image { .. }) => {
                    return Err(layer_err(
                        i,
                        kind,
                        format!(
                            "needs a flat input, got {shape}: put {{\"type\": \"flatten\"}} \
                             before it"
                        ),
                    ))
                }
                (_, Shape::Vector(_)) => {
                    return Err(layer_err(
                        i,
                        kind,
                        format!("needs a C × H × W input, got a flat vector of {shape}"),
                    ))
                }
            };
            // Sizes saturate instead of wrapping, so an absurd value is caught here.
            let values = match output {
                Shape::Image { c, h, w } => c.saturating_mul(h).saturating_mul(w),
                Shape::Vector(n) => n,
            };
            if values > MAX_VALUES {
                return Err(layer_err(
                    i,
                    kind,
                    format!("gives {output} values per image, more than 2^31"),
                ));
            }
            let weight_offset = offset;
            offset = offset
                .checked_add(n_weight.saturating_add(n_bias))
                .filter(|&o| o <= u32::MAX as usize)
                .ok_or_else(|| layer_err(i, kind, "more than 2^32 parameters"))?;
            built.push(BuiltLayer {
                layer,
                input: shape,
                output,
                weight_offset,
                bias_offset: (n_bias > 0).then_some(weight_offset + n_weight),
            });
            shape = output;
        }
        match shape {
            Shape::Vector(n) if n == outputs => {}
            _ => {
                return Err(Error::Config(format!(
                    "net: the last layer gives {shape} values per image, the data needs \
                     {outputs} (end with a linear layer of out_features = {outputs})"
                )))
            }
        }
        Ok(NetSpec {
            layers: built,
            input,
            n_params: offset,
        })
    }

    /// The layers with their shapes and parameter offsets.
    pub fn layers(&self) -> &[BuiltLayer] {
        &self.layers
    }

    /// The input shape (per image).
    pub fn input(&self) -> Shape {
        self.input
    }

    /// Outputs per image.
    pub fn outputs(&self) -> usize {
        self.layers.last().map_or(0, |l| l.output.len())
    }

    /// Total number of parameters P.
    pub fn n_params(&self) -> usize {
        self.n_params
    }

    /// The largest number of values between two layers (per image), for scratch sizes.
    pub fn max_activation_len(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.output.len())
            .fold(self.input.len(), usize::max)
    }

    /// The parameter tensors in `state_dict` order (`"<i>.weight"`, `"<i>.bias"`).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut t = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let (wshape, out) = match (l.layer, l.input) {
                (
                    Layer::Conv2d {
                        out_channels,
                        kernel_size: k,
                        ..
                    },
                    Shape::Image { c, .. },
                ) => (vec![out_channels, c, k, k], out_channels),
                (Layer::Linear { out_features, .. }, Shape::Vector(f)) => {
                    (vec![out_features, f], out_features)
                }
                _ => continue,
            };
            t.push(TensorSpec {
                name: format!("{i}.weight"),
                shape: wshape,
                offset: l.weight_offset,
            });
            if let Some(b) = l.bias_offset {
                t.push(TensorSpec {
                    name: format!("{i}.bias"),
                    shape: vec![out],
                    offset: b,
                });
            }
        }
        t
    }

    /// The JSON form, every default written out (what `config.json` records).
    pub fn to_json(&self) -> Value {
        Value::Array(self.layers.iter().map(|l| l.layer.to_json()).collect())
    }

    /// The short form (every argument written out), for logs.
    pub fn short_form(&self) -> String {
        self.layers
            .iter()
            .map(|l| layer_short(&l.layer))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Multiply-adds of one forward pass of one image (convolutions and linear layers).
    pub fn macs_per_image(&self) -> usize {
        self.layers.iter().map(BuiltLayer::macs).sum()
    }
}

impl BuiltLayer {
    /// Multiply-adds of this layer for one image (0 for pools, activations, flatten;
    /// the padding taps a convolution skips are counted, as is usual).
    pub fn macs(&self) -> usize {
        match (self.layer, self.input) {
            (Layer::Conv2d { kernel_size: k, .. }, Shape::Image { c, .. }) => {
                self.output.len() * c * k * k
            }
            (Layer::Linear { .. }, Shape::Vector(f)) => self.output.len() * f,
            _ => 0,
        }
    }

    /// The layer's short form with its index, e.g. `2 conv2d(20,5,bias=false)`.
    pub fn label(&self, index: usize) -> String {
        format!("{index} {}", layer_short(&self.layer))
    }
}

/// One layer in the short form with every argument written out.
fn layer_short(layer: &Layer) -> String {
    match *layer {
        Layer::Conv2d {
            out_channels,
            kernel_size,
            stride,
            padding,
            bias,
        } => format!("conv2d({out_channels},{kernel_size},{stride},{padding},bias={bias})"),
        Layer::MaxPool2d { kernel_size } => format!("maxpool2d({kernel_size})"),
        Layer::AvgPool2d { kernel_size } => format!("avgpool2d({kernel_size})"),
        Layer::Linear { out_features, bias } => format!("linear({out_features},bias={bias})"),
        Layer::Flatten => "flatten".into(),
        Layer::Act(a) => a.name().into(),
    }
}

/// A layer-spec network as written (`net` in a config file, `--net` on the command line):
/// the layers, their keys and values checked, not yet built for a data set's shape (a
/// NumPy data set's shape is known only from its files; see [`NetLayers::build`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetLayers(pub Vec<Layer>);

impl NetLayers {
    /// Parses the command line's text: the JSON form when it starts with `[`, else the
    /// short form. Errors: [`Error::Config`] naming the layer and key.
    pub fn parse(text: &str) -> Result<Self> {
        let layers = if text.trim_start().starts_with('[') {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| Error::Config(format!("net: not valid JSON: {e}")))?;
            parse_json(&v)?
        } else {
            parse_short(text)?
        };
        Self::new(layers)
    }

    /// The layers, refused when there are none. Errors: [`Error::Config`].
    fn new(layers: Vec<Layer>) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::Config("net: the list of layers is empty".into()));
        }
        Ok(NetLayers(layers))
    }

    /// Builds the network for samples of shape `input` and `outputs` values per sample.
    /// Errors: as [`NetSpec::build`].
    pub fn build(&self, input: Shape, outputs: usize) -> Result<NetSetting> {
        Ok(NetSetting(std::sync::Arc::new(NetSpec::build(
            &self.0, input, outputs,
        )?)))
    }

    /// The JSON list, every default written out.
    pub fn to_json(&self) -> Value {
        Value::Array(self.0.iter().map(Layer::to_json).collect())
    }
}

impl serde::Serialize for NetLayers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for NetLayers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = <Value as serde::Deserialize>::deserialize(d)?;
        parse_json(&v).and_then(NetLayers::new).map_err(|e| {
            serde::de::Error::custom(
                e.to_string()
                    .trim_start_matches("invalid configuration: ")
                    .to_string(),
            )
        })
    }
}

/// The input of every IDX data set here (MNIST, Fashion-MNIST, notMNIST): 1 × 28 × 28.
pub const IDX_INPUT: Shape = Shape::Image { c: 1, h: 28, w: 28 };

/// A layer-spec network built for one data shape (what a resolved configuration and the
/// trainers hold); written as its JSON form with every default. Read from the JSON form
/// it is built for [`IDX_INPUT`] images and 10 classes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetSetting(pub std::sync::Arc<NetSpec>);

impl NetSetting {
    /// Validates `layers` for the IDX data sets. Errors: as [`NetSpec::build`].
    pub fn from_layers(layers: &[Layer]) -> Result<Self> {
        NetLayers(layers.to_vec()).build(IDX_INPUT, crate::model::CLASSES)
    }

    /// Parses the text (as [`NetLayers::parse`]) and builds it for the IDX data sets.
    /// Errors: [`Error::Config`] naming the layer and key.
    pub fn parse(text: &str) -> Result<Self> {
        NetLayers::parse(text)?.build(IDX_INPUT, crate::model::CLASSES)
    }
}

impl serde::Serialize for NetSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.to_json().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for NetSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = <Value as serde::Deserialize>::deserialize(d)?;
        parse_json(&v)
            .and_then(|l| NetSetting::from_layers(&l))
            .map_err(|e| {
                serde::de::Error::custom(
                    e.to_string()
                        .trim_start_matches("invalid configuration: ")
                        .to_string(),
                )
            })
    }
}
