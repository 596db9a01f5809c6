//! Ensemble reductions on the CPU (twins of `kernels/reduce.cu`).

use crate::backend::check_len;
use crate::Result;
use rayon::prelude::*;

/// Mean over rows: `out[c] = (1/rows) Σ_r a[r, c]`; `a` is rows × cols. Accumulates in f64.
pub fn row_mean(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    check_len("row_mean input", a.len(), rows * cols)?;
    check_len("row_mean output", out.len(), cols)?;
    const CHUNK: usize = 256;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
        let c0 = ci * CHUNK;
        let mut acc = vec![0.0f64; o.len()];
        for r in 0..rows {
            let row = &a[r * cols + c0..r * cols + c0 + o.len()];
            for (s, &v) in acc.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        for (dst, s) in o.iter_mut().zip(acc) {
            *dst = (s / rows as f64) as f32;
        }
    });
    Ok(())
}

/// `centred[r, c] = g[r, c] − mean_r g[·, c]` and `innov[r, c] = y[c] − g[r, c]`, in f64.
pub fn center_and_innovate(
    g: &[f32],
    y: &[f32],
    rows: usize,
    cols: usize,
    centred: &mut [f64],
    innov: &mut [f64],
) -> Result<()> {
    check_len("center_and_innovate g", g.len(), rows * cols)?;
    check_len("center_and_innovate y", y.len(), cols)?;
    check_len("center_and_innovate centred", centred.len(), rows * cols)?;
    check_len("center_and_innovate innov", innov.len(), rows * cols)?;
    let mut mean = vec![0.0f64; cols];
    for r in 0..rows {
        for (s, &v) in mean.iter_mut().zip(&g[r * cols..(r + 1) * cols]) {
            *s += v as f64;
        }
    }
    for s in &mut mean {
        *s /= rows as f64;
    }
    centred
        .par_chunks_mut(cols)
        .zip(innov.par_chunks_mut(cols))
        .zip(g.par_chunks(cols))
        .for_each(|((cr, ir), gr)| {
            for c in 0..cols {
                let v = gr[c] as f64;
                cr[c] = v - mean[c];
                ir[c] = y[c] as f64 - v;
            }
        });
    Ok(())
}

/// Element-wise f64 → f32 conversion.
pub fn f64_to_f32(src: &[f64], dst: &mut [f32]) -> Result<()> {
    check_len("f64_to_f32 destination", dst.len(), src.len())?;
    dst.par_iter_mut()
        .zip(src.par_iter())
        .for_each(|(d, &s)| *d = s as f32);
    Ok(())
}

/// `y[i] += x[i]` (twin of `add_f64` in `kernels/reduce.cu`).
pub fn add_f64(x: &[f64], y: &mut [f64]) -> Result<()> {
    check_len("add_f64 destination", y.len(), x.len())?;
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(a, b)| *a += b));
    Ok(())
}

/// Multiplicative inflation about the mean: `u[r, c] = mean[c] + lambda · (u[r, c] −
/// mean[c])` as one fused multiply-add (`mul_add`, the twin of `fmaf` in
/// `inflate_rows_f32`, `kernels/reduce.cu`: the same bits). `u` is rows × cols.
pub fn inflate_rows_f32(
    u: &mut [f32],
    mean: &[f32],
    rows: usize,
    cols: usize,
    lambda: f32,
) -> Result<()> {
    check_len("inflate_rows_f32 ensemble", u.len(), rows * cols)?;
    check_len("inflate_rows_f32 mean", mean.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    u.par_chunks_mut(cols).for_each(|row| {
        for (v, &m) in row.iter_mut().zip(mean) {
            *v = lambda.mul_add(*v - m, m);
        }
    });
    Ok(())
}

/// Threads per row of `row_sq_norms_f64` in `kernels/reduce.cu` (`ROWSQ_THREADS`): the
/// twin splits each row into the same partial sums.
pub const ROWSQ_THREADS: usize = 256;

/// Row sums of squares in f64, `out[r] = Σ_c a[r, c]²`, in the kernel's order: partial
/// sum t takes columns t, t + 256, … by fused multiply-adds, then the 256 partial sums
/// are added by the same halving tree (twin of `row_sq_norms_f64`: the same bits).
pub fn row_sq_norms_f64(a: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
    check_len("row_sq_norms_f64 input", a.len(), rows * cols)?;
    let mut out = vec![0.0f64; rows];
    if cols == 0 {
        return Ok(out);
    }
    out.par_iter_mut()
        .zip(a.par_chunks(cols))
        .for_each(|(o, row)| {
            let mut part = [0.0f64; ROWSQ_THREADS];
            for (t, p) in part.iter_mut().enumerate() {
                let mut s = 0.0f64;
                for &v in row.iter().skip(t).step_by(ROWSQ_THREADS) {
                    s = v.mul_add(v, s);
                }
                *p = s;
            }
            let mut h = ROWSQ_THREADS / 2;
            while h > 0 {
                for t in 0..h {
                    part[t] += part[t + h];
                }
                h /= 2;
            }
            *o = part[0];
        });
    Ok(out)
}

/// Nesterov momentum on the members: `x = u[i]; u[i] = x + beta · (x − prev[i])` (one
/// `mul_add`, the twin of `fmaf` in `nesterov_f32`, `kernels/reduce.cu`); `prev[i] = x`.
pub fn nesterov_f32(u: &mut [f32], prev: &mut [f32], beta: f32) -> Result<()> {
    check_len("nesterov_f32 previous ensemble", prev.len(), u.len())?;
    u.par_chunks_mut(1 << 14)
        .zip(prev.par_chunks_mut(1 << 14))
        .for_each(|(u, p)| {
            for (x, q) in u.iter_mut().zip(p) {
                let old = *x;
                *x = beta.mul_add(old - *q, old);
                *q = old;
            }
        });
    Ok(())
}

/// `y[i] += alpha · x[i]` in f64 with x in f32, one `mul_add` (twin of
/// `add_scaled_f32_f64`: the same bits).
pub fn add_scaled_f32_f64(x: &[f32], alpha: f64, y: &mut [f64]) -> Result<()> {
    check_len("add_scaled_f32_f64 destination", y.len(), x.len())?;
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(y, x)| {
            y.iter_mut()
                .zip(x)
                .for_each(|(a, &b)| *a = alpha.mul_add(f64::from(b), *a))
        });
    Ok(())
}

/// Column standard deviations about `mean`: `out[c] = √((1/rows) Σ_r (a[r, c] −
/// mean[c])²)`, accumulated in f64 and rounded once (twin of `row_std_f32`; the kernel
/// adds its 16 row slices in another order: they agree to f32 rounding).
pub fn row_std_f32(
    a: &[f32],
    mean: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [f32],
) -> Result<()> {
    check_len("row_std_f32 input", a.len(), rows * cols)?;
    check_len("row_std_f32 mean", mean.len(), cols)?;
    check_len("row_std_f32 output", out.len(), cols)?;
    let mut acc = vec![0.0f64; cols];
    for r in 0..rows {
        for ((s, &v), &m) in acc.iter_mut().zip(&a[r * cols..(r + 1) * cols]).zip(mean) {
            let d = f64::from(v) - f64::from(m);
            *s += d * d;
        }
    }
    for (o, s) in out.iter_mut().zip(acc) {
        *o = (s / rows as f64).sqrt() as f32;
    }
    Ok(())
}

/// Philox4x32-10 (Salmon et al. 2011) of counter `c` under key `k`: the generator of
/// `add_normal_f32` (`kernels/reduce.cu`), the same integers on both sides.
pub fn philox4x32_10(mut c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    const M0: u32 = 0xD251_1F53;
    const M1: u32 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut k0, mut k1) = (k[0], k[1]);
    for r in 0..10 {
        if r > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0];
    }
    c
}

/// The four standard normals of group `g` (elements 4g … 4g + 3) at `step` under `key`
/// (Box–Muller in f64 on Philox's words, as `add_normal_f32`).
pub fn philox_normals(key: [u32; 2], step: u32, g: u64) -> [f64; 4] {
    let c = philox4x32_10([g as u32, (g >> 32) as u32, step, 0], key);
    let mut z = [0.0f64; 4];
    for k in 0..2 {
        let u1 = (f64::from(c[2 * k]) + 0.5) * 2.328_306_436_538_696_3e-10;
        let u2 = (f64::from(c[2 * k + 1]) + 0.5) * 2.328_306_436_538_696_3e-10;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        z[2 * k] = r * t.cos();
        z[2 * k + 1] = r * t.sin();
    }
    z
}

/// Additive inflation: `u[i] += mult · scale[(offset + i) mod cols] · z_{offset + i}`, z
/// the standard normals of [`philox_normals`] at (`key`, `step`) by global index (twin of
/// `add_normal_f32`: the same draws; the f64 transcendentals may differ by an ulp, which
/// rounds to the same f32 almost always). `offset`: the global index of `u[0]` (0 in one
/// process; a rank's first member × cols on a sharded run).
#[allow(clippy::too_many_arguments)]
pub fn add_normal_f32(
    u: &mut [f32],
    offset: usize,
    cols: usize,
    scale: &[f32],
    mult: f32,
    key: [u32; 2],
    step: u32,
) -> Result<()> {
    check_len("add_normal_f32 scale", scale.len(), cols)?;
    if cols == 0 || u.is_empty() {
        return Ok(());
    }
    if !u.len().is_multiple_of(cols) {
        return Err(crate::Error::Shape {
            what: "add_normal_f32 ensemble".into(),
            expected: format!("a multiple of {cols} values"),
            found: format!("{}", u.len()),
        });
    }
    u.par_chunks_mut(1 << 12)
        .enumerate()
        .for_each(|(chunk, part)| {
            let base = offset + (chunk << 12);
            let mut group = (u64::MAX, [0.0f64; 4]);
            for (q, v) in part.iter_mut().enumerate() {
                let gi = base + q;
                let g = (gi / 4) as u64;
                if group.0 != g {
                    group = (g, philox_normals(key, step, g));
                }
                let s = f64::from(mult) * f64::from(scale[gi % cols]);
                *v = (f64::from(*v) + s * group.1[gi % 4]) as f32;
            }
        });
    Ok(())
}

/// `a[r, c] *= w[r]` over rows × cols (twin of `scale_rows_f64`: one multiply each).
pub fn scale_rows_f64(a: &mut [f64], rows: usize, cols: usize, w: &[f64]) -> Result<()> {
    check_len("scale_rows_f64 matrix", a.len(), rows * cols)?;
    check_len("scale_rows_f64 scales", w.len(), rows)?;
    if cols == 0 {
        return Ok(());
    }
    a.par_chunks_mut(cols)
        .zip(w.par_iter())
        .for_each(|(row, &s)| row.iter_mut().for_each(|v| *v *= s));
    Ok(())
}
