//! Backpropagation through ONE layer-spec network ([`NetSpec`]) on the CPU: the forward
//! pass keeping every layer's output, softmax cross-entropy averaged over the batch
//! (PyTorch's `CrossEntropyLoss`), and the gradient with respect to the P weights
//! (`Sequential` order, biases included). Twin of [`crate::cpu::backprop`] for the fused
//! presets; generic over [`Real`] (f32 to train, f64 for the finite-difference tests).
//!
//! Per layer (input x, output y, upstream gradient g = ∂loss/∂y):
//! - conv2d (stride s, zero padding p): ∂W[o,i,ky,kx] = Σ_{y,x} g[o,y,x]·x[i, ys+ky−p,
//!   xs+kx−p] over the positions inside the image, ∂b[o] = Σ g[o,·,·], and ∂x the
//!   transposed sum;
//! - linear: ∂W = g ⊗ x, ∂b = g, ∂x = Wᵀg;
//! - max-pool: g goes to the one input the forward pass chose (first maximum in
//!   row-major window order, a NaN winning: PyTorch's CPU rule); average-pool: g/k² to
//!   every input of the window; inputs outside the floored windows get 0;
//! - activations from their output y: logistic y(1−y), tanh 1−y², ReLU 1 where y > 0
//!   else 0 (0 at the kink, as PyTorch), **heaviside 0** — it has no useful gradient,
//!   so SGD and Adam cannot move the weights below it, which is what the baselines
//!   must show;
//! - flatten: the identity.
//!
//! Work split: fixed runs of [`GRAD_CHUNK`] images, one rayon task each with its own
//! gradient accumulator, summed in run order: bit-identical for any thread count.

use rayon::prelude::*;

use crate::cpu::backprop::{
    check_batch, cross_entropy, softmax_into, sum_partials, Real, GRAD_CHUNK,
};
use crate::cpu::spec_forward::{layer_forward, valid_range};
use crate::model::spec::{BuiltLayer, Layer, NetSpec, Shape, SpecActivation};
use crate::{Error, Result};

/// Result of [`spec_backprop`].
#[derive(Debug, Clone, PartialEq)]
pub struct SpecBackprop<T> {
    /// Mean softmax cross-entropy over the batch (natural log).
    pub loss: f64,
    /// Images whose arg-max output (ties to the lowest class) equals the label.
    pub correct: usize,
    /// d loss / d weights: P values, `Sequential` order.
    pub grad: Vec<T>,
}

/// `act` applied to one value; for f32 exactly [`SpecActivation::apply`].
#[inline(always)]
pub fn spec_act_apply<T: Real>(act: SpecActivation, x: T) -> T {
    match act {
        SpecActivation::Logistic => T::ONE / (T::ONE + (-x).exp()),
        SpecActivation::Relu => {
            if x > T::ZERO {
                x
            } else {
                T::ZERO
            }
        }
        SpecActivation::Tanh => x.tanh(),
        SpecActivation::Heaviside => {
            if x < T::ZERO {
                T::ZERO
            } else if x >= T::ZERO {
                T::ONE
            } else {
                x
            }
        }
    }
}

/// Derivative of `act` from its output `y` (see the module notes; heaviside 0).
#[inline(always)]
pub fn spec_act_derivative<T: Real>(act: SpecActivation, y: T) -> T {
    match act {
        SpecActivation::Logistic => y * (T::ONE - y),
        SpecActivation::Relu => {
            if y > T::ZERO {
                T::ONE
            } else {
                T::ZERO
            }
        }
        SpecActivation::Tanh => T::ONE - y * y,
        SpecActivation::Heaviside => T::ZERO,
    }
}

/// Every layer's output for one image, and each max-pool's arg-max.
struct Tape<T> {
    /// `outs[l]`: the output of layer l (its shape's length).
    outs: Vec<Vec<T>>,
    /// `args[l]`: layer l's arg-max indices (max-pool layers only, else empty).
    args: Vec<Vec<u32>>,
    /// Softmax of the last layer's output.
    probs: Vec<T>,
    /// Upstream gradients, two buffers of the largest activation length.
    g: Vec<T>,
    h: Vec<T>,
}

impl<T: Real> Tape<T> {
    fn new(spec: &NetSpec) -> Self {
        let layers = spec.layers();
        let scratch = spec.max_activation_len();
        Tape {
            outs: layers
                .iter()
                .map(|l| vec![T::ZERO; l.output.len()])
                .collect(),
            args: layers
                .iter()
                .map(|l| match l.layer {
                    Layer::MaxPool2d { .. } => vec![0; l.output.len()],
                    _ => Vec::new(),
                })
                .collect(),
            probs: vec![T::ZERO; spec.outputs()],
            g: vec![T::ZERO; scratch],
            h: vec![T::ZERO; scratch],
        }
    }
}

/// Loss, correct count and gradient of one spec network (`weights`: P) on a
/// mini-batch (`x`: B × inputs, `labels`: B, each below the spec's outputs).
/// Errors: [`Error::Shape`] on a length mismatch, an empty batch or a bad label.
pub fn spec_backprop<T: Real>(
    spec: &NetSpec,
    weights: &[T],
    x: &[T],
    labels: &[u8],
) -> Result<SpecBackprop<T>> {
    let (p, n_in) = (spec.n_params(), spec.input().len());
    check_batch(
        "spec_backprop",
        weights.len(),
        p,
        x.len(),
        n_in,
        labels,
        spec.outputs(),
    )?;
    let images = labels.len();
    let scale = T::ONE / T::from_f64(images as f64);
    let chunks: Vec<usize> = (0..images).step_by(GRAD_CHUNK).collect();
    let partials: Vec<(Vec<T>, f64, usize)> = chunks
        .into_par_iter()
        .map(|i0| {
            let mut grad = vec![T::ZERO; p];
            let mut tape = Tape::new(spec);
            let (mut loss, mut correct) = (0.0f64, 0usize);
            for d in i0..(i0 + GRAD_CHUNK).min(images) {
                let img = &x[d * n_in..][..n_in];
                let label = usize::from(labels[d]);
                forward_image(spec, weights, img, &mut tape);
                let logits = tape.outs.last().map_or(img, |v| v.as_slice());
                let (l, ok) = cross_entropy(logits, label);
                loss += l;
                correct += usize::from(ok);
                softmax_into(logits, &mut tape.probs);
                backward_image(spec, weights, img, &mut tape, label, scale, &mut grad)?;
            }
            Ok((grad, loss, correct))
        })
        .collect::<Result<_>>()?;
    let (grad, loss, correct) = sum_partials(p, partials);
    Ok(SpecBackprop {
        loss: loss / images as f64,
        correct,
        grad,
    })
}

/// Mean squared error (PyTorch's `MSELoss`, the mean over the batch and the outputs) and
/// its gradient for one spec network (`weights`: P) on a mini-batch (`x`: B × inputs,
/// `targets`: B × outputs, real values); `correct` is 0. Same work split as
/// [`spec_backprop`]: bit-identical for any thread count.
/// Errors: [`Error::Shape`] on a length mismatch or an empty batch.
pub fn spec_backprop_mse<T: Real>(
    spec: &NetSpec,
    weights: &[T],
    x: &[T],
    targets: &[T],
) -> Result<SpecBackprop<T>> {
    let (p, n_in, k) = (spec.n_params(), spec.input().len(), spec.outputs());
    let images = targets.len() / k.max(1);
    if weights.len() != p || images == 0 || targets.len() != images * k || x.len() != images * n_in
    {
        return Err(Error::Shape {
            what: "spec_backprop_mse weights, inputs and targets".into(),
            expected: format!("{p} weights, B × {n_in} inputs and B × {k} targets, B ≥ 1"),
            found: format!(
                "{} weights, {} inputs, {} targets",
                weights.len(),
                x.len(),
                targets.len()
            ),
        });
    }
    // d/d out of (1/(B·k)) Σ (out − y)² is 2 (out − y) / (B·k).
    let scale = T::from_f64(2.0 / (images * k) as f64);
    let chunks: Vec<usize> = (0..images).step_by(GRAD_CHUNK).collect();
    let partials: Vec<(Vec<T>, f64, usize)> = chunks
        .into_par_iter()
        .map(|i0| {
            let mut grad = vec![T::ZERO; p];
            let mut tape = Tape::new(spec);
            let mut loss = 0.0f64;
            for d in i0..(i0 + GRAD_CHUNK).min(images) {
                let img = &x[d * n_in..][..n_in];
                let y = &targets[d * k..][..k];
                forward_image(spec, weights, img, &mut tape);
                let out = tape.outs.last().map_or(img, |v| v.as_slice());
                for ((g, &o), &t) in tape.g[..k].iter_mut().zip(out).zip(y) {
                    let e = o - t;
                    loss += (o.to_f64() - t.to_f64()).powi(2);
                    *g = e * scale;
                }
                backward_from_output(spec, weights, img, &mut tape, &mut grad)?;
            }
            Ok((grad, loss, 0))
        })
        .collect::<Result<_>>()?;
    let (grad, loss, _) = sum_partials(p, partials);
    Ok(SpecBackprop {
        loss: loss / (images * k) as f64,
        correct: 0,
        grad,
    })
}

/// The output of every activation layer of `spec` (`weights`: P) over `images` inputs
/// (`x`: images × inputs), each images × its length, in layer order, and the softmax of
/// the network's output (images × outputs): what the statistics describe.
/// Errors: [`Error::Shape`] on a length mismatch.
pub fn spec_activations(
    spec: &NetSpec,
    weights: &[f32],
    x: &[f32],
    images: usize,
) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
    let n_in = spec.input().len();
    crate::backend::check_len(
        "spec_activations weights (P)",
        weights.len(),
        spec.n_params(),
    )?;
    crate::backend::check_len(
        "spec_activations x (images × inputs)",
        x.len(),
        images.saturating_mul(n_in),
    )?;
    let acts: Vec<usize> = spec
        .layers()
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l.layer, Layer::Act(_)))
        .map(|(i, _)| i)
        .collect();
    let mut out: Vec<Vec<f32>> = acts
        .iter()
        .map(|&i| Vec::with_capacity(images * spec.layers()[i].output.len()))
        .collect();
    let mut probs = Vec::with_capacity(images * spec.outputs());
    let mut tape = Tape::new(spec);
    for img in x.chunks_exact(n_in.max(1)).take(images) {
        forward_image(spec, weights, img, &mut tape);
        for (o, &i) in out.iter_mut().zip(&acts) {
            o.extend_from_slice(&tape.outs[i]);
        }
        let logits = tape.outs.last().map_or(img, |v| v.as_slice());
        softmax_into(logits, &mut tape.probs);
        probs.extend_from_slice(&tape.probs);
    }
    Ok((out, probs))
}

/// The forward pass of one image, keeping every layer's output in `tape`.
fn forward_image<T: Real>(spec: &NetSpec, w: &[T], img: &[T], tape: &mut Tape<T>) {
    for (i, l) in spec.layers().iter().enumerate() {
        let (done, rest) = tape.outs.split_at_mut(i);
        let input: &[T] = match done.last() {
            Some(v) => v,
            None => img,
        };
        let out = &mut rest[0];
        match l.layer {
            Layer::Act(act) => {
                for (o, &v) in out.iter_mut().zip(input) {
                    *o = spec_act_apply(act, v);
                }
            }
            Layer::Flatten => out.copy_from_slice(input),
            Layer::MaxPool2d { .. } => layer_forward(l, w, input, out, Some(&mut tape.args[i])),
            _ => layer_forward(l, w, input, out, None),
        }
    }
}

/// The backward pass of one image after [`forward_image`] and the softmax: adds the
/// image's gradient (scaled by `scale` = 1/B) into `grad`.
#[allow(clippy::too_many_arguments)]
fn backward_image<T: Real>(
    spec: &NetSpec,
    w: &[T],
    img: &[T],
    tape: &mut Tape<T>,
    label: usize,
    scale: T,
    grad: &mut [T],
) -> Result<()> {
    let n_out = spec.outputs();
    for (k, (g, &pk)) in tape.g[..n_out].iter_mut().zip(&tape.probs).enumerate() {
        let target = if k == label { T::ONE } else { T::ZERO };
        *g = (pk - target) * scale;
    }
    backward_from_output(spec, w, img, tape, grad)
}

/// The backward pass of one image after [`forward_image`], from the loss gradient of the
/// network's output in `tape.g[..outputs]`: adds the image's gradient into `grad`.
fn backward_from_output<T: Real>(
    spec: &NetSpec,
    w: &[T],
    img: &[T],
    tape: &mut Tape<T>,
    grad: &mut [T],
) -> Result<()> {
    let layers = spec.layers();
    for i in (0..layers.len()).rev() {
        let l = &layers[i];
        let input: &[T] = if i == 0 { img } else { &tape.outs[i - 1] };
        let (n_in, n_o) = (l.input.len(), l.output.len());
        match l.layer {
            Layer::Act(act) => {
                for (g, &y) in tape.g[..n_o].iter_mut().zip(&tape.outs[i]) {
                    *g = *g * spec_act_derivative(act, y);
                }
                continue;
            }
            Layer::Flatten => continue,
            // The first layer's input gradient is not needed.
            _ => {
                let want_input = i > 0;
                let (g, h) = (&tape.g[..n_o], &mut tape.h[..n_in]);
                layer_backward(l, w, input, g, &tape.args[i], grad, want_input.then_some(h))?;
            }
        }
        std::mem::swap(&mut tape.g, &mut tape.h);
    }
    Ok(())
}

/// One layer with parameters or a pool, backward: adds its weight and bias gradients
/// into `grad` (P) and, when `din` is given, overwrites it with the input gradient.
fn layer_backward<T: Real>(
    l: &BuiltLayer,
    w: &[T],
    input: &[T],
    g: &[T],
    arg: &[u32],
    grad: &mut [T],
    din: Option<&mut [T]>,
) -> Result<()> {
    match (l.layer, l.input, l.output) {
        (
            Layer::Conv2d {
                kernel_size: k,
                stride,
                padding,
                ..
            },
            Shape::Image { c, h, w: wd },
            Shape::Image {
                c: co,
                h: oh,
                w: ow,
            },
        ) => {
            let n_w = co * c * k * k;
            let geom = ConvGeom {
                c,
                h,
                w: wd,
                co,
                oh,
                ow,
                k,
                stride,
                padding,
            };
            conv2d_backward(
                &geom,
                input,
                g,
                &w[l.weight_offset..][..n_w],
                &mut grad[l.weight_offset..][..n_w],
                din,
            );
            if let Some(o) = l.bias_offset {
                for (b, plane) in grad[o..][..co].iter_mut().zip(g.chunks_exact(oh * ow)) {
                    *b += plane.iter().fold(T::ZERO, |acc, &v| acc + v);
                }
            }
        }
        (Layer::Linear { .. }, Shape::Vector(f), Shape::Vector(n)) => {
            let weight = &w[l.weight_offset..][..n * f];
            for (row, &gv) in grad[l.weight_offset..][..n * f].chunks_exact_mut(f).zip(g) {
                for (d, &v) in row.iter_mut().zip(input) {
                    *d += gv * v;
                }
            }
            if let Some(o) = l.bias_offset {
                for (b, &gv) in grad[o..][..n].iter_mut().zip(g) {
                    *b += gv;
                }
            }
            if let Some(din) = din {
                din.fill(T::ZERO);
                for (row, &gv) in weight.chunks_exact(f).zip(g) {
                    for (d, &wv) in din.iter_mut().zip(row) {
                        *d += gv * wv;
                    }
                }
            }
        }
        (Layer::MaxPool2d { .. }, _, _) => {
            if let Some(din) = din {
                din.fill(T::ZERO);
                for (&gv, &a) in g.iter().zip(arg) {
                    let slot = din.get_mut(a as usize).ok_or_else(|| Error::Shape {
                        what: "spec_backprop max-pool arg-max index".to_string(),
                        expected: format!("below {}", l.input.len()),
                        found: format!("{a}"),
                    })?;
                    *slot += gv;
                }
            }
        }
        (
            Layer::AvgPool2d { kernel_size: k },
            Shape::Image { h, w: wd, .. },
            Shape::Image { h: oh, w: ow, .. },
        ) => {
            if let Some(din) = din {
                din.fill(T::ZERO);
                let scale = T::ONE / T::from_f64((k * k) as f64);
                let planes = din.chunks_exact_mut(h * wd).zip(g.chunks_exact(oh * ow));
                for (dst, src) in planes {
                    for y in 0..oh {
                        for x in 0..ow {
                            let v = src[y * ow + x] * scale;
                            for ky in 0..k {
                                for d in &mut dst[(y * k + ky) * wd + x * k..][..k] {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
            }
        }
        // `NetSpec::build` admits no other combination.
        _ => unreachable!("layer {:?} on input {:?}", l.layer, l.input),
    }
    Ok(())
}

/// The shapes of one convolution: input c × h × w, output co × oh × ow, kernel k,
/// stride, zero padding.
struct ConvGeom {
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    oh: usize,
    ow: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

/// conv2d backward: adds the weight gradient into `dweight` (co × c × k × k) and, when
/// given, overwrites `din` (c × h × w) with the input gradient. Positions that read the
/// zero padding contribute nothing.
fn conv2d_backward<T: Real>(
    s: &ConvGeom,
    input: &[T],
    g: &[T],
    weight: &[T],
    dweight: &mut [T],
    mut din: Option<&mut [T]>,
) {
    if let Some(d) = din.as_deref_mut() {
        d.fill(T::ZERO);
    }
    let (k, st, pd) = (s.k, s.stride, s.padding);
    for (o, plane) in g.chunks_exact(s.oh * s.ow).enumerate().take(s.co) {
        for i in 0..s.c {
            for ky in 0..k {
                let (y0, y1) = valid_range(s.oh, s.h, ky, st, pd);
                for kx in 0..k {
                    let (x0, x1) = valid_range(s.ow, s.w, kx, st, pd);
                    let wi = ((o * s.c + i) * k + ky) * k + kx;
                    let wv = weight[wi];
                    let mut acc = T::ZERO;
                    for y in y0..y1 {
                        let row = (i * s.h + y * st + ky - pd) * s.w;
                        for x in x0..x1 {
                            let at = row + x * st + kx - pd;
                            let gv = plane[y * s.ow + x];
                            acc += gv * input[at];
                            if let Some(d) = din.as_deref_mut() {
                                d[at] += wv * gv;
                            }
                        }
                    }
                    dweight[wi] += acc;
                }
            }
        }
    }
}
