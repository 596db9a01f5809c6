//! The `bench` command: the median forward, update and per-layer times of the EnKF
//! iteration on one backend, and the tables `main.rs` prints.

use super::{dispatch, BackendJob};
use crate::backend::{Backend, BackendKind, MathMode, Trans};
use crate::data::DataSplit;
use crate::model::{Net, CLASSES};
use crate::Result;

/// One line of the benchmark table. Times are medians of CUDA-event (GPU) or wall-clock
/// (CPU) measurements after warm-up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// Backend used.
    pub backend: String,
    /// Ensemble size.
    pub members: usize,
    /// Ensemble forward pass (B = 64), ms.
    pub forward_ms: f64,
    /// Achieved GFLOP/s of the forward pass.
    pub forward_gflops: f64,
    /// `forward_gflops` as a fraction of the device's FP32 FFMA peak, where known.
    pub forward_of_peak: Option<f64>,
    /// The ensemble reductions alone (means, centring, innovations: J × m), ms.
    pub reduce_ms: f64,
    /// Bytes the reductions must move (G read as f32, centred and innovations written as
    /// f64: 20·J·m) per second, GB/s.
    pub reduce_gbs: f64,
    /// The copy ceiling measured on the same backend: `copy_f32` of U (J × P), counting
    /// read plus write, GB/s.
    pub copy_gbs: f64,
    /// The small f64 phase (reductions, covariance, solves), ms.
    pub gain_ms: f64,
    /// The large phase (the two products that move U), ms.
    pub apply_ms: f64,
    /// gain + apply: one EnKF update, ms.
    pub update_ms: f64,
    /// Achieved GFLOP/s of the two large products in `apply_ms` (for the association the
    /// workspace chose: `4·m·J·P` via T = AᵀU, or `2·J²·m + 2·J²·P` via S = X·Aᵀ).
    pub update_gflops: f64,
    /// The ceiling measured on the same backend: one `gemm_f32` of the update's shape,
    /// (J × P) += (J × m)(m × P), in GFLOP/s (cuBLAS on the GPU).
    pub sgemm_gflops: f64,
    /// `update_gflops / sgemm_gflops`.
    pub update_of_sgemm: f64,
    /// Scoring the mean network on the mini-batch, ms.
    pub score_ms: f64,
    /// One test-set evaluation of the mean network, ms.
    pub eval_ms: f64,
    /// forward + update + score, ms.
    pub iteration_ms: f64,
    /// Projected seconds per MNIST epoch (7504 iterations, 16 evaluations).
    pub epoch_s: f64,
    /// Layer-spec networks: each layer's share of the forward pass (not in the CSV).
    #[serde(skip)]
    pub layers: Vec<LayerTime>,
}

/// One layer's part of a layer-spec forward pass in `bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTime {
    /// Index and short form, e.g. `0 conv2d(10,5,1,0,bias=false)`.
    pub layer: String,
    /// Its share of the forward pass's time.
    pub share: f64,
    /// That share of the median forward time, ms.
    pub ms: f64,
    /// Its multiply-adds ×2 per second, GFLOP/s (None for layers without any).
    pub gflops: Option<f64>,
}

/// Settings of one benchmark.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Ensemble sizes.
    pub members: Vec<usize>,
    /// Network.
    pub net: Net,
    /// Update rule.
    pub update: crate::enkf::UpdateRule,
    /// Timed repetitions (median reported).
    pub iters: usize,
    /// Warm-up repetitions.
    pub warmup: usize,
    /// Data set.
    pub data: DataSplit,
}

struct BenchJob<'a>(&'a BenchSpec);

/// The median of `v` (the upper one of an even count; NaN when `v` is empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

impl BackendJob for BenchJob<'_> {
    type Output = Vec<BenchRow>;
    fn run<B: Backend>(self, be: &B, _desc: &str) -> Result<Vec<BenchRow>> {
        use rand::SeedableRng;
        let spec = self.0;
        let net = spec.net.clone();
        let p = net.n_params();
        let b = 64.min(spec.data.train.len());
        let idx: Vec<usize> = (0..b).collect();
        let mut hx = Vec::new();
        let labels = spec.data.train.gather(&idx, &mut hx);
        let x = be.upload_f32(&hx)?;
        let y = be.upload_f32(&crate::enkf::one_hot(&labels, CLASSES))?;
        let test_x = be.upload_f32(&spec.data.test.images)?;
        let n_test = spec.data.test.len();
        let mut test_out = be.zeros_f32(n_test * CLASSES)?;
        let mut rows = Vec::new();
        for &j in &spec.members {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
            let mut u = be.upload_f32(&crate::enkf::init_ensemble(&mut rng, j, p, 1.0))?;
            let u0 = be.download_f32(&u)?;
            let mut g = be.zeros_f32(j * b * CLASSES)?;
            let mut ws = crate::enkf::EnkfWorkspace::new(be, j, p, b)?;
            let mut w = be.zeros_f32(p)?;
            let mut small = be.zeros_f32(b * CLASSES)?;
            let m = b * CLASSES;
            // Temporaries of the reductions alone, and the operands of the SGEMM ceiling.
            let (mut a_tmp, mut x_tmp) = (be.zeros_f64(j * m)?, be.zeros_f64(j * m)?);
            let (gx, gt) = (be.zeros_f32(j * m)?, be.zeros_f32(m * p)?);
            let mut u_copy = be.zeros_f32(j * p)?;
            let mut t = [(); 8].map(|_| Vec::new());
            for it in 0..spec.warmup + spec.iters {
                // Restart from the same ensemble so every repetition does the same work.
                be.write_f32(&u0, &mut u)?;
                let f = be.time_ms(&mut || {
                    let _r = crate::gpu::timing::range("forward");
                    be.ensemble_forward(&net, &u, j, &x, b, &mut g)
                })?;
                let r = be.time_ms(&mut || {
                    let _r = crate::gpu::timing::range("reductions");
                    be.center_and_innovate(&g, &y, j, m, &mut a_tmp, &mut x_tmp)
                })?;
                let gn = be.time_ms(&mut || {
                    let _r = crate::gpu::timing::range("gain");
                    ws.gain(be, spec.update, 0.01, &g, &y)
                })?;
                let ap = be.time_ms(&mut || {
                    let _r = crate::gpu::timing::range("apply");
                    ws.apply(be, &mut u)
                })?;
                let sc = be.time_ms(&mut || {
                    let _r = crate::gpu::timing::range("score");
                    be.row_mean(&u, j, p, &mut w)?;
                    be.ensemble_forward(&net, &w, 1, &x, b, &mut small)?;
                    be.download_f32(&small).map(|_| ())
                })?;
                let e = be.time_ms(&mut || {
                    let _r = crate::gpu::timing::range("eval");
                    be.ensemble_forward(&net, &w, 1, &test_x, n_test, &mut test_out)?;
                    be.download_f32(&test_out).map(|_| ())
                })?;
                let sg = be.time_ms(&mut || {
                    let _r = crate::gpu::timing::range("sgemm ceiling");
                    be.gemm_f32(Trans::No, Trans::No, j, p, m, 1.0, &gx, &gt, 1.0, &mut u)
                })?;
                let cp = be.time_ms(&mut || {
                    let _r = crate::gpu::timing::range("copy ceiling");
                    be.copy_f32(&u, &mut u_copy)
                })?;
                if it >= spec.warmup {
                    for (v, x) in t.iter_mut().zip([f, r, gn, ap, sc, e, sg, cp]) {
                        v.push(x);
                    }
                }
            }
            let [f, r, gn, ap, sc, e, sg, cp] = t.map(median);
            let fwd_flop = 2.0 * net.macs_per_image() as f64 * b as f64 * j as f64;
            // The two large products of the association the workspace chose.
            let (jf, pf, mf) = (j as f64, p as f64, m as f64);
            let upd_flop = match ws.order() {
                crate::enkf::ApplyOrder::Members => 2.0 * jf * jf * mf + 2.0 * jf * jf * pf,
                _ => 4.0 * mf * jf * pf,
            };
            let forward_gflops = fwd_flop / f / 1e6;
            let update_gflops = upd_flop / ap / 1e6;
            let sgemm_gflops = 2.0 * jf * pf * mf / sg / 1e6;
            let up = gn + ap;
            let it_ms = f + up + sc;
            // Per-layer shares: the CPU times its layers in place, CUDA each launch.
            let layers = match net.spec() {
                Some(s) => {
                    let shares = be.spec_layer_shares(s, &u, j, &x, b)?;
                    s.layers()
                        .iter()
                        .zip(shares)
                        .enumerate()
                        .map(|(i, (l, share))| {
                            let flop = 2.0 * (l.macs() * b * j) as f64;
                            LayerTime {
                                layer: l.label(i),
                                share,
                                ms: share * f,
                                gflops: (flop > 0.0).then(|| flop / (share * f) / 1e6),
                            }
                        })
                        .collect()
                }
                _ => Vec::new(),
            };
            let epoch_iters = 938.0 * 8.0;
            rows.push(BenchRow {
                backend: be.name(),
                members: j,
                forward_ms: f,
                forward_gflops,
                forward_of_peak: be.fp32_peak_gflops().map(|pk| forward_gflops / pk),
                reduce_ms: r,
                reduce_gbs: 20.0 * jf * mf / r / 1e6,
                copy_gbs: 8.0 * jf * pf / cp / 1e6,
                gain_ms: gn,
                apply_ms: ap,
                update_ms: up,
                update_gflops,
                sgemm_gflops,
                update_of_sgemm: update_gflops / sgemm_gflops,
                score_ms: sc,
                eval_ms: e,
                iteration_ms: it_ms,
                epoch_s: (it_ms * epoch_iters + e * 16.0) / 1e3,
                layers,
            });
            eprintln!(
                "J = {j}: forward {f:.2} ms, update {up:.2} ms (reductions {r:.2}, gain {gn:.2}, \
                 apply {ap:.2}), iteration {it_ms:.2} ms"
            );
        }
        Ok(rows)
    }
}

/// Runs `enkf-dnn bench`; returns the table rows.
pub fn bench_command(
    kind: BackendKind,
    math: MathMode,
    spec: &BenchSpec,
) -> Result<(Vec<BenchRow>, String)> {
    dispatch(kind, math, BenchJob(spec))
}

/// Formats the per-layer times of layer-spec rows as Markdown (empty without any).
pub fn layer_table(rows: &[BenchRow]) -> String {
    let mut s = String::new();
    for r in rows.iter().filter(|r| !r.layers.is_empty()) {
        s += &format!(
            "\nJ = {}, B = 64: forward {:.2} ms; each layer's share of the summed task time \
             (SGEMM of the update's shape on this backend: {:.1} GFLOP/s)\n\n\
             | layer | share | ms | GFLOP/s | of SGEMM |\n|---|---|---|---|---|\n",
            r.members, r.forward_ms, r.sgemm_gflops
        );
        for l in &r.layers {
            let (g, of) = match l.gflops {
                Some(g) => (
                    format!("{g:.1}"),
                    format!("{:.0} %", 100.0 * g / r.sgemm_gflops),
                ),
                None => ("—".into(), "—".into()),
            };
            s += &format!(
                "| {} | {:.1} % | {:.2} | {g} | {of} |\n",
                l.layer,
                100.0 * l.share,
                l.ms
            );
        }
    }
    s
}

/// Formats the benchmark table as Markdown.
pub fn bench_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| backend | J | forward ms | forward GFLOP/s | of FP32 peak | reductions ms | reductions GB/s | copy GB/s | gain ms | apply ms | apply GFLOP/s | SGEMM GFLOP/s (same shape) | apply / SGEMM | score ms | eval ms | ms/iteration | s/epoch (projected) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let peak = r
            .forward_of_peak
            .map_or("—".to_string(), |f| format!("{:.0} %", 100.0 * f));
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} | {} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} % | {:.2} | {:.2} | {:.2} | {:.0} |\n",
            r.backend,
            r.members,
            r.forward_ms,
            r.forward_gflops,
            peak,
            r.reduce_ms,
            r.reduce_gbs,
            r.copy_gbs,
            r.gain_ms,
            r.apply_ms,
            r.update_gflops,
            r.sgemm_gflops,
            100.0 * r.update_of_sgemm,
            r.score_ms,
            r.eval_ms,
            r.iteration_ms,
            r.epoch_s
        ));
    }
    s
}
