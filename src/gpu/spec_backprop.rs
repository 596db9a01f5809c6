//! Backpropagation through ONE layer-spec network on the GPU: the [`BackPlan`]'s
//! forward ops with one member (`spec.cu`, each op's output kept), the loss kernel, and
//! its backward steps (`kernels/spec_backprop.cu`, and two cuBLAS GEMMs per linear
//! layer). Twin of `cpu::spec_backprop_kernels::run_backprop`, which runs the same plan
//! with the kernels' CPU twins; the CPU backend's own path (`cpu::spec_backprop`) agrees
//! with both to the gradient tolerance (`tests/spec_backprop.rs`, `tests/gpu_spec.rs`).
//!
//! Memory per call: the tape (B × Σ op outputs), two gradient buffers (B ×
//! [`BackPlan::grad_len`]) and the P-long gradient, allocated per call (a mini-batch of
//! one network: a few MB for the networks a spec describes, against the EnKF's GBs).
//! Determinism: every kernel sums in a fixed order and cuBLAS's GEMMs are deterministic
//! on one device and stream, so a gradient is bit-identical from run to run.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::geometry::{elementwise_launch, elementwise_stride_launch, spec_reduce_launch};
use super::spec_backplan::{BackPlan, BackStep, Tape};
use super::spec_plan::SpecPlan;
use super::{cuda_err, device_zeros, linalg, spec_forward, to_i32, CudaBackend};
use crate::backend::{check_len, Trans};
use crate::cpu::spec_backprop_kernels::SpecTargets;
use crate::model::spec::NetSpec;
use crate::Result;

/// Result of [`spec_backprop`]: loss, correct count and the gradient on the device.
#[derive(Debug)]
pub struct GpuSpecBackprop {
    /// Mean softmax cross-entropy (labels) or mean squared error (real targets).
    pub loss: f64,
    /// Images whose arg-max output (ties to the lowest class) equals the label (0 for
    /// real targets).
    pub correct: usize,
    /// d loss / d weights: P values, `Sequential` order.
    pub grad: CudaSlice<f32>,
}

/// Loss, correct count and gradient of one spec network (`weights`: P on the device) on
/// a mini-batch (`x`: B × inputs on the device; `targets` on the host), as
/// `cpu::spec_backprop::spec_backprop` (labels) and `spec_backprop_mse` (real targets).
/// Waits for the stream (the loss comes back to the host).
///
/// Errors: [`crate::Error::Shape`] on a length mismatch, an empty batch, a bad label or
/// a size beyond the kernels' int range; [`crate::Error::Cuda`] when an allocation, a
/// launch or a copy fails.
pub fn spec_backprop(
    be: &CudaBackend,
    spec: &NetSpec,
    weights: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    targets: SpecTargets<'_>,
) -> Result<GpuSpecBackprop> {
    let (p, n_in, n_out) = (spec.n_params(), spec.input().len(), spec.outputs());
    let images = targets.check("gpu spec_backprop", n_out)?;
    check_len("gpu spec_backprop weights (P)", weights.len(), p)?;
    check_len(
        "gpu spec_backprop x (images × inputs)",
        x.len(),
        images.saturating_mul(n_in),
    )?;
    let images_i = to_i32("gpu spec_backprop images", images)?;
    let plan = BackPlan::of(SpecPlan::of(spec));
    let ops = &plan.forward.ops;
    let stream = be.stream();

    let mut tape: Vec<CudaSlice<f32>> = ops
        .iter()
        .map(|o| device_zeros(stream, images * o.out_len()))
        .collect::<Result<_>>()?;
    for (i, op) in ops.iter().enumerate() {
        let (done, rest) = tape.split_at_mut(i);
        let src = done.last().unwrap_or(x).slice(..);
        let mut dst = rest[0].slice_mut(..);
        spec_forward::launch(be, op, &src, 0, weights, 0, p, &mut dst, 1, images)?;
    }

    let mut grads = [
        device_zeros::<f32>(stream, images * plan.grad_len)?,
        device_zeros::<f32>(stream, images * plan.grad_len)?,
    ];
    let mut per_image = device_zeros::<f64>(stream, images)?;
    let mut ok = device_zeros::<i32>(stream, images)?;
    let out = tape.last().unwrap_or(x);
    let classes = to_i32("gpu spec_backprop outputs", n_out)?;
    let mut g0 = grads[0].slice_mut(..images * n_out);
    let loss_div = match targets {
        SpecTargets::Labels(labels) => {
            let labels: Vec<i32> = labels.iter().map(|&l| i32::from(l)).collect();
            let labels_d = stream
                .clone_htod(&labels)
                .map_err(cuda_err("uploading the labels"))?;
            let scale = 1.0f32 / images as f32;
            let f = be.kernels().get("spec_softmax_xent_f32")?;
            let mut b = stream.launch_builder(f);
            b.arg(out)
                .arg(&labels_d)
                .arg(&images_i)
                .arg(&classes)
                .arg(&scale)
                .arg(&mut per_image)
                .arg(&mut ok)
                .arg(&mut g0);
            // SAFETY: out and g0 hold images·outputs values, labels, per_image and ok
            // `images`; thread d < images touches row d only.
            unsafe { b.launch(elementwise_launch(images)) }
                .map_err(cuda_err("launching spec_softmax_xent_f32"))?;
            images
        }
        SpecTargets::Real(t) => {
            let t_d = stream
                .clone_htod(t)
                .map_err(cuda_err("uploading the targets"))?;
            let scale = (2.0 / (images * n_out) as f64) as f32;
            let f = be.kernels().get("spec_mse_backward_f32")?;
            let mut b = stream.launch_builder(f);
            b.arg(out)
                .arg(&t_d)
                .arg(&images_i)
                .arg(&classes)
                .arg(&scale)
                .arg(&mut per_image)
                .arg(&mut g0);
            // SAFETY: out, t_d (checked by targets.check) and g0 hold images·outputs
            // values, per_image `images`; thread d < images touches row d only.
            unsafe { b.launch(elementwise_launch(images)) }
                .map_err(cuda_err("launching spec_mse_backward_f32"))?;
            images * n_out
        }
    };

    let mut grad = device_zeros::<f32>(stream, p)?;
    for step in &plan.steps {
        run_step(be, step, weights, x, &tape, &mut grads, &mut grad, images)?;
    }

    let per_image = stream
        .clone_dtoh(&per_image)
        .map_err(cuda_err("downloading the losses"))?;
    let ok = stream
        .clone_dtoh(&ok)
        .map_err(cuda_err("downloading the correct flags"))?;
    stream
        .synchronize()
        .map_err(cuda_err("synchronizing the stream"))?;
    Ok(GpuSpecBackprop {
        loss: per_image.iter().sum::<f64>() / loss_div as f64,
        correct: ok.iter().map(|&v| v as usize).sum(),
        grad,
    })
}

/// The gradient buffer `g` to read and the other one to write.
fn pair(grads: &mut [CudaSlice<f32>; 2], g: usize) -> (&CudaSlice<f32>, &mut CudaSlice<f32>) {
    let [a, b] = grads;
    if g == 0 {
        (a, b)
    } else {
        (b, a)
    }
}

/// One backward step of the plan on `images` images (see `spec_backplan`).
#[allow(clippy::too_many_arguments)]
fn run_step(
    be: &CudaBackend,
    step: &BackStep,
    weights: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    tape: &[CudaSlice<f32>],
    grads: &mut [CudaSlice<f32>; 2],
    grad: &mut CudaSlice<f32>,
    images: usize,
) -> Result<()> {
    let read = |t: Tape| -> CudaView<'_, f32> {
        match t {
            Tape::Input => x.slice(..),
            Tape::Op(i) => tape[i].slice(..),
        }
    };
    let int = |what: &str, v: usize| to_i32(what, v);
    let images_i = int("spec backprop images", images)?;
    let stream = be.stream();
    match *step {
        BackStep::Act { y, g, len, act } => {
            let n = images * len;
            let n_ll = n as i64;
            let yv = read(y);
            let mut gv = grads[g].slice_mut(..n);
            let f = be.kernels().get("spec_act_backward_f32")?;
            let mut b = stream.launch_builder(f);
            b.arg(&mut gv).arg(&yv).arg(&n_ll).arg(&act);
            // SAFETY: g holds images·grad_len ≥ n values, y (an op's output) n values.
            unsafe { b.launch(elementwise_stride_launch(n)) }
                .map_err(cuda_err("launching spec_act_backward_f32"))?;
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
            let dims = conv_dims(input, output, window)?;
            let xv = read(xt);
            let gv = grads[g].slice(..images * output.0 * output.1 * output.2);
            let mut dw = grad.slice_mut(w_off..w_off + n_w);
            let f = be.kernels().get("spec_conv2d_wgrad_f32")?;
            let mut b = stream.launch_builder(f);
            b.arg(&xv).arg(&gv).arg(&mut dw).arg(&images_i);
            b.arg(&dims[0])
                .arg(&dims[1])
                .arg(&dims[2])
                .arg(&dims[3])
                .arg(&dims[4])
                .arg(&dims[5])
                .arg(&dims[6])
                .arg(&dims[7])
                .arg(&dims[8]);
            // SAFETY: xv holds images·c·h·w values (the conv's input), gv images·co·oh·ow
            // (its output gradient), dw the co·c·k·k weights the blocks write.
            unsafe { b.launch(spec_reduce_launch(n_w)) }
                .map_err(cuda_err("launching spec_conv2d_wgrad_f32"))?;
        }
        BackStep::ConvDgrad {
            g,
            out,
            w_off,
            input,
            output,
            window,
        } => {
            debug_assert_ne!(g, out);
            let n = images * input.0 * input.1 * input.2;
            let n_w = output.0 * input.0 * window.0 * window.0;
            let dims = conv_dims(input, output, window)?;
            let (src, dst) = pair(grads, g);
            let gv = src.slice(..images * output.0 * output.1 * output.2);
            let mut dv = dst.slice_mut(..n);
            let wv = weights.slice(w_off..w_off + n_w);
            let f = be.kernels().get("spec_conv2d_dgrad_f32")?;
            let mut b = stream.launch_builder(f);
            b.arg(&gv).arg(&wv).arg(&mut dv).arg(&images_i);
            b.arg(&dims[0])
                .arg(&dims[1])
                .arg(&dims[2])
                .arg(&dims[3])
                .arg(&dims[4])
                .arg(&dims[5])
                .arg(&dims[6])
                .arg(&dims[7])
                .arg(&dims[8]);
            // SAFETY: gv holds images·co·oh·ow values, wv the co·c·k·k weights, dv the
            // n = images·c·h·w input gradients the threads write.
            unsafe { b.launch(elementwise_stride_launch(n)) }
                .map_err(cuda_err("launching spec_conv2d_dgrad_f32"))?;
        }
        BackStep::BiasGrad {
            g,
            b_off,
            channels,
            plane,
        } => {
            let (ch, pl) = (int("bias channels", channels)?, int("bias plane", plane)?);
            let gv = grads[g].slice(..images * channels * plane);
            let mut db = grad.slice_mut(b_off..b_off + channels);
            let f = be.kernels().get("spec_bias_grad_f32")?;
            let mut b = stream.launch_builder(f);
            b.arg(&gv).arg(&mut db).arg(&images_i).arg(&ch).arg(&pl);
            // SAFETY: gv holds images·channels·plane values, db the channels biases.
            unsafe { b.launch(spec_reduce_launch(channels)) }
                .map_err(cuda_err("launching spec_bias_grad_f32"))?;
        }
        BackStep::PoolBack {
            x: xt,
            g,
            out,
            mode,
            channels,
            input: (h, wd),
            output: (oh, ow),
            k,
        } => {
            debug_assert_ne!(g, out);
            let planes = images * channels;
            let n = planes * h * wd;
            let dims = [
                int("pool h", h)?,
                int("pool w", wd)?,
                int("pool oh", oh)?,
                int("pool ow", ow)?,
                int("pool k", k)?,
                mode.code(),
            ];
            let planes_ll = planes as i64;
            let xv = read(xt);
            let (src, dst) = pair(grads, g);
            let gv = src.slice(..planes * oh * ow);
            let mut dv = dst.slice_mut(..n);
            let f = be.kernels().get("spec_pool2d_backward_f32")?;
            let mut b = stream.launch_builder(f);
            b.arg(&xv).arg(&gv).arg(&mut dv).arg(&planes_ll);
            b.arg(&dims[0])
                .arg(&dims[1])
                .arg(&dims[2])
                .arg(&dims[3])
                .arg(&dims[4])
                .arg(&dims[5]);
            // SAFETY: xv holds the pool's n input values, gv planes·oh·ow gradients, dv
            // the n input gradients the threads write.
            unsafe { b.launch(elementwise_stride_launch(n)) }
                .map_err(cuda_err("launching spec_pool2d_backward_f32"))?;
        }
        BackStep::LinearWgrad {
            x: xt,
            g,
            w_off,
            f,
            n,
        } => {
            let xv = read(xt);
            let gv = grads[g].slice(..images * n);
            let mut dw: CudaViewMut<'_, f32> = grad.slice_mut(w_off..w_off + n * f);
            // dW (n × f) = gᵀ · x: g stored images × n, x images × f.
            linalg::gemm(
                be.blas(),
                Trans::Yes,
                Trans::No,
                n,
                f,
                images,
                1.0f32,
                &gv,
                &xv,
                0.0f32,
                &mut dw,
            )?;
        }
        BackStep::LinearDgrad {
            g,
            out,
            w_off,
            f,
            n,
        } => {
            debug_assert_ne!(g, out);
            let (src, dst) = pair(grads, g);
            let gv = src.slice(..images * n);
            let mut dv = dst.slice_mut(..images * f);
            let wv = weights.slice(w_off..w_off + n * f);
            // din (images × f) = g (images × n) · W (n × f).
            linalg::gemm(
                be.blas(),
                Trans::No,
                Trans::No,
                images,
                f,
                n,
                1.0f32,
                &gv,
                &wv,
                0.0f32,
                &mut dv,
            )?;
        }
    }
    Ok(())
}

/// The nine int dimensions of a conv kernel: c, h, w, co, oh, ow, k, stride, padding.
fn conv_dims(
    (c, h, wd): (usize, usize, usize),
    (co, oh, ow): (usize, usize, usize),
    (k, stride, pad): (usize, usize, usize),
) -> Result<[i32; 9]> {
    Ok([
        to_i32("conv c", c)?,
        to_i32("conv h", h)?,
        to_i32("conv w", wd)?,
        to_i32("conv co", co)?,
        to_i32("conv oh", oh)?,
        to_i32("conv ow", ow)?,
        to_i32("conv k", k)?,
        to_i32("conv stride", stride)?,
        to_i32("conv padding", pad)?,
    ])
}
