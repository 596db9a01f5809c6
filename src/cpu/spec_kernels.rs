//! CPU twins of the layer-spec kernels of `kernels/spec.cu` (same names, same
//! arguments in host types, the same operations in the same order: bit for bit equal
//! to the kernels in the emulation, `tests/kernel_emu.rs`), a twin of the cuBLAS
//! strided-batched GEMM of the linear layers, and [`run_plan`], which executes a GPU
//! launch plan ([`SpecPlan`]) with them, chunk by chunk as the CUDA backend does.
//!
//! These are references, not the CPU backend's forward pass (`spec_forward.rs`, which
//! groups images and keeps tiles in registers); the tests hold the two equal to the
//! forward tolerance (the kernels use fused multiply-adds, the CPU path does not).

use crate::backend::check_len;
use crate::gpu::spec_plan::{Block, Buf, OpKind, PoolMode, SpecOp, SpecPlan, ACT_NONE};
use crate::model::spec::{NetSpec, SpecActivation};
use crate::{Error, Result};

/// The activation of kernel code `code` (`ENKF_ACT_*`; [`ACT_NONE`]: identity).
///
/// # Panics
/// On a code no kernel knows (the plan only makes known ones).
pub fn spec_activate(x: f32, code: i32) -> f32 {
    let act = match code {
        ACT_NONE => return x,
        0 => SpecActivation::Logistic,
        1 => SpecActivation::Relu,
        2 => SpecActivation::Tanh,
        3 => SpecActivation::Heaviside,
        _ => panic!("spec_activate: unknown activation code {code}"),
    };
    act.apply(x)
}

/// Twin of `spec_conv2d_f32`: `input` members × images × c·h·wd (or images × c·h·wd
/// with `in_mstride` 0), weights of member r at `w[w_base + r·w_stride ..]`, bias at
/// `b_off` past that when given; `out` members × images × co·oh·ow.
#[allow(clippy::too_many_arguments)]
pub fn spec_conv2d_f32(
    input: &[f32],
    in_mstride: usize,
    w: &[f32],
    w_base: usize,
    w_stride: usize,
    b_off: Option<usize>,
    out: &mut [f32],
    (members, images): (usize, usize),
    (c, h, wd): (usize, usize, usize),
    (co, oh, ow): (usize, usize, usize),
    (k, stride, pad): (usize, usize, usize),
    act: i32,
) {
    let plane = oh * ow;
    let per_image = co * plane;
    let in_image = c * h * wd;
    for (i, o_val) in out
        .iter_mut()
        .enumerate()
        .take(members * images * per_image)
    {
        let r = i / (images * per_image);
        let rest = i % (images * per_image);
        let (d, within) = (rest / per_image, rest % per_image);
        let (o, pos) = (within / plane, within % plane);
        let (y, x) = (pos / ow, pos % ow);
        let wm = &w[w_base + r * w_stride..];
        let wo = &wm[o * c * k * k..];
        let src = &input[r * in_mstride + d * in_image..];
        let mut s = 0.0f32;
        for ci in 0..c {
            for ky in 0..k {
                let Some(iy) = (y * stride + ky).checked_sub(pad).filter(|&v| v < h) else {
                    continue;
                };
                let row = &src[(ci * h + iy) * wd..];
                let wr = &wo[(ci * k + ky) * k..];
                for (kx, &wv) in wr.iter().enumerate().take(k) {
                    let Some(ix) = (x * stride + kx).checked_sub(pad).filter(|&v| v < wd) else {
                        continue;
                    };
                    s = wv.mul_add(row[ix], s);
                }
            }
        }
        if let Some(b) = b_off {
            s += wm[b + o];
        }
        *o_val = spec_activate(s, act);
    }
}

/// Twin of `spec_pool2d_f32`: `planes` planes of h × wd (`planes_per_member` per member,
/// member r's at `r·in_mstride`) → `out` planes × oh × ow.
#[allow(clippy::too_many_arguments)]
pub fn spec_pool2d_f32(
    input: &[f32],
    in_mstride: usize,
    out: &mut [f32],
    (planes, planes_per_member): (usize, usize),
    (h, wd): (usize, usize),
    (oh, ow): (usize, usize),
    k: usize,
    mode: PoolMode,
    act: i32,
) {
    let plane = oh * ow;
    for (i, o_val) in out.iter_mut().enumerate().take(planes * plane) {
        let (p, pos) = (i / plane, i % plane);
        let (y, x) = (pos / ow, pos % ow);
        let (r, q) = (p / planes_per_member, p % planes_per_member);
        let src = &input[r * in_mstride + q * h * wd + y * k * wd + x * k..];
        let v = match mode {
            PoolMode::Max => {
                let mut v = src[0];
                for ky in 0..k {
                    for &t in &src[ky * wd..][..k] {
                        if t > v || (t.is_nan() && !v.is_nan()) {
                            v = t;
                        }
                    }
                }
                v
            }
            PoolMode::Avg => {
                let mut acc = 0.0f32;
                for ky in 0..k {
                    for &t in &src[ky * wd..][..k] {
                        acc += t;
                    }
                }
                acc / (k * k) as f32
            }
        };
        *o_val = spec_activate(v, act);
    }
}

/// Twin of `spec_bias_act_f32`: `out[r, d, j] = act(input[r·in_mstride + d·len + j] +
/// bias_r[j / plane])`, the bias of member r at `w[w_base + r·w_stride ..]` when
/// `has_bias`.
#[allow(clippy::too_many_arguments)]
pub fn spec_bias_act_f32(
    input: &[f32],
    in_mstride: usize,
    out: &mut [f32],
    w: &[f32],
    w_base: usize,
    w_stride: usize,
    has_bias: bool,
    (members, images): (usize, usize),
    (len, plane): (usize, usize),
    act: i32,
) {
    let per_member = images * len;
    for (i, o_val) in out.iter_mut().enumerate().take(members * per_member) {
        let (r, rest) = (i / per_member, i % per_member);
        let mut v = input[r * in_mstride + rest];
        if has_bias {
            v += w[w_base + r * w_stride + (rest % len) / plane];
        }
        *o_val = spec_activate(v, act);
    }
}

/// Twin of the linear layers' cuBLAS strided-batched GEMM: for each member r of
/// `members`, `out_r` (images × n) = `in_r` (images × f, at `r·in_mstride`) · W_rᵀ, W_r
/// (n × f) at `w[w_base + r·w_stride ..]`; each sum in index order (cuBLAS's order is
/// its own: the twins agree to the forward tolerance).
#[allow(clippy::too_many_arguments)]
pub fn linear_strided_batched_f32(
    input: &[f32],
    in_mstride: usize,
    w: &[f32],
    w_base: usize,
    w_stride: usize,
    out: &mut [f32],
    (members, images): (usize, usize),
    (f, n): (usize, usize),
) {
    for r in 0..members {
        let wm = &w[w_base + r * w_stride..][..n * f];
        for d in 0..images {
            let x = &input[r * in_mstride + d * f..][..f];
            let o = &mut out[(r * images + d) * n..][..n];
            for (ov, row) in o.iter_mut().zip(wm.chunks_exact(f)) {
                *ov = row.iter().zip(x).fold(0.0f32, |s, (&a, &b)| s + a * b);
            }
        }
    }
}

/// Executes `plan` (of `spec`) with the twins above: `members` networks (`weights`
/// members × P) over `images` inputs `x` into `out` (members × images × outputs), block
/// by block (`blocks`, e.g. [`SpecPlan::blocks`]) with two scratch buffers, as the CUDA
/// backend does.
///
/// Errors: [`Error::Shape`] on buffer lengths; [`Error::Config`] when the blocks do not
/// tile the output in order.
#[allow(clippy::too_many_arguments)]
pub fn run_plan(
    plan: &SpecPlan,
    spec: &NetSpec,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &mut [f32],
    blocks: &[Block],
) -> Result<()> {
    let (p, n_in, n_out) = (spec.n_params(), spec.input().len(), spec.outputs());
    check_len("run_plan weights", weights.len(), members * p)?;
    check_len("run_plan x", x.len(), images * n_in)?;
    check_len("run_plan out", out.len(), members * images * n_out)?;
    let mut next = 0;
    for b in blocks {
        let r = b.out_range(images, n_out);
        if r.start != next || (b.members > 1 && b.images != images) {
            return Err(Error::Config(format!(
                "run_plan: block {b:?} does not continue the output at {next}"
            )));
        }
        next = r.end;
    }
    if next != out.len() {
        return Err(Error::Config(format!(
            "run_plan: the blocks cover {next} of {} outputs",
            out.len()
        )));
    }
    let len = blocks
        .iter()
        .map(|b| b.members * b.images * plan.max_len)
        .max()
        .unwrap_or(0);
    let mut scratch = [vec![f32::NAN; len], vec![f32::NAN; len]];
    for b in blocks {
        let (mc, dc) = (b.members, b.images);
        for op in &plan.ops {
            // The source: the block's images (member stride 0) or a scratch buffer; the
            // destination: the other scratch buffer, or the block's range of `out`.
            let (src_buf, stride): (Vec<f32>, usize) = match op.src {
                Buf::Input => (x[b.image0 * n_in..][..dc * n_in].to_vec(), 0),
                Buf::Scratch(s) => (scratch[s].clone(), dc * op.in_len()),
                Buf::Out => unreachable!("no op reads the output"),
            };
            let dst: &mut [f32] = match op.dst {
                Buf::Scratch(s) => &mut scratch[s],
                Buf::Out => &mut out[b.out_range(images, n_out)],
                Buf::Input => unreachable!("no op writes the images"),
            };
            run_op(
                op,
                &src_buf,
                stride,
                weights,
                b.member0 * p,
                p,
                dst,
                (mc, dc),
            );
        }
    }
    Ok(())
}

/// One forward op of a plan with the twins: `src` (member stride `in_mstride`, 0 for the
/// shared images) into `dst`, `mc` members × `images` images, the block's weights at
/// `w_base` of `weights` (member stride `p`).
#[allow(clippy::too_many_arguments)]
pub fn run_op(
    op: &SpecOp,
    src: &[f32],
    in_mstride: usize,
    weights: &[f32],
    w_base: usize,
    p: usize,
    dst: &mut [f32],
    (mc, dc): (usize, usize),
) {
    let (src_buf, stride) = (src, in_mstride);
    match op.kind {
        OpKind::Conv {
            w_off,
            b_off,
            input,
            output,
            window,
        } => spec_conv2d_f32(
            src_buf,
            stride,
            weights,
            w_base + w_off,
            p,
            b_off.map(|b| b - w_off),
            dst,
            (mc, dc),
            input,
            output,
            window,
            op.act,
        ),
        OpKind::Pool {
            mode,
            channels,
            input,
            output,
            k,
        } => spec_pool2d_f32(
            src_buf,
            stride,
            dst,
            (mc * dc * channels, dc * channels),
            input,
            output,
            k,
            mode,
            op.act,
        ),
        OpKind::Linear { w_off, f, n } => linear_strided_batched_f32(
            src_buf,
            stride,
            weights,
            w_base + w_off,
            p,
            dst,
            (mc, dc),
            (f, n),
        ),
        OpKind::BiasAct { b_off, len, plane } => spec_bias_act_f32(
            src_buf,
            stride,
            dst,
            weights,
            w_base + b_off.unwrap_or(0),
            p,
            b_off.is_some(),
            (mc, dc),
            (len, plane),
            op.act,
        ),
    }
}
