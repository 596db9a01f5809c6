//! Backpropagation through ONE network on the CPU: forward pass keeping the
//! intermediates, softmax cross-entropy averaged over the batch (PyTorch's
//! `CrossEntropyLoss`, reduction `mean`), and the gradient of that loss with respect to
//! the P weights (`state_dict` order, see [`crate::model`]).
//!
//! Generic over [`Real`] (f32 for training, f64 for the finite-difference tests).
//!
//! Layer order here: conv1 → activation → max-pool → conv2 → activation →
//! ([`Arch::Pooled`]: max-pool) → flatten → fc1. This is the PyTorch module's order and
//! keeps the activation output before pooling, which is what the statistics call
//! "layer 1" (the output of the first activation, 10 × 24 × 24 per image) and
//! "layer 2" (20 × 8 × 8). The inference path (`cpu::forward`) pools first; the two
//! orders give the same values because every activation is monotone non-decreasing.
//!
//! Max-pool ties: the gradient goes to ONE input per window, the first maximum in
//! row-major window order ((0,0), (0,1), (1,0), (1,1)), found with a strictly-greater
//! comparison, as PyTorch's CPU `max_pool2d` does (`if val > max || isnan(val)`); a NaN
//! wins its window.
//!
//! Shapes (row-major): weights P; x: images × 784; per image a1 10 × 24 × 24, p1
//! 10 × 12 × 12, a2 20 × 8 × 8, p2 20 × 4 × 4 (Pooled only), logits and probs 10.
//!
//! Work split: the batch is cut into fixed runs of [`GRAD_CHUNK`] images; each run is
//! one rayon task that owns a gradient accumulator. Partial gradients, losses and
//! counts are summed in run order afterwards, so the result is bit-identical for any
//! thread count.

use rayon::prelude::*;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

use crate::backend::check_len;
use crate::model::{Activation, Arch, Net, C1, C2, CLASSES, H1, H2, IMG, IMG_PIXELS, KSIZE, P1};
use crate::{Error, Result};

/// Images per rayon task (the partial gradients of the tasks are summed in order).
pub const GRAD_CHUNK: usize = 8;

/// The floating-point type of a backpropagation pass (implemented for f32 and f64).
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Converts from f32 (exact for f32 and f64).
    fn from_f32(v: f32) -> Self;
    /// Converts from f64 (rounds for f32).
    fn from_f64(v: f64) -> Self;
    /// Converts to f64 (exact).
    fn to_f64(self) -> f64;
    /// e^self.
    fn exp(self) -> Self;
    /// tanh(self).
    fn tanh(self) -> Self;
    /// Whether the value is NaN.
    fn is_nan(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// The activation `act` applied to one value; for f32 exactly [`Activation::apply`].
#[inline(always)]
pub fn act_apply<T: Real>(act: Activation, x: T) -> T {
    match act {
        Activation::Logistic => T::ONE / (T::ONE + (-x).exp()),
        Activation::Relu => {
            if x > T::ZERO {
                x
            } else {
                T::ZERO
            }
        }
        Activation::Tanh => x.tanh(),
    }
}

/// Derivative of `act` from its output `y` (logistic y(1−y), tanh 1−y², ReLU 1 where
/// y > 0 else 0, i.e. 0 at the kink as PyTorch); for f32 exactly
/// [`Activation::derivative_from_output`].
#[inline(always)]
pub fn act_derivative<T: Real>(act: Activation, y: T) -> T {
    match act {
        Activation::Logistic => y * (T::ONE - y),
        Activation::Relu => {
            if y > T::ZERO {
                T::ONE
            } else {
                T::ZERO
            }
        }
        Activation::Tanh => T::ONE - y * y,
    }
}

/// Forward intermediates of one network over `images` images (see the module docs for
/// the per-image shapes). Every buffer is images × (per-image size), image-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardCache<T> {
    /// Number of images.
    pub images: usize,
    /// conv1 activation output before pooling (statistics layer 1): images × 10×24×24.
    pub a1: Vec<T>,
    /// After the first max-pool: images × 10×12×12.
    pub p1: Vec<T>,
    /// Arg-max of each first-pool window, as an index into the image's a1 (0..5760):
    /// images × 1440.
    pub arg1: Vec<u32>,
    /// conv2 activation output (statistics layer 2): images × 20×8×8.
    pub a2: Vec<T>,
    /// After the second max-pool ([`Arch::Pooled`] only, else empty): images × 20×4×4.
    pub p2: Vec<T>,
    /// Arg-max of each second-pool window into the image's a2 (0..1280), Pooled only.
    pub arg2: Vec<u32>,
    /// Raw logits: images × 10.
    pub logits: Vec<T>,
    /// Softmax of the logits (statistics layer 3): images × 10.
    pub probs: Vec<T>,
}

impl<T: Real> ForwardCache<T> {
    /// Zeroed buffers for `images` images of network `net`.
    pub fn zeros(net: &Net, images: usize) -> Self {
        let pooled = net.arch == Arch::Pooled;
        let p2 = if pooled { net.fc_in() } else { 0 };
        ForwardCache {
            images,
            a1: vec![T::ZERO; images * C1 * H1 * H1],
            p1: vec![T::ZERO; images * C1 * P1 * P1],
            arg1: vec![0; images * C1 * P1 * P1],
            a2: vec![T::ZERO; images * C2 * H2 * H2],
            p2: vec![T::ZERO; images * p2],
            arg2: vec![0; images * p2],
            logits: vec![T::ZERO; images * CLASSES],
            probs: vec![T::ZERO; images * CLASSES],
        }
    }
}

/// Result of [`backprop`].
#[derive(Debug, Clone, PartialEq)]
pub struct Backprop<T> {
    /// Mean softmax cross-entropy over the batch (natural log).
    pub loss: f64,
    /// Images whose arg-max logit (ties to the lowest class) equals the label.
    pub correct: usize,
    /// d loss / d weights: P values, `state_dict` order.
    pub grad: Vec<T>,
    /// The forward intermediates (activations for the statistics).
    pub cache: ForwardCache<T>,
}

/// Forward pass of one network (`weights`: P) over `images` images (`x`: images × 784),
/// keeping every intermediate. Errors: [`Error::Shape`] on a length mismatch.
pub fn forward_cached<T: Real>(
    net: &Net,
    weights: &[T],
    x: &[T],
    images: usize,
) -> Result<ForwardCache<T>> {
    net.require_fused("the cached forward pass (statistics, backpropagation)")?;
    check_len("forward_cached weights (P)", weights.len(), net.n_params())?;
    check_len(
        "forward_cached x (images × 784)",
        x.len(),
        images.saturating_mul(IMG_PIXELS),
    )?;
    let mut cache = ForwardCache::zeros(net, images);
    split_cache(&mut cache, images)
        .into_par_iter()
        .try_for_each(|mut part| {
            for d in 0..part.n {
                let img = &x[(part.i0 + d) * IMG_PIXELS..][..IMG_PIXELS];
                forward_image(net, weights, img, &mut part.image(d))?;
            }
            Ok::<(), Error>(())
        })?;
    Ok(cache)
}

/// Loss, correct count and gradient of one network (`weights`: P, `state_dict` order)
/// on a mini-batch (`x`: B × 784, `labels`: B, each < 10), with the forward cache.
///
/// loss = (1/B) Σ_b (log Σ_k e^{z_bk} − z_b,label), as `torch.nn.CrossEntropyLoss()`.
/// Errors: [`Error::Shape`] on a length mismatch, an empty batch or a label ≥ 10.
pub fn backprop<T: Real>(net: &Net, weights: &[T], x: &[T], labels: &[u8]) -> Result<Backprop<T>> {
    net.require_fused("backpropagation (SGD, Adam)")?;
    let images = labels.len();
    let p = net.n_params();
    check_batch(
        "backprop",
        weights.len(),
        p,
        x.len(),
        IMG_PIXELS,
        labels,
        CLASSES,
    )?;
    let scale = T::ONE / T::from_f64(images as f64);
    let mut cache = ForwardCache::zeros(net, images);
    let partials: Vec<(Vec<T>, f64, usize)> = split_cache(&mut cache, images)
        .into_par_iter()
        .map(|mut part| {
            let mut grad = vec![T::ZERO; p];
            let mut s = BackScratch::new(net);
            let (mut loss, mut correct) = (0.0f64, 0usize);
            for d in 0..part.n {
                let img = &x[(part.i0 + d) * IMG_PIXELS..][..IMG_PIXELS];
                let label = usize::from(labels[part.i0 + d]);
                let mut v = part.image(d);
                forward_image(net, weights, img, &mut v)?;
                let (l, ok) = cross_entropy(v.logits, label);
                loss += l;
                correct += usize::from(ok);
                for (k, (g, &pk)) in s.dlogits.iter_mut().zip(v.probs.iter()).enumerate() {
                    let target = if k == label { T::ONE } else { T::ZERO };
                    *g = (pk - target) * scale;
                }
                backward_image(net, weights, img, &v, &mut s, &mut grad)?;
            }
            Ok((grad, loss, correct))
        })
        .collect::<Result<_>>()?;
    let (grad, loss, correct) = sum_partials(p, partials);
    Ok(Backprop {
        loss: loss / images as f64,
        correct,
        grad,
        cache,
    })
}

/// Sums the per-task (gradient, loss, correct) triples in task order (the fixed order
/// that makes the result independent of the thread count).
pub(crate) fn sum_partials<T: Real>(
    p: usize,
    partials: Vec<(Vec<T>, f64, usize)>,
) -> (Vec<T>, f64, usize) {
    let mut grad = vec![T::ZERO; p];
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for (g, l, c) in partials {
        for (a, b) in grad.iter_mut().zip(g) {
            *a += b;
        }
        loss += l;
        correct += c;
    }
    (grad, loss, correct)
}

/// Checks a backpropagation batch: `weights` P values, `x` (labels × `n_in`) values,
/// at least one image, every label below `classes`. `what` names the caller.
/// Errors: [`Error::Shape`] naming the first fault.
pub(crate) fn check_batch(
    what: &str,
    weights: usize,
    p: usize,
    x: usize,
    n_in: usize,
    labels: &[u8],
    classes: usize,
) -> Result<()> {
    let images = labels.len();
    check_len(&format!("{what} weights (P)"), weights, p)?;
    check_len(
        &format!("{what} x (labels × {n_in})"),
        x,
        images.saturating_mul(n_in),
    )?;
    if images == 0 {
        return Err(Error::Shape {
            what: format!("{what} batch"),
            expected: "at least one image".to_string(),
            found: "0 images".to_string(),
        });
    }
    if let Some(i) = labels.iter().position(|&l| usize::from(l) >= classes) {
        return Err(Error::Shape {
            what: format!("{what} label of image {i}"),
            expected: format!("a class below {classes}"),
            found: format!("{}", labels[i]),
        });
    }
    Ok(())
}

/// Max-pool 2×2 stride 2 with arg-max: `input` c × h × w (h, w even), `out`
/// c × h/2 × w/2, `arg` (same length as `out`) the flat index into `input` of the
/// chosen element: the first maximum in row-major window order (strictly-greater scan;
/// a NaN wins), as PyTorch's CPU `max_pool2d`. Errors: [`Error::Shape`] on a length
/// mismatch or an odd side.
pub fn maxpool2_argmax_forward<T: Real>(
    input: &[T],
    c: usize,
    h: usize,
    w: usize,
    out: &mut [T],
    arg: &mut [u32],
) -> Result<()> {
    crate::cpu::forward::check_even_sides("maxpool2_argmax_forward input sides", h, w)?;
    let n_out = c * (h / 2) * (w / 2);
    check_len("maxpool2_argmax_forward input", input.len(), c * h * w)?;
    check_len("maxpool2_argmax_forward out", out.len(), n_out)?;
    check_len("maxpool2_argmax_forward arg", arg.len(), n_out)?;
    if input.len() > u32::MAX as usize {
        return Err(Error::Shape {
            what: "maxpool2_argmax_forward input".to_string(),
            expected: "at most 2^32 − 1 elements (u32 indices)".to_string(),
            found: format!("{}", input.len()),
        });
    }
    let (oh, ow) = (h / 2, w / 2);
    let mut j = 0;
    for ch in 0..c {
        for y in 0..oh {
            for xo in 0..ow {
                let base = (ch * h + 2 * y) * w + 2 * xo;
                let mut best = base;
                for idx in [base + 1, base + w, base + w + 1] {
                    let v = input[idx];
                    if v > input[best] || (v.is_nan() && !input[best].is_nan()) {
                        best = idx;
                    }
                }
                out[j] = input[best];
                arg[j] = best as u32;
                j += 1;
            }
        }
    }
    Ok(())
}

/// Max-pool backward: `din` (the pool input's length) is zeroed, then
/// `din[arg[j]] += dout[j]`. Errors: [`Error::Shape`] when `arg` and `dout` differ in
/// length or an index is out of range.
pub fn maxpool2_backward<T: Real>(dout: &[T], arg: &[u32], din: &mut [T]) -> Result<()> {
    check_len("maxpool2_backward arg", arg.len(), dout.len())?;
    din.fill(T::ZERO);
    for (&g, &a) in dout.iter().zip(arg) {
        let slot = din.get_mut(a as usize).ok_or_else(|| Error::Shape {
            what: "maxpool2_backward arg-max index".to_string(),
            expected: format!("below {}", dout.len() * 4),
            found: format!("{a}"),
        })?;
        *slot += g;
    }
    Ok(())
}

/// Activation backward in place: `grad[i] *= act'(y[i])` with `y` the activation's
/// output. Errors: [`Error::Shape`] when the lengths differ.
pub fn activation_backward<T: Real>(act: Activation, y: &[T], grad: &mut [T]) -> Result<()> {
    check_len("activation_backward grad", grad.len(), y.len())?;
    for (g, &v) in grad.iter_mut().zip(y) {
        *g = *g * act_derivative(act, v);
    }
    Ok(())
}

/// Linear layer backward (no bias): `input` nin, `weight` nout × nin, `dout` nout.
/// Adds `dout ⊗ input` into `dweight` (nout × nin) and, when given, overwrites `din`
/// (nin) with `weightᵀ · dout`. Errors: [`Error::Shape`] on a length mismatch.
pub fn linear_backward<T: Real>(
    input: &[T],
    nin: usize,
    weight: &[T],
    nout: usize,
    dout: &[T],
    dweight: &mut [T],
    din: Option<&mut [T]>,
) -> Result<()> {
    check_len("linear_backward input", input.len(), nin)?;
    check_len("linear_backward weight", weight.len(), nout * nin)?;
    check_len("linear_backward dout", dout.len(), nout)?;
    check_len("linear_backward dweight", dweight.len(), nout * nin)?;
    if nin == 0 {
        return Ok(());
    }
    for (row, &g) in dweight.chunks_exact_mut(nin).zip(dout) {
        for (d, &v) in row.iter_mut().zip(input) {
            *d += g * v;
        }
    }
    if let Some(din) = din {
        check_len("linear_backward din", din.len(), nin)?;
        din.fill(T::ZERO);
        for (row, &g) in weight.chunks_exact(nin).zip(dout) {
            for (d, &wv) in din.iter_mut().zip(row) {
                *d += g * wv;
            }
        }
    }
    Ok(())
}

/// Convolution forward, generic twin of [`crate::cpu::forward::conv2d_forward`] (same
/// shapes, same accumulation order (i, ky, kx), so f32 results are identical).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward_generic<T: Real>(
    input: &[T],
    cin: usize,
    h: usize,
    w: usize,
    weight: &[T],
    cout: usize,
    k: usize,
    out: &mut [T],
) -> Result<()> {
    let (oh, ow) = conv_out_sides("conv2d_forward_generic", h, w, k)?;
    check_len("conv2d_forward_generic input", input.len(), cin * h * w)?;
    check_len(
        "conv2d_forward_generic weight",
        weight.len(),
        cout * cin * k * k,
    )?;
    check_len("conv2d_forward_generic out", out.len(), cout * oh * ow)?;
    if oh * ow == 0 {
        return Ok(());
    }
    for (o, plane) in out.chunks_exact_mut(oh * ow).enumerate() {
        plane.fill(T::ZERO);
        for i in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    let wv = weight[((o * cin + i) * k + ky) * k + kx];
                    for (y, row) in plane.chunks_exact_mut(ow).enumerate() {
                        let src = &input[(i * h + y + ky) * w + kx..][..ow];
                        for (d, &s) in row.iter_mut().zip(src) {
                            *d += wv * s;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Convolution weight gradient: adds
/// `dweight[o, i, ky, kx] += Σ_{y,x} dout[o, y, x] · input[i, y+ky, x+kx]` (`input`
/// cin × h × w, `dout` cout × (h−k+1) × (w−k+1), `dweight` cout × cin × k × k).
/// Each tap sums a lane vector over rows first (vectorisable), then the lanes in order.
/// Errors: [`Error::Shape`] on a length mismatch or a bad kernel side.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_weight<T: Real>(
    input: &[T],
    cin: usize,
    h: usize,
    w: usize,
    dout: &[T],
    cout: usize,
    k: usize,
    dweight: &mut [T],
) -> Result<()> {
    let (oh, ow) = conv_out_sides("conv2d_backward_weight", h, w, k)?;
    check_len("conv2d_backward_weight input", input.len(), cin * h * w)?;
    check_len("conv2d_backward_weight dout", dout.len(), cout * oh * ow)?;
    check_len(
        "conv2d_backward_weight dweight",
        dweight.len(),
        cout * cin * k * k,
    )?;
    if oh * ow == 0 {
        return Ok(());
    }
    let mut lanes = vec![T::ZERO; ow];
    for (o, plane) in dout.chunks_exact(oh * ow).enumerate() {
        for i in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    lanes.fill(T::ZERO);
                    for (y, grow) in plane.chunks_exact(ow).enumerate() {
                        let src = &input[(i * h + y + ky) * w + kx..][..ow];
                        for (l, (&g, &s)) in lanes.iter_mut().zip(grow.iter().zip(src)) {
                            *l += g * s;
                        }
                    }
                    let sum = lanes.iter().fold(T::ZERO, |acc, &v| acc + v);
                    dweight[((o * cin + i) * k + ky) * k + kx] += sum;
                }
            }
        }
    }
    Ok(())
}

/// Convolution input gradient: overwrites `din` (cin × h × w) with
/// `din[i, y+ky, x+kx] = Σ_{o,ky,kx} weight[o, i, ky, kx] · dout[o, y, x]` (`weight`
/// cout × cin × k × k, `dout` cout × (h−k+1) × (w−k+1)).
/// Errors: [`Error::Shape`] on a length mismatch or a bad kernel side.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_input<T: Real>(
    dout: &[T],
    cout: usize,
    weight: &[T],
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    din: &mut [T],
) -> Result<()> {
    let (oh, ow) = conv_out_sides("conv2d_backward_input", h, w, k)?;
    check_len("conv2d_backward_input dout", dout.len(), cout * oh * ow)?;
    check_len(
        "conv2d_backward_input weight",
        weight.len(),
        cout * cin * k * k,
    )?;
    check_len("conv2d_backward_input din", din.len(), cin * h * w)?;
    din.fill(T::ZERO);
    if oh * ow == 0 {
        return Ok(());
    }
    for (o, plane) in dout.chunks_exact(oh * ow).enumerate() {
        for i in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    let wv = weight[((o * cin + i) * k + ky) * k + kx];
                    for (y, grow) in plane.chunks_exact(ow).enumerate() {
                        let dst = &mut din[(i * h + y + ky) * w + kx..][..ow];
                        for (d, &g) in dst.iter_mut().zip(grow) {
                            *d += wv * g;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Output sides of a valid k × k convolution over h × w, or a shape error.
fn conv_out_sides(what: &str, h: usize, w: usize, k: usize) -> Result<(usize, usize)> {
    if k == 0 || k > h || k > w {
        return Err(Error::Shape {
            what: format!("{what} kernel side"),
            expected: format!("1 ≤ k ≤ min(h, w) = {}", h.min(w)),
            found: format!("k = {k}"),
        });
    }
    Ok((h - k + 1, w - k + 1))
}

/// Mutable views of one run of images inside a [`ForwardCache`].
struct CachePart<'a, T> {
    i0: usize,
    n: usize,
    a1: &'a mut [T],
    p1: &'a mut [T],
    arg1: &'a mut [u32],
    a2: &'a mut [T],
    p2: &'a mut [T],
    arg2: &'a mut [u32],
    logits: &'a mut [T],
    probs: &'a mut [T],
}

/// The views of one image of a [`CachePart`].
struct ImageView<'b, T> {
    a1: &'b mut [T],
    p1: &'b mut [T],
    arg1: &'b mut [u32],
    a2: &'b mut [T],
    p2: &'b mut [T],
    arg2: &'b mut [u32],
    logits: &'b mut [T],
    probs: &'b mut [T],
}

/// Image `d` of slice `s` that holds `n` images of equal size.
fn nth<X>(s: &mut [X], n: usize, d: usize) -> &mut [X] {
    let per = s.len() / n;
    &mut s[d * per..(d + 1) * per]
}

impl<T> CachePart<'_, T> {
    fn image(&mut self, d: usize) -> ImageView<'_, T> {
        let n = self.n;
        ImageView {
            a1: nth(self.a1, n, d),
            p1: nth(self.p1, n, d),
            arg1: nth(self.arg1, n, d),
            a2: nth(self.a2, n, d),
            p2: nth(self.p2, n, d),
            arg2: nth(self.arg2, n, d),
            logits: nth(self.logits, n, d),
            probs: nth(self.probs, n, d),
        }
    }
}

/// Cuts `v` (images × per-image values) into runs of [`GRAD_CHUNK`] images.
fn runs<X>(v: &mut [X], images: usize) -> Vec<&mut [X]> {
    let per = v.len() / images.max(1);
    let mut out = Vec::with_capacity(images.div_ceil(GRAD_CHUNK));
    let mut rest = v;
    let mut left = images;
    while left > 0 {
        let n = GRAD_CHUNK.min(left);
        let (head, tail) = rest.split_at_mut(n * per);
        out.push(head);
        rest = tail;
        left -= n;
    }
    out
}

/// Splits the cache into one [`CachePart`] per run of [`GRAD_CHUNK`] images.
fn split_cache<T>(c: &mut ForwardCache<T>, images: usize) -> Vec<CachePart<'_, T>> {
    let mut a1 = runs(&mut c.a1, images).into_iter();
    let mut p1 = runs(&mut c.p1, images).into_iter();
    let mut arg1 = runs(&mut c.arg1, images).into_iter();
    let mut a2 = runs(&mut c.a2, images).into_iter();
    let mut p2 = runs(&mut c.p2, images).into_iter();
    let mut arg2 = runs(&mut c.arg2, images).into_iter();
    let mut logits = runs(&mut c.logits, images).into_iter();
    let mut probs = runs(&mut c.probs, images).into_iter();
    let mut parts = Vec::new();
    let mut i0 = 0;
    while i0 < images {
        let n = GRAD_CHUNK.min(images - i0);
        // Every field was cut into the same number of runs, so none runs out first.
        match (
            a1.next(),
            p1.next(),
            arg1.next(),
            a2.next(),
            p2.next(),
            arg2.next(),
            logits.next(),
            probs.next(),
        ) {
            (
                Some(a1),
                Some(p1),
                Some(arg1),
                Some(a2),
                Some(p2),
                Some(arg2),
                Some(logits),
                Some(probs),
            ) => parts.push(CachePart {
                i0,
                n,
                a1,
                p1,
                arg1,
                a2,
                p2,
                arg2,
                logits,
                probs,
            }),
            _ => break,
        }
        i0 += n;
    }
    parts
}

/// One image forward, writing every intermediate into `v`.
fn forward_image<T: Real>(net: &Net, w: &[T], img: &[T], v: &mut ImageView<'_, T>) -> Result<()> {
    let w1 = &w[Net::CONV1_OFFSET..][..Net::CONV1_LEN];
    let w2 = &w[Net::CONV2_OFFSET..][..Net::CONV2_LEN];
    let wf = &w[Net::FC_OFFSET..][..net.fc_len()];
    conv2d_forward_generic(img, 1, IMG, IMG, w1, C1, KSIZE, v.a1)?;
    for a in v.a1.iter_mut() {
        *a = act_apply(net.act, *a);
    }
    maxpool2_argmax_forward(v.a1, C1, H1, H1, v.p1, v.arg1)?;
    conv2d_forward_generic(v.p1, C1, P1, P1, w2, C2, KSIZE, v.a2)?;
    for a in v.a2.iter_mut() {
        *a = act_apply(net.act, *a);
    }
    let feat: &[T] = match net.arch {
        Arch::Paper => v.a2,
        Arch::Pooled => {
            maxpool2_argmax_forward(v.a2, C2, H2, H2, v.p2, v.arg2)?;
            v.p2
        }
    };
    for (o, row) in v.logits.iter_mut().zip(wf.chunks_exact(net.fc_in())) {
        *o = row
            .iter()
            .zip(feat)
            .fold(T::ZERO, |acc, (&wv, &f)| acc + wv * f);
    }
    softmax_into(v.logits, v.probs);
    Ok(())
}

/// `probs` = softmax(`logits`) (same length, at least one), max-shifted.
pub(crate) fn softmax_into<T: Real>(logits: &[T], probs: &mut [T]) {
    let max = logits
        .iter()
        .fold(logits[0], |m, &z| if z > m { z } else { m });
    let mut sum = T::ZERO;
    for (p, &z) in probs.iter_mut().zip(logits) {
        *p = (z - max).exp();
        sum += *p;
    }
    for p in probs.iter_mut() {
        *p = *p / sum;
    }
}

/// Cross-entropy of one image (natural log, computed in f64 from the logits) and
/// whether its arg-max (ties to the lowest class) is `label`.
pub(crate) fn cross_entropy<T: Real>(logits: &[T], label: usize) -> (f64, bool) {
    let mut best = 0;
    for k in 1..logits.len() {
        if logits[k] > logits[best] {
            best = k;
        }
    }
    let max = logits[best].to_f64();
    let lse = max
        + logits
            .iter()
            .map(|&z| (z.to_f64() - max).exp())
            .sum::<f64>()
            .ln();
    (lse - logits[label].to_f64(), best == label)
}

/// Per-task scratch of the backward pass (one image at a time).
struct BackScratch<T> {
    dlogits: Vec<T>,
    dfeat: Vec<T>,
    da2: Vec<T>,
    dp1: Vec<T>,
    da1: Vec<T>,
}

impl<T: Real> BackScratch<T> {
    fn new(net: &Net) -> Self {
        BackScratch {
            dlogits: vec![T::ZERO; CLASSES],
            dfeat: vec![T::ZERO; net.fc_in()],
            da2: vec![T::ZERO; C2 * H2 * H2],
            dp1: vec![T::ZERO; C1 * P1 * P1],
            da1: vec![T::ZERO; C1 * H1 * H1],
        }
    }
}

/// One image backward from `s.dlogits`, adding its weight gradient into `grad` (P).
fn backward_image<T: Real>(
    net: &Net,
    w: &[T],
    img: &[T],
    v: &ImageView<'_, T>,
    s: &mut BackScratch<T>,
    grad: &mut [T],
) -> Result<()> {
    let fc_in = net.fc_in();
    let w2 = &w[Net::CONV2_OFFSET..][..Net::CONV2_LEN];
    let wf = &w[Net::FC_OFFSET..][..net.fc_len()];
    let (g1, rest) = grad.split_at_mut(Net::CONV2_OFFSET);
    let (g2, gf) = rest.split_at_mut(Net::CONV2_LEN);
    // fc1: dW += dlogits ⊗ feat, dfeat = Wᵀ dlogits.
    let feat: &[T] = match net.arch {
        Arch::Paper => v.a2,
        Arch::Pooled => v.p2,
    };
    linear_backward(feat, fc_in, wf, CLASSES, &s.dlogits, gf, Some(&mut s.dfeat))?;
    // Back to conv2's activation output (through the second pool when present), then
    // through the activation to conv2's pre-activation.
    match net.arch {
        Arch::Paper => s.da2.copy_from_slice(&s.dfeat),
        Arch::Pooled => maxpool2_backward(&s.dfeat, v.arg2, &mut s.da2)?,
    }
    activation_backward(net.act, v.a2, &mut s.da2)?;
    conv2d_backward_weight(v.p1, C1, P1, P1, &s.da2, C2, KSIZE, g2)?;
    conv2d_backward_input(&s.da2, C2, w2, C1, P1, P1, KSIZE, &mut s.dp1)?;
    maxpool2_backward(&s.dp1, v.arg1, &mut s.da1)?;
    activation_backward(net.act, v.a1, &mut s.da1)?;
    conv2d_backward_weight(img, 1, IMG, IMG, &s.da1, C1, KSIZE, g1)
}
