//! CPU twins of the kernels of `kernels/spec_backprop.cu` (same names, the same
//! operations in the same order: bit for bit equal to the kernels in the emulation,
//! `tests/kernel_emu_spec_backprop.rs`), twins of the linear layers' two cuBLAS GEMMs,
//! and [`run_backprop`], which executes a [`BackPlan`] with them as the CUDA backend does
//! (`gpu::spec_backprop`).
//!
//! These are references, not the CPU backend's backpropagation (`spec_backprop.rs`, one
//! image at a time): the tests hold the two equal to the gradient tolerance (the kernels
//! use fused multiply-adds and sum in another order).

use crate::backend::check_len;
use crate::cpu::spec_backprop::{spec_act_derivative, SpecBackprop};
use crate::cpu::spec_kernels::run_op;
use crate::gpu::geometry::SPEC_RED_THREADS;
use crate::gpu::spec_backplan::{BackPlan, BackStep, Tape};
use crate::gpu::spec_plan::{PoolMode, ACT_NONE};
use crate::model::spec::{NetSpec, SpecActivation};
use crate::{Error, Result};

/// What the loss compares the network's outputs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SpecTargets<'a> {
    /// One class per image (below the spec's outputs): softmax cross-entropy.
    Labels(&'a [u8]),
    /// Real targets, images × outputs: mean squared error.
    Real(&'a [f32]),
}

impl SpecTargets<'_> {
    /// Images in the batch for a network of `outputs` outputs.
    pub fn images(&self, outputs: usize) -> usize {
        match self {
            SpecTargets::Labels(l) => l.len(),
            SpecTargets::Real(t) => t.len() / outputs.max(1),
        }
    }

    /// Checks the targets against `outputs` (`what` names the caller in the error).
    ///
    /// Errors: [`Error::Shape`] for an empty batch, a label not below `outputs`, or real
    /// targets that are not images × outputs.
    pub fn check(&self, what: &str, outputs: usize) -> Result<usize> {
        let images = self.images(outputs);
        if images == 0 {
            return Err(Error::Shape {
                what: format!("{what} batch"),
                expected: "at least one image".into(),
                found: "0 images".into(),
            });
        }
        match self {
            SpecTargets::Labels(l) => {
                if let Some(i) = l.iter().position(|&v| usize::from(v) >= outputs) {
                    return Err(Error::Shape {
                        what: format!("{what} label of image {i}"),
                        expected: format!("a class below {outputs}"),
                        found: l[i].to_string(),
                    });
                }
            }
            SpecTargets::Real(t) => check_len(
                &format!("{what} targets (images × outputs)"),
                t.len(),
                images * outputs,
            )?,
        }
        Ok(images)
    }
}

/// The activation of kernel code `code`, `None` for [`ACT_NONE`].
///
/// # Panics
/// On a code no kernel knows (the plans only make known ones).
fn activation(code: i32) -> Option<SpecActivation> {
    match code {
        ACT_NONE => None,
        0 => Some(SpecActivation::Logistic),
        1 => Some(SpecActivation::Relu),
        2 => Some(SpecActivation::Tanh),
        3 => Some(SpecActivation::Heaviside),
        _ => panic!("unknown activation code {code}"),
    }
}

/// Twin of `spec_act_backward_f32`: `g[i] ← g[i] · act'(y[i])` ([`ACT_NONE`]: unchanged).
pub fn spec_act_backward_f32(g: &mut [f32], y: &[f32], act: i32) {
    let Some(a) = activation(act) else { return };
    for (gv, &yv) in g.iter_mut().zip(y) {
        *gv *= spec_act_derivative(a, yv);
    }
}

/// Twin of `spec_conv2d_dgrad_f32`: `din` (images × c × h × wd) from `g` (images × co ×
/// oh × ow) and `w` (co × c × k × k).
pub fn spec_conv2d_dgrad_f32(
    g: &[f32],
    w: &[f32],
    din: &mut [f32],
    images: usize,
    (c, h, wd): (usize, usize, usize),
    (co, oh, ow): (usize, usize, usize),
    (k, stride, pad): (usize, usize, usize),
) {
    let (in_plane, plane) = (h * wd, oh * ow);
    for (i, out) in din.iter_mut().enumerate().take(images * c * in_plane) {
        let (d, rest) = (i / (c * in_plane), i % (c * in_plane));
        let (ci, pos) = (rest / in_plane, rest % in_plane);
        let (iy, ix) = (pos / wd, pos % wd);
        let gd = &g[d * co * plane..];
        let mut s = 0.0f32;
        for o in 0..co {
            let wo = &w[(o * c + ci) * k * k..];
            let go = &gd[o * plane..];
            for ky in 0..k {
                let Some(y) = tap(iy, ky, pad, stride, oh) else {
                    continue;
                };
                for kx in 0..k {
                    let Some(x) = tap(ix, kx, pad, stride, ow) else {
                        continue;
                    };
                    s = wo[ky * k + kx].mul_add(go[y * ow + x], s);
                }
            }
        }
        *out = s;
    }
}

/// The output position y with y·stride + kk − pad = i, if there is one below `out_side`.
fn tap(i: usize, kk: usize, pad: usize, stride: usize, out_side: usize) -> Option<usize> {
    let t = (i + pad).checked_sub(kk)?;
    (t % stride == 0 && t / stride < out_side).then_some(t / stride)
}

/// The kernels' block sum: `partials` (one per thread, [`SPEC_RED_THREADS`] of them)
/// halved as a tree, s = 128, 64, ..., 1: p[t] += p[t + s].
fn block_sum(partials: &mut [f32]) -> f32 {
    let mut s = partials.len() / 2;
    while s > 0 {
        for t in 0..s {
            partials[t] += partials[t + s];
        }
        s /= 2;
    }
    partials[0]
}

/// Twin of `spec_conv2d_wgrad_f32`: `dw` (co × c × k × k) from `input` (images × c × h ×
/// wd) and `g` (images × co × oh × ow), summed as the kernel's blocks do.
pub fn spec_conv2d_wgrad_f32(
    input: &[f32],
    g: &[f32],
    dw: &mut [f32],
    images: usize,
    (c, h, wd): (usize, usize, usize),
    (co, oh, ow): (usize, usize, usize),
    (k, stride, pad): (usize, usize, usize),
) {
    let (kk, plane) = (k * k, oh * ow);
    let positions = images * plane;
    let threads = SPEC_RED_THREADS as usize;
    let mut partials = vec![0.0f32; threads];
    for (wi, out) in dw.iter_mut().enumerate().take(co * c * kk) {
        let (o, rest) = (wi / (c * kk), wi % (c * kk));
        let (ci, ky, kx) = (rest / kk, (rest % kk) / k, rest % k);
        for (t, acc) in partials.iter_mut().enumerate() {
            *acc = 0.0;
            for j in (t..positions).step_by(threads) {
                let (d, pos) = (j / plane, j % plane);
                let (y, x) = (pos / ow, pos % ow);
                let (Some(iy), Some(ix)) = (
                    (y * stride + ky).checked_sub(pad).filter(|&v| v < h),
                    (x * stride + kx).checked_sub(pad).filter(|&v| v < wd),
                ) else {
                    continue;
                };
                let gv = g[(d * co + o) * plane + pos];
                let xv = input[((d * c + ci) * h + iy) * wd + ix];
                *acc = gv.mul_add(xv, *acc);
            }
        }
        *out = block_sum(&mut partials);
    }
}

/// Twin of `spec_bias_grad_f32`: `db[o] = Σ_d Σ_q g[d, o, q]` (g images × channels ×
/// plane), summed as the kernel's blocks do.
pub fn spec_bias_grad_f32(g: &[f32], db: &mut [f32], images: usize, channels: usize, plane: usize) {
    let count = images * plane;
    let threads = SPEC_RED_THREADS as usize;
    let mut partials = vec![0.0f32; threads];
    for (o, out) in db.iter_mut().enumerate().take(channels) {
        for (t, acc) in partials.iter_mut().enumerate() {
            *acc = 0.0;
            for j in (t..count).step_by(threads) {
                let (d, q) = (j / plane, j % plane);
                *acc += g[(d * channels + o) * plane + q];
            }
        }
        *out = block_sum(&mut partials);
    }
}

/// Twin of `spec_pool2d_backward_f32`: `din` (planes × h × wd) from the pool's input
/// `input` (planes × h × wd) and `g` (planes × oh × ow).
#[allow(clippy::too_many_arguments)]
pub fn spec_pool2d_backward_f32(
    input: &[f32],
    g: &[f32],
    din: &mut [f32],
    planes: usize,
    (h, wd): (usize, usize),
    (oh, ow): (usize, usize),
    k: usize,
    mode: PoolMode,
) {
    let in_plane = h * wd;
    let inv = 1.0f32 / (k * k) as f32;
    for (i, out) in din.iter_mut().enumerate().take(planes * in_plane) {
        let (p, pos) = (i / in_plane, i % in_plane);
        let (iy, ix) = (pos / wd, pos % wd);
        let (wy, wx) = (iy / k, ix / k);
        if wy >= oh || wx >= ow {
            *out = 0.0;
            continue;
        }
        let gv = g[p * oh * ow + wy * ow + wx];
        *out = match mode {
            PoolMode::Max => {
                let src = &input[p * in_plane + wy * k * wd + wx * k..];
                let (mut v, mut best) = (src[0], 0);
                for ky in 0..k {
                    for (kx, &t) in src[ky * wd..][..k].iter().enumerate() {
                        if t > v || (t.is_nan() && !v.is_nan()) {
                            v = t;
                            best = ky * k + kx;
                        }
                    }
                }
                if best == (iy - wy * k) * k + (ix - wx * k) {
                    gv
                } else {
                    0.0
                }
            }
            PoolMode::Avg => gv * inv,
        };
    }
}

/// Twin of `spec_softmax_xent_f32` for every image (`logits` images × classes, `labels`
/// images): per-image loss (f64), correct flags and `g` = (p − onehot)·scale.
#[allow(clippy::too_many_arguments)]
pub fn spec_softmax_xent_f32(
    logits: &[f32],
    labels: &[i32],
    classes: usize,
    scale: f32,
    loss: &mut [f64],
    correct: &mut [i32],
    g: &mut [f32],
) {
    for (d, &label) in labels.iter().enumerate() {
        let z = &logits[d * classes..][..classes];
        let gd = &mut g[d * classes..][..classes];
        let ok = usize::try_from(label).is_ok_and(|l| l < classes);
        let mut best = 0;
        for j in 1..classes {
            if z[j] > z[best] {
                best = j;
            }
        }
        let mx = z.iter().fold(z[0], |m, &v| if v > m { v } else { m });
        let mut sum = 0.0f32;
        for (e, &v) in gd.iter_mut().zip(z) {
            *e = (v - mx).exp();
            sum += *e;
        }
        for (j, gv) in gd.iter_mut().enumerate() {
            let p = *gv / sum;
            let target = if ok && j as i32 == label { 1.0 } else { 0.0 };
            *gv = if ok { (p - target) * scale } else { 0.0 };
        }
        let m = f64::from(z[best]);
        let s = z.iter().fold(0.0f64, |s, &v| s + (f64::from(v) - m).exp());
        loss[d] = if ok {
            (m + s.ln()) - f64::from(z[label as usize])
        } else {
            f64::NAN
        };
        correct[d] = i32::from(ok && best as i32 == label);
    }
}

/// Twin of `spec_mse_backward_f32` for every image (`out`, `targets` images × k).
pub fn spec_mse_backward_f32(
    out: &[f32],
    targets: &[f32],
    k: usize,
    scale: f32,
    loss: &mut [f64],
    g: &mut [f32],
) {
    for (d, l) in loss.iter_mut().enumerate() {
        let mut s = 0.0f64;
        for j in d * k..(d + 1) * k {
            let (o, t) = (out[j], targets[j]);
            let e = f64::from(o) - f64::from(t);
            s += e * e;
            g[j] = (o - t) * scale;
        }
        *l = s;
    }
}

/// Twin of the weight-gradient GEMM of a linear layer: `dw` (n × f) = gᵀ · x over
/// `images` rows (g images × n, x images × f), each sum in image order.
pub fn linear_wgrad_f32(g: &[f32], x: &[f32], dw: &mut [f32], images: usize, f: usize, n: usize) {
    for (o, row) in dw.chunks_exact_mut(f).enumerate().take(n) {
        for (i, v) in row.iter_mut().enumerate() {
            *v = (0..images).fold(0.0f32, |s, d| s + g[d * n + o] * x[d * f + i]);
        }
    }
}

/// Twin of the input-gradient GEMM of a linear layer: `din` (images × f) = g (images × n)
/// · W (n × f), each sum in output order.
pub fn linear_dgrad_f32(g: &[f32], w: &[f32], din: &mut [f32], images: usize, f: usize, n: usize) {
    for d in 0..images {
        for i in 0..f {
            din[d * f + i] = (0..n).fold(0.0f32, |s, o| s + g[d * n + o] * w[o * f + i]);
        }
    }
}

/// Executes `plan` (of `spec`) with the twins: the forward ops with one member keeping
/// every op's output, the loss kernel, then the backward steps. Loss, correct count and
/// gradient as [`crate::cpu::spec_backprop::spec_backprop`] (softmax cross-entropy for
/// labels, the mean squared error for real targets, `correct` 0).
///
/// Errors: [`Error::Shape`] on buffer lengths or bad targets.
pub fn run_backprop(
    plan: &BackPlan,
    spec: &NetSpec,
    weights: &[f32],
    x: &[f32],
    targets: SpecTargets<'_>,
) -> Result<SpecBackprop<f32>> {
    let (p, n_in, n_out) = (spec.n_params(), spec.input().len(), spec.outputs());
    let images = targets.check("run_backprop", n_out)?;
    check_len("run_backprop weights (P)", weights.len(), p)?;
    check_len("run_backprop x (images × inputs)", x.len(), images * n_in)?;
    let ops = &plan.forward.ops;
    let mut tape: Vec<Vec<f32>> = ops
        .iter()
        .map(|o| vec![f32::NAN; images * o.out_len()])
        .collect();
    for (i, op) in ops.iter().enumerate() {
        let (done, rest) = tape.split_at_mut(i);
        let src: &[f32] = done.last().map_or(x, |v| v.as_slice());
        run_op(op, src, 0, weights, 0, p, &mut rest[0], (1, images));
    }
    let out = tape.last().map_or(x, |v| v.as_slice());
    let mut grads = [
        vec![f32::NAN; images * plan.grad_len],
        vec![f32::NAN; images * plan.grad_len],
    ];
    let mut per_image = vec![0.0f64; images];
    let mut correct = 0usize;
    match targets {
        SpecTargets::Labels(labels) => {
            let labels: Vec<i32> = labels.iter().map(|&l| i32::from(l)).collect();
            let mut ok = vec![0i32; images];
            let scale = 1.0f32 / images as f32;
            let g = &mut grads[0][..images * n_out];
            spec_softmax_xent_f32(out, &labels, n_out, scale, &mut per_image, &mut ok, g);
            correct = ok.iter().map(|&v| v as usize).sum();
        }
        SpecTargets::Real(t) => {
            let scale = (2.0 / (images * n_out) as f64) as f32;
            let g = &mut grads[0][..images * n_out];
            spec_mse_backward_f32(out, t, n_out, scale, &mut per_image, g);
        }
    }
    let loss_div = match targets {
        SpecTargets::Labels(_) => images,
        SpecTargets::Real(_) => images * n_out,
    };
    let loss = per_image.iter().sum::<f64>() / loss_div as f64;
    let mut grad = vec![f32::NAN; p];
    let read = |t: Tape| -> &[f32] {
        match t {
            Tape::Input => x,
            Tape::Op(i) => &tape[i],
        }
    };
    for step in &plan.steps {
        match *step {
            BackStep::Act { y, g, len, act } => {
                spec_act_backward_f32(&mut grads[g][..images * len], read(y), act);
            }
            BackStep::ConvWgrad {
                x: xt,
                g,
                w_off,
                input,
                output,
                window,
            } => {
                let n_w = output.0 * input.0 * window.0 * window.0;
                let dw = &mut grad[w_off..][..n_w];
                spec_conv2d_wgrad_f32(read(xt), &grads[g], dw, images, input, output, window);
            }
            BackStep::ConvDgrad {
                g,
                out,
                w_off,
                input,
                output,
                window,
            } => {
                let [a, b] = &mut grads;
                let (src, dst) = if g == 0 { (&*a, b) } else { (&*b, a) };
                debug_assert_ne!(g, out);
                spec_conv2d_dgrad_f32(src, &weights[w_off..], dst, images, input, output, window);
            }
            BackStep::BiasGrad {
                g,
                b_off,
                channels,
                plane,
            } => {
                let db = &mut grad[b_off..][..channels];
                spec_bias_grad_f32(&grads[g], db, images, channels, plane);
            }
            BackStep::PoolBack {
                x: xt,
                g,
                out,
                mode,
                channels,
                input,
                output,
                k,
            } => {
                let [a, b] = &mut grads;
                let (src, dst) = if g == 0 { (&*a, b) } else { (&*b, a) };
                debug_assert_ne!(g, out);
                let planes = images * channels;
                spec_pool2d_backward_f32(read(xt), src, dst, planes, input, output, k, mode);
            }
            BackStep::LinearWgrad {
                x: xt,
                g,
                w_off,
                f,
                n,
            } => {
                let dw = &mut grad[w_off..][..n * f];
                linear_wgrad_f32(&grads[g], read(xt), dw, images, f, n);
            }
            BackStep::LinearDgrad {
                g,
                out,
                w_off,
                f,
                n,
            } => {
                let [a, b] = &mut grads;
                let (src, dst) = if g == 0 { (&*a, b) } else { (&*b, a) };
                debug_assert_ne!(g, out);
                linear_dgrad_f32(src, &weights[w_off..], dst, images, f, n);
            }
        }
    }
    Ok(SpecBackprop {
        loss,
        correct,
        grad,
    })
}
