//! The forward pass of a layer-spec network on the GPU (twin of
//! `src/cpu/spec_forward.rs`): the launches of its [`SpecPlan`], block by block (whole members, or one
//! member's images in chunks),
//! with the kernels of `kernels/spec.cu` and one cuBLAS strided-batched GEMM per linear
//! layer. The paper's presets keep the fused kernel (`forward.rs`).
//!
//! Two scratch buffers of [`SpecPlan::scratch_len`] values are kept by the backend
//! between calls (grown when a call needs more), so an EnKF iteration allocates
//! nothing; the memory check counts them (`memory.rs`).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::geometry::elementwise_stride_launch;
use super::spec_plan::{Buf, OpKind, SpecOp, SpecPlan};
use super::{cuda_err, linalg, to_i32, CudaBackend};
use crate::backend::check_len;
use crate::model::spec::NetSpec;
use crate::Result;

/// `members` networks of `spec` (`weights` members × P) on `images` inputs `x`
/// (images × n_in) into `out` (members × images × outputs).
///
/// Errors: [`crate::Error::Shape`] on buffer lengths or sizes beyond the kernels' int
/// range; [`crate::Error::Cuda`] when a scratch allocation or a launch fails.
pub fn spec_forward(
    be: &CudaBackend,
    spec: &NetSpec,
    weights: &CudaSlice<f32>,
    members: usize,
    x: &CudaSlice<f32>,
    images: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    spec_forward_timed(be, spec, weights, members, x, images, out, None)
}

/// [`spec_forward`] timing every launch: with `times` (one slot per layer of `spec`),
/// each op's milliseconds (CUDA events around it, the stream synchronised before each)
/// are added to the slot of the layer that made it (a fused activation's time is its
/// producer's; `bench --net` on CUDA).
///
/// Errors: as [`spec_forward`]; [`crate::Error::Shape`] for a `times` of another length
/// than the layers.
#[allow(clippy::too_many_arguments)]
pub fn spec_forward_timed(
    be: &CudaBackend,
    spec: &NetSpec,
    weights: &CudaSlice<f32>,
    members: usize,
    x: &CudaSlice<f32>,
    images: usize,
    out: &mut CudaSlice<f32>,
    mut times: Option<&mut [f64]>,
) -> Result<()> {
    if let Some(t) = &times {
        check_len("spec_forward layer times", t.len(), spec.layers().len())?;
    }
    let (p, n_in, n_out) = (spec.n_params(), spec.input().len(), spec.outputs());
    check_len(
        "spec_forward weights (members × P)",
        weights.len(),
        members * p,
    )?;
    check_len("spec_forward x (images × inputs)", x.len(), images * n_in)?;
    check_len(
        "spec_forward out (members × images × outputs)",
        out.len(),
        members * images * n_out,
    )?;
    if members == 0 || images == 0 {
        return Ok(());
    }
    let plan = SpecPlan::of(spec);
    let mut scratch = be.spec_scratch(plan.scratch_len(members, images))?;
    let [s0, s1] = &mut scratch[..] else {
        unreachable!("spec_scratch keeps two buffers")
    };
    for block in plan.blocks(members, images) {
        let (mc, dc) = (block.members, block.images);
        let images_in = block.image0 * n_in..(block.image0 + dc) * n_in;
        for op in &plan.ops {
            let in_mstride = match op.src {
                Buf::Input => 0,
                _ => dc * op.in_len(),
            };
            let mut run = || {
                let (src, mut dst) = op_views(
                    op,
                    x.slice(images_in.clone()),
                    [&mut *s0, &mut *s1],
                    &mut *out,
                    mc * in_mstride,
                    block.out_range(images, n_out),
                    mc * dc * op.out_len(),
                );
                launch(
                    be,
                    op,
                    &src,
                    in_mstride,
                    weights,
                    block.member0 * p,
                    p,
                    &mut dst,
                    mc,
                    dc,
                )
            };
            match times.as_deref_mut() {
                Some(t) => t[op.layer] += crate::backend::Backend::time_ms(be, &mut run)?,
                None => run()?,
            }
        }
    }
    Ok(())
}

/// The source of `op` (the block's images `x`, or `src_len` values of a scratch buffer)
/// and its destination (`n` values of the other scratch buffer, or the block's `rows` of
/// the output): never the same buffer (the plan alternates).
fn op_views<'a>(
    op: &SpecOp,
    x: CudaView<'a, f32>,
    scratch: [&'a mut CudaSlice<f32>; 2],
    out: &'a mut CudaSlice<f32>,
    src_len: usize,
    rows: std::ops::Range<usize>,
    n: usize,
) -> (CudaView<'a, f32>, CudaViewMut<'a, f32>) {
    let [s0, s1] = scratch;
    match (op.src, op.dst) {
        (Buf::Input, Buf::Out) => (x, out.slice_mut(rows)),
        (Buf::Input, Buf::Scratch(0)) => (x, s0.slice_mut(..n)),
        (Buf::Input, Buf::Scratch(_)) => (x, s1.slice_mut(..n)),
        (Buf::Scratch(0), Buf::Out) => (s0.slice(..src_len), out.slice_mut(rows)),
        (Buf::Scratch(_), Buf::Out) => (s1.slice(..src_len), out.slice_mut(rows)),
        (Buf::Scratch(0), _) => (s0.slice(..src_len), s1.slice_mut(..n)),
        (Buf::Scratch(_), _) => (s1.slice(..src_len), s0.slice_mut(..n)),
        (src, dst) => unreachable!("the plan reads {src:?} and writes {dst:?}"),
    }
}

/// One op of the plan on a block of `mc` members × `images` images: `src` (member stride `in_mstride`,
/// 0 for the shared images) into `dst`; the chunk's weights start at `w_base` of
/// `weights` (member stride `p`).
#[allow(clippy::too_many_arguments)]
pub(super) fn launch(
    be: &CudaBackend,
    op: &SpecOp,
    src: &CudaView<'_, f32>,
    in_mstride: usize,
    weights: &CudaSlice<f32>,
    w_base: usize,
    p: usize,
    dst: &mut CudaViewMut<'_, f32>,
    mc: usize,
    images: usize,
) -> Result<()> {
    let n = mc * images * op.out_len();
    check_len("spec op output", dst.len(), n)?;
    let cfg = elementwise_stride_launch(n);
    let ll = |v: usize| v as i64;
    let int = |what: &str, v: usize| to_i32(what, v);
    let (mc_i, images_i) = (int("spec members", mc)?, int("spec images", images)?);
    match op.kind {
        OpKind::Conv {
            w_off,
            b_off,
            input: (c, h, wd),
            output: (co, oh, ow),
            window: (k, stride, pad),
        } => {
            let b_rel: i64 = b_off.map_or(-1, |b| ll(b - w_off));
            let dims = [
                int("conv c", c)?,
                int("conv h", h)?,
                int("conv w", wd)?,
                int("conv co", co)?,
                int("conv oh", oh)?,
                int("conv ow", ow)?,
                int("conv k", k)?,
                int("conv stride", stride)?,
                int("conv padding", pad)?,
            ];
            let f = be.kernels().get("spec_conv2d_f32")?;
            let mut b = be.stream().launch_builder(f);
            let (in_ms, wb, ws) = (ll(in_mstride), ll(w_base + w_off), ll(p));
            b.arg(src)
                .arg(&in_ms)
                .arg(weights)
                .arg(&wb)
                .arg(&ws)
                .arg(&b_rel)
                .arg(dst)
                .arg(&mc_i)
                .arg(&images_i)
                .arg(&dims[0])
                .arg(&dims[1])
                .arg(&dims[2])
                .arg(&dims[3])
                .arg(&dims[4])
                .arg(&dims[5])
                .arg(&dims[6])
                .arg(&dims[7])
                .arg(&dims[8])
                .arg(&op.act);
            // SAFETY: the kernel reads src at r·in_mstride + c·h·w per image for r < mc
            // (the chunk's rows of the previous layer, or the images with stride 0),
            // weights at w_base + w_off + r·P + (co·c·k·k and the bias) < members·P, and
            // writes n = mc·images·co·oh·ow values of dst (checked above).
            unsafe { b.launch(cfg) }.map_err(cuda_err("launching spec_conv2d_f32"))?;
        }
        OpKind::Pool {
            mode,
            channels,
            input: (h, wd),
            output: (oh, ow),
            k,
        } => {
            let (planes, per_member) = (ll(mc * images * channels), ll(images * channels));
            let dims = [
                int("pool h", h)?,
                int("pool w", wd)?,
                int("pool oh", oh)?,
                int("pool ow", ow)?,
                int("pool k", k)?,
                mode.code(),
            ];
            let f = be.kernels().get("spec_pool2d_f32")?;
            let mut b = be.stream().launch_builder(f);
            let in_ms = ll(in_mstride);
            b.arg(src)
                .arg(&in_ms)
                .arg(dst)
                .arg(&planes)
                .arg(&per_member)
                .arg(&dims[0])
                .arg(&dims[1])
                .arg(&dims[2])
                .arg(&dims[3])
                .arg(&dims[4])
                .arg(&dims[5])
                .arg(&op.act);
            // SAFETY: the kernel reads the planes of src for r < mc (windows inside
            // h × w by the floored output size) and writes n values of dst.
            unsafe { b.launch(cfg) }.map_err(cuda_err("launching spec_pool2d_f32"))?;
        }
        OpKind::Linear { w_off, f, n: nf } => {
            let w = weights.slice(w_base + w_off..);
            linalg::linear_strided_batched_f32(
                be.blas(),
                src,
                in_mstride,
                &w,
                p,
                dst,
                (mc, images),
                (f, nf),
            )?;
        }
        OpKind::BiasAct { b_off, len, plane } => {
            let has_bias = i32::from(b_off.is_some());
            let wb = ll(w_base + b_off.unwrap_or(0));
            let (in_ms, ws) = (ll(in_mstride), ll(p));
            let (len_i, plane_i) = (int("bias len", len)?, int("bias plane", plane)?);
            let f = be.kernels().get("spec_bias_act_f32")?;
            let mut b = be.stream().launch_builder(f);
            b.arg(src)
                .arg(&in_ms)
                .arg(dst)
                .arg(weights)
                .arg(&wb)
                .arg(&ws)
                .arg(&has_bias)
                .arg(&mc_i)
                .arg(&images_i)
                .arg(&len_i)
                .arg(&plane_i)
                .arg(&op.act);
            // SAFETY: reads src at r·in_mstride + images·len values per member r < mc
            // and the bias of member r below members·P, writes n values of dst.
            unsafe { b.launch(cfg) }.map_err(cuda_err("launching spec_bias_act_f32"))?;
        }
    }
    Ok(())
}
