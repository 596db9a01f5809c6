//! The forward pass of a layer-spec network ([`NetSpec`]) on the CPU, every member on
//! every image.
//!
//! Shapes: `weights` J × P (P = [`NetSpec::n_params`], `Sequential` order), `x` B × n_in
//! (n_in = the spec's input length, C × H × W row-major per image), `out` J × B × n_out.
//! Work split: one member's images in fixed groups of four per rayon task, computed
//! start to finish by one thread in a fixed order, so the result is bit-identical for
//! any thread count. Linear layers take each weight row against the group's four inputs
//! at once (one load of the row for four dot products, each in its own documented
//! order); stride-1 convolutions keep tiles of outputs in AVX registers over all their
//! taps (same order per output; a padded one, or one whose output width is not a
//! multiple of 8, runs on a zero-padded copy of its input into a wider output, whose
//! w·0 terms leave finite sums unchanged); an activation right before a max-pool runs
//! after it (every activation is monotone non-decreasing, so the values are the same;
//! `bench --net` books its time under the pool). The whole task is compiled for AVX2
//! when the CPU has it (same operations, wider registers; Rust does not contract
//! `a * b + c` into FMA, so the numbers are those of the baseline build).
//!
//! Every layer accumulates in f32 in a fixed order: conv2d adds the terms of each output
//! in the order (input channel, ky, kx), skipping the zero padding, then the bias;
//! linear keeps 8 interleaved partial sums (`s_k` over the inputs i ≡ k mod 8 of the
//! first ⌊n/8⌋·8, in index order, so the compiler can vectorise them), adds them as
//! ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), then the remaining inputs in
//! order, then the bias ([`dot8`]); avg-pool sums its window row by row and
//! divides by k². The paper presets keep their fused kernels (`forward.rs`); this path
//! gives the same function (tests hold it to them).

use rayon::prelude::*;

use crate::backend::check_len;
use crate::cpu::backprop::Real;
use crate::cpu::dot::{dot8, dot8x4_best};
use crate::model::spec::{BuiltLayer, Layer, NetSpec, Shape};
use crate::Result;

/// Forward pass of `members` spec networks over `images` inputs, see the module notes.
/// Errors: [`crate::Error::Shape`] when a buffer length does not match.
pub fn spec_forward(
    spec: &NetSpec,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &mut [f32],
) -> Result<()> {
    let (p, n_in, n_out) = (spec.n_params(), spec.input().len(), spec.outputs());
    check_lengths(spec, weights, members, x, images, out)?;
    if members == 0 || images == 0 {
        return Ok(());
    }
    let scratch = spec.max_activation_len() * GROUP;
    // Tasks: one member's images in groups of GROUP (fixed, not thread-dependent).
    let groups = images.div_ceil(GROUP);
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(members * groups);
    for (m, block) in out.chunks_mut(images * n_out).enumerate() {
        for (g, o) in block.chunks_mut(GROUP * n_out).enumerate() {
            tasks.push((m, g * GROUP, o));
        }
    }
    tasks.into_par_iter().for_each_init(
        || (vec![0.0f32; scratch], vec![0.0f32; scratch]),
        |(a, b), (m, d0, o)| {
            let w = &weights[m * p..][..p];
            let nb = o.len() / n_out;
            let input = &x[d0 * n_in..][..nb * n_in];
            forward_group_dispatch(spec, w, input, nb, a, b, o, None);
        },
    );
    Ok(())
}

/// The buffer lengths [`spec_forward`] needs. Errors: [`crate::Error::Shape`] naming
/// the buffer that does not match.
fn check_lengths(
    spec: &NetSpec,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
    out: &[f32],
) -> Result<()> {
    check_len(
        "spec_forward weights (members × P)",
        weights.len(),
        members.saturating_mul(spec.n_params()),
    )?;
    check_len(
        "spec_forward x (images × inputs)",
        x.len(),
        images.saturating_mul(spec.input().len()),
    )?;
    check_len(
        "spec_forward out (members × images × outputs)",
        out.len(),
        members
            .saturating_mul(images)
            .saturating_mul(spec.outputs()),
    )
}

/// [`spec_forward`] timing every layer: returns each layer's share of the
/// summed task time (shares add up to 1, all 0 without members or images; multiply by a
/// forward pass's wall time for its milliseconds). The output is discarded. For `bench`; the clock reads add about
/// 50 ns per layer per group of four images.
/// Errors: those of [`spec_forward`].
pub fn spec_layer_shares(
    spec: &NetSpec,
    weights: &[f32],
    members: usize,
    x: &[f32],
    images: usize,
) -> Result<Vec<f64>> {
    let (p, n_in, n_out) = (spec.n_params(), spec.input().len(), spec.outputs());
    let mut out = vec![0.0f32; members.saturating_mul(images).saturating_mul(n_out)];
    check_lengths(spec, weights, members, x, images, &out)?;
    let layers = spec.layers().len();
    if out.is_empty() {
        return Ok(vec![0.0; layers]);
    }
    let scratch = spec.max_activation_len() * GROUP;
    let per_task: Vec<Vec<f64>> = out
        .par_chunks_mut(images * n_out)
        .enumerate()
        .flat_map_iter(|(m, block)| {
            let (mut a, mut b) = (vec![0.0f32; scratch], vec![0.0f32; scratch]);
            let mut t = vec![0.0f64; layers];
            for (g, o) in block.chunks_mut(GROUP * n_out).enumerate() {
                let nb = o.len() / n_out;
                let input = &x[g * GROUP * n_in..][..nb * n_in];
                let w = &weights[m * p..][..p];
                forward_group_dispatch(spec, w, input, nb, &mut a, &mut b, o, Some(&mut t));
            }
            std::iter::once(t)
        })
        .collect();
    let mut total = vec![0.0f64; layers];
    for t in per_task {
        for (s, v) in total.iter_mut().zip(t) {
            *s += v;
        }
    }
    let sum: f64 = total.iter().sum();
    Ok(total
        .into_iter()
        .map(|v| if sum > 0.0 { v / sum } else { 0.0 })
        .collect())
}

/// Images per task: the linear layers compute this many images against each weight row
/// at once (one load of the row for all of them); each output keeps its own sums in
/// the documented order, so the result does not depend on the grouping.
const GROUP: usize = 4;

/// [`forward_group`], compiled for AVX2 when the CPU has it (the same IEEE operations
/// in the same order, only wider registers: bit-identical to the baseline build).
#[allow(clippy::too_many_arguments)]
fn forward_group_dispatch(
    spec: &NetSpec,
    w: &[f32],
    input: &[f32],
    nb: usize,
    a: &mut [f32],
    b: &mut [f32],
    out: &mut [f32],
    times: Option<&mut [f64]>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { forward_group_avx2(spec, w, input, nb, a, b, out, times) };
        return;
    }
    forward_group(spec, w, input, nb, a, b, out, times);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_group_avx2(
    spec: &NetSpec,
    w: &[f32],
    input: &[f32],
    nb: usize,
    a: &mut [f32],
    b: &mut [f32],
    out: &mut [f32],
    times: Option<&mut [f64]>,
) {
    forward_group(spec, w, input, nb, a, b, out, times);
}

/// One member (`w`: P weights) on `nb` ≤ [`GROUP`] inputs (`input`: nb × inputs,
/// `out`: nb × outputs); `a`, `b` scratch of GROUP × [`NetSpec::max_activation_len`]
/// values each, holding the nb activation rows of the current layer. With `times`
/// (one slot per layer), each layer's seconds are added to its slot.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_group(
    spec: &NetSpec,
    w: &[f32],
    input: &[f32],
    nb: usize,
    a: &mut [f32],
    b: &mut [f32],
    out: &mut [f32],
    mut times: Option<&mut [f64]>,
) {
    a[..input.len()].copy_from_slice(input);
    let (mut cur, mut next) = (a, b);
    let layers = spec.layers();
    // An activation right before a max-pool runs after it, on the pooled values only:
    // every activation is monotone non-decreasing, so max(act(x)) = act(max(x)).
    let mut deferred = None;
    for (i, l) in layers.iter().enumerate() {
        let _clock = times.as_deref_mut().map(|t| LayerClock::start(&mut t[i]));
        let (n_in, n_out) = (l.input.len(), l.output.len());
        match l.layer {
            Layer::Act(act) => {
                if let Some(Layer::MaxPool2d { .. }) = layers.get(i + 1).map(|n| n.layer) {
                    deferred = Some(act);
                } else {
                    for v in &mut cur[..nb * n_in] {
                        *v = act.apply(*v);
                    }
                }
                continue;
            }
            Layer::Flatten => continue,
            Layer::Linear { .. } => linear_group(l, w, &cur[..nb * n_in], &mut next[..nb * n_out]),
            #[cfg(target_arch = "x86_64")]
            Layer::Conv2d {
                stride: 1, padding, ..
            } if std::arch::is_x86_feature_detected!("avx2") => {
                let rows = cur[..nb * n_in].chunks_exact(n_in);
                let Shape::Image { w: ow, .. } = l.output else {
                    unreachable!("conv2d gives images")
                };
                if padding == 0 && ow % 8 == 0 {
                    for (src, dst) in rows.zip(next[..nb * n_out].chunks_exact_mut(n_out)) {
                        // SAFETY: AVX2 is present (the guard above).
                        unsafe { conv2d_s1_avx(l, w, src, dst) };
                    }
                } else {
                    // Zero-padded copies of the inputs (the padding, and on the right as
                    // many columns as make the output width a multiple of 8, so that no
                    // output takes the scalar tail), then the unpadded kernel into a
                    // wider output whose first columns are kept: each kept output adds
                    // the same terms in the same order plus w·0 for the padding, which
                    // leaves a finite sum unchanged (bit for bit).
                    let extra = ow.next_multiple_of(8) - ow;
                    let padded = padded_layer(l, extra);
                    PADDED.with(|bufs| {
                        let (pin, pout) = &mut *bufs.borrow_mut();
                        for (src, dst) in rows.zip(next[..nb * n_out].chunks_exact_mut(n_out)) {
                            pad_image(src, l.input, (padding, extra), pin);
                            pout.resize(padded.output.len(), 0.0);
                            // SAFETY: AVX2 is present (the guard above).
                            unsafe { conv2d_s1_avx(&padded, w, pin, pout) };
                            let wide = ow + extra;
                            for (d, s) in dst.chunks_exact_mut(ow).zip(pout.chunks_exact(wide)) {
                                d.copy_from_slice(&s[..ow]);
                            }
                        }
                    });
                }
            }
            #[cfg(target_arch = "x86_64")]
            Layer::Conv2d { .. } if std::arch::is_x86_feature_detected!("avx2") => {
                // Stride > 1 (stride 1 took the arm above).
                let rows = cur[..nb * n_in].chunks_exact(n_in);
                PADDED.with(|bufs| {
                    let (poly, wide) = &mut *bufs.borrow_mut();
                    for (src, dst) in rows.zip(next[..nb * n_out].chunks_exact_mut(n_out)) {
                        // SAFETY: AVX2 is present (the guard above).
                        unsafe { conv2d_strided_avx(l, w, src, dst, (poly, wide)) };
                    }
                });
            }
            _ => {
                let rows = cur[..nb * n_in].chunks_exact(n_in);
                for (src, dst) in rows.zip(next[..nb * n_out].chunks_exact_mut(n_out)) {
                    layer_forward(l, w, src, dst, None);
                }
                if let Some(act) = deferred.take() {
                    for v in &mut next[..nb * n_out] {
                        *v = act.apply(*v);
                    }
                }
            }
        }
        std::mem::swap(&mut cur, &mut next);
    }
    out.copy_from_slice(&cur[..out.len()]);
}

thread_local! {
    /// The zero-padded input and the widened output of the padded stride-1
    /// convolutions (per thread).
    static PADDED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The stride-1 convolution `l` (padding p) as an unpadded one on inputs padded by p,
/// and by `extra` more columns on the right (`extra` more output columns).
fn padded_layer(l: &BuiltLayer, extra: usize) -> BuiltLayer {
    match (l.layer, l.input, l.output) {
        (
            Layer::Conv2d {
                out_channels,
                kernel_size,
                stride,
                padding,
                bias,
            },
            Shape::Image { c, h, w },
            Shape::Image {
                c: co,
                h: oh,
                w: ow,
            },
        ) => BuiltLayer {
            layer: Layer::Conv2d {
                out_channels,
                kernel_size,
                stride,
                padding: 0,
                bias,
            },
            input: Shape::Image {
                c,
                h: h + 2 * padding,
                w: w + 2 * padding + extra,
            },
            output: Shape::Image {
                c: co,
                h: oh,
                w: ow + extra,
            },
            ..l.clone()
        },
        _ => unreachable!("padded_layer of a conv2d on images"),
    }
}

/// Writes `src` (an image of `shape`) into `out` with `p` zeros on every side of each
/// plane and `extra` more on the right (`out` becomes c × (h + 2p) × (w + 2p + extra)).
fn pad_image(src: &[f32], shape: Shape, (p, extra): (usize, usize), out: &mut Vec<f32>) {
    let Shape::Image { c, h, w } = shape else {
        unreachable!("pad_image of an image")
    };
    let (ph, pw) = (h + 2 * p, w + 2 * p + extra);
    out.clear();
    out.resize(c * ph * pw, 0.0);
    for ch in 0..c {
        for y in 0..h {
            let from = &src[(ch * h + y) * w..][..w];
            out[(ch * ph + y + p) * pw + p..][..w].copy_from_slice(from);
        }
    }
}

/// A stride-1, unpadded conv2d layer on one image in AVX registers, output-stationary:
/// per output channel and row, up to 32 outputs accumulate in four 8-lane registers
/// over every tap in the order (input channel, ky, kx), each with a separate multiply
/// and add, then the bias is added: the operations of [`conv2d`] in the same order per
/// output, so the result is bit-identical. Columns past the last full 8 go scalar.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn conv2d_s1_avx(l: &BuiltLayer, w: &[f32], input: &[f32], out: &mut [f32]) {
    let (
        Layer::Conv2d { kernel_size: k, .. },
        Shape::Image { c, h, w: wd },
        Shape::Image {
            c: co,
            h: oh,
            w: ow,
        },
    ) = (l.layer, l.input, l.output)
    else {
        unreachable!("conv2d maps images to images (NetSpec::build)")
    };
    assert!(input.len() == c * h * wd && out.len() == co * oh * ow && oh + k - 1 <= h);
    assert!(
        ow + k - 1 <= wd,
        "conv2d_s1_avx: output wider than the input allows"
    );
    let weight = &w[l.weight_offset..][..co * c * k * k];
    let bias = l.bias_offset.map(|o| &w[o..][..co]);
    let full = ow / 8 * 8;
    let plane = oh * ow;
    for o in 0..co {
        let wo = &weight[o * c * k * k..][..c * k * k];
        let b = bias.map(|b| b[o]);
        let dst = &mut out[o * plane..][..plane];
        let g = ConvGeom1 {
            c,
            h,
            wd,
            ow,
            k,
            s: 1,
        };
        conv_rows(&g, input, wo, b, dst, (oh, full));
        for y in 0..oh {
            let row = &mut dst[y * ow..][..ow];
            for (x, d) in row.iter_mut().enumerate().skip(full) {
                let mut s = 0.0f32;
                let mut t = 0;
                for i in 0..c {
                    for ky in 0..k {
                        let src = &input[(i * h + y + ky) * wd..][..wd];
                        for kx in 0..k {
                            s += wo[t] * src[x + kx];
                            t += 1;
                        }
                    }
                }
                *d = match b {
                    Some(b) => s + b,
                    None => s,
                };
            }
        }
    }
}

/// Output rows 0..oh, columns 0..full (a multiple of 8) of one output channel `dst` of
/// the convolution `g`, in tiles of R rows × NB blocks of 8 columns, R·NB ≤ 6
/// independent accumulators held in registers (const sizes, so the loops unroll).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn conv_rows(
    g: &ConvGeom1,
    input: &[f32],
    wo: &[f32],
    b: Option<f32>,
    dst: &mut [f32],
    (oh, full): (usize, usize),
) {
    let blocks = full / 8;
    let band = if blocks == 1 { 4 } else { 2 };
    let mut y0 = 0;
    while y0 < oh && blocks > 0 {
        let r = (oh - y0).min(band);
        let mut x0 = 0;
        while x0 < full {
            let nb = ((full - x0) / 8).min(3);
            let at = (y0, x0);
            match (r, nb) {
                (4, 1) => conv_tile::<4, 1>(g, input, wo, b, dst, at),
                (3, 1) => conv_tile::<3, 1>(g, input, wo, b, dst, at),
                (2, 1) => conv_tile::<2, 1>(g, input, wo, b, dst, at),
                (1, 1) => conv_tile::<1, 1>(g, input, wo, b, dst, at),
                (2, 2) => conv_tile::<2, 2>(g, input, wo, b, dst, at),
                (1, 2) => conv_tile::<1, 2>(g, input, wo, b, dst, at),
                (2, 3) => conv_tile::<2, 3>(g, input, wo, b, dst, at),
                (1, 3) => conv_tile::<1, 3>(g, input, wo, b, dst, at),
                _ => unreachable!("r ≤ 4 with one block, ≤ 2 otherwise; nb ≤ 3"),
            }
            x0 += 8 * nb;
        }
        y0 += r;
    }
}

/// A strided (stride s > 1), optionally padded conv2d layer on one image in AVX
/// registers: the image is laid out column-polyphase with its zero padding
/// ([`ConvGeom1`]; `poly`, reused) and its output computed `wide` (`ow` rounded up to a
/// multiple of 8, the extra columns reading zeros) by [`conv_rows`], then the first `ow`
/// columns are kept. Each kept output adds the taps in the order (input channel, ky,
/// kx) with a separate multiply and add, as [`conv2d`] does, plus w·0 for the padding
/// taps [`conv2d`] skips, which leaves a finite sum unchanged: bit for bit its result.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn conv2d_strided_avx(
    l: &BuiltLayer,
    w: &[f32],
    input: &[f32],
    out: &mut [f32],
    (poly, wide): (&mut Vec<f32>, &mut Vec<f32>),
) {
    let (
        Layer::Conv2d {
            kernel_size: k,
            stride: s,
            padding: p,
            ..
        },
        Shape::Image { c, h, w: wd },
        Shape::Image {
            c: co,
            h: oh,
            w: ow,
        },
    ) = (l.layer, l.input, l.output)
    else {
        unreachable!("conv2d maps images to images (NetSpec::build)")
    };
    assert!(input.len() == c * h * wd && out.len() == co * oh * ow);
    let (hp, owp) = (h + 2 * p, ow.next_multiple_of(8));
    let row = owp + (k - 1) / s;
    poly.clear();
    poly.resize(c * hp * s * row, 0.0);
    for i in 0..c {
        for y in 0..h {
            let src = &input[(i * h + y) * wd..][..wd];
            for (x, &v) in src.iter().enumerate() {
                let px = x + p;
                // Columns past the last phase row are never read by a kept output.
                if px / s < row {
                    poly[((i * hp + y + p) * s + px % s) * row + px / s] = v;
                }
            }
        }
    }
    let g = ConvGeom1 {
        c,
        h: hp,
        wd: row,
        ow: owp,
        k,
        s,
    };
    let weight = &w[l.weight_offset..][..co * c * k * k];
    let bias = l.bias_offset.map(|o| &w[o..][..co]);
    wide.clear();
    wide.resize(oh * owp, 0.0);
    for o in 0..co {
        let wo = &weight[o * c * k * k..][..c * k * k];
        conv_rows(&g, poly, wo, bias.map(|b| b[o]), wide, (oh, owp));
        let dst = &mut out[o * oh * ow..][..oh * ow];
        for (d, src) in dst.chunks_exact_mut(ow).zip(wide.chunks_exact(owp)) {
            d.copy_from_slice(&src[..ow]);
        }
    }
}

/// The sides of an unpadded convolution for [`conv_tile`]: c input channels of h rows,
/// output width ow, kernel k, stride s. The input is column-polyphase: row iy of
/// channel i holds s phase rows of `wd` values, phase rx at ((i·h + iy)·s + rx)·wd, its
/// value q being column s·q + rx of the image row (s = 1: the plain layout, wd its
/// width), so the 8 outputs x … x + 7 of tap kx read 8 consecutive values of phase kx
/// mod s from q = x + kx / s.
#[cfg(target_arch = "x86_64")]
struct ConvGeom1 {
    c: usize,
    h: usize,
    wd: usize,
    ow: usize,
    k: usize,
    s: usize,
}

/// R output rows × NB blocks of 8 columns of one output channel of [`conv2d_s1_avx`],
/// starting at (row, column) `at`: every tap in the order (input channel, ky, kx), a
/// separate multiply and add per tap, the bias last.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn conv_tile<const R: usize, const NB: usize>(
    g: &ConvGeom1,
    input: &[f32],
    wo: &[f32],
    bias: Option<f32>,
    dst: &mut [f32],
    (y0, x0): (usize, usize),
) {
    use std::arch::x86_64::*;
    let (c, h, wd, ow, k, s) = (g.c, g.h, g.wd, g.ow, g.k, g.s);
    assert!(x0 + 8 * NB + (k - 1) / s <= wd && (y0 + R) * ow <= dst.len());
    assert!(((c - 1) * h + (y0 + R - 1) * s + k - 1) * s * wd + s * wd <= input.len());
    let mut acc = [[_mm256_setzero_ps(); NB]; R];
    let mut t = 0;
    for i in 0..c {
        for ky in 0..k {
            for kx in 0..k {
                let wv = _mm256_set1_ps(wo[t]);
                t += 1;
                let (rx, qx) = (kx % s, kx / s);
                for (r, ar) in acc.iter_mut().enumerate() {
                    let base = ((i * h + (y0 + r) * s + ky) * s + rx) * wd + x0 + qx;
                    for (bi, a) in ar.iter_mut().enumerate() {
                        // SAFETY: base + 8·bi + 8 ≤ the row's end (asserted above).
                        let v = _mm256_loadu_ps(input.as_ptr().add(base + 8 * bi));
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, v));
                    }
                }
            }
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        for (bi, a) in ar.iter().enumerate() {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            let at = (y0 + r) * ow + x0 + 8 * bi;
            for (d, v) in dst[at..][..8].iter_mut().zip(lanes) {
                *d = match bias {
                    Some(b) => v + b,
                    None => v,
                };
            }
        }
    }
}

/// Adds the time from its start to its drop to a slot.
struct LayerClock<'a> {
    slot: &'a mut f64,
    t0: std::time::Instant,
}

impl<'a> LayerClock<'a> {
    fn start(slot: &'a mut f64) -> Self {
        LayerClock {
            slot,
            t0: std::time::Instant::now(),
        }
    }
}

impl Drop for LayerClock<'_> {
    fn drop(&mut self) {
        *self.slot += self.t0.elapsed().as_secs_f64();
    }
}

/// A linear layer on the rows of `input` (nb × f) into `out` (nb × n): every weight row
/// against up to four inputs at once, each output exactly [`dot8`] plus the bias.
#[inline(always)]
fn linear_group(l: &BuiltLayer, w: &[f32], input: &[f32], out: &mut [f32]) {
    let (Shape::Vector(f), Shape::Vector(n)) = (l.input, l.output) else {
        unreachable!("linear layers map vectors to vectors (NetSpec::build)")
    };
    let weight = &w[l.weight_offset..][..n * f];
    let bias = l.bias_offset.map(|o| &w[o..][..n]);
    let nb = input.len() / f.max(1);
    let mut d = 0;
    while d + 4 <= nb {
        let x = [
            &input[d * f..][..f],
            &input[(d + 1) * f..][..f],
            &input[(d + 2) * f..][..f],
            &input[(d + 3) * f..][..f],
        ];
        for (k, row) in weight.chunks_exact(f).enumerate() {
            let s = dot8x4_best(row, x);
            for (i, v) in s.into_iter().enumerate() {
                out[(d + i) * n + k] = match bias {
                    Some(b) => v + b[k],
                    None => v,
                };
            }
        }
        d += 4;
    }
    for d in d..nb {
        let x = &input[d * f..][..f];
        for (k, row) in weight.chunks_exact(f).enumerate() {
            let v = dot8(row, x);
            out[d * n + k] = match bias {
                Some(b) => v + b[k],
                None => v,
            };
        }
    }
}

/// One layer with parameters or a pool: `input` its input, `out` its output; `arg`
/// receives each max-pool output's arg-max (an index into `input`) when given.
#[inline(always)]
pub(crate) fn layer_forward<T: Real>(
    l: &BuiltLayer,
    w: &[T],
    input: &[T],
    out: &mut [T],
    arg: Option<&mut [u32]>,
) {
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
            let weight = &w[l.weight_offset..][..co * c * k * k];
            let bias = l.bias_offset.map(|o| &w[o..][..co]);
            conv2d(
                input,
                (c, h, wd),
                weight,
                bias,
                (co, oh, ow),
                (k, stride, padding),
                out,
            );
        }
        (
            Layer::MaxPool2d { kernel_size: k },
            Shape::Image { h, w: wd, .. },
            Shape::Image { h: oh, w: ow, .. },
        ) => pool(input, (h, wd), (oh, ow), k, Pool::Max, out, arg),
        (
            Layer::AvgPool2d { kernel_size: k },
            Shape::Image { h, w: wd, .. },
            Shape::Image { h: oh, w: ow, .. },
        ) => pool(input, (h, wd), (oh, ow), k, Pool::Avg, out, None),
        (Layer::Linear { .. }, Shape::Vector(f), Shape::Vector(n)) => {
            let weight = &w[l.weight_offset..][..n * f];
            let bias = l.bias_offset.map(|o| &w[o..][..n]);
            for (k, (o, row)) in out.iter_mut().zip(weight.chunks_exact(f)).enumerate() {
                let s = dot8(row, input);
                *o = match bias {
                    Some(b) => s + b[k],
                    None => s,
                };
            }
        }
        // `NetSpec::build` admits no other combination.
        _ => unreachable!("layer {:?} on input {:?}", l.layer, l.input),
    }
}

/// Valid range of output positions `x` whose input position `x·stride + kx − padding`
/// lies in `0..side`.
#[inline(always)]
pub(crate) fn valid_range(
    out_side: usize,
    side: usize,
    kx: usize,
    stride: usize,
    padding: usize,
) -> (usize, usize) {
    // x·s + kx ≥ p  ⇔  x ≥ ⌈(p − kx)/s⌉;  x·s + kx − p ≤ side − 1  ⇔  x ≤ ⌊(side − 1 + p − kx)/s⌋.
    let lo = padding.saturating_sub(kx).div_ceil(stride);
    let hi = match (side + padding).checked_sub(kx + 1) {
        Some(top) => (top / stride + 1).min(out_side),
        None => 0,
    };
    (lo, hi.max(lo))
}

/// conv2d with stride and zero padding: `input` c × h × w, `weight` co × c × k × k,
/// `out` co × oh × ow.
#[inline(always)]
fn conv2d<T: Real>(
    input: &[T],
    (c, h, w): (usize, usize, usize),
    weight: &[T],
    bias: Option<&[T]>,
    (co, oh, ow): (usize, usize, usize),
    (k, stride, padding): (usize, usize, usize),
    out: &mut [T],
) {
    for (o, plane) in out.chunks_exact_mut(oh * ow).enumerate().take(co) {
        plane.fill(T::ZERO);
        for i in 0..c {
            for ky in 0..k {
                let (y0, y1) = valid_range(oh, h, ky, stride, padding);
                for kx in 0..k {
                    let (x0, x1) = valid_range(ow, w, kx, stride, padding);
                    let wv = weight[((o * c + i) * k + ky) * k + kx];
                    for y in y0..y1 {
                        let iy = y * stride + ky - padding;
                        let src = &input[(i * h + iy) * w..][..w];
                        let row = &mut plane[y * ow..][..ow];
                        if stride == 1 {
                            // x0 + kx ≥ padding by `valid_range`.
                            let start = x0 + kx - padding;
                            for (d, &s) in row[x0..x1].iter_mut().zip(&src[start..]) {
                                *d += wv * s;
                            }
                        } else {
                            for (x, d) in row.iter_mut().enumerate().take(x1).skip(x0) {
                                *d += wv * src[x * stride + kx - padding];
                            }
                        }
                    }
                }
            }
        }
        if let Some(b) = bias {
            for v in plane.iter_mut() {
                *v += b[o];
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Pool {
    Max,
    Avg,
}

/// Max- or average-pool with window = stride = k over every plane of `input`
/// (planes of h × w → oh × ow, floored). Max takes the first maximum in row-major
/// window order with a strictly-greater scan, a NaN winning its window (PyTorch's CPU
/// `max_pool2d`), and writes its flat index into `input` to `arg` when given; average
/// sums the window row by row and divides by k².
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pool<T: Real>(
    input: &[T],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    k: usize,
    kind: Pool,
    out: &mut [T],
    mut arg: Option<&mut [u32]>,
) {
    let scale = T::from_f64((k * k) as f64);
    let planes = input.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow));
    for (ch, (src, dst)) in planes.enumerate() {
        for y in 0..oh {
            for x in 0..ow {
                let j = y * ow + x;
                match kind {
                    Pool::Max if k == 2 && arg.is_none() => {
                        // The common 2 × 2 window without arg-max, unrolled.
                        let top = &src[2 * y * w + 2 * x..][..2];
                        let bottom = &src[(2 * y + 1) * w + 2 * x..][..2];
                        let mut best = top[0];
                        for v in [top[1], bottom[0], bottom[1]] {
                            if v > best || (v.is_nan() && !best.is_nan()) {
                                best = v;
                            }
                        }
                        dst[j] = best;
                    }
                    Pool::Max => {
                        let mut best = y * k * w + x * k;
                        for ky in 0..k {
                            for kx in 0..k {
                                let idx = (y * k + ky) * w + x * k + kx;
                                let (v, b) = (src[idx], src[best]);
                                if v > b || (v.is_nan() && !b.is_nan()) {
                                    best = idx;
                                }
                            }
                        }
                        dst[j] = src[best];
                        if let Some(a) = arg.as_deref_mut() {
                            // `NetSpec::build` caps a layer's values below 2^31.
                            a[ch * oh * ow + j] = (ch * h * w + best) as u32;
                        }
                    }
                    Pool::Avg => {
                        let mut acc = T::ZERO;
                        for ky in 0..k {
                            for &v in &src[(y * k + ky) * w + x * k..][..k] {
                                acc += v;
                            }
                        }
                        dst[j] = acc / scale;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No members or no images: every share is 0 (no division by a zero total, no
    /// zero-sized chunks).
    #[test]
    fn layer_shares_without_work_are_zero() {
        let layers = crate::model::spec::parse_short("flatten linear(10)").unwrap();
        let spec = NetSpec::build(&layers, Shape::Vector(4), 10).unwrap();
        let w = vec![0.5f32; spec.n_params()];
        assert_eq!(
            spec_layer_shares(&spec, &[], 0, &[0.0; 4], 1).unwrap(),
            [0.0, 0.0]
        );
        assert_eq!(spec_layer_shares(&spec, &w, 1, &[], 0).unwrap(), [0.0, 0.0]);
    }
}
