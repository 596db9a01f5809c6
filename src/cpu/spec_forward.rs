//! The forward pass of a layer-spec network ([`NetSpec`]) on the CPU, every member on
//! every image.
//!
//! Shapes: `weights` J × P (P = [`NetSpec::n_params`], `Sequential` order), `x` B × n_in
//! (n_in = the spec's input length, C × H × W row-major per image), `out` J × B × n_out.
//! Work split: one (member, image) pair per rayon task, computed start to finish by one
//! thread in a fixed order, so the result is bit-identical for any thread count.
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
    check_len(
        "spec_forward weights (members × P)",
        weights.len(),
        members.saturating_mul(p),
    )?;
    check_len(
        "spec_forward x (images × inputs)",
        x.len(),
        images.saturating_mul(n_in),
    )?;
    check_len(
        "spec_forward out (members × images × outputs)",
        out.len(),
        members.saturating_mul(images).saturating_mul(n_out),
    )?;
    if members == 0 || images == 0 {
        return Ok(());
    }
    let scratch = spec.max_activation_len();
    out.par_chunks_mut(n_out).enumerate().for_each_init(
        || (vec![0.0f32; scratch], vec![0.0f32; scratch]),
        |(a, b), (t, o)| {
            let (m, d) = (t / images, t % images);
            let w = &weights[m * p..][..p];
            let input = &x[d * n_in..][..n_in];
            forward_one(spec, w, input, a, b, o);
        },
    );
    Ok(())
}

/// One member (`w`: P weights) on one input; `a`, `b` scratch of
/// [`NetSpec::max_activation_len`] values each.
fn forward_one(
    spec: &NetSpec,
    w: &[f32],
    input: &[f32],
    a: &mut [f32],
    b: &mut [f32],
    out: &mut [f32],
) {
    a[..input.len()].copy_from_slice(input);
    let (mut cur, mut next) = (a, b);
    for l in spec.layers() {
        let (n_in, n_out) = (l.input.len(), l.output.len());
        match l.layer {
            Layer::Act(act) => {
                for v in &mut cur[..n_in] {
                    *v = act.apply(*v);
                }
                continue;
            }
            Layer::Flatten => continue,
            _ => layer_forward(l, w, &cur[..n_in], &mut next[..n_out], None),
        }
        std::mem::swap(&mut cur, &mut next);
    }
    out.copy_from_slice(&cur[..out.len()]);
}

/// One layer with parameters or a pool: `input` its input, `out` its output; `arg`
/// receives each max-pool output's arg-max (an index into `input`) when given.
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

/// The dot product of `a` and `b` (equal lengths) in the fixed order of the module
/// notes: 8 interleaved partial sums, a pairwise tree, then the tail.
pub fn dot8<T: Real>(a: &[T], b: &[T]) -> T {
    let n8 = a.len() / 8 * 8;
    let mut s = [T::ZERO; 8];
    for (wa, wb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for k in 0..8 {
            s[k] += wa[k] * wb[k];
        }
    }
    let mut total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (&x, &y) in a[n8..].iter().zip(&b[n8..]) {
        total += x * y;
    }
    total
}

/// Valid range of output positions `x` whose input position `x·stride + kx − padding`
/// lies in `0..side`.
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
