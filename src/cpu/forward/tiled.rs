//! The driver shared by the register-tiled SIMD forward kernels (`avx512.rs`,
//! `avx2.rs`): the data layouts that make every vector load contiguous, the per-thread
//! scratch, and the loop over a work item. Each instruction set supplies the four
//! kernels of [`Simd`]; the layouts are the same for both.
//!
//! Per work item (see the parent module): the item's images are rearranged once into
//! "phase planes" shared by all its members; then for each member and image:
//!
//! 1. conv1 + max-pool + activation, fused in registers. The pooled map is 10 × 12 × 12
//!    = 10 × 144 floats. For one vector of pooled positions j = py·12 + px the kernel
//!    accumulates the 4 pool quadrants (dy, dx) of a few output channels, then takes
//!    the max over quadrants and applies the activation.
//!    Phase planes make every load contiguous: `U[a, t][r·12 + px] = x[2r + a][2px + t]`
//!    (a ∈ {0,1}, t ∈ 0..6, r ∈ 0..14; 12 planes × 168 floats), so the conv1 input for
//!    quadrant (dy, dx), tap (ky, kx) at all j is `U[s & 1, t][(s >> 1)·12 + j]` with
//!    s = dy + ky, t = dx + kx.
//! 2. conv2 (+ activation for [`Arch::Paper`]). The output is 20 × 64 positions
//!    p = y·8 + x. Shifted copies of the pooled map, `S[i, kx][r·8 + x] = a1[i][r][x + kx]`
//!    (10 × 5 × 96 floats), make the input of tap (i, ky, kx) at all p the contiguous
//!    `S[i, kx][ky·8 + p]`.
//! 3. [`Arch::Pooled`]: scalar max-pool then vector activation.
//! 4. fc1: one vector accumulator per class over the features, then a fixed-order lane
//!    reduction.
//!
//! Every (member, image) pair runs the same instruction sequence wherever it lies in a
//! work item, so results do not depend on the split or the thread count.

use rayon::prelude::*;

use super::{maxpool2, work_items, Item, CHUNK_IMAGES};
use crate::model::{Activation, Arch, Net, C1, C2, CLASSES, H2, IMG, IMG_PIXELS, P1};

/// Floats of one image's phase planes: 12 planes of 14 × 12.
pub(super) const U_PLANE: usize = 14 * P1;
pub(super) const U_LEN: usize = 12 * U_PLANE;
/// Floats of one shifted copy of a pooled conv1 channel: 12 rows × 8.
pub(super) const S_PLANE: usize = P1 * H2;
pub(super) const S_LEN: usize = C1 * 5 * S_PLANE;
/// Pooled conv1 map, conv2 map, pooled conv2 map.
pub(super) const A1_LEN: usize = C1 * P1 * P1;
pub(super) const C2_LEN: usize = C2 * H2 * H2;
const P2_LEN: usize = C2 * 16;

/// One instruction set's kernels. A value of the implementing type is the proof that
/// the running CPU has that instruction set (only its `detect` makes one), which is
/// what makes these methods safe to call.
pub(super) trait Simd: Copy + Send + Sync {
    /// conv1 → max-pool → activation for one image: `u` its phase planes (`U_LEN`),
    /// `w1` 10 × 25, `a1` 10 × 144 (pooled, activated).
    fn conv1_pool_act(self, act: Activation, u: &[f32], w1: &[f32], a1: &mut [f32]);
    /// conv2 for one image: `s` the shifted copies (`S_LEN`), `w2` 20 × 250, `c2`
    /// 20 × 64; the activation is applied when `act` is `Some`.
    fn conv2(self, act: Option<Activation>, s: &[f32], w2: &[f32], c2: &mut [f32]);
    /// fc1: `logits[k] = Σ_f wf[k, f] · feat[f]`, `feat` F (a multiple of 16), `wf`
    /// 10 × F.
    fn fc(self, feat: &[f32], wf: &[f32], logits: &mut [f32]);
    /// The activation in place, `buf.len()` a multiple of 16.
    fn act_in_place(self, act: Activation, buf: &mut [f32]);
}

/// Per-thread scratch.
struct Scratch {
    u: Vec<f32>,
    a1: Vec<f32>,
    s: Vec<f32>,
    c2: Vec<f32>,
    p2: Vec<f32>,
}

/// The tiled ensemble forward; shapes checked by the caller, both counts > 0.
pub(super) fn ensemble_forward<K: Simd>(
    k: K,
    net: &Net,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &mut [f32],
) {
    work_items(members, images, out)
        .into_par_iter()
        .for_each_init(
            || Scratch {
                u: vec![0.0; CHUNK_IMAGES * U_LEN],
                a1: vec![0.0; A1_LEN],
                s: vec![0.0; S_LEN],
                c2: vec![0.0; C2_LEN],
                p2: vec![0.0; P2_LEN],
            },
            |s, mut item| run_item(k, net, weights, x, s, &mut item),
        );
}

/// Computes one work item.
fn run_item<K: Simd>(
    k: K,
    net: &Net,
    weights: &[f32],
    x: &[f32],
    s: &mut Scratch,
    item: &mut Item<'_>,
) {
    let p = net.n_params();
    for d in 0..item.n_img {
        let img = &x[(item.i0 + d) * IMG_PIXELS..][..IMG_PIXELS];
        phase_planes(img, &mut s.u[d * U_LEN..][..U_LEN]);
    }
    for (j, o) in item.outs.iter_mut().enumerate() {
        let w = &weights[(item.m0 + j) * p..][..p];
        let w1 = &w[Net::CONV1_OFFSET..][..Net::CONV1_LEN];
        let w2 = &w[Net::CONV2_OFFSET..][..Net::CONV2_LEN];
        let wf = &w[Net::FC_OFFSET..][..net.fc_len()];
        for d in 0..item.n_img {
            k.conv1_pool_act(net.act, &s.u[d * U_LEN..][..U_LEN], w1, &mut s.a1);
            shifted_copies(&s.a1, &mut s.s);
            let logits = &mut o[d * CLASSES..][..CLASSES];
            match net.arch {
                Arch::Paper => {
                    k.conv2(Some(net.act), &s.s, w2, &mut s.c2);
                    k.fc(&s.c2, wf, logits);
                }
                Arch::Pooled => {
                    k.conv2(None, &s.s, w2, &mut s.c2);
                    maxpool2(&s.c2, H2, H2, &mut s.p2);
                    k.act_in_place(net.act, &mut s.p2);
                    k.fc(&s.p2, wf, logits);
                }
            }
        }
    }
}

/// `u[(a·6 + t)·168 + r·12 + px] = img[2r + a][2px + t]` (see the module notes).
fn phase_planes(img: &[f32], u: &mut [f32]) {
    for a in 0..2 {
        for t in 0..6 {
            let plane = &mut u[(a * 6 + t) * U_PLANE..][..U_PLANE];
            for (r, row) in plane.chunks_exact_mut(P1).enumerate() {
                let src = &img[(2 * r + a) * IMG..][..IMG];
                for (px, d) in row.iter_mut().enumerate() {
                    *d = src[2 * px + t];
                }
            }
        }
    }
}

/// `s[(i·5 + kx)·96 + r·8 + x] = a1[i][r][x + kx]`.
fn shifted_copies(a1: &[f32], s: &mut [f32]) {
    for i in 0..C1 {
        for kx in 0..5 {
            let dst = &mut s[(i * 5 + kx) * S_PLANE..][..S_PLANE];
            for (r, row) in dst.chunks_exact_mut(H2).enumerate() {
                row.copy_from_slice(&a1[(i * P1 + r) * P1 + kx..][..H2]);
            }
        }
    }
}

/// Offset in the phase planes of the conv1 input for pool quadrant `q` (dy = q / 2,
/// dx = q % 2), tap (`ky`, `kx`), pooled positions starting at `j0`.
#[inline(always)]
pub(super) fn conv1_offset(q: usize, ky: usize, kx: usize, j0: usize) -> usize {
    let (sy, t) = (q / 2 + ky, q % 2 + kx);
    ((sy & 1) * 6 + t) * U_PLANE + (sy >> 1) * P1 + j0
}
