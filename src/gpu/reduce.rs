//! Ensemble reductions on the GPU (twins of `src/cpu/reduce.rs`), launching the kernels
//! of `kernels/reduce.cu`.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::geometry::{elementwise_stride_launch, mean_launch, row_sq_launch};
use super::{cuda_err, to_i32, CudaBackend};
use crate::backend::check_len;
use crate::Result;

/// Mean over rows in f64, rounded to f32: `out[c] = (1/rows) Σ_r a[r, c]`.
///
/// `a`: rows × cols, `out`: cols. Errors: [`crate::Error::Shape`] on a length mismatch.
pub fn row_mean(
    be: &CudaBackend,
    a: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("row_mean input", a.len(), rows * cols)?;
    check_len("row_mean output", out.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    let (rows_i, cols_i) = (
        to_i32("row_mean rows", rows)?,
        to_i32("row_mean cols", cols)?,
    );
    let f = be.kernels().get("row_mean_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(a).arg(&rows_i).arg(&cols_i).arg(out);
    // SAFETY: check_len proved a = rows·cols and out = cols elements; threads with
    // column ≥ cols neither read nor write.
    unsafe { launch.launch(mean_launch(cols)) }
        .map(|_| ())
        .map_err(cuda_err("launching row_mean_f32"))
}

/// `centred[r, c] = g[r, c] − mean_r g[·, c]`, `innov[r, c] = y[c] − g[r, c]` in f64; the
/// mean is kept in f64 (a temporary of `cols` doubles), as on the CPU.
///
/// `g`: rows × cols, `y`: cols, `centred`, `innov`: rows × cols.
/// Errors: [`crate::Error::Shape`] on a length mismatch.
pub fn center_and_innovate(
    be: &CudaBackend,
    g: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    centred: &mut CudaSlice<f64>,
    innov: &mut CudaSlice<f64>,
) -> Result<()> {
    check_len("center_and_innovate g", g.len(), rows * cols)?;
    check_len("center_and_innovate y", y.len(), cols)?;
    check_len("center_and_innovate centred", centred.len(), rows * cols)?;
    check_len("center_and_innovate innov", innov.len(), rows * cols)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rows_i = to_i32("center_and_innovate rows", rows)?;
    let cols_i = to_i32("center_and_innovate cols", cols)?;
    let mut mean = be
        .stream()
        .alloc_zeros::<f64>(cols)
        .map_err(cuda_err("allocating the column means"))?;

    let f = be.kernels().get("row_mean_f64")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(g).arg(&rows_i).arg(&cols_i).arg(&mut mean);
    // SAFETY: check_len proved g = rows·cols; `mean` was allocated with cols elements.
    unsafe { launch.launch(mean_launch(cols)) }.map_err(cuda_err("launching row_mean_f64"))?;

    let f = be.kernels().get("center_and_innovate_f64")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(g)
        .arg(y)
        .arg(&mean)
        .arg(&rows_i)
        .arg(&cols_i)
        .arg(centred)
        .arg(innov);
    // SAFETY: check_len proved g, centred, innov = rows·cols and y = cols elements; mean has
    // cols; the grid-stride loop stops at rows·cols.
    unsafe { launch.launch(elementwise_stride_launch(rows * cols)) }
        .map(|_| ())
        .map_err(cuda_err("launching center_and_innovate_f64"))
}

/// Element-wise f64 → f32 (round to nearest). Errors: [`crate::Error::Shape`] on a
/// length mismatch.
pub fn f64_to_f32(be: &CudaBackend, src: &CudaSlice<f64>, dst: &mut CudaSlice<f32>) -> Result<()> {
    check_len("f64_to_f32 destination", dst.len(), src.len())?;
    let n = src.len();
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    let f = be.kernels().get("f64_to_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(src).arg(dst).arg(&n_i);
    // SAFETY: check_len proved dst and src both hold n elements; the loop stops at n.
    unsafe { launch.launch(elementwise_stride_launch(n)) }
        .map(|_| ())
        .map_err(cuda_err("launching f64_to_f32"))
}

/// `dst[i] += host[i]`: the host values are uploaded into a temporary device buffer and
/// added by `add_f64`. Errors: [`crate::Error::Shape`] on a length mismatch, the
/// upload's or launch's error.
pub fn add_host_f64(be: &CudaBackend, host: &[f64], dst: &mut CudaSlice<f64>) -> Result<()> {
    check_len("add_host_f64 destination", dst.len(), host.len())?;
    let n = host.len();
    if n == 0 {
        return Ok(());
    }
    let x = be
        .stream()
        .clone_htod(host)
        .map_err(cuda_err(&format!("uploading {n} f64")))?;
    let n_i = n as i64;
    let f = be.kernels().get("add_f64")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(&x).arg(dst).arg(&n_i);
    // SAFETY: check_len proved dst holds n elements, x was uploaded with n; the loop
    // stops at n.
    unsafe { launch.launch(elementwise_stride_launch(n)) }
        .map(|_| ())
        .map_err(cuda_err("launching add_f64"))
}

/// Multiplicative inflation about `mean`: `u[r, c] = fmaf(lambda, u[r, c] − mean[c],
/// mean[c])`. Errors: [`crate::Error::Shape`] on a length mismatch or a size past i32.
pub fn inflate_rows_f32(
    be: &CudaBackend,
    u: &mut CudaSlice<f32>,
    mean: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    lambda: f32,
) -> Result<()> {
    check_len("inflate_rows_f32 ensemble", u.len(), rows * cols)?;
    check_len("inflate_rows_f32 mean", mean.len(), cols)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let rows_i = to_i32("inflate_rows_f32 rows", rows)?;
    let cols_i = to_i32("inflate_rows_f32 cols", cols)?;
    let f = be.kernels().get("inflate_rows_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(u)
        .arg(mean)
        .arg(&rows_i)
        .arg(&cols_i)
        .arg(&lambda);
    // SAFETY: check_len proved u = rows·cols and mean = cols elements; the loop stops at
    // rows·cols and reads mean[i mod cols].
    unsafe { launch.launch(elementwise_stride_launch(rows * cols)) }
        .map(|_| ())
        .map_err(cuda_err("launching inflate_rows_f32"))
}

/// Nesterov momentum `u = u + beta (u − prev)`, `prev = old u` (`nesterov_f32`).
/// Errors: [`crate::Error::Shape`] on a length mismatch.
pub fn nesterov_f32(
    be: &CudaBackend,
    u: &mut CudaSlice<f32>,
    prev: &mut CudaSlice<f32>,
    beta: f32,
) -> Result<()> {
    check_len("nesterov_f32 previous ensemble", prev.len(), u.len())?;
    let n = u.len();
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    let f = be.kernels().get("nesterov_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(u).arg(prev).arg(&n_i).arg(&beta);
    // SAFETY: check_len proved u and prev both hold n elements; the loop stops at n.
    unsafe { launch.launch(elementwise_stride_launch(n)) }
        .map(|_| ())
        .map_err(cuda_err("launching nesterov_f32"))
}

/// `y[i] += alpha · x[i]` in f64 (`add_scaled_f32_f64`). Errors: [`crate::Error::Shape`]
/// on a length mismatch.
pub fn add_scaled_f32_f64(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    alpha: f64,
    y: &mut CudaSlice<f64>,
) -> Result<()> {
    check_len("add_scaled_f32_f64 destination", y.len(), x.len())?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    let f = be.kernels().get("add_scaled_f32_f64")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(x).arg(&alpha).arg(y).arg(&n_i);
    // SAFETY: check_len proved x and y both hold n elements; the loop stops at n.
    unsafe { launch.launch(elementwise_stride_launch(n)) }
        .map(|_| ())
        .map_err(cuda_err("launching add_scaled_f32_f64"))
}

/// Row sums of squares `Σ_c a[r, c]²` (`row_sq_norms_f64`), downloaded (rows values).
/// Errors: [`crate::Error::Shape`] on a length mismatch or a size past i32.
pub fn row_sq_norms_f64(
    be: &CudaBackend,
    a: &CudaSlice<f64>,
    rows: usize,
    cols: usize,
) -> Result<Vec<f64>> {
    check_len("row_sq_norms_f64 input", a.len(), rows * cols)?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    let rows_i = to_i32("row_sq_norms_f64 rows", rows)?;
    let cols_i = to_i32("row_sq_norms_f64 cols", cols)?;
    let mut out = be
        .stream()
        .alloc_zeros::<f64>(rows)
        .map_err(cuda_err("allocating the row sums"))?;
    let f = be.kernels().get("row_sq_norms_f64")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(a).arg(&rows_i).arg(&cols_i).arg(&mut out);
    // SAFETY: check_len proved a = rows·cols elements, out has rows; block r reads row r
    // only and thread 0 writes out[r]; rows ≤ i32::MAX fits the grid's x dimension.
    unsafe { launch.launch(row_sq_launch(rows)) }
        .map_err(cuda_err("launching row_sq_norms_f64"))?;
    be.stream()
        .clone_dtoh(&out)
        .map_err(cuda_err("downloading the row sums"))
}

/// Column standard deviations about `mean` (`row_std_f32`). Errors:
/// [`crate::Error::Shape`] on a length mismatch or a size past i32.
pub fn row_std_f32(
    be: &CudaBackend,
    a: &CudaSlice<f32>,
    mean: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("row_std_f32 input", a.len(), rows * cols)?;
    check_len("row_std_f32 mean", mean.len(), cols)?;
    check_len("row_std_f32 output", out.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    let rows_i = to_i32("row_std_f32 rows", rows)?;
    let cols_i = to_i32("row_std_f32 cols", cols)?;
    let f = be.kernels().get("row_std_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(a).arg(mean).arg(&rows_i).arg(&cols_i).arg(out);
    // SAFETY: check_len proved a = rows·cols, mean and out = cols elements; threads with
    // column ≥ cols neither read nor write.
    unsafe { launch.launch(mean_launch(cols)) }
        .map(|_| ())
        .map_err(cuda_err("launching row_std_f32"))
}

/// Additive inflation `u[i] += mult · scale[(offset + i) mod cols] · z_{offset + i}` with
/// Philox normals (`add_normal_f32`). Errors: [`crate::Error::Shape`] on a length mismatch
/// or a column count past i32.
#[allow(clippy::too_many_arguments)]
pub fn add_normal_f32(
    be: &CudaBackend,
    u: &mut CudaSlice<f32>,
    offset: usize,
    cols: usize,
    scale: &CudaSlice<f32>,
    mult: f32,
    key: [u32; 2],
    step: u32,
) -> Result<()> {
    check_len("add_normal_f32 scale", scale.len(), cols)?;
    let n = u.len();
    if cols == 0 || n == 0 {
        return Ok(());
    }
    if !n.is_multiple_of(cols) {
        return Err(crate::Error::Shape {
            what: "add_normal_f32 ensemble".into(),
            expected: format!("a multiple of {cols} values"),
            found: format!("{n}"),
        });
    }
    let cols_i = to_i32("add_normal_f32 cols", cols)?;
    let (n_i, off_i) = (n as i64, offset as i64);
    let f = be.kernels().get("add_normal_f32")?;
    let mut launch = be.stream().launch_builder(f);
    launch
        .arg(u)
        .arg(&n_i)
        .arg(&off_i)
        .arg(&cols_i)
        .arg(scale)
        .arg(&mult)
        .arg(&key[0])
        .arg(&key[1])
        .arg(&step);
    // SAFETY: u holds n elements (a multiple of cols), scale holds cols; each group g
    // writes only the local u[4g − offset .. 4g + 4 − offset) inside 0..n and reads
    // scale[gi mod cols].
    unsafe { launch.launch(elementwise_stride_launch(n.div_ceil(4) + 1)) }
        .map(|_| ())
        .map_err(cuda_err("launching add_normal_f32"))
}

/// `a[r, c] *= w[r]` (`scale_rows_f64`), `w` uploaded from the host. Errors:
/// [`crate::Error::Shape`] on a length mismatch or a size past i32.
pub fn scale_rows_f64(
    be: &CudaBackend,
    a: &mut CudaSlice<f64>,
    rows: usize,
    cols: usize,
    w: &[f64],
) -> Result<()> {
    check_len("scale_rows_f64 matrix", a.len(), rows * cols)?;
    check_len("scale_rows_f64 scales", w.len(), rows)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let rows_i = to_i32("scale_rows_f64 rows", rows)?;
    let cols_i = to_i32("scale_rows_f64 cols", cols)?;
    let wd = be
        .stream()
        .clone_htod(w)
        .map_err(cuda_err(&format!("uploading {rows} scales")))?;
    let f = be.kernels().get("scale_rows_f64")?;
    let mut launch = be.stream().launch_builder(f);
    launch.arg(a).arg(&wd).arg(&rows_i).arg(&cols_i);
    // SAFETY: check_len proved a = rows·cols elements, wd holds rows; the loop stops at
    // rows·cols and reads w[i / cols] < rows.
    unsafe { launch.launch(elementwise_stride_launch(rows * cols)) }
        .map(|_| ())
        .map_err(cuda_err("launching scale_rows_f64"))
}
