//! AVX-512 kernels of the forward pass (x86_64, chosen at run time); the layouts and
//! the loop over a work item are in `tiled.rs`.
//!
//! 1. conv1: a vector holds 16 pooled positions (144 = 9 vectors); tile 5 output
//!    channels × 4 pool quadrants = 20 zmm accumulators; per tap 4 vector loads and 5
//!    weight broadcasts feed 20 FMAs.
//! 2. conv2: 20 × 64 = 4 vectors of 16 positions per channel (rows 2v, 2v+1); tile
//!    5 channels × 4 vectors = 20 accumulators; per tap 4 loads and 5 broadcasts feed
//!    20 FMAs.
//! 3. fc1: 10 zmm accumulators, `_mm512_reduce_add_ps` at the end.
//!
//! The activations use a vector `exp` (Cephes polynomial, about 2 ulp); logistic is
//! `1 / (1 + e^−x)`, tanh is `sign(x)·(1 − e)/(1 + e)` with `e = e^{−2|x|}`
//! (absolute error about 1e-7, relative error larger only for |x| ≲ 1e-3).

use std::arch::x86_64::*;

use super::tiled::{conv1_offset, Simd, A1_LEN, C2_LEN, S_LEN, S_PLANE, U_LEN};
use crate::model::{Activation, C1, C2, CLASSES};

/// Proof that the running CPU has AVX-512F (only [`Avx512::detect`] makes one).
#[derive(Clone, Copy)]
pub(super) struct Avx512(());

impl Avx512 {
    /// `Some` when the CPU supports AVX-512F.
    pub(super) fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx512f").then_some(Avx512(()))
    }
}

impl Simd for Avx512 {
    fn conv1_pool_act(self, act: Activation, u: &[f32], w1: &[f32], a1: &mut [f32]) {
        // SAFETY: `self` proves AVX-512F is available.
        unsafe { conv1_pool_act(act, u, w1, a1) }
    }
    fn conv2(self, act: Option<Activation>, s: &[f32], w2: &[f32], c2: &mut [f32]) {
        // SAFETY: as above.
        unsafe { conv2(act, s, w2, c2) }
    }
    fn fc(self, feat: &[f32], wf: &[f32], logits: &mut [f32]) {
        // SAFETY: as above.
        unsafe { fc(feat, wf, logits) }
    }
    fn act_in_place(self, act: Activation, buf: &mut [f32]) {
        // SAFETY: as above.
        unsafe { act_in_place(act, buf) }
    }
}

/// See [`Simd::act_in_place`].
#[target_feature(enable = "avx512f")]
fn act_in_place(act: Activation, buf: &mut [f32]) {
    assert!(buf.len().is_multiple_of(16));
    for v in buf.chunks_exact_mut(16) {
        // SAFETY: `v` holds 16 floats.
        unsafe {
            let a = act16(act, _mm512_loadu_ps(v.as_ptr()));
            _mm512_storeu_ps(v.as_mut_ptr(), a);
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
                        let off = conv1_offset(q, ky, kx, 16 * v);
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
    // Beyond ±100 every activation built on it is saturated (e^−100 ≈ 3.7e−44 is
    // returned for smaller x, not 0); the clamp keeps n·ln2 exact.
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
