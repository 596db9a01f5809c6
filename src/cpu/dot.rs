//! The fixed-order f32 dot products of the CPU's layer-spec forward pass
//! ([`crate::cpu::spec_forward`]): 8 interleaved partial sums over the first ⌊n/8⌋·8
//! terms (`s_k` over the indices i ≡ k mod 8, in index order), added as
//! ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), then the remaining terms in order.
//! The four-input variants share the loads of `a` and give each result bit-identical to
//! [`dot8`] (separate multiply and add, never FMA), so the thread count and the CPU's
//! vector width do not change a sum.

use crate::cpu::backprop::Real;

/// The dot product of `a` and `b` (equal lengths) in the fixed order of the module
/// notes: 8 interleaved partial sums, a pairwise tree, then the tail.
#[inline(always)]
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

/// [`dot8x4`] with AVX when the CPU has it.
#[inline(always)]
pub(crate) fn dot8x4_best(a: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot8x4_avx(a, x) };
    }
    dot8x4(a, x)
}

/// [`dot8x4`] in AVX registers: one 8-lane register of partial sums per input, updated
/// with a separate multiply and add (not FMA), so every lane rounds exactly as the
/// scalar `s[k] += a[k] * x[k]`; then the same tree and tail. Bit-identical to
/// [`dot8x4`] and to [`dot8`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot8x4_avx(a: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = a.len();
    for xi in &x {
        assert_eq!(xi.len(), n, "dot8x4_avx: unequal lengths");
    }
    let n8 = n / 8 * 8;
    let mut s = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 ≤ n8 ≤ n = len of a and of every x[j] (asserted above).
        let wa = _mm256_loadu_ps(a.as_ptr().add(i));
        for (sj, xj) in s.iter_mut().zip(&x) {
            let xv = _mm256_loadu_ps(xj.as_ptr().add(i));
            *sj = _mm256_add_ps(*sj, _mm256_mul_ps(wa, xv));
        }
        i += 8;
    }
    let mut r = [0.0f32; 4];
    for ((rj, sj), xj) in r.iter_mut().zip(&s).zip(&x) {
        let mut l = [0.0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), *sj);
        let mut total = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        for (&p, &q) in a[n8..].iter().zip(&xj[n8..]) {
            total += p * q;
        }
        *rj = total;
    }
    r
}

/// Four [`dot8`]s of `a` with the four `x`, sharing the loads of `a`; each result is
/// bit-identical to `dot8(a, x[i])`.
#[inline(always)]
pub(crate) fn dot8x4(a: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let n8 = a.len() / 8 * 8;
    let mut s = [[0.0f32; 8]; 4];
    let lanes = a[..n8]
        .chunks_exact(8)
        .zip(x[0][..n8].chunks_exact(8))
        .zip(x[1][..n8].chunks_exact(8))
        .zip(x[2][..n8].chunks_exact(8))
        .zip(x[3][..n8].chunks_exact(8));
    for ((((wa, x0), x1), x2), x3) in lanes {
        for k in 0..8 {
            s[0][k] += wa[k] * x0[k];
            s[1][k] += wa[k] * x1[k];
            s[2][k] += wa[k] * x2[k];
            s[3][k] += wa[k] * x3[k];
        }
    }
    let mut r = [0.0f32; 4];
    for ((ri, si), xi) in r.iter_mut().zip(&s).zip(&x) {
        let mut total = ((si[0] + si[1]) + (si[2] + si[3])) + ((si[4] + si[5]) + (si[6] + si[7]));
        for (&p, &q) in a[n8..].iter().zip(&xi[n8..]) {
            total += p * q;
        }
        *ri = total;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The grouped dot products (portable and AVX) are bit-identical to [`dot8`] for
    /// lengths with and without a tail; a sum in another order differs in the last
    /// bits for most of these inputs, so the check can fail.
    #[test]
    fn grouped_dot_products_equal_dot8_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for n in [0, 1, 7, 8, 9, 31, 32, 100, 784] {
            let mut v = || {
                (0..n)
                    .map(|_| rng.random::<f32>() - 0.5)
                    .collect::<Vec<_>>()
            };
            let a = v();
            let xs = [v(), v(), v(), v()];
            let x = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            let want: Vec<u32> = x.iter().map(|xi| dot8(&a, xi).to_bits()).collect();
            let bits = |r: [f32; 4]| r.map(f32::to_bits).to_vec();
            assert_eq!(bits(dot8x4(&a, x)), want, "portable, n = {n}");
            assert_eq!(bits(dot8x4_best(&a, x)), want, "best, n = {n}");
        }
    }
}
