//! The CPU reference backend: host vectors, rayon threads, `gemm` for dense products.
//!
//! Files mirror `src/gpu/`: `forward.rs` (the network), `reduce.rs` (ensemble
//! reductions), `linalg.rs` (GEMM and the small solves).

pub mod backprop;
pub mod blas;
pub mod dot;
pub mod eigen;
pub mod forward;
pub mod linalg;
pub mod reduce;
pub mod spec_backprop;
pub mod spec_backprop_kernels;
pub mod spec_forward;
pub mod spec_kernels;

use crate::backend::{check_len, Backend, CacheMode, GradStep, MathMode, Trans};
use crate::model::Net;
use crate::train::optim::GradOptimizer;
use crate::Result;

/// The CPU backend. Uses the global rayon pool (set its size with `RAYON_NUM_THREADS`
/// or `--threads`).
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    /// Ignored on the CPU (kept so configs round-trip).
    pub math: MathMode,
}

impl CpuBackend {
    /// A CPU backend.
    pub fn new() -> Self {
        CpuBackend::default()
    }
}

impl Backend for CpuBackend {
    type F32 = Vec<f32>;
    type F64 = Vec<f64>;
    type Optim = GradOptimizer;

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, {} forward)",
            rayon::current_num_threads(),
            forward::forward_impl_name()
        )
    }

    fn zeros_f32(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn zeros_f64(&self, n: usize) -> Result<Vec<f64>> {
        Ok(vec![0.0; n])
    }
    fn upload_f32(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn write_f32(&self, host: &[f32], dst: &mut Vec<f32>) -> Result<()> {
        check_len("write_f32 destination", dst.len(), host.len())?;
        dst.copy_from_slice(host);
        Ok(())
    }
    fn write_f64(&self, host: &[f64], dst: &mut Vec<f64>) -> Result<()> {
        check_len("write_f64 destination", dst.len(), host.len())?;
        dst.copy_from_slice(host);
        Ok(())
    }
    fn download_f32(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn download_f64(&self, buf: &Vec<f64>) -> Result<Vec<f64>> {
        Ok(buf.clone())
    }
    fn len_f32(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn ensemble_forward(
        &self,
        net: &Net,
        weights: &Vec<f32>,
        members: usize,
        x: &Vec<f32>,
        images: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        forward::ensemble_forward(net, weights, members, x, images, out)
    }

    fn backprop(
        &self,
        net: &Net,
        weights: &Vec<f32>,
        x: &Vec<f32>,
        labels: &[u8],
        grad: &mut Vec<f32>,
        cache: CacheMode,
    ) -> Result<GradStep> {
        check_len("backprop grad (P)", grad.len(), net.n_params())?;
        let (loss, correct, g, kept) = match net.spec() {
            Some(spec) => {
                let bp = spec_backprop::spec_backprop(spec, weights, x, labels)?;
                (bp.loss, bp.correct, bp.grad, None)
            }
            None => {
                let bp = backprop::backprop(net, weights, x, labels)?;
                let kept = (cache == CacheMode::Keep).then_some(bp.cache);
                (bp.loss, bp.correct, bp.grad, kept)
            }
        };
        *grad = g;
        Ok(GradStep {
            loss,
            correct,
            cache: kept,
        })
    }

    fn backprop_mse(
        &self,
        net: &Net,
        weights: &Vec<f32>,
        x: &Vec<f32>,
        targets: &[f32],
        grad: &mut Vec<f32>,
    ) -> Result<GradStep> {
        check_len("backprop grad (P)", grad.len(), net.n_params())?;
        let spec = net.require_spec_for_real_targets()?;
        let bp = spec_backprop::spec_backprop_mse(spec, weights, x, targets)?;
        *grad = bp.grad;
        Ok(GradStep {
            loss: bp.loss,
            correct: 0,
            cache: None,
        })
    }

    fn optimizer(&self, opt: &GradOptimizer) -> Result<GradOptimizer> {
        Ok(opt.clone())
    }

    fn optimizer_step(
        &self,
        opt: &mut GradOptimizer,
        params: &mut Vec<f32>,
        grad: &Vec<f32>,
    ) -> Result<()> {
        opt.step(params, grad)
    }

    fn row_mean(&self, a: &Vec<f32>, rows: usize, cols: usize, out: &mut Vec<f32>) -> Result<()> {
        reduce::row_mean(a, rows, cols, out)
    }

    fn center_and_innovate(
        &self,
        g: &Vec<f32>,
        y: &Vec<f32>,
        rows: usize,
        cols: usize,
        centred: &mut Vec<f64>,
        innov: &mut Vec<f64>,
    ) -> Result<()> {
        reduce::center_and_innovate(g, y, rows, cols, centred, innov)
    }

    fn gemm_f32(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Vec<f32>,
        b: &Vec<f32>,
        beta: f32,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        linalg::gemm_f32(ta, tb, m, n, k, alpha, a, b, beta, c)
    }

    fn gemm_f64(
        &self,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        a: &Vec<f64>,
        b: &Vec<f64>,
        beta: f64,
        c: &mut Vec<f64>,
    ) -> Result<()> {
        linalg::gemm_f64(ta, tb, m, n, k, alpha, a, b, beta, c)
    }

    fn add_diagonal_f64(&self, a: &mut Vec<f64>, n: usize, shift: f64) -> Result<()> {
        linalg::add_diagonal_f64(a, n, shift)
    }

    fn block_cholesky_solve_f64(
        &self,
        a: &mut Vec<f64>,
        blocks: usize,
        bs: usize,
        rhs: &mut Vec<f64>,
        nrhs: usize,
    ) -> Result<()> {
        linalg::block_cholesky_solve_f64(a, blocks, bs, rhs, nrhs)
    }

    fn block_cholesky_whiten_f64(
        &self,
        a: &mut Vec<f64>,
        blocks: usize,
        bs: usize,
        x: &mut Vec<f64>,
        y: &mut Vec<f64>,
        nrhs: usize,
    ) -> Result<()> {
        linalg::block_cholesky_whiten_f64(a, blocks, bs, x, y, nrhs)
    }

    fn unit_block_lower_f64(&self, a: &mut Vec<f64>, n: usize, bs: usize) -> Result<()> {
        linalg::unit_block_lower_f64(a, n, bs)
    }

    fn solve_unit_lower_right_f64(
        &self,
        t: &Vec<f64>,
        n: usize,
        b: &mut Vec<f64>,
        rows: usize,
    ) -> Result<()> {
        linalg::solve_unit_lower_right_f64(t, n, b, rows)
    }

    fn f64_to_f32(&self, src: &Vec<f64>, dst: &mut Vec<f32>) -> Result<()> {
        reduce::f64_to_f32(src, dst)
    }

    fn add_host_f64(&self, host: &[f64], dst: &mut Vec<f64>) -> Result<()> {
        reduce::add_f64(host, dst)
    }

    fn inflate_rows_f32(
        &self,
        u: &mut Vec<f32>,
        mean: &Vec<f32>,
        rows: usize,
        cols: usize,
        lambda: f32,
    ) -> Result<()> {
        reduce::inflate_rows_f32(u, mean, rows, cols, lambda)
    }

    fn nesterov_f32(&self, u: &mut Vec<f32>, prev: &mut Vec<f32>, beta: f32) -> Result<()> {
        reduce::nesterov_f32(u, prev, beta)
    }

    fn add_scaled_f32_f64(&self, x: &Vec<f32>, alpha: f64, y: &mut Vec<f64>) -> Result<()> {
        reduce::add_scaled_f32_f64(x, alpha, y)
    }

    fn row_std_f32(
        &self,
        a: &Vec<f32>,
        mean: &Vec<f32>,
        rows: usize,
        cols: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        reduce::row_std_f32(a, mean, rows, cols, out)
    }

    fn allreduce_sum_f64(&self, comm: &dyn crate::dist::Comm, buf: &mut Vec<f64>) -> Result<()> {
        // The host buffer is summed in place (the same values as the staged default).
        match comm.size() {
            1 => Ok(()),
            _ => comm.allreduce_sum_f64(buf),
        }
    }

    fn allreduce_sum_f32(&self, comm: &dyn crate::dist::Comm, buf: &mut Vec<f32>) -> Result<()> {
        match comm.size() {
            1 => Ok(()),
            _ => comm.allreduce_sum_f32(buf),
        }
    }

    fn add_normal_f32(
        &self,
        u: &mut Vec<f32>,
        offset: usize,
        cols: usize,
        scale: &Vec<f32>,
        mult: f32,
        key: [u32; 2],
        step: u32,
    ) -> Result<()> {
        reduce::add_normal_f32(u, offset, cols, scale, mult, key, step)
    }

    fn scale_rows_f64(&self, a: &mut Vec<f64>, rows: usize, cols: usize, w: &[f64]) -> Result<()> {
        reduce::scale_rows_f64(a, rows, cols, w)
    }

    fn sym_eigen_f64(&self, a: &mut Vec<f64>, n: usize) -> Result<Vec<f64>> {
        eigen::sym_eigen_f64(a, n)
    }

    fn row_sq_norms_f64(&self, a: &Vec<f64>, rows: usize, cols: usize) -> Result<Vec<f64>> {
        reduce::row_sq_norms_f64(a, rows, cols)
    }

    fn spec_layer_shares(
        &self,
        spec: &crate::model::spec::NetSpec,
        weights: &Vec<f32>,
        members: usize,
        x: &Vec<f32>,
        images: usize,
    ) -> Result<Vec<f64>> {
        spec_forward::spec_layer_shares(spec, weights, members, x, images)
    }

    fn copy_f32(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        check_len("copy_f32 destination", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn copy_rows_f32(
        &self,
        src: &Vec<f32>,
        src_row: usize,
        dst: &mut Vec<f32>,
        dst_row: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        crate::backend::check_rows("copy_rows_f32 source", src.len(), src_row + rows, cols)?;
        crate::backend::check_rows("copy_rows_f32 destination", dst.len(), dst_row + rows, cols)?;
        dst[dst_row * cols..(dst_row + rows) * cols]
            .copy_from_slice(&src[src_row * cols..(src_row + rows) * cols]);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
