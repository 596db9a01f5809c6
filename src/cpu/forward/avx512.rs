//! AVX-512 kernels of the forward pass (x86_64, chosen at run time).
//!
//! Per work item (see the parent module): the item's images are rearranged once into
//! "phase planes" shared by all its members; then for each member and image:
//!
//! 1. conv1 + max-pool + activation, fused in registers. The pooled map is 10 × 12 × 12
//!    = 10 × 144 = 10 × 9 vectors of 16. For one vector of 16 pooled positions
//!    j = py·12 + px the kernel accumulates the 4 pool quadrants (dy, dx) of 5 output
//!    channels: 20 zmm accumulators; per tap 4 vector loads and 5 weight broadcasts feed
//!    20 FMAs. Then max over quadrants, activation, store.
//!    Phase planes make every load contiguous: `U[a, t][r·12 + px] = x[2r + a][2px + t]`
//!    (a ∈ {0,1}, t ∈ 0..6, r ∈ 0..14; 12 planes × 168 floats), so the conv1 input for
//!    quadrant (dy, dx), tap (ky, kx) at all j is `U[s & 1, t][(s >> 1)·12 + j]` with
//!    s = dy + ky, t = dx + kx.
//! 2. conv2 (+ activation for [`Arch::Paper`]). The output is 20 × 64: 4 vectors of 16
//!    positions p = y·8 + x (rows 2v, 2v+1). Shifted copies of the pooled map,
//!    `S[i, kx][r·8 + x] = a1[i][r][x + kx]` (10 × 5 × 96 floats), make the input of tap
//!    (i, ky, kx) at all p the contiguous `S[i, kx][ky·8 + p]`. Tile: 5 channels × 4
//!    vectors = 20 accumulators; per tap 4 loads and 5 broadcasts feed 20 FMAs.
//! 3. [`Arch::Pooled`]: scalar max-pool then vector activation.
//! 4. fc1: 10 vector accumulators over the features, then a fixed-order lane reduction.
//!
//! Every (member, image) pair runs the same instruction sequence wherever it lies in a
//! work item, so results do not depend on the split or the thread count.
//!
//! The activations use a vector `exp` (Cephes polynomial, about 2 ulp); logistic is
//! `1 / (1 + e^−x)`, tanh is `sign(x)·(1 − e)/(1 + e)` with `e = e^{−2|x|}`
//! (absolute error about 1e-7, relative error larger only for |x| ≲ 1e-3).

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{maxpool2, work_items, Item, CHUNK_IMAGES};
use crate::model::{Activation, Arch, Net, C1, C2, CLASSES, H2, IMG, IMG_PIXELS, P1};

/// Proof that the running CPU has AVX-512F (only [`Avx512::detect`] makes one).
#[derive(Clone, Copy)]
pub(super) struct Avx512(());

impl Avx512 {
    /// `Some` when the CPU supports AVX-512F.
    pub(super) fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx512f").then_some(Avx512(()))
    }
}

/// Floats of one image's phase planes: 12 planes of 14 × 12.
const U_PLANE: usize = 14 * P1;
const U_LEN: usize = 12 * U_PLANE;
/// Floats of one shifted copy of a pooled conv1 channel: 12 rows × 8.
const S_PLANE: usize = P1 * H2;
const S_LEN: usize = C1 * 5 * S_PLANE;
/// Pooled conv1 map, conv2 map.
const A1_LEN: usize = C1 * P1 * P1;
const C2_LEN: usize = C2 * H2 * H2;

/// Per-thread scratch.
struct Scratch {
    u: Vec<f32>,
    a1: Vec<f32>,
    s: Vec<f32>,
    c2: Vec<f32>,
    p2: Vec<f32>,
}

/// The vectorised ensemble forward; shapes checked by the caller, both counts > 0.
pub(super) fn ensemble_forward(
    token: Avx512,
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
                p2: vec![0.0; C2 * 16],
            },
            // SAFETY: `token` proves AVX-512F is available.
            |s, mut item| unsafe { run_item(token, net, weights, x, s, &mut item) },
        );
}

/// Computes one work item.
///
/// # Safety
/// The CPU must support AVX-512F (the token). Buffer lengths are as checked by
/// `check_shapes`; every kernel asserts the lengths it relies on.
#[target_feature(enable = "avx512f")]
unsafe fn run_item(
    _token: Avx512,
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
            conv1_pool_act(net.act, &s.u[d * U_LEN..][..U_LEN], w1, &mut s.a1);
            shifted_copies(&s.a1, &mut s.s);
            let logits = &mut o[d * CLASSES..][..CLASSES];
            match net.arch {
                Arch::Paper => {
                    conv2(Some(net.act), &s.s, w2, &mut s.c2);
                    fc(&s.c2, wf, logits);
                }
                Arch::Pooled => {
                    conv2(None, &s.s, w2, &mut s.c2);
                    maxpool2(&s.c2, H2, H2, &mut s.p2);
                    for v in s.p2.chunks_exact_mut(16) {
                        let a = act16(net.act, _mm512_loadu_ps(v.as_ptr()));
                        _mm512_storeu_ps(v.as_mut_ptr(), a);
                    }
                    fc(&s.p2, wf, logits);
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

/// conv1 → max-pool → activation for one image: `u` its phase planes, `w1` 10 × 25,
/// `a1` 10 × 144 (pooled, activated).
#[target_feature(enable = "avx512f")]
fn conv1_pool_act(act: Activation, u: &[f32], w1: &[f32], a1: &mut [f32]) {
    assert!(u.len() == U_LEN && w1.len() == C1 * 25 && a1.len() == A1_LEN);
    let up = u.as_ptr();
    for g in 0..2 {
        for v in 0..9 {
            let mut acc = [[_mm512_setzero_ps(); 4]; 5];
            for ky in 0..5 {
                for kx in 0..5 {
                    let mut xin = [_mm512_setzero_ps(); 4];
                    for (q, xq) in xin.iter_mut().enumerate() {
                        let (sy, t) = (q / 2 + ky, q % 2 + kx);
                        let off = ((sy & 1) * 6 + t) * U_PLANE + (sy >> 1) * P1 + 16 * v;
                        // SAFETY: off + 16 ≤ 11·168 + 2·12 + 8·16 + 16 = 2016 = u.len().
                        *xq = unsafe { _mm512_loadu_ps(up.add(off)) };
                    }
                    for (c, accc) in acc.iter_mut().enumerate() {
                        let wb = _mm512_set1_ps(w1[(5 * g + c) * 25 + ky * 5 + kx]);
                        for (a, xq) in accc.iter_mut().zip(&xin) {
                            *a = _mm512_fmadd_ps(wb, *xq, *a);
                        }
                    }
                }
            }
            for (c, accc) in acc.iter().enumerate() {
                let m = _mm512_max_ps(
                    _mm512_max_ps(accc[0], accc[1]),
                    _mm512_max_ps(accc[2], accc[3]),
                );
                let dst = &mut a1[(5 * g + c) * 144 + 16 * v..][..16];
                // SAFETY: `dst` holds 16 floats.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), act16(act, m)) };
            }
        }
    }
}

/// conv2 for one image: `s` the shifted copies, `w2` 20 × 250, `c2` 20 × 64; the
/// activation is applied when `act` is `Some`.
#[target_feature(enable = "avx512f")]
fn conv2(act: Option<Activation>, s: &[f32], w2: &[f32], c2: &mut [f32]) {
    assert!(s.len() == S_LEN && w2.len() == C2 * 250 && c2.len() == C2_LEN);
    let sp = s.as_ptr();
    for g in 0..4 {
        let wg = &w2[g * 5 * 250..][..5 * 250];
        let mut acc = [[_mm512_setzero_ps(); 4]; 5];
        for i in 0..C1 {
            for ky in 0..5 {
                for kx in 0..5 {
                    let base = (i * 5 + kx) * S_PLANE + ky * 8;
                    let mut xin = [_mm512_setzero_ps(); 4];
                    for (v, xv) in xin.iter_mut().enumerate() {
                        // SAFETY: base + 16v + 16 ≤ 49·96 + 32 + 64 = 4800 = s.len().
                        *xv = unsafe { _mm512_loadu_ps(sp.add(base + 16 * v)) };
                    }
                    let k = i * 25 + ky * 5 + kx;
                    for (c, accc) in acc.iter_mut().enumerate() {
                        let wb = _mm512_set1_ps(wg[c * 250 + k]);
                        for (a, xv) in accc.iter_mut().zip(&xin) {
                            *a = _mm512_fmadd_ps(wb, *xv, *a);
                        }
                    }
                }
            }
        }
        for (c, accc) in acc.iter().enumerate() {
            for (v, a) in accc.iter().enumerate() {
                let r = match act {
                    Some(act) => act16(act, *a),
                    None => *a,
                };
                let dst = &mut c2[(5 * g + c) * 64 + 16 * v..][..16];
                // SAFETY: `dst` holds 16 floats.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), r) };
            }
        }
    }
}

/// fc1: `logits[k] = Σ_f wf[k, f] · feat[f]`, `feat` F (a multiple of 16), `wf` 10 × F.
#[target_feature(enable = "avx512f")]
fn fc(feat: &[f32], wf: &[f32], logits: &mut [f32]) {
    let nf = feat.len();
    assert!(nf.is_multiple_of(16) && wf.len() == CLASSES * nf && logits.len() == CLASSES);
    let mut acc = [_mm512_setzero_ps(); CLASSES];
    for f in (0..nf).step_by(16) {
        // SAFETY: f + 16 ≤ nf = feat.len(), and k·nf + f + 16 ≤ 10·nf = wf.len().
        unsafe {
            let xv = _mm512_loadu_ps(feat.as_ptr().add(f));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(wf.as_ptr().add(k * nf + f)), xv, *a);
            }
        }
    }
    for (l, a) in logits.iter_mut().zip(&acc) {
        *l = _mm512_reduce_add_ps(*a);
    }
}

/// The activation on 16 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn act16(act: Activation, x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    match act {
        // `max(x, 0)` returns its second operand (0) for a NaN x, like `f32::max`.
        Activation::Relu => _mm512_max_ps(x, _mm512_setzero_ps()),
        Activation::Logistic => {
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            _mm512_div_ps(one, _mm512_add_ps(one, e))
        }
        Activation::Tanh => {
            let e = exp16(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-2.0)));
            let t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
            let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
            _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign))
        }
    }
}

/// e^x on 16 lanes (Cephes `expf`: x = n·ln2 + r, |r| ≤ ln2/2, degree-6 polynomial,
/// scaled by 2^n with `scalef`, which also produces the overflow to +inf and the
/// gradual underflow to 0). NaN propagates.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    // Beyond ±100 the result is already inf or 0; the clamp keeps n·ln2 exact.
    // The NaN-propagating operand order: min/max return their second operand on NaN.
    let x = _mm512_max_ps(
        _mm512_set1_ps(-100.0),
        _mm512_min_ps(_mm512_set1_ps(100.0), x),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(e, n)
}
