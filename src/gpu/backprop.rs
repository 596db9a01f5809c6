//! Backpropagation through ONE network on the GPU (twin of `src/cpu/backprop.rs`) and
//! the SGD and Adam updates on device buffers (twins of `Sgd::step` and `Adam::step` in
//! `src/train/optim.rs`), launching the kernels of `kernels/backprop.cu`.
//!
//! Shapes as the CPU twin: weights P (`state_dict` order); x: images × 784; the cache
//! per image a1 10 × 24 × 24, p1 10 × 12 × 12 (+ arg1), a2 20 × 8 × 8, p2 20 × 4 × 4
//! (+ arg2, Pooled only), logits and probs 10; gradient P.
//!
//! Determinism: every kernel sums in a fixed order (per-image gradients are reduced over
//! the batch image by image), so a run is bit-identical from run to run. The gradient
//! differs from the CPU's in the last bits (FMA and summation order): see
//! `tests/gpu_backprop.rs` for the tolerances. The optimizer steps round exactly as the
//! CPU twins do and are bit-identical to them.

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};

use super::geometry::{elementwise_launch, per_image_launch};
use super::{cuda_err, to_i32, CudaBackend};
use crate::backend::check_len;
use crate::cpu::backprop::ForwardCache;
use crate::model::{Arch, Net, C1, C2, CLASSES, H1, H2, IMG_PIXELS, P1};
use crate::train::optim::{Adam, GradOptimizer};
use crate::{Error, Result};

/// Forward intermediates of one network over `images` images, on the device: the twin
/// of [`ForwardCache`] with the same fields and layouts (image-major).
#[derive(Debug)]
pub struct GpuForwardCache {
    /// Number of images.
    pub images: usize,
    /// conv1 activation output before pooling: images × 10×24×24.
    pub a1: CudaSlice<f32>,
    /// After the first max-pool: images × 10×12×12.
    pub p1: CudaSlice<f32>,
    /// Arg-max of each first-pool window into the image's a1: images × 1440.
    pub arg1: CudaSlice<u32>,
    /// conv2 activation output: images × 20×8×8.
    pub a2: CudaSlice<f32>,
    /// After the second max-pool (Pooled only, else empty): images × 20×4×4.
    pub p2: CudaSlice<f32>,
    /// Arg-max of each second-pool window into the image's a2 (Pooled only): images × 320.
    pub arg2: CudaSlice<u32>,
    /// Raw logits: images × 10.
    pub logits: CudaSlice<f32>,
    /// Softmax of the logits: images × 10.
    pub probs: CudaSlice<f32>,
}

/// A zero-filled device buffer of `n` elements (n = 0: see [`super::device_zeros`]).
fn zeros<T: DeviceRepr + ValidAsZeroBits>(be: &CudaBackend, n: usize) -> Result<CudaSlice<T>> {
    super::device_zeros(be.stream(), n)
}

/// Copies a device buffer to the host (waits for the stream).
fn download<T: DeviceRepr + Default + Clone>(
    be: &CudaBackend,
    buf: &CudaSlice<T>,
) -> Result<Vec<T>> {
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let v = be
        .stream()
        .clone_dtoh(buf)
        .map_err(cuda_err("downloading a backprop buffer"))?;
    be.stream()
        .synchronize()
        .map_err(cuda_err("synchronizing the stream"))?;
    Ok(v)
}

impl GpuForwardCache {
    /// Zeroed device buffers for `images` images of network `net`.
    ///
    /// Errors: [`Error::Cuda`] when an allocation fails.
    pub fn zeros(be: &CudaBackend, net: &Net, images: usize) -> Result<Self> {
        net.require_fused("CUDA backpropagation")?;
        let p2 = if net.arch == Arch::Pooled {
            net.fc_in()
        } else {
            0
        };
        Ok(GpuForwardCache {
            images,
            a1: zeros(be, images * C1 * H1 * H1)?,
            p1: zeros(be, images * C1 * P1 * P1)?,
            arg1: zeros(be, images * C1 * P1 * P1)?,
            a2: zeros(be, images * C2 * H2 * H2)?,
            p2: zeros(be, images * p2)?,
            arg2: zeros(be, images * p2)?,
            logits: zeros(be, images * CLASSES)?,
            probs: zeros(be, images * CLASSES)?,
        })
    }

    /// Copies every buffer to a host [`ForwardCache`] (for the statistics).
    ///
    /// Errors: [`Error::Cuda`] when a copy fails.
    pub fn download(&self, be: &CudaBackend) -> Result<ForwardCache<f32>> {
        Ok(ForwardCache {
            images: self.images,
            a1: download(be, &self.a1)?,
            p1: download(be, &self.p1)?,
            arg1: download(be, &self.arg1)?,
            a2: download(be, &self.a2)?,
            p2: download(be, &self.p2)?,
            arg2: download(be, &self.arg2)?,
            logits: download(be, &self.logits)?,
            probs: download(be, &self.probs)?,
        })
    }

    /// Checks every buffer's length against `net` and `images`.
    fn check(&self, net: &Net, images: usize) -> Result<()> {
        let p2 = if net.arch == Arch::Pooled {
            net.fc_in()
        } else {
            0
        };
        check_len("GpuForwardCache images", self.images, images)?;
        check_len("GpuForwardCache a1", self.a1.len(), images * C1 * H1 * H1)?;
        check_len("GpuForwardCache p1", self.p1.len(), images * C1 * P1 * P1)?;
        check_len(
            "GpuForwardCache arg1",
            self.arg1.len(),
            images * C1 * P1 * P1,
        )?;
        check_len("GpuForwardCache a2", self.a2.len(), images * C2 * H2 * H2)?;
        check_len("GpuForwardCache p2", self.p2.len(), images * p2)?;
        check_len("GpuForwardCache arg2", self.arg2.len(), images * p2)?;
        check_len(
            "GpuForwardCache logits",
            self.logits.len(),
            images * CLASSES,
        )?;
        check_len("GpuForwardCache probs", self.probs.len(), images * CLASSES)
    }
}

/// Result of [`backprop`]: the twin of [`crate::cpu::backprop::Backprop`] with the
/// gradient and the cache left on the device.
#[derive(Debug)]
pub struct GpuBackprop {
    /// Mean softmax cross-entropy over the batch (natural log).
    pub loss: f64,
    /// Images whose arg-max logit (ties to the lowest class) equals the label.
    pub correct: usize,
    /// d loss / d weights: P values, `state_dict` order.
    pub grad: CudaSlice<f32>,
    /// The forward intermediates.
    pub cache: GpuForwardCache,
}

/// Forward pass of one network (`weights`: P) over `images` images (`x`: images × 784),
/// keeping every intermediate: the twin of [`crate::cpu::backprop::forward_cached`].
///
/// Errors: [`Error::Shape`] on a length mismatch or more images than a CUDA int holds;
/// [`Error::Cuda`] when an allocation or the launch fails.
pub fn forward_cached(
    be: &CudaBackend,
    net: &Net,
    weights: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    images: usize,
) -> Result<GpuForwardCache> {
    let mut cache = GpuForwardCache::zeros(be, net, images)?;
    forward_into(be, net, weights, x, images, &mut cache)?;
    Ok(cache)
}

/// [`forward_cached`] into an existing cache (checked against `net` and `images`).
fn forward_into(
    be: &CudaBackend,
    net: &Net,
    weights: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    images: usize,
    cache: &mut GpuForwardCache,
) -> Result<()> {
    check_len(
        "gpu forward_cached weights (P)",
        weights.len(),
        net.n_params(),
    )?;
    check_len(
        "gpu forward_cached x (images × 784)",
        x.len(),
        images.saturating_mul(IMG_PIXELS),
    )?;
    cache.check(net, images)?;
    if images == 0 {
        return Ok(());
    }
    // Element offsets of the cache (images × 5760 the largest) and of x must fit the
    // kernel's long long index; the block count must fit an int.
    let images_i = to_i32("gpu forward_cached images", images)?;
    let (arch, act) = (net.arch.code(), net.act.code());
    let f = be.kernels().get("backprop_forward_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(weights)
        .arg(x)
        .arg(&images_i)
        .arg(&arch)
        .arg(&act)
        .arg(&mut cache.a1)
        .arg(&mut cache.p1)
        .arg(&mut cache.arg1)
        .arg(&mut cache.a2)
        .arg(&mut cache.p2)
        .arg(&mut cache.arg2)
        .arg(&mut cache.logits)
        .arg(&mut cache.probs);
    // SAFETY: check_len proved weights = P (the kernel reads conv1, conv2 and the
    // 10 × fc_in fc1 weights of `net`, P in all), x = images·784, and cache.check every
    // cache buffer at its per-image size × images; block d < images touches image d only;
    // p2 and arg2 are written only for Arch::Pooled, where they hold images·320 elements.
    unsafe { launch.launch(per_image_launch(images)) }
        .map(|_| ())
        .map_err(cuda_err("launching backprop_forward_f32"))
}

/// Loss, correct count and gradient of one network (`weights`: P on the device) on a
/// mini-batch (`x`: B × 784 on the device, `labels`: B on the host, each < 10), with the
/// forward cache: the twin of [`crate::cpu::backprop::backprop`]. Waits for the stream
/// (the loss comes back to the host).
///
/// loss = (1/B) Σ_b (log Σ_k e^{z_bk} − z_b,label), as `torch.nn.CrossEntropyLoss()`.
/// Errors: [`Error::Shape`] on a length mismatch, an empty batch or a label ≥ 10;
/// [`Error::Cuda`] when an allocation, a launch or a copy fails.
pub fn backprop(
    be: &CudaBackend,
    net: &Net,
    weights: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    labels: &[u8],
) -> Result<GpuBackprop> {
    let images = labels.len();
    let p = net.n_params();
    check_len("gpu backprop weights (P)", weights.len(), p)?;
    check_len(
        "gpu backprop x (labels × 784)",
        x.len(),
        images.saturating_mul(IMG_PIXELS),
    )?;
    if images == 0 {
        return Err(Error::Shape {
            what: "gpu backprop batch".to_string(),
            expected: "at least one image".to_string(),
            found: "0 images".to_string(),
        });
    }
    if let Some(i) = labels.iter().position(|&l| usize::from(l) >= CLASSES) {
        return Err(Error::Shape {
            what: format!("gpu backprop label of image {i}"),
            expected: format!("a class below {CLASSES}"),
            found: format!("{}", labels[i]),
        });
    }
    let images_i = to_i32("gpu backprop images", images)?;
    let p_i = to_i32("gpu backprop P", p)?;
    let (arch, act) = (net.arch.code(), net.act.code());
    // The CPU twin's scale: 1/B computed in the gradient's type.
    let scale = 1.0f32 / images as f32;

    let mut cache = GpuForwardCache::zeros(be, net, images)?;
    forward_into(be, net, weights, x, images, &mut cache)?;

    let labels_i: Vec<i32> = labels.iter().map(|&l| i32::from(l)).collect();
    let labels_d = be
        .stream()
        .clone_htod(&labels_i)
        .map_err(cuda_err("uploading the labels"))?;
    let mut loss = zeros::<f64>(be, images)?;
    let mut correct = zeros::<i32>(be, images)?;
    let mut dlogits = zeros::<f32>(be, images * CLASSES)?;
    let f = be.kernels().get("softmax_xent_backward_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(&cache.logits)
        .arg(&cache.probs)
        .arg(&labels_d)
        .arg(&images_i)
        .arg(&scale)
        .arg(&mut loss)
        .arg(&mut correct)
        .arg(&mut dlogits);
    // SAFETY: logits, probs (checked by forward_into) and dlogits hold images·10, labels,
    // loss and correct `images` elements; thread d < images touches row d only.
    unsafe { launch.launch(elementwise_launch(images)) }
        .map_err(cuda_err("launching softmax_xent_backward_f32"))?;

    let gimg_len = images.checked_mul(p).ok_or_else(|| Error::Shape {
        what: "gpu backprop per-image gradients".to_string(),
        expected: "images × P below 2^64".to_string(),
        found: format!("{images} × {p}"),
    })?;
    let mut gimg = zeros::<f32>(be, gimg_len)?;
    let f = be.kernels().get("backprop_backward_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(weights)
        .arg(x)
        .arg(&images_i)
        .arg(&p_i)
        .arg(&arch)
        .arg(&act)
        .arg(&cache.a1)
        .arg(&cache.p1)
        .arg(&cache.arg1)
        .arg(&cache.a2)
        .arg(&cache.p2)
        .arg(&cache.arg2)
        .arg(&dlogits)
        .arg(&mut gimg);
    // SAFETY: weights = P, x = images·784 (checked above), the cache buffers at their
    // per-image sizes × images (forward_into), dlogits = images·10 and gimg = images·P
    // (allocated so); block d < images reads image d and writes row d of gimg only; p2
    // and arg2 are read only for Arch::Pooled.
    unsafe { launch.launch(per_image_launch(images)) }
        .map_err(cuda_err("launching backprop_backward_f32"))?;

    let mut grad = zeros::<f32>(be, p)?;
    let f = be.kernels().get("grad_reduce_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(&gimg).arg(&images_i).arg(&p_i).arg(&mut grad);
    // SAFETY: gimg holds images·P elements and grad P; thread i < P reads column i only.
    unsafe { launch.launch(elementwise_launch(p)) }
        .map_err(cuda_err("launching grad_reduce_f32"))?;

    let losses = download(be, &loss)?;
    let hits = download(be, &correct)?;
    Ok(GpuBackprop {
        loss: losses.iter().sum::<f64>() / images as f64,
        correct: hits.iter().filter(|&&c| c != 0).count(),
        grad,
        cache,
    })
}

/// SGD's state on the device: hyper-parameters and the momentum buffer.
#[derive(Debug)]
struct SgdState {
    lr: f32,
    momentum: f32,
    buf: Option<CudaSlice<f32>>,
}

/// Adam's state on the device: the host optimizer (hyper-parameters and step count t;
/// its host moments are not used) and the device moments.
#[derive(Debug)]
struct AdamState {
    host: Adam,
    m: Option<CudaSlice<f32>>,
    v: Option<CudaSlice<f32>>,
}

#[derive(Debug)]
enum GpuOptimizerKind {
    Sgd(SgdState),
    Adam(AdamState),
}

/// A gradient optimizer whose state lives on the device: the twin of [`GradOptimizer`]
/// (same update formulas and rounding, bit-identical results).
#[derive(Debug)]
pub struct GpuOptimizer {
    kind: GpuOptimizerKind,
}

impl GpuOptimizer {
    /// The device twin of `opt`, with its state (momentum buffer, Adam moments and step
    /// count) uploaded as it is.
    ///
    /// Errors: [`Error::Cuda`] when an upload fails.
    pub fn from_host(be: &CudaBackend, opt: &GradOptimizer) -> Result<Self> {
        let up = |v: &[f32]| -> Result<Option<CudaSlice<f32>>> {
            if v.is_empty() {
                Ok(None)
            } else {
                be.stream()
                    .clone_htod(v)
                    .map(Some)
                    .map_err(cuda_err("uploading optimizer state"))
            }
        };
        let kind = match opt {
            GradOptimizer::Sgd(s) => GpuOptimizerKind::Sgd(SgdState {
                lr: s.lr as f32,
                momentum: s.momentum as f32,
                buf: up(&s.buf)?,
            }),
            GradOptimizer::Adam(a) => GpuOptimizerKind::Adam(AdamState {
                host: Adam {
                    m: Vec::new(),
                    v: Vec::new(),
                    ..a.clone()
                },
                m: up(&a.m)?,
                v: up(&a.v)?,
            }),
        };
        Ok(GpuOptimizer { kind })
    }

    /// One update of `params` (P) with `grad` (P), as [`GradOptimizer::step`].
    ///
    /// Errors: [`Error::Shape`] when the lengths differ (or differ from the first
    /// step's); [`Error::Cuda`] when an allocation or the launch fails.
    pub fn step(
        &mut self,
        be: &CudaBackend,
        params: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
    ) -> Result<()> {
        match &mut self.kind {
            GpuOptimizerKind::Sgd(s) => sgd_step(be, s, params, grad),
            GpuOptimizerKind::Adam(a) => adam_step(be, a, params, grad),
        }
    }
}

/// Launches `sgd_step_f32` (see [`crate::train::optim::Sgd::step`]).
/// The `mode` argument of `sgd_step_f32`: 0 plain SGD (momentum 0), 1 first momentum
/// step (the buffer starts as the gradient, as PyTorch), 2 later momentum steps.
pub fn sgd_mode(momentum: f32, has_buffer: bool) -> i32 {
    if momentum == 0.0 {
        0
    } else if has_buffer {
        2
    } else {
        1
    }
}

fn sgd_step(
    be: &CudaBackend,
    s: &mut SgdState,
    params: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
) -> Result<()> {
    let n = params.len();
    check_len("gpu Sgd::step grad", grad.len(), n)?;
    let n_i = to_i32("gpu Sgd::step parameters", n)?;
    if n == 0 {
        return Ok(());
    }
    // mode 0: no momentum (buffer unused); 1: first step (buffer = grad); 2: later.
    let mode = sgd_mode(s.momentum, s.buf.is_some());
    if let Some(b) = &s.buf {
        check_len("gpu Sgd::step momentum buffer", b.len(), n)?;
    }
    let mut buf = match s.buf.take() {
        Some(b) => b,
        None if mode == 1 => zeros::<f32>(be, n)?,
        None => zeros::<f32>(be, 0)?,
    };
    let f = be.kernels().get("sgd_step_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(&mut *params)
        .arg(grad)
        .arg(&mut buf)
        .arg(&n_i)
        .arg(&s.lr)
        .arg(&s.momentum)
        .arg(&mode);
    // SAFETY: params and grad hold n elements (checked); buf holds n elements whenever
    // mode ≠ 0 (checked, or allocated with n in mode 1; in mode 0 the kernel never
    // touches it); thread i < n touches element i only.
    let res = unsafe { launch.launch(elementwise_launch(n)) };
    if mode != 0 {
        s.buf = Some(buf);
    }
    res.map(|_| ()).map_err(cuda_err("launching sgd_step_f32"))
}

/// Launches `adam_step_f32` with the per-step scalars computed exactly as
/// [`Adam::step`] does (f64, then rounded to f32).
fn adam_step(
    be: &CudaBackend,
    a: &mut AdamState,
    params: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
) -> Result<()> {
    let n = params.len();
    check_len("gpu Adam::step grad", grad.len(), n)?;
    let n_i = to_i32("gpu Adam::step parameters", n)?;
    check_len(
        "gpu Adam::step first moment",
        a.m.as_ref().map_or(n, |m| m.len()),
        n,
    )?;
    check_len(
        "gpu Adam::step second moment",
        a.v.as_ref().map_or(n, |v| v.len()),
        n,
    )?;
    let mut m = match a.m.take() {
        Some(m) => m,
        None => zeros::<f32>(be, n)?,
    };
    let mut v = match a.v.take() {
        Some(v) => v,
        None => zeros::<f32>(be, n)?,
    };
    a.host.t += 1;
    let k = a.host.scalars();
    if n == 0 {
        a.m = Some(m);
        a.v = Some(v);
        return Ok(());
    }
    let f = be.kernels().get("adam_step_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(&mut *params)
        .arg(grad)
        .arg(&mut m)
        .arg(&mut v)
        .arg(&n_i)
        .arg(&k.step_size)
        .arg(&k.bc2_sqrt)
        .arg(&k.w1)
        .arg(&k.b2)
        .arg(&k.w2)
        .arg(&k.eps);
    // SAFETY: params, grad, m and v hold n elements (checked); thread i < n touches
    // element i only.
    let res = unsafe { launch.launch(elementwise_launch(n)) };
    a.m = Some(m);
    a.v = Some(v);
    res.map(|_| ()).map_err(cuda_err("launching adam_step_f32"))
}
