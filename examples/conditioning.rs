//! Conditioning of the EnKF gain systems on real MNIST, and what an f32 solve would lose.
//!
//!     cargo run --release --example conditioning -- [J] [iterations]
//!
//! Trains J members (σ = 1, logistic, sequential rule, γ = 0.01) for the given number of
//! iterations on the CPU, then for the next mini-batch forms C = AᵀA/J + γI (640 × 640,
//! the batch rule's matrix) and its 64 diagonal 10 × 10 blocks (the sequential rule's),
//! estimates their 2-norm condition numbers (power and inverse iteration), and solves
//! X C = D in f32 and in f64 (Cholesky) to report the relative error of the f32 gain.

use enkf_dnn::backend::{Backend, BackendKind};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::{default_mnist_dir, load_dir};
use enkf_dnn::train::{PartialConfig, Trainer};

fn cholesky<
    T: Copy
        + Into<f64>
        + From<f32>
        + std::ops::Sub<Output = T>
        + std::ops::Mul<Output = T>
        + std::ops::Div<Output = T>
        + PartialOrd,
>(
    a: &[T],
    n: usize,
    sqrt: fn(T) -> T,
) -> Option<Vec<T>> {
    let zero = T::from(0.0);
    let mut l = vec![zero; n * n];
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d = d - l[j * n + k] * l[j * n + k];
        }
        // Not positive (or NaN): the factorisation fails.
        if d.partial_cmp(&zero) != Some(std::cmp::Ordering::Greater) {
            return None;
        }
        let d = sqrt(d);
        l[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s = s - l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = s / d;
        }
    }
    Some(l)
}

/// Solves L Lᵀ x = b in place.
fn solve<
    T: Copy + std::ops::Sub<Output = T> + std::ops::Mul<Output = T> + std::ops::Div<Output = T>,
>(
    l: &[T],
    n: usize,
    b: &mut [T],
) {
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s = s - l[i * n + k] * b[k];
        }
        b[i] = s / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s = s - l[k * n + i] * b[k];
        }
        b[i] = s / l[i * n + i];
    }
}

fn matvec(a: &[f64], n: usize, x: &[f64]) -> Vec<f64> {
    (0..n)
        .map(|i| (0..n).map(|k| a[i * n + k] * x[k]).sum())
        .collect()
}

fn normalize(x: &mut [f64]) -> f64 {
    let n = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    x.iter_mut().for_each(|v| *v /= n);
    n
}

/// 2-norm condition number of the SPD matrix `a` (n × n) by power / inverse iteration.
fn condition(a: &[f64], n: usize) -> f64 {
    let l = cholesky(a, n, f64::sqrt).expect("SPD");
    let mut x: Vec<f64> = (0..n).map(|i| 1.0 + (i % 7) as f64 * 0.1).collect();
    let mut lmax = 0.0;
    for _ in 0..300 {
        normalize(&mut x);
        x = matvec(a, n, &x);
        lmax = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    }
    let mut y: Vec<f64> = (0..n).map(|i| 1.0 + (i % 5) as f64 * 0.1).collect();
    let mut inv = 0.0;
    for _ in 0..300 {
        normalize(&mut y);
        solve(&l, n, &mut y);
        inv = y.iter().map(|v| v * v).sum::<f64>().sqrt();
    }
    lmax * inv
}

fn main() -> enkf_dnn::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (j, iters) = (
        args.first().copied().unwrap_or(1000),
        args.get(1).copied().unwrap_or(0),
    );
    let data = load_dir(&default_mnist_dir())?;
    let be = CpuBackend::new();
    let gamma = 0.01;
    let mut cfg = PartialConfig {
        members: Some(j),
        iterations: Some(iters.max(1)),
        backend: Some(BackendKind::Cpu),
        ..Default::default()
    }
    .resolve()?;
    cfg.eval_every = 1_000_000;
    let mut trainer = Trainer::new(&be, &cfg, &data)?;
    if iters > 0 {
        trainer.run(&mut ())?;
    }
    let u = be.upload_f32(&trainer.ensemble_host()?)?;
    let b = 64;
    let m = b * 10;
    let idx: Vec<usize> = ((iters / 8) * b..(iters / 8) * b + b).collect();
    let mut x = Vec::new();
    let labels = data.train.gather(&idx, &mut x);
    let x = be.upload_f32(&x)?;
    let mut g = be.zeros_f32(j * m)?;
    be.ensemble_forward(&cfg.net(), &u, j, &x, b, &mut g)?;
    let y = be.upload_f32(&enkf_dnn::enkf::one_hot(&labels, 10))?;
    let (mut a, mut d) = (be.zeros_f64(j * m)?, be.zeros_f64(j * m)?);
    be.center_and_innovate(&g, &y, j, m, &mut a, &mut d)?;
    let mut c = be.zeros_f64(m * m)?;
    be.gemm_f64(
        enkf_dnn::backend::Trans::Yes,
        enkf_dnn::backend::Trans::No,
        m,
        m,
        j,
        1.0 / j as f64,
        &a,
        &a,
        0.0,
        &mut c,
    )?;
    be.add_diagonal_f64(&mut c, m, gamma)?;
    let cond_full = condition(&c, m);
    let mut block_conds: Vec<f64> = (0..b)
        .map(|blk| {
            let sub: Vec<f64> = (0..100)
                .map(|e| c[(blk * 10 + e / 10) * m + blk * 10 + e % 10])
                .collect();
            condition(&sub, 10)
        })
        .collect();
    block_conds.sort_by(f64::total_cmp);
    // f32 vs f64 gain of the batch rule: X = D C⁻¹ for 50 members.
    let l64 = cholesky(&c, m, f64::sqrt).expect("SPD");
    let c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let l32 = cholesky(&c32, m, f32::sqrt);
    let mut worst: f64 = 0.0;
    if let Some(l32) = &l32 {
        for r in 0..50.min(j) {
            let mut x64: Vec<f64> = d[r * m..(r + 1) * m].to_vec();
            solve(&l64, m, &mut x64);
            let mut x32: Vec<f32> = d[r * m..(r + 1) * m].iter().map(|&v| v as f32).collect();
            solve(l32, m, &mut x32);
            let num: f64 = x64
                .iter()
                .zip(&x32)
                .map(|(p, q)| (p - *q as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let den: f64 = x64.iter().map(|p| p * p).sum::<f64>().sqrt();
            worst = worst.max(num / den);
        }
    }
    println!("J = {j}, after {iters} iterations, gamma = {gamma}");
    println!("cond(C + γI), 640 × 640 (batch rule): {cond_full:.3e}");
    println!(
        "cond of the 64 diagonal 10 × 10 blocks (sequential rule): min {:.3e}, median {:.3e}, max {:.3e}",
        block_conds[0],
        block_conds[32],
        block_conds[63]
    );
    match l32 {
        Some(_) => println!(
            "f32 Cholesky gain X = D C⁻¹: worst relative error over 50 members {worst:.3e}"
        ),
        None => println!("f32 Cholesky of C + γI fails (not positive definite in f32)"),
    }
    Ok(())
}
