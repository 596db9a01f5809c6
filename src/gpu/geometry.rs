//! The launch geometry of every kernel in `kernels/*.cu`, in one place.
//!
//! Pure functions of the problem size, with no device behind them: the CUDA host code
//! launches with them, and `tests/kernel_emu.rs` runs the very same kernel sources with
//! the very same geometry on the CPU through the emulation shim of `tests/emu/`, so a
//! kernel's indexing and its host's launch are checked together even where no GPU is.

use cudarc::driver::LaunchConfig;

use crate::model::{C1, C2, IMG_PIXELS, KSIZE, P1};

/// Warps per block of the forward kernel at most (its `__launch_bounds__(256, 2)`), and
/// what an H100/H200 runs; devices with less shared memory run fewer, see
/// [`forward_geometry`].
pub const FORWARD_WARPS: u32 = 8;
/// Warps per SM the forward kernel's registers allow: `__launch_bounds__(256, 2)` caps a
/// thread at 128 registers, and every sm_75+ SM has 64 Ki of them: 16 warps.
const FORWARD_MAX_WARPS_PER_SM: u32 = 16;
/// Images per block of the forward kernel at most (each warp runs 8 images).
const MAX_IMAGES_PER_BLOCK: usize = 64;
/// Images per block at least (below, the weight loads are no longer amortised).
const MIN_IMAGES_PER_BLOCK: usize = 8;

/// Columns per block of the column-mean kernels (threadIdx.x, `MEAN_TX` in reduce.cu).
pub const MEAN_TX: u32 = 32;
/// Row slices per block of the column-mean kernels (threadIdx.y, `MEAN_TY`).
pub const MEAN_TY: u32 = 16;
/// Threads per block of the element-wise kernels.
pub const EW_THREADS: u32 = 256;
/// Blocks of the grid-stride element-wise kernels at most (enough to fill any GPU).
pub const EW_MAX_BLOCKS: u32 = 1 << 16;

/// Threads per block of the small Cholesky kernel: one right-hand-side row each.
pub const CHOL_THREADS: u32 = 128;
/// Largest grid y extent (row groups) of the small Cholesky kernel.
pub const CHOL_MAX_ROW_GROUPS: u32 = 65_535;

/// Threads per block of the per-image backprop kernels (`BP_THREADS` in backprop.cu).
pub const BP_THREADS: u32 = 256;

/// A 1-D grid of `threads`-thread blocks covering `n` items, at most `max_blocks`
/// blocks (grid-stride kernels loop over the rest), at least one block.
pub fn grid_1d(n: usize, threads: u32, max_blocks: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, max_blocks as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Floats of the forward kernel's padded conv1 weights, [10][5][8] (`FWD_W1_FLOATS`).
pub const FORWARD_W1_FLOATS: u32 = (C1 * KSIZE * 8) as u32;
/// Float stride between the forward kernel's padded conv2 output channels,
/// [10][5][8] + 4 (`FWD_W2_OC_STRIDE`).
pub const FORWARD_W2_OC_STRIDE: u32 = (C1 * KSIZE * 8 + 4) as u32;

/// Dynamic shared memory of one forward block: per warp the pooled conv1 map (10·12·12)
/// and the image (784), then the conv1 and conv2 weights with kernel rows padded to 8
/// floats, as `kernels/forward.cu` lays them out. 105,088 bytes for 8 warps.
pub const fn forward_smem_bytes(warps: u32) -> u32 {
    let per_warp = (C1 * P1 * P1 + IMG_PIXELS) as u32;
    (warps * per_warp + FORWARD_W1_FLOATS + C2 as u32 * FORWARD_W2_OC_STRIDE) * 4
}

/// Images per forward block: 64 when there are enough (member, image-group) blocks to
/// fill the GPU several times over (training: J ≥ a few hundred), halved down to 8
/// otherwise (evaluation: 1 member × 10,000 images → 625 blocks of 16 images).
pub fn images_per_block(members: usize, images: usize, sm_count: u32) -> usize {
    let target_blocks = 4 * sm_count as usize;
    let mut ipb = MAX_IMAGES_PER_BLOCK;
    while ipb > MIN_IMAGES_PER_BLOCK && members * images.div_ceil(ipb) < target_blocks {
        ipb /= 2;
    }
    ipb
}

/// Shared memory of a device, in bytes, as the driver reports it
/// (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`, `…_PER_MULTIPROCESSOR`,
/// `CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedMemoryLimits {
    /// Most dynamic shared memory one block may opt in to.
    pub per_block_optin: u32,
    /// Shared memory of one SM, shared by its resident blocks.
    pub per_sm: u32,
    /// What the system keeps per resident block on top of the block's own.
    pub reserved_per_block: u32,
}

impl SharedMemoryLimits {
    /// Turing (sm_75): 64 KB per block and per SM.
    pub const SM75: Self = Self::new(65_536, 65_536, 0);
    /// A100 (sm_80): 163 KB per block, 164 KB per SM.
    pub const SM80: Self = Self::new(166_912, 167_936, 1024);
    /// RTX 30xx, A10, A40 (sm_86): 99 KB per block, 100 KB per SM.
    pub const SM86: Self = Self::new(101_376, 102_400, 1024);
    /// L40S, RTX 40xx (sm_89): as sm_86.
    pub const SM89: Self = Self::SM86;
    /// H100, H200, GH200 (sm_90): 227 KB per block, 228 KB per SM.
    pub const SM90: Self = Self::new(232_448, 233_472, 1024);

    const fn new(per_block_optin: u32, per_sm: u32, reserved_per_block: u32) -> Self {
        SharedMemoryLimits {
            per_block_optin,
            per_sm,
            reserved_per_block,
        }
    }
}

/// How the forward kernel is launched on a device: warps per block and how many such
/// blocks one SM holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardGeometry {
    /// Warps per block (blockDim.x = 32 · warps).
    pub warps: u32,
    /// Blocks resident per SM (shared memory and registers permitting).
    pub blocks_per_sm: u32,
}

impl ForwardGeometry {
    /// Dynamic shared memory of one block.
    pub fn smem_bytes(&self) -> u32 {
        forward_smem_bytes(self.warps)
    }
}

impl std::fmt::Display for ForwardGeometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} warps/block, {} B shared, {} blocks/SM",
            self.warps,
            self.smem_bytes(),
            self.blocks_per_sm
        )
    }
}

/// The forward geometry for a device with shared memory `limits`: the warps per block
/// (1 … [`FORWARD_WARPS`]) whose block fits the opt-in limit and that keeps the most
/// warps resident per SM (shared memory, then registers, bound them), the larger block
/// on a tie (the member's weights are staged once per block). `None` when not even one
/// warp's block fits. A pure function: H100/H200 get 8 warps, 2 blocks per SM; A100 5
/// warps, 2 blocks; sm_86/sm_89 7 warps, 1 block; Turing 3 warps, 1 block.
pub fn forward_geometry(limits: SharedMemoryLimits) -> Option<ForwardGeometry> {
    (1..=FORWARD_WARPS)
        .filter(|&w| forward_smem_bytes(w) <= limits.per_block_optin)
        .map(|warps| {
            let per_block = forward_smem_bytes(warps) + limits.reserved_per_block;
            let by_smem = limits.per_sm / per_block;
            let by_regs = FORWARD_MAX_WARPS_PER_SM / warps;
            ForwardGeometry {
                warps,
                blocks_per_sm: by_smem.min(by_regs),
            }
        })
        .filter(|g| g.blocks_per_sm >= 1)
        .max_by_key(|g| (g.warps * g.blocks_per_sm, g.warps))
}

/// Launch of `ensemble_forward_f32` for `members` × `images` on a GPU with `sm_count`
/// SMs and blocks of `warps` warps (from [`forward_geometry`]): `members · ceil(images /
/// ipb)` blocks, and the ipb the kernel takes as its last argument. `None` when the grid
/// exceeds 2^31 − 1 blocks.
pub fn forward_launch(
    members: usize,
    images: usize,
    sm_count: u32,
    warps: u32,
) -> Option<(LaunchConfig, usize)> {
    let ipb = images_per_block(members, images, sm_count);
    let blocks = members
        .checked_mul(images.div_ceil(ipb))
        .filter(|&b| b <= i32::MAX as usize)?;
    let warps = warps.clamp(1, FORWARD_WARPS);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: forward_smem_bytes(warps),
    };
    Some((cfg, ipb))
}

/// Column-mean kernels (`row_mean_f32`, `row_mean_f64`): blocks of (32, 16) threads,
/// one block per 32 columns.
pub fn mean_launch(cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(MEAN_TX as usize) as u32, 1, 1),
        block_dim: (MEAN_TX, MEAN_TY, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid-stride element-wise kernels over `n` items (`center_and_innovate_f64`,
/// `f64_to_f32`, `unit_block_lower_f64` over n² entries).
pub fn elementwise_stride_launch(n: usize) -> LaunchConfig {
    grid_1d(n, EW_THREADS, EW_MAX_BLOCKS)
}

/// Threads per row of `row_sq_norms_f64` (`ROWSQ_THREADS` in reduce.cu).
pub const ROWSQ_THREADS: u32 = 256;

/// `row_sq_norms_f64`: one block of [`ROWSQ_THREADS`] threads per row.
pub fn row_sq_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROWSQ_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads of the spec backprop reduction kernels' blocks (`SPEC_RED_THREADS` of
/// `kernels/spec_backprop.cu`; `tests/kernel_emu_spec_backprop.rs` holds them equal).
pub const SPEC_RED_THREADS: u32 = 256;

/// `spec_conv2d_wgrad_f32` and `spec_bias_grad_f32`: one block of [`SPEC_RED_THREADS`]
/// threads per output value, at most 65,535 blocks (the kernels loop over the rest),
/// at least one.
pub fn spec_reduce_launch(outputs: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (outputs.clamp(1, 65_535) as u32, 1, 1),
        block_dim: (SPEC_RED_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `add_diagonal_f64` on an n × n matrix: one thread per diagonal entry.
pub fn add_diagonal_launch(n: usize) -> LaunchConfig {
    grid_1d(n, EW_THREADS, u32::MAX >> 1)
}

/// `block_cholesky_solve_small_f64`: grid (blocks, ceil(nrhs / 128)), 128 threads.
/// `None` when the rows need more than [`CHOL_MAX_ROW_GROUPS`] row groups.
pub fn small_cholesky_launch(blocks: usize, nrhs: usize) -> Option<LaunchConfig> {
    let row_groups = nrhs.div_ceil(CHOL_THREADS as usize).max(1);
    if row_groups > CHOL_MAX_ROW_GROUPS as usize {
        return None;
    }
    Some(LaunchConfig {
        grid_dim: (blocks as u32, row_groups as u32, 1),
        block_dim: (CHOL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The per-image backprop kernels: one block of [`BP_THREADS`] threads per image.
pub fn per_image_launch(images: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (images as u32, 1, 1),
        block_dim: (BP_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per element of `n` (n ≤ i32::MAX, checked by the callers): the gradient
/// reduction, the softmax backward and the optimizer steps.
pub fn elementwise_launch(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(EW_THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (EW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_layout_matches_the_kernel() {
        // 8 warps × (1440 + 784) + 400 + 20 × 404 floats, as documented in
        // kernels/forward.cu.
        assert_eq!(forward_smem_bytes(8), 105_088);
        // 2 blocks (plus 1 KB the hardware reserves per block) must fit the 228 KB of an
        // H100/H200 SM.
        assert!(2 * (forward_smem_bytes(FORWARD_WARPS) + 1024) <= 228 * 1024);
        // The per-warp maps end 16-byte aligned, so the padded weight rows are too.
        assert_eq!((FORWARD_WARPS * (1440 + 784)) % 4, 0);
        assert_eq!(FORWARD_W2_OC_STRIDE % 4, 0);
    }

    #[test]
    fn images_per_block_fills_the_gpu() {
        assert_eq!(images_per_block(5000, 64, 132), 64);
        assert_eq!(images_per_block(1, 10_000, 132), 16);
        assert_eq!(images_per_block(1, 10, 132), 8);
        let (cfg, ipb) = forward_launch(5000, 64, 132, 8).expect("fits");
        assert_eq!((cfg.grid_dim.0, ipb), (5000, 64));
        let (cfg, ipb) = forward_launch(1, 10_000, 132, 8).expect("fits");
        assert_eq!((cfg.grid_dim.0, ipb), (625, 16));
        assert!(forward_launch(usize::MAX / 2, 64, 132, 8).is_none());
        let (cfg, _) = forward_launch(5000, 64, 108, 5).expect("fits");
        assert_eq!(cfg.block_dim.0, 160);
        assert_eq!(cfg.shared_mem_bytes, forward_smem_bytes(5));
    }

    #[test]
    fn forward_geometry_follows_the_shared_memory_of_each_architecture() {
        let g = |l| forward_geometry(l).expect("some geometry fits");
        let wb = |l| {
            let x = g(l);
            (x.warps, x.blocks_per_sm)
        };
        // H100/H200: 8 warps (105,088 B), two blocks per SM.
        assert_eq!(wb(SharedMemoryLimits::SM90), (8, 2));
        // A100: one 8-warp block per SM (8 warps) loses to two 5-warp blocks (10).
        assert_eq!(wb(SharedMemoryLimits::SM80), (5, 2));
        // sm_86/89: 105,088 B is over the 101,376 B opt-in limit: 7 warps (96,192 B).
        assert_eq!(wb(SharedMemoryLimits::SM86), (7, 1));
        assert_eq!(wb(SharedMemoryLimits::SM89), (7, 1));
        // Turing: 64 KB: 3 warps (60,608 B).
        assert_eq!(wb(SharedMemoryLimits::SM75), (3, 1));
        for l in [
            SharedMemoryLimits::SM75,
            SharedMemoryLimits::SM80,
            SharedMemoryLimits::SM86,
            SharedMemoryLimits::SM90,
        ] {
            let x = g(l);
            assert!(x.smem_bytes() <= l.per_block_optin, "{l:?}");
            assert!(
                x.blocks_per_sm * (x.smem_bytes() + l.reserved_per_block) <= l.per_sm,
                "{l:?}"
            );
            assert!(x.warps * x.blocks_per_sm <= 16, "{l:?}: registers");
        }
        // Less than one warp's block: no geometry.
        assert_eq!(
            forward_geometry(SharedMemoryLimits::new(40_000, 40_000, 0)),
            None
        );
    }

    #[test]
    fn one_dimensional_grids_cover_their_items() {
        assert_eq!(elementwise_launch(18_050).grid_dim.0, 71);
        assert_eq!(elementwise_launch(1).grid_dim.0, 1);
        assert_eq!(elementwise_launch(0).grid_dim.0, 1);
        assert_eq!(per_image_launch(64).grid_dim.0, 64);
        assert_eq!(per_image_launch(64).block_dim.0, BP_THREADS);
        assert_eq!(elementwise_stride_launch(1 << 30).grid_dim.0, EW_MAX_BLOCKS);
        assert_eq!(mean_launch(640).grid_dim.0, 20);
        let c = small_cholesky_launch(64, 5000).expect("fits");
        assert_eq!((c.grid_dim.0, c.grid_dim.1), (64, 40));
        assert!(small_cholesky_launch(1, 65_536 * 128).is_none());
    }
}
