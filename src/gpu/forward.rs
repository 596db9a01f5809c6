//! Forward pass of the ensemble on the GPU (twin of `src/cpu/forward.rs`), launching
//! `ensemble_forward_f32` of `kernels/forward.cu`.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::geometry::{forward_launch, ForwardGeometry};
use super::{cuda_err, to_i32, CudaBackend, Kernels};
use crate::backend::check_len;
use crate::model::{Net, CLASSES, IMG_PIXELS};
use crate::{Error, Result};

pub use super::geometry::{forward_geometry, forward_smem_bytes, FORWARD_WARPS};

/// Raises the forward kernel's dynamic shared memory limit above the default 48 KB, to
/// what blocks of `geometry` use.
///
/// Errors: [`Error::Cuda`] when the device refuses that much shared memory per block.
pub(crate) fn configure(k: &Kernels, geometry: ForwardGeometry) -> Result<()> {
    k.get("ensemble_forward_f32")?
        .set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            geometry.smem_bytes() as i32,
        )
        .map_err(|e| {
            Error::Cuda(format!(
                "ensemble_forward_f32 needs {} bytes of shared memory per block ({geometry}): \
                 {e:?}",
                geometry.smem_bytes()
            ))
        })
}

/// Forward pass of `members` networks over `images` images, see
/// [`crate::backend::Backend::ensemble_forward`], in blocks of the device's geometry.
///
/// `weights`: members × P, `x`: images × 784, `out`: members × images × 10 (overwritten).
/// Errors: [`Error::Shape`] on a length mismatch or sizes beyond the kernel's int range.
pub fn ensemble_forward(
    be: &CudaBackend,
    net: &Net,
    weights: &CudaSlice<f32>,
    members: usize,
    x: &CudaSlice<f32>,
    images: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let warps = be.forward_geometry().warps;
    ensemble_forward_with_warps(be, warps, net, weights, members, x, images, out)
}

/// [`ensemble_forward`] in blocks of `warps` warps (at most the device's own geometry,
/// whose shared memory the kernel was configured for): on one device, the tests run the
/// geometries other architectures get.
///
/// Errors: as [`ensemble_forward`]; [`Error::Config`] for `warps` outside 1 … the
/// device's warps per block.
#[allow(clippy::too_many_arguments)]
pub fn ensemble_forward_with_warps(
    be: &CudaBackend,
    warps: u32,
    net: &Net,
    weights: &CudaSlice<f32>,
    members: usize,
    x: &CudaSlice<f32>,
    images: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    net.require_fused("the CUDA forward pass")?;
    let max = be.forward_geometry().warps;
    if warps == 0 || warps > max {
        return Err(Error::Config(format!(
            "ensemble_forward: {warps} warps per block; this device's kernel is configured \
             for 1 … {max}"
        )));
    }
    let p = net.n_params();
    check_len("ensemble_forward weights", weights.len(), members * p)?;
    check_len("ensemble_forward images", x.len(), images * IMG_PIXELS)?;
    check_len(
        "ensemble_forward output",
        out.len(),
        members * images * CLASSES,
    )?;
    if members == 0 || images == 0 {
        return Ok(());
    }
    let (cfg, ipb) = forward_launch(members, images, be.sm_count(), warps).ok_or_else(|| {
        Error::Config(format!(
            "ensemble_forward: {members} members × {images} images needs more than 2^31 \
             blocks; split the batch"
        ))
    })?;
    let members_i = to_i32("ensemble_forward members", members)?;
    let images_i = to_i32("ensemble_forward images", images)?;
    let p_i = to_i32("ensemble_forward P", p)?;
    let arch = net.arch.code();
    let act = net.act.code();
    let ipb_i = ipb as i32;
    let f = be.kernels().get("ensemble_forward_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(weights)
        .arg(x)
        .arg(out)
        .arg(&members_i)
        .arg(&images_i)
        .arg(&p_i)
        .arg(&arch)
        .arg(&act)
        .arg(&ipb_i);
    // SAFETY: check_len above proved weights = members·P, x = images·784 and
    // out = members·images·10 elements, the extents the kernel indexes; block b touches
    // member b / groups < members only, and images < `images` only.
    unsafe { launch.launch(cfg) }
        .map(|_| ())
        .map_err(cuda_err("launching ensemble_forward_f32"))
}
