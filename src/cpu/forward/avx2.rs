//! AVX2 + FMA kernels of the forward pass (x86_64 CPUs without AVX-512, chosen at run
//! time); the layouts and the loop over a work item are in `tiled.rs`.
//!
//! AVX2 has 16 ymm registers of 8 floats (AVX-512: 32 of 16), so the tiles are smaller
//! than in `avx512.rs`:
//! 1. conv1: a vector holds 8 pooled positions (144 = 18 vectors); tile 2 output
//!    channels × 4 pool quadrants = 8 accumulators; per tap 4 vector loads and 2 weight
//!    broadcasts feed 8 FMAs (14 registers live).
//! 2. conv2: 20 × 64 = 8 vectors of 8 positions (one output row each) per channel;
//!    tile 5 channels × 2 vectors = 10 accumulators; per tap 2 loads and 5 broadcasts
//!    feed 10 FMAs (13 registers live).
//! 3. fc1: 10 ymm accumulators, reduced in a fixed order at the end.
//!
//! The activations use the same Cephes `exp` polynomial as `avx512.rs`; without
//! `scalef`, the scaling by 2^n is two exact multiplications by 2^⌊n/2⌋ and
//! 2^(n − ⌊n/2⌋), which gives the same overflow to +inf and gradual underflow to 0.

use std::arch::x86_64::*;

use super::tiled::{conv1_offset, Simd, A1_LEN, C2_LEN, S_LEN, S_PLANE, U_LEN};
use crate::model::{Activation, C1, C2, CLASSES};

/// Proof that the running CPU has AVX2 and FMA (only [`Avx2::detect`] makes one).
#[derive(Clone, Copy)]
pub(super) struct Avx2(());

impl Avx2 {
    /// `Some` when the CPU supports AVX2 and FMA.
    pub(super) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Avx2(()))
    }
}

impl Simd for Avx2 {
    fn conv1_pool_act(self, act: Activation, u: &[f32], w1: &[f32], a1: &mut [f32]) {
        // SAFETY: `self` proves AVX2 and FMA are available.
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

/// See [`Simd::conv1_pool_act`].
#[target_feature(enable = "avx2,fma")]
fn conv1_pool_act(act: Activation, u: &[f32], w1: &[f32], a1: &mut [f32]) {
    assert!(u.len() == U_LEN && w1.len() == C1 * 25 && a1.len() == A1_LEN);
    let up = u.as_ptr();
    for g in 0..C1 / 2 {
        for v in 0..18 {
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            for ky in 0..5 {
                for kx in 0..5 {
                    let mut xin = [_mm256_setzero_ps(); 4];
                    for (q, xq) in xin.iter_mut().enumerate() {
                        let off = conv1_offset(q, ky, kx, 8 * v);
                        // SAFETY: off + 8 ≤ 11·168 + 2·12 + 17·8 + 8 = 2016 = u.len().
                        *xq = unsafe { _mm256_loadu_ps(up.add(off)) };
                    }
                    for (c, accc) in acc.iter_mut().enumerate() {
                        let wb = _mm256_set1_ps(w1[(2 * g + c) * 25 + ky * 5 + kx]);
                        for (a, xq) in accc.iter_mut().zip(&xin) {
                            *a = _mm256_fmadd_ps(wb, *xq, *a);
                        }
                    }
                }
            }
            for (c, accc) in acc.iter().enumerate() {
                let m = _mm256_max_ps(
                    _mm256_max_ps(accc[0], accc[1]),
                    _mm256_max_ps(accc[2], accc[3]),
                );
                let dst = &mut a1[(2 * g + c) * 144 + 8 * v..][..8];
                // SAFETY: `dst` holds 8 floats.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), act8(act, m)) };
            }
        }
    }
}

/// See [`Simd::conv2`].
#[target_feature(enable = "avx2,fma")]
fn conv2(act: Option<Activation>, s: &[f32], w2: &[f32], c2: &mut [f32]) {
    assert!(s.len() == S_LEN && w2.len() == C2 * 250 && c2.len() == C2_LEN);
    let sp = s.as_ptr();
    for g in 0..C2 / 5 {
        let wg = &w2[g * 5 * 250..][..5 * 250];
        for h in 0..4 {
            let mut acc = [[_mm256_setzero_ps(); 2]; 5];
            for i in 0..C1 {
                for ky in 0..5 {
                    for kx in 0..5 {
                        let base = (i * 5 + kx) * S_PLANE + ky * 8 + 16 * h;
                        // SAFETY: base + 16 ≤ 49·96 + 32 + 48 + 16 = 4800 = s.len().
                        let xin = unsafe {
                            [
                                _mm256_loadu_ps(sp.add(base)),
                                _mm256_loadu_ps(sp.add(base + 8)),
                            ]
                        };
                        let k = i * 25 + ky * 5 + kx;
                        for (c, accc) in acc.iter_mut().enumerate() {
                            let wb = _mm256_set1_ps(wg[c * 250 + k]);
                            for (a, xv) in accc.iter_mut().zip(&xin) {
                                *a = _mm256_fmadd_ps(wb, *xv, *a);
                            }
                        }
                    }
                }
            }
            for (c, accc) in acc.iter().enumerate() {
                for (v, a) in accc.iter().enumerate() {
                    let r = match act {
                        Some(act) => act8(act, *a),
                        None => *a,
                    };
                    let dst = &mut c2[(5 * g + c) * 64 + 16 * h + 8 * v..][..8];
                    // SAFETY: `dst` holds 8 floats.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), r) };
                }
            }
        }
    }
}

/// See [`Simd::fc`].
#[target_feature(enable = "avx2,fma")]
fn fc(feat: &[f32], wf: &[f32], logits: &mut [f32]) {
    let nf = feat.len();
    assert!(nf.is_multiple_of(8) && wf.len() == CLASSES * nf && logits.len() == CLASSES);
    let mut acc = [_mm256_setzero_ps(); CLASSES];
    for f in (0..nf).step_by(8) {
        // SAFETY: f + 8 ≤ nf = feat.len(), and k·nf + f + 8 ≤ 10·nf = wf.len().
        unsafe {
            let xv = _mm256_loadu_ps(feat.as_ptr().add(f));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(wf.as_ptr().add(k * nf + f)), xv, *a);
            }
        }
    }
    for (l, a) in logits.iter_mut().zip(&acc) {
        *l = hsum8(*a);
    }
}

/// See [`Simd::act_in_place`].
#[target_feature(enable = "avx2,fma")]
fn act_in_place(act: Activation, buf: &mut [f32]) {
    assert!(buf.len().is_multiple_of(8));
    for v in buf.chunks_exact_mut(8) {
        // SAFETY: `v` holds 8 floats.
        unsafe {
            let a = act8(act, _mm256_loadu_ps(v.as_ptr()));
            _mm256_storeu_ps(v.as_mut_ptr(), a);
        }
    }
}

/// Sum of 8 lanes in a fixed order: (lo + hi) pairwise, then within the 4 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8(x: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    _mm_cvtss_f32(s1)
}

/// The activation on 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn act8(act: Activation, x: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    let sign_bit = _mm256_set1_ps(-0.0);
    match act {
        // `max(x, 0)` returns its second operand (0) for a NaN x, like `f32::max`.
        Activation::Relu => _mm256_max_ps(x, _mm256_setzero_ps()),
        Activation::Logistic => {
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            _mm256_div_ps(one, _mm256_add_ps(one, e))
        }
        Activation::Tanh => {
            let abs = _mm256_andnot_ps(sign_bit, x);
            let e = exp8(_mm256_mul_ps(abs, _mm256_set1_ps(-2.0)));
            let t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
            _mm256_or_ps(t, _mm256_and_ps(x, sign_bit))
        }
    }
}

/// 2^k for integer lanes k ∈ [−126, 127] (built from the exponent bits).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn pow2i(k: __m256i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        k,
        _mm256_set1_epi32(127),
    )))
}

/// e^x on 8 lanes (Cephes `expf`: x = n·ln2 + r, |r| ≤ ln2/2, degree-6 polynomial,
/// scaled by 2^n in two exact steps, see the module notes). NaN propagates.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    // Beyond ±104 the result is already inf or 0 (e^−104 < 2^−150); the clamp keeps
    // n·ln2 exact and |n| ≤ 151, so both halves of n stay within the normal exponents.
    // The NaN-propagating operand order: min/max return their second operand on NaN.
    let x = _mm256_max_ps(
        _mm256_set1_ps(-104.0),
        _mm256_min_ps(_mm256_set1_ps(104.0), x),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // For a NaN x, `n` converts to i32::MIN and the scale is meaningless, but `e` is
    // already NaN and stays NaN.
    let ni = _mm256_cvtps_epi32(n);
    let n1 = _mm256_srai_epi32::<1>(ni);
    let n2 = _mm256_sub_epi32(ni, n1);
    _mm256_mul_ps(_mm256_mul_ps(e, pow2i(n1)), pow2i(n2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on 8 lanes of `x` (only on CPUs with AVX2 and FMA).
    fn lanes(x: [f32; 8], f: impl Fn(__m256) -> __m256) -> [f32; 8] {
        let mut out = [0.0f32; 8];
        // SAFETY: only called after `Avx2::detect` succeeded; 8 floats each way.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), f(_mm256_loadu_ps(x.as_ptr()))) };
        out
    }

    /// The vector exp against f64 over its whole range: relative error within 4 ulp
    /// (2^-21; the polynomial is about 2 ulp, the two-step scaling is exact for normal
    /// results) while the result is normal, absolute 2^-149 (one subnormal step) below,
    /// +inf above f32's range, NaN kept.
    #[test]
    fn exp8_matches_f64_exp_over_the_whole_range() {
        if Avx2::detect().is_none() {
            eprintln!("no AVX2 + FMA on this CPU; nothing to check");
            return;
        }
        let mut xs: Vec<f32> = (-2200..=2200).map(|i| i as f32 * 0.047_3).collect();
        xs.extend([-150.0, -103.9, -88.0, 88.5, 88.8, 103.9, 150.0, 0.0, -0.0]);
        xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE]);
        for chunk in xs.chunks(8) {
            let mut x = [0.0f32; 8];
            x[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: AVX2 + FMA detected above.
            let got = lanes(x, |v| unsafe { exp8(v) });
            for (&xi, &g) in x.iter().zip(&got) {
                let want = (xi as f64).exp();
                if want > f32::MAX as f64 {
                    assert_eq!(g, f32::INFINITY, "exp({xi})");
                } else if want < f32::MIN_POSITIVE as f64 {
                    assert!(
                        (g as f64 - want).abs() <= 2f64.powi(-149),
                        "exp({xi}) = {g}"
                    );
                } else {
                    let rel = (g as f64 - want).abs() / want;
                    assert!(rel <= 2f64.powi(-21), "exp({xi}) = {g}, want {want}");
                }
            }
        }
        // SAFETY: as above.
        let nan = lanes([f32::NAN; 8], |v| unsafe { exp8(v) });
        assert!(nan.iter().all(|v| v.is_nan()), "{nan:?}");
    }

    /// The three activations against [`Activation::apply`], signs and saturation
    /// included; tanh keeps the sign of −0.
    #[test]
    fn act8_matches_the_scalar_activations() {
        if Avx2::detect().is_none() {
            return;
        }
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.13).collect();
        for act in [Activation::Logistic, Activation::Relu, Activation::Tanh] {
            for chunk in xs.chunks_exact(8) {
                let x: [f32; 8] = chunk.try_into().unwrap();
                // SAFETY: AVX2 + FMA detected above.
                let got = lanes(x, |v| unsafe { act8(act, v) });
                for (&xi, &g) in x.iter().zip(&got) {
                    let want = act.apply(xi);
                    assert!((g - want).abs() <= 2e-7, "{act:?}({xi}) = {g}, want {want}");
                }
            }
            // SAFETY: as above.
            let relu_nan = lanes([f32::NAN; 8], |v| unsafe { act8(Activation::Relu, v) });
            assert_eq!(relu_nan, [0.0; 8], "relu(NaN) is 0 like f32::max");
        }
        // SAFETY: as above.
        let t = lanes([-0.0; 8], |v| unsafe { act8(Activation::Tanh, v) });
        assert!(t.iter().all(|v| *v == 0.0 && v.is_sign_negative()), "{t:?}");
    }

    /// The fixed-order lane sum.
    #[test]
    fn hsum8_adds_every_lane() {
        if Avx2::detect().is_none() {
            return;
        }
        let x = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
        // SAFETY: AVX2 + FMA detected above; `x` holds 8 floats.
        let got = unsafe { hsum8(_mm256_loadu_ps(x.as_ptr())) };
        assert_eq!(got, 255.0);
    }
}
