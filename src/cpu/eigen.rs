//! Symmetric eigendecomposition in f64 on the CPU: Householder reduction to tridiagonal
//! form and the implicit QL algorithm with eigenvectors (the EISPACK `tred2` / `tql2`
//! pair, as in JAMA's public-domain `EigenvalueDecomposition`). The CPU twin of
//! cuSOLVER's `syevd` for [`crate::backend::Backend::sym_eigen_f64`]: the same
//! decomposition up to the signs (and, for repeated eigenvalues, the bases) of the
//! eigenvectors, which the transform update's matrix functions do not see.
//!
//! Cost: 4n³/3 for the reduction, about 3n³ for the rotations (n = 640: about a second on
//! one core). With a system BLAS selected (`--blas`, `cpu::blas`) its LAPACK `dsyevd`
//! runs instead (same contract; README "The CPU products"). The rotations act on rows of the transposed eigenvector matrix, contiguous
//! in memory.

use crate::backend::check_len;
use crate::{Error, Result};

/// Eigen-decomposes the symmetric row-major n × n matrix `a` (only its values are read;
/// it must be symmetric). Returns the eigenvalues in ascending order; `a` is overwritten
/// by Q, whose row k is the unit eigenvector of eigenvalue k (so the input is
/// Qᵀ diag(λ) Q).
///
/// Errors: [`Error::Shape`] on the length; [`Error::Config`] when QL does not converge
/// within 30 · n iterations (not expected for a finite matrix; a NaN input reports it).
pub fn sym_eigen_f64(a: &mut [f64], n: usize) -> Result<Vec<f64>> {
    check_len("sym_eigen_f64 matrix", a.len(), n * n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err(Error::Config(
            "sym_eigen_f64: the matrix holds NaN or infinite values".into(),
        ));
    }
    // The selected system LAPACK when there is one (`cpu::blas`): blocked, threaded.
    if let Some(r) = crate::cpu::blas::dsyevd(a, n) {
        return r;
    }
    let mut d = vec![0.0f64; n];
    let mut e = vec![0.0f64; n];
    // v[i * n + j] = V[i][j]; V's columns become the eigenvectors.
    let v = a;
    tred2(v, n, &mut d, &mut e);
    // W = Vᵀ: the rotations of tql2 then touch two contiguous rows.
    for i in 0..n {
        for j in i + 1..n {
            v.swap(i * n + j, j * n + i);
        }
    }
    tql2(v, n, &mut d, &mut e)?;
    Ok(d)
}

/// Householder tridiagonalisation (JAMA `tred2`): V (row-major, the input on entry) is
/// overwritten by the orthogonal transformation, `d` gets the diagonal, `e` the
/// subdiagonal (e[0] = 0).
#[allow(clippy::needless_range_loop)]
fn tred2(v: &mut [f64], n: usize, d: &mut [f64], e: &mut [f64]) {
    let at = |i: usize, j: usize| i * n + j;
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for k in 0..i {
            scale += d[k].abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
                v[at(j, i)] = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for j in 0..i {
                e[j] = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[at(j, i)] = f;
                g = e[j] + v[at(j, j)] * f;
                for k in j + 1..i {
                    g += v[at(k, j)] * d[k];
                    e[k] += v[at(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[at(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        v[at(n - 1, i)] = v[at(i, i)];
        v[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[at(k, i + 1)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[at(k, i + 1)] * v[at(k, j)];
                }
                for k in 0..=i {
                    v[at(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[at(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
        v[at(n - 1, j)] = 0.0;
    }
    v[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL on the tridiagonal (d, e) (JAMA `tql2`), rotating the rows of W = Vᵀ
/// (row k of W = column k of V); sorts the eigenvalues ascending with their rows.
fn tql2(w: &mut [f64], n: usize, d: &mut [f64], e: &mut [f64]) -> Result<()> {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0f64;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    let mut budget = 30 * n;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            loop {
                if budget == 0 {
                    return Err(Error::Config(
                        "sym_eigen_f64: the QL iteration did not converge".into(),
                    ));
                }
                budget -= 1;
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (lo, hi) = w.split_at_mut((i + 1) * n);
                    let (wi, wi1) = (&mut lo[i * n..], &mut hi[..n]);
                    for (x, y) in wi.iter_mut().zip(wi1.iter_mut()) {
                        let t = *y;
                        *y = s * *x + c * t;
                        *x = c * *x - s * t;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    for i in 0..n.saturating_sub(1) {
        let mut k = i;
        let mut p = d[i];
        for (j, &dj) in d.iter().enumerate().skip(i + 1) {
            if dj < p {
                k = j;
                p = dj;
            }
        }
        if k != i {
            d[k] = d[i];
            d[i] = p;
            let (lo, hi) = w.split_at_mut(k * n);
            lo[i * n..(i + 1) * n].swap_with_slice(&mut hi[..n]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Qᵀ diag(λ) Q rebuilds the matrix, Q is orthonormal, λ ascending; a diagonal
    /// matrix and a 1 × 1 come out as themselves.
    #[test]
    fn decomposition_rebuilds_the_matrix() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for n in [1usize, 2, 3, 17, 64] {
            let b: Vec<f64> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            // A = B Bᵀ + diag: symmetric, with a spread of eigenvalues.
            let mut a = vec![0.0f64; n * n];
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>()
                        + if i == j { i as f64 * 0.1 } else { 0.0 };
                }
            }
            let mut q = a.clone();
            let lambda = sym_eigen_f64(&mut q, n).expect("eigen");
            assert!(lambda.windows(2).all(|w| w[0] <= w[1]), "{lambda:?}");
            let scale = lambda.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for i in 0..n {
                for j in 0..n {
                    let rebuilt: f64 = (0..n)
                        .map(|k| q[k * n + i] * lambda[k] * q[k * n + j])
                        .sum();
                    assert!(
                        (rebuilt - a[i * n + j]).abs() < 1e-12 * scale * n as f64,
                        "n {n}, ({i}, {j}): {rebuilt} vs {}",
                        a[i * n + j]
                    );
                    let dot: f64 = (0..n).map(|k| q[i * n + k] * q[j * n + k]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!(
                        (dot - want).abs() < 1e-12 * n as f64,
                        "n {n}: QQᵀ ({i}, {j}) = {dot}"
                    );
                }
            }
        }
        let mut diag = vec![3.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0];
        assert_eq!(sym_eigen_f64(&mut diag, 3).expect("diag"), [-1.0, 2.0, 3.0]);
        let mut nan = vec![f64::NAN; 4];
        assert!(sym_eigen_f64(&mut nan, 2).is_err());
    }
}
