//! One mini-batch's EnKF updates from a checkpoint, in several variants: what each
//! does to the mean network (issue 13's tail-batch jump).
//!
//!     cargo run --release --example tail_lab -- RUN_DIR [BATCH_INDEX] [RULE]
//!
//! Reads RUN_DIR/checkpoint.bin (the ensemble U and the run's configuration; the run
//! must use the paper's network on IDX data), takes mini-batch BATCH_INDEX of the file
//! order (default: the checkpoint's current one), and applies the run's r updates to a
//! copy of U in each variant: the run's rule (or RULE: sequential, batch, transform;
//! the f64 Kalman step below is the batch and transform rules' mean step, not the
//! sequential one's) in either apply order, with and without
//! the run's additive inflation (0.3 × the spread drawn before each forward pass, as the
//! trainer does, from this program's own stream), other γ, and the first half of the
//! batch only. After each update it prints the mean network's loss on the batch and
//! its test error, the step of the mean and the spread; for the first update it also
//! prints the f64 Kalman mean step ū' − ū = Eᵀ A (AᵀA/J + γI)⁻¹ d̄ / J beside the one
//! the workspace took (relative difference), so that a numerical fault of an order
//! shows as a large difference.

use enkf_dnn::backend::Backend;
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::data::{load_dir_limited, DataSplit};
use enkf_dnn::enkf::{one_hot, ApplyOrder, EnkfWorkspace, UpdateRule};
use enkf_dnn::model::{Net, CLASSES};
use std::path::PathBuf;

/// One variant of the batch's updates.
struct Variant {
    name: String,
    order: ApplyOrder,
    gamma: f64,
    noise: f32,
    /// Images of the batch used (from its start).
    images: usize,
}

/// Mean cross-entropy of logits (n × 10) against labels, and the error in percent.
fn loss_and_error(logits: &[f32], labels: &[u8]) -> (f64, f64) {
    let mut loss = 0.0;
    let mut wrong = 0usize;
    for (row, &l) in logits.chunks_exact(CLASSES).zip(labels) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = f64::from(max)
            + row
                .iter()
                .map(|&v| f64::from(v - max).exp())
                .sum::<f64>()
                .ln();
        loss += lse - f64::from(row[usize::from(l)]);
        let arg = (0..CLASSES)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0);
        wrong += usize::from(arg != usize::from(l));
    }
    let n = labels.len().max(1) as f64;
    (loss / n, 100.0 * wrong as f64 / n)
}

/// Column means of a J × P ensemble, in f64.
fn mean_of(u: &[f32], j: usize, p: usize) -> Vec<f64> {
    let mut m = vec![0.0f64; p];
    for row in u.chunks_exact(p) {
        for (a, &v) in m.iter_mut().zip(row) {
            *a += f64::from(v);
        }
    }
    m.iter_mut().for_each(|v| *v /= j as f64);
    m
}

/// √(mean over the weights of their population variance over the members).
fn spread_of(u: &[f32], j: usize, p: usize) -> f64 {
    let m = mean_of(u, j, p);
    let mut var = 0.0;
    for row in u.chunks_exact(p) {
        for (a, &v) in m.iter().zip(row) {
            var += (f64::from(v) - a).powi(2);
        }
    }
    (var / (j * p) as f64).sqrt()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The f64 Kalman mean step Eᵀ A (AᵀA/J + γI)⁻¹ d̄ / J (P) for U (J × P), G (J × m).
fn kalman_mean_step(u: &[f32], g: &[f32], y: &[f32], j: usize, p: usize, gamma: f64) -> Vec<f64> {
    let m = y.len();
    let gbar = mean_of(g, j, m);
    let ubar = mean_of(u, j, p);
    let a: Vec<f64> = g
        .chunks_exact(m)
        .flat_map(|row| row.iter().zip(&gbar).map(|(&v, b)| f64::from(v) - b))
        .collect();
    let mut c = vec![0.0f64; m * m];
    for row in a.chunks_exact(m) {
        for r in 0..m {
            let ar = row[r];
            for (s, cv) in c[r * m..(r + 1) * m].iter_mut().enumerate() {
                *cv += ar * row[s];
            }
        }
    }
    c.iter_mut().for_each(|v| *v /= j as f64);
    (0..m).for_each(|r| c[r * m + r] += gamma);
    let mut x: Vec<f64> = y
        .iter()
        .zip(&gbar)
        .map(|(&t, b)| f64::from(t) - b)
        .collect();
    // Cholesky C = L Lᵀ, then x = C⁻¹ d̄.
    for k in 0..m {
        let d = (c[k * m + k] - (0..k).map(|i| c[k * m + i] * c[k * m + i]).sum::<f64>()).sqrt();
        c[k * m + k] = d;
        for r in k + 1..m {
            let s = c[r * m + k] - (0..k).map(|i| c[r * m + i] * c[k * m + i]).sum::<f64>();
            c[r * m + k] = s / d;
        }
    }
    for r in 0..m {
        x[r] = (x[r] - (0..r).map(|i| c[r * m + i] * x[i]).sum::<f64>()) / c[r * m + r];
    }
    for r in (0..m).rev() {
        x[r] = (x[r] - (r + 1..m).map(|i| c[i * m + r] * x[i]).sum::<f64>()) / c[r * m + r];
    }
    let w: Vec<f64> = a
        .chunks_exact(m)
        .map(|row| row.iter().zip(&x).map(|(p, q)| p * q).sum::<f64>() / j as f64)
        .collect();
    let mut step = vec![0.0f64; p];
    for (row, wj) in u.chunks_exact(p).zip(&w) {
        for ((s, &v), b) in step.iter_mut().zip(row).zip(&ubar) {
            *s += (f64::from(v) - b) * wj;
        }
    }
    step
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .ok_or("usage: tail_lab RUN_DIR [BATCH_INDEX]")?,
    );
    let (state, u0) =
        enkf_dnn::train::checkpoint::read(&enkf_dnn::train::checkpoint::path_in(&dir))?;
    let cfg = &state.config;
    let net: Net = cfg.net();
    let (j, p) = (state.members, state.params);
    let data: DataSplit = load_dir_limited(&cfg.data, cfg.train_limit, cfg.test_limit)?;
    let n = data.train.len();
    let batches = n.div_ceil(cfg.batch);
    let bi = match args.get(1) {
        Some(s) => s.parse::<usize>()?,
        None => state.batch_global % batches,
    };
    let lo = bi * cfg.batch;
    let hi = (lo + cfg.batch).min(n);
    println!(
        "checkpoint at update {} (J = {j}, P = {p}, run's rule {:?}, γ = {}, additive {} × \
         spread, r = {}); batch {bi}: images {lo}..{hi}",
        state.t, cfg.update, cfg.gamma, cfg.additive_inflation, state.repetitions
    );
    let be = CpuBackend::new();
    let test_x = data.test.images.clone();
    let test_n = data.test.len();
    let rule: UpdateRule = match args.get(2) {
        Some(r) => <UpdateRule as clap::ValueEnum>::from_str(r, true)
            .map_err(|e| format!("RULE {r}: {e}"))?,
        None => cfg.update,
    };
    let s = cfg.additive_inflation as f32;
    let full = hi - lo;
    let mut variants = Vec::new();
    for order in [ApplyOrder::Params, ApplyOrder::Members] {
        for noise in [s, 0.0] {
            variants.push(Variant {
                name: format!("{} order, noise {noise}", order.name()),
                order,
                gamma: cfg.gamma,
                noise,
                images: full,
            });
        }
    }
    for (gamma, images) in [(2.0 * cfg.gamma, full), (cfg.gamma, full / 2)] {
        variants.push(Variant {
            name: format!("auto order, noise {s}, γ = {gamma}, {images} images"),
            order: ApplyOrder::Auto,
            gamma,
            noise: s,
            images,
        });
    }
    for v in &variants {
        println!("\n== {:?} rule, {}", rule, v.name);
        let b = v.images;
        let x: Vec<f32> = data.train.images[lo * 784..(lo + b) * 784].to_vec();
        let labels = &data.train.labels[lo..lo + b];
        let y = one_hot(labels, CLASSES);
        let mut ws = EnkfWorkspace::with_outputs_and_order(&be, j, p, b, CLASSES, v.order)?;
        let mut u = u0.clone();
        let mut g = vec![0.0f32; j * b * CLASSES];
        let mut scale = vec![0.0f32; p];
        let mut mean32 = vec![0.0f32; p];
        let report = |u: &[f32], step: usize, prev: &[f64]| -> Result<Vec<f64>, enkf_dnn::Error> {
            let mean = mean_of(u, j, p);
            let m32: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
            let mut out = vec![0.0f32; b * CLASSES];
            be.ensemble_forward(&net, &m32, 1, &x, b, &mut out)?;
            let (bl, _) = loss_and_error(&out, labels);
            let mut tout = vec![0.0f32; test_n * CLASSES];
            be.ensemble_forward(&net, &m32, 1, &test_x, test_n, &mut tout)?;
            let (tl, te) = loss_and_error(&tout, &data.test.labels);
            let d: Vec<f64> = mean.iter().zip(prev).map(|(a, b)| a - b).collect();
            println!(
                "  update {step}: batch loss {bl:.4}  test error {te:.2} %  test loss {tl:.4}  \
                 |Δū| {:.4}  |ū| {:.2}  spread {:.5}",
                norm(&d),
                norm(&mean),
                spread_of(u, j, p)
            );
            Ok(mean)
        };
        let mut prev = report(&u, 0, &mean_of(&u, j, p))?;
        for rep in 0..state.repetitions {
            if v.noise > 0.0 {
                be.row_mean(&u, j, p, &mut mean32)?;
                be.row_std_f32(&u, &mean32, j, p, &mut scale)?;
                be.add_normal_f32(&mut u, 0, p, &scale, v.noise, [0x07a1_11ab, 13], rep as u32)?;
            }
            be.ensemble_forward(&net, &u, j, &x, b, &mut g)?;
            let before = u.clone();
            ws.gain(&be, rule, v.gamma, &g, &y)?;
            ws.apply(&be, &mut u)?;
            if rep == 0 {
                let want = kalman_mean_step(&before, &g, &y, j, p, v.gamma);
                let got: Vec<f64> = mean_of(&u, j, p)
                    .iter()
                    .zip(mean_of(&before, j, p))
                    .map(|(a, b)| a - b)
                    .collect();
                let diff: Vec<f64> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
                println!(
                    "  first update ({:?} order used): mean step |f32| {:.6}, |f64 Kalman| \
                     {:.6}, relative difference {:.2e}",
                    ws.order(),
                    norm(&got),
                    norm(&want),
                    norm(&diff) / norm(&want).max(f64::MIN_POSITIVE)
                );
            }
            prev = report(&u, rep + 1, &prev)?;
        }
    }
    Ok(())
}
