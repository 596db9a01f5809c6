//! The network's forward pass on the CPU (twin of `kernels/forward.cu`).
//!
//! Shapes: `weights` is J × P (P = [`Net::n_params`], `state_dict` order), `x` is
//! B × 784 (row-major 28 × 28 images), `out` is J × B × 10 raw logits. One image through
//! one member: conv1 (1 → 10, 5×5) → max-pool 2×2 → activation → conv2 (10 → 20, 5×5)
//! → [`Arch::Pooled`]: max-pool 2×2 → activation → flatten (channel-major) → fc1.
//! Max-pool is applied before the activation: all three activations are monotone
//! non-decreasing, so `pool(act(z)) = act(pool(z))` and the cheaper order is exact.
//!
//! Work split: the output is cut into work items of [`BLOCK_MEMBERS`] members ×
//! [`CHUNK_IMAGES`] images, spread over rayon threads. An item prepares its images'
//! conv1 input once and reuses it for every member of the block; each (member, image)
//! pair is then computed start to finish by one thread in a fixed instruction order,
//! so the result is bit-identical for any number of threads and any split.
//!
//! Three implementations of the same item ([`ForwardImpl`]): register-tiled SIMD
//! kernels for AVX-512 (`forward/avx512.rs`) and for AVX2 + FMA (`forward/avx2.rs`),
//! sharing their data layouts and driver (`forward/tiled.rs`), the best one the CPU
//! supports chosen at run time; and a portable one built from the layer helpers below ([`conv2d_forward`], [`maxpool2_forward`],
//! [`activation_forward`], [`linear_forward`]), which are also the CPU twins of the
//! CUDA layer kernels and the building blocks for backpropagation.

use rayon::prelude::*;

use crate::backend::check_len;
use crate::model::{Activation, Arch, Net, C1, C2, CLASSES, H1, H2, IMG, IMG_PIXELS, KSIZE, P1};
use crate::{Error, Result};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod tiled;

/// Images per work item (their conv1 input is prepared once per item).
pub const CHUNK_IMAGES: usize = 8;
/// Members per work item (they share the item's prepared images).
pub const BLOCK_MEMBERS: usize = 8;

/// The implementations of the CPU forward pass. They agree up to f32 rounding (the
/// tests hold each to the same naive f64 reference), not bit for bit; each one is
/// bit-identical for any thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardImpl {
    /// AVX-512F register-tiled kernels (x86_64).
    Avx512,
    /// AVX2 + FMA register-tiled kernels (x86_64).
    Avx2,
    /// The layer helpers of this module, any CPU.
    Portable,
}

impl ForwardImpl {
    /// Every implementation, fastest first.
    pub const ALL: [ForwardImpl; 3] = [
        ForwardImpl::Avx512,
        ForwardImpl::Avx2,
        ForwardImpl::Portable,
    ];

    /// The name used in logs and benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            ForwardImpl::Avx512 => "avx512",
            ForwardImpl::Avx2 => "avx2",
            ForwardImpl::Portable => "portable",
        }
    }

    /// Whether the running CPU can execute this implementation.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            ForwardImpl::Avx512 => avx512::Avx512::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            ForwardImpl::Avx2 => avx2::Avx2::detect().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            ForwardImpl::Avx512 | ForwardImpl::Avx2 => false,
            ForwardImpl::Portable => true,
        }
    }

    /// The fastest implementation this CPU supports (what [`ensemble_forward`] uses).
    pub fn best() -> ForwardImpl {
        ForwardImpl::ALL
            .into_iter()
            .find(|i| i.is_available())
            .unwrap_or(ForwardImpl::Portable)
    }
}

/// Forward pass of `members` networks over `images` images, see
/// [`crate::backend::Backend::ensemble_forward`].
///
/// `weights`: members × P (P = `net.n_params()`), `x`: images × 784 pixels,
/// `out`: members × images × 10 raw logits, overwritten. Uses [`ForwardImpl::best`].
/// Errors: [`Error::Shape`] when a buffer length does not match.
pub fn ensemble_forward(
    net: &Net,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &mut [f32],
) -> Result<()> {
    ensemble_forward_with(ForwardImpl::best(), net, weights, members, x, images, out)
}

/// The portable forward pass (the layer helpers, any CPU), same contract as
/// [`ensemble_forward`]. Results agree with the vectorised paths up to f32 rounding.
pub fn ensemble_forward_portable(
    net: &Net,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &mut [f32],
) -> Result<()> {
    ensemble_forward_with(ForwardImpl::Portable, net, weights, members, x, images, out)
}

/// [`ensemble_forward`] with a chosen implementation (for tests and benchmarks). A
/// layer-spec network ([`Net::spec`]) always runs [`crate::cpu::spec_forward`].
/// Errors: [`Error::Config`] when this CPU cannot run `imp`; [`Error::Shape`] as
/// [`ensemble_forward`].
pub fn ensemble_forward_with(
    imp: ForwardImpl,
    net: &Net,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &mut [f32],
) -> Result<()> {
    if let Some(spec) = net.spec() {
        // A layer-spec network: the generic per-layer path (any implementation choice).
        return crate::cpu::spec_forward::spec_forward(spec, weights, members, x, images, out);
    }
    check_shapes(net, weights, members, x, images, out)?;
    if members == 0 || images == 0 {
        return Ok(());
    }
    match imp {
        #[cfg(target_arch = "x86_64")]
        ForwardImpl::Avx512 => match avx512::Avx512::detect() {
            Some(k) => tiled::ensemble_forward(k, net, weights, members, x, images, out),
            None => return Err(unavailable(imp)),
        },
        #[cfg(target_arch = "x86_64")]
        ForwardImpl::Avx2 => match avx2::Avx2::detect() {
            Some(k) => tiled::ensemble_forward(k, net, weights, members, x, images, out),
            None => return Err(unavailable(imp)),
        },
        #[cfg(not(target_arch = "x86_64"))]
        ForwardImpl::Avx512 | ForwardImpl::Avx2 => return Err(unavailable(imp)),
        ForwardImpl::Portable => return portable(net, weights, members, x, images, out),
    }
    Ok(())
}

fn unavailable(imp: ForwardImpl) -> Error {
    Error::Config(format!(
        "the CPU forward implementation {} needs instructions this CPU lacks",
        imp.name()
    ))
}

/// Name of the implementation [`ensemble_forward`] uses on this CPU
/// (`"avx512"`, `"avx2"` or `"portable"`), for logs and benchmark reports.
pub fn forward_impl_name() -> &'static str {
    ForwardImpl::best().name()
}

/// Valid (no padding), stride-1 cross-correlation, PyTorch `conv2d` without bias.
///
/// `input`: cin × h × w, `weight`: cout × cin × k × k, `out`: cout × (h−k+1) × (w−k+1):
/// `out[o, y, x] = Σ_{i,ky,kx} weight[o, i, ky, kx] · input[i, y+ky, x+kx]`, accumulated
/// in f32 in the order (i, ky, kx). Errors: [`Error::Shape`] on a length mismatch or
/// when `k` is 0 or larger than `h` or `w`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward(
    input: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    cout: usize,
    k: usize,
    out: &mut [f32],
) -> Result<()> {
    if k == 0 || k > h || k > w {
        return Err(Error::Shape {
            what: "conv2d_forward kernel side".to_string(),
            expected: format!("1 ≤ k ≤ min(h, w) = {}", h.min(w)),
            found: format!("k = {k}"),
        });
    }
    let (oh, ow) = (h - k + 1, w - k + 1);
    check_len("conv2d_forward input", input.len(), cin * h * w)?;
    check_len("conv2d_forward weight", weight.len(), cout * cin * k * k)?;
    check_len("conv2d_forward out", out.len(), cout * oh * ow)?;
    if oh * ow == 0 {
        return Ok(());
    }
    for (o, plane) in out.chunks_exact_mut(oh * ow).enumerate() {
        plane.fill(0.0);
        for i in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    let wv = weight[((o * cin + i) * k + ky) * k + kx];
                    for (y, row) in plane.chunks_exact_mut(ow).enumerate() {
                        let src = &input[(i * h + y + ky) * w + kx..][..ow];
                        for (d, s) in row.iter_mut().zip(src) {
                            *d += wv * s;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Errors with [`Error::Shape`] unless both sides `h × w` of a 2 × 2 max-pool input are
/// even (shared by [`maxpool2_forward`] and the backprop twin).
pub(crate) fn check_even_sides(what: &str, h: usize, w: usize) -> Result<()> {
    if h.is_multiple_of(2) && w.is_multiple_of(2) {
        Ok(())
    } else {
        Err(Error::Shape {
            what: what.to_string(),
            expected: "even height and width".to_string(),
            found: format!("{h} × {w}"),
        })
    }
}

/// Max-pool 2×2, stride 2: `input` c × h × w (h, w even), `out` c × h/2 × w/2,
/// `out[c, y, x] = max(input[c, 2y+dy, 2x+dx])`. Errors: [`Error::Shape`] on a length
/// mismatch or an odd side.
pub fn maxpool2_forward(
    input: &[f32],
    c: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
) -> Result<()> {
    check_even_sides("maxpool2_forward input sides", h, w)?;
    check_len("maxpool2_forward input", input.len(), c * h * w)?;
    check_len("maxpool2_forward out", out.len(), c * (h / 2) * (w / 2))?;
    maxpool2(input, h, w, out);
    Ok(())
}

/// Applies `act` element-wise in place (`buf` any length), exactly [`Activation::apply`].
pub fn activation_forward(act: Activation, buf: &mut [f32]) {
    for v in buf {
        *v = act.apply(*v);
    }
}

/// Linear layer without bias: `out[k] = Σ_i weight[k, i] · input[i]`, `input`: nin,
/// `weight`: nout × nin row-major, `out`: nout; f32 accumulation in index order.
/// Errors: [`Error::Shape`] on a length mismatch.
pub fn linear_forward(
    input: &[f32],
    nin: usize,
    weight: &[f32],
    nout: usize,
    out: &mut [f32],
) -> Result<()> {
    check_len("linear_forward input", input.len(), nin)?;
    check_len("linear_forward weight", weight.len(), nout * nin)?;
    check_len("linear_forward out", out.len(), nout)?;
    if nin == 0 {
        out.fill(0.0);
        return Ok(());
    }
    for (o, row) in out.iter_mut().zip(weight.chunks_exact(nin)) {
        *o = row.iter().zip(input).fold(0.0, |acc, (w, v)| acc + w * v);
    }
    Ok(())
}

/// Max-pool 2×2 on planes of h × w (lengths already checked by the caller).
fn maxpool2(input: &[f32], h: usize, w: usize, out: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    if oh * ow == 0 {
        return;
    }
    for (src, dst) in input.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
        for y in 0..oh {
            let r0 = &src[2 * y * w..][..w];
            let r1 = &src[(2 * y + 1) * w..][..w];
            for (xo, d) in dst[y * ow..][..ow].iter_mut().enumerate() {
                *d = r0[2 * xo]
                    .max(r0[2 * xo + 1])
                    .max(r1[2 * xo].max(r1[2 * xo + 1]));
            }
        }
    }
}

/// Checks every buffer length of [`ensemble_forward`].
fn check_shapes(
    net: &Net,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &mut [f32],
) -> Result<()> {
    let p = net.n_params();
    check_len(
        "ensemble_forward weights (members × P)",
        weights.len(),
        members.saturating_mul(p),
    )?;
    check_len(
        "ensemble_forward x (images × 784)",
        x.len(),
        images.saturating_mul(IMG_PIXELS),
    )?;
    check_len(
        "ensemble_forward out (members × images × 10)",
        out.len(),
        members.saturating_mul(images).saturating_mul(CLASSES),
    )
}

/// One work item: members `m0..m0 + outs.len()`, images `i0..i0 + n_img`; `outs[j]` is
/// the n_img × 10 block of member `m0 + j`'s output.
struct Item<'a> {
    m0: usize,
    i0: usize,
    n_img: usize,
    outs: Vec<&'a mut [f32]>,
}

/// Cuts `out` (members × images × 10, both counts > 0) into the work items.
fn work_items(members: usize, images: usize, out: &mut [f32]) -> Vec<Item<'_>> {
    let n_chunks = images.div_ceil(CHUNK_IMAGES);
    let n_blocks = members.div_ceil(BLOCK_MEMBERS);
    let mut items: Vec<Item<'_>> = (0..n_blocks * n_chunks)
        .map(|t| {
            let i0 = (t % n_chunks) * CHUNK_IMAGES;
            Item {
                m0: (t / n_chunks) * BLOCK_MEMBERS,
                i0,
                n_img: CHUNK_IMAGES.min(images - i0),
                outs: Vec::with_capacity(BLOCK_MEMBERS),
            }
        })
        .collect();
    for (m, slab) in out.chunks_mut(images * CLASSES).enumerate() {
        for (c, piece) in slab.chunks_mut(CHUNK_IMAGES * CLASSES).enumerate() {
            items[(m / BLOCK_MEMBERS) * n_chunks + c].outs.push(piece);
        }
    }
    items
}

/// Per-thread scratch of the portable path (one member, one image).
struct PortableScratch {
    c1: Vec<f32>,
    p1: Vec<f32>,
    c2: Vec<f32>,
    p2: Vec<f32>,
}

/// The portable path; shapes already checked, both counts > 0.
fn portable(
    net: &Net,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &mut [f32],
) -> Result<()> {
    let p = net.n_params();
    work_items(members, images, out)
        .into_par_iter()
        .try_for_each_init(
            || PortableScratch {
                c1: vec![0.0; C1 * H1 * H1],
                p1: vec![0.0; C1 * P1 * P1],
                c2: vec![0.0; C2 * H2 * H2],
                p2: vec![0.0; net.fc_in()],
            },
            |s, mut item| {
                for (j, o) in item.outs.iter_mut().enumerate() {
                    let w = &weights[(item.m0 + j) * p..][..p];
                    for d in 0..item.n_img {
                        let img = &x[(item.i0 + d) * IMG_PIXELS..][..IMG_PIXELS];
                        forward_one(net, w, img, s, &mut o[d * CLASSES..][..CLASSES])?;
                    }
                }
                Ok(())
            },
        )
}

/// One member (`w`: P weights) on one image (784 pixels) → 10 logits, layer by layer.
fn forward_one(
    net: &Net,
    w: &[f32],
    img: &[f32],
    s: &mut PortableScratch,
    logits: &mut [f32],
) -> Result<()> {
    let w1 = &w[Net::CONV1_OFFSET..][..Net::CONV1_LEN];
    let w2 = &w[Net::CONV2_OFFSET..][..Net::CONV2_LEN];
    let wf = &w[Net::FC_OFFSET..][..net.fc_len()];
    conv2d_forward(img, 1, IMG, IMG, w1, C1, KSIZE, &mut s.c1)?;
    maxpool2_forward(&s.c1, C1, H1, H1, &mut s.p1)?;
    activation_forward(net.act, &mut s.p1);
    conv2d_forward(&s.p1, C1, P1, P1, w2, C2, KSIZE, &mut s.c2)?;
    let feat = match net.arch {
        Arch::Paper => &mut s.c2,
        Arch::Pooled => {
            maxpool2_forward(&s.c2, C2, H2, H2, &mut s.p2)?;
            &mut s.p2
        }
    };
    activation_forward(net.act, feat);
    linear_forward(feat, net.fc_in(), wf, CLASSES, logits)
}
