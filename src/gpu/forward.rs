//! Forward pass of the ensemble on the GPU (twin of `src/cpu/forward.rs`), launching
//! `ensemble_forward_f32` of `kernels/forward.cu`.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{cuda_err, to_i32, CudaBackend, Kernels};
use crate::backend::check_len;
use crate::model::{Arch, Net, C1, CLASSES, IMG_PIXELS, P1};
use crate::{Error, Result};

/// Warps per block of the forward kernel (its `__launch_bounds__(256, 2)`).
pub const FORWARD_WARPS: u32 = 8;
/// Images per block at most (each warp then runs 8 images through the network).
const MAX_IMAGES_PER_BLOCK: usize = 64;
/// Images per block at least (below, the weight loads are no longer amortised).
const MIN_IMAGES_PER_BLOCK: usize = 8;

/// Dynamic shared memory of one block: per warp the pooled conv1 map (10·12·12) and the
/// image (784), then conv1 and conv2 weights (250 + 5000), as `kernels/forward.cu` lays
/// them out. 92,168 bytes for 8 warps.
pub const fn forward_smem_bytes(warps: u32) -> u32 {
    let per_warp = (C1 * P1 * P1 + IMG_PIXELS) as u32;
    (warps * per_warp + Net::FC_OFFSET as u32) * 4
}

/// Raises the forward kernel's dynamic shared memory limit above the default 48 KB.
///
/// Errors: [`Error::Cuda`] when the device has less shared memory per block.
pub(crate) fn configure(k: &Kernels) -> Result<()> {
    k.get("ensemble_forward_f32")?
        .set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            forward_smem_bytes(FORWARD_WARPS) as i32,
        )
        .map_err(cuda_err(
            "ensemble_forward_f32 needs 92,168 bytes of shared memory per block",
        ))
}

/// Images per block: 64 when there are enough (member, image-group) blocks to fill the
/// GPU several times over (training: J ≥ a few hundred), halved down to 8 otherwise
/// (evaluation: 1 member × 10,000 images → 625 blocks of 16 images).
fn images_per_block(members: usize, images: usize, sm_count: u32) -> usize {
    let target_blocks = 4 * sm_count as usize;
    let mut ipb = MAX_IMAGES_PER_BLOCK;
    while ipb > MIN_IMAGES_PER_BLOCK && members * images.div_ceil(ipb) < target_blocks {
        ipb /= 2;
    }
    ipb
}

/// Forward pass of `members` networks over `images` images, see
/// [`crate::backend::Backend::ensemble_forward`].
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
    let ipb = images_per_block(members, images, be.sm_count());
    let blocks = members
        .checked_mul(images.div_ceil(ipb))
        .filter(|&b| b <= i32::MAX as usize)
        .ok_or_else(|| {
            Error::Config(format!(
                "ensemble_forward: {members} members × {images} images needs more than 2^31 \
                 blocks; split the batch"
            ))
        })?;
    let members_i = to_i32("ensemble_forward members", members)?;
    let images_i = to_i32("ensemble_forward images", images)?;
    let p_i = to_i32("ensemble_forward P", p)?;
    let arch: i32 = match net.arch {
        Arch::Paper => 0,
        Arch::Pooled => 1,
    };
    let act = net.act.code();
    let ipb_i = ipb as i32;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (32 * FORWARD_WARPS, 1, 1),
        shared_mem_bytes: forward_smem_bytes(FORWARD_WARPS),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_layout_matches_the_kernel() {
        // 8 warps × (1440 + 784) + 250 + 5000 floats, as documented in kernels/forward.cu.
        assert_eq!(forward_smem_bytes(8), 92_168);
        // 2 blocks must fit the 228 KB of an H100/H200 SM (227 KB per block at most).
        assert!(2 * forward_smem_bytes(FORWARD_WARPS) <= 228 * 1024);
    }

    #[test]
    fn images_per_block_fills_the_gpu() {
        assert_eq!(images_per_block(5000, 64, 132), 64);
        assert_eq!(images_per_block(1, 10_000, 132), 16);
        assert_eq!(images_per_block(1, 10, 132), 8);
    }
}
