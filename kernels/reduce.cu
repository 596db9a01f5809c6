// reduce.cu: reductions over the ensemble (rows = members) and element-wise conversions.
//
// Shapes (row-major): a, g are rows × cols f32 (rows = J members, cols = m = 10·B
// observations); y, mean, out have cols entries; centred and innov are rows × cols f64.
//
// Column means (row_mean_f32, row_mean_f64): blockDim (32, 16), grid ceil(cols / 32).
//   threadIdx.x picks the column, so each warp reads 32 consecutive floats of a row
//   (coalesced); the 16 threadIdx.y slices stride over the rows and accumulate in f64;
//   the 16 partial sums of a column are added in a fixed order in shared memory. The
//   result does not depend on timing (no atomics), and an f64 sum of J ≤ 10^6 f32 values
//   is exact to well below f32 rounding, as in the CPU twin (src/cpu/reduce.rs).
// Element-wise kernels: 1-D grid-stride loops over the flat index (long long), any grid.
//   add_f64: y[i] += x[i] (n entries; the stochastic EnKF adds its perturbed observations
//     to the innovations, J × m).
//   inflate_rows_f32: u[r, c] = fmaf(lambda, u[r, c] − mean[c], mean[c]) over rows × cols
//     (multiplicative inflation of the members about their mean; fmaf so that the CPU
//     twin's mul_add gives the same bits).
//   nesterov_f32: x = u[i]; u[i] = fmaf(beta, x − prev[i], x); prev[i] = x (Nesterov
//     momentum on the members after an update, n = J·P entries).
//   scale_rows_f64: a[r, c] *= w[r] over rows × cols (the transform update's matrix
//     functions Qᵀ diag(w) Q; one multiply, the CPU twin's bits).
//   add_scaled_f32_f64: y[i] = fma(alpha, (double)x[i], y[i]) (f32 Gram matrices into the
//     f64 member-space systems of the Tikhonov update).
// Row sums of squares (row_sq_norms_f64): one block of ROWSQ_THREADS (256) threads per
//   row, grid (rows); thread t sums a[r, t], a[r, t + 256], … with fma in f64, then the
//   256 partial sums are added by a fixed halving tree in shared memory. The CPU twin
//   follows the same order, so the two agree bit for bit (the data-misfit controller's
//   Φ_j = |y − g_j|² / 2γ reads these from the innovations D, J × m).
// Column standard deviations (row_std_f32): as row_mean_f32, over (a[r, c] − mean[c])²,
//   sqrt of the f64 mean, rounded once to f32 (additive inflation's "spread" scale).
// Additive inflation (add_normal_f32): u[i] += mult · scale[(offset + i) mod cols] ·
//   z_{offset + i} with z standard normal from a counter-based generator, so the draws are
//   a function of (key, step, global index) and need no state (a rank of a sharded run
//   passes its first member's offset, and its rows get the one-process run's draws): Philox4x32-10 (Salmon et al. 2011, Random123) with key
//   (key0, key1) and counter (g mod 2^32, g / 2^32, step, 0) for the group g of elements
//   4g … 4g + 3; its four 32-bit words give two uniform pairs u = (x + 0.5) 2^-32 and
//   Box–Muller in f64: z = √(−2 ln u₁) (cos 2πu₂, sin 2πu₂). Grid-stride over the groups.
//   The CPU twin computes the same integers; the f64 transcendentals (device: ≤ 2 ulp)
//   round to the same f32 almost always: twins agree to 1 ulp of f32.
#include "common.cuh"

#define ROWSQ_THREADS 256

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

// Philox4x32-10 of counter c under key (k0, k1), in place.
__device__ __forceinline__ void philox4x32_10(unsigned int c[4], unsigned int k0,
                                              unsigned int k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        const unsigned long long p0 = (unsigned long long)PHILOX_M0 * c[0];
        const unsigned long long p1 = (unsigned long long)PHILOX_M1 * c[2];
        const unsigned int hi0 = (unsigned int)(p0 >> 32), lo0 = (unsigned int)p0;
        const unsigned int hi1 = (unsigned int)(p1 >> 32), lo1 = (unsigned int)p1;
        const unsigned int n0 = hi1 ^ c[1] ^ k0;
        const unsigned int n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
    }
}

#define MEAN_TX 32
#define MEAN_TY 16

// Column sums of a (rows × cols) in f64, divided by rows; thread (tx, 0) returns it.
__device__ __forceinline__ double column_mean(const float* __restrict__ a, int rows, int cols,
                                              int c) {
    __shared__ double part[MEAN_TY][MEAN_TX + 1];
    double s = 0.0;
    if (c < cols) {
        for (int r = threadIdx.y; r < rows; r += MEAN_TY) {
            s += (double)a[(long long)r * cols + c];
        }
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    double t = 0.0;
    if (threadIdx.y == 0) {
#pragma unroll
        for (int i = 0; i < MEAN_TY; ++i) {
            t += part[i][threadIdx.x];
        }
    }
    return t / (double)rows;
}

// out[c] = (1/rows) Σ_r a[r, c], rounded once to f32.
extern "C" __global__ void row_mean_f32(const float* __restrict__ a, int rows, int cols,
                                        float* __restrict__ out) {
    const int c = blockIdx.x * MEAN_TX + threadIdx.x;
    const double m = column_mean(a, rows, cols, c);
    if (threadIdx.y == 0 && c < cols) {
        out[c] = (float)m;
    }
}

// mean[c] = (1/rows) Σ_r a[r, c], kept in f64 (input of center_and_innovate_f64).
extern "C" __global__ void row_mean_f64(const float* __restrict__ a, int rows, int cols,
                                        double* __restrict__ mean) {
    const int c = blockIdx.x * MEAN_TX + threadIdx.x;
    const double m = column_mean(a, rows, cols, c);
    if (threadIdx.y == 0 && c < cols) {
        mean[c] = m;
    }
}

// out[c] = sqrt((1/rows) Σ_r (a[r, c] − mean[c])²), f64 sums rounded once to f32.
extern "C" __global__ void row_std_f32(const float* __restrict__ a,
                                       const float* __restrict__ mean, int rows, int cols,
                                       float* __restrict__ out) {
    __shared__ double part[MEAN_TY][MEAN_TX + 1];
    const int c = blockIdx.x * MEAN_TX + threadIdx.x;
    double s = 0.0;
    if (c < cols) {
        const double m = (double)mean[c];
        for (int r = threadIdx.y; r < rows; r += MEAN_TY) {
            const double d = (double)a[(long long)r * cols + c] - m;
            s += d * d;
        }
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double t = 0.0;
#pragma unroll
        for (int i = 0; i < MEAN_TY; ++i) {
            t += part[i][threadIdx.x];
        }
        out[c] = (float)sqrt(t / (double)rows);
    }
}

// centred[r, c] = g[r, c] − mean[c], innov[r, c] = y[c] − g[r, c], all in f64.
extern "C" __global__ void center_and_innovate_f64(const float* __restrict__ g,
                                                   const float* __restrict__ y,
                                                   const double* __restrict__ mean, int rows,
                                                   int cols, double* __restrict__ centred,
                                                   double* __restrict__ innov) {
    const long long total = (long long)rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += stride) {
        const int c = (int)(i % cols);
        const double v = (double)g[i];
        centred[i] = v - mean[c];
        innov[i] = (double)y[c] - v;
    }
}

// dst[i] = (float)src[i] (round to nearest).
extern "C" __global__ void f64_to_f32(const double* __restrict__ src, float* __restrict__ dst,
                                      long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[i] = (float)src[i];
    }
}

// y[i] += x[i].
extern "C" __global__ void add_f64(const double* __restrict__ x, double* __restrict__ y,
                                   long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] += x[i];
    }
}

// u[r, c] = mean[c] + lambda · (u[r, c] − mean[c]), as one fused multiply-add.
extern "C" __global__ void inflate_rows_f32(float* __restrict__ u,
                                            const float* __restrict__ mean, int rows,
                                            int cols, float lambda) {
    const long long n = (long long)rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float m = mean[i % cols];
        u[i] = fmaf(lambda, u[i] - m, m);
    }
}

// x = u[i]; u[i] = x + beta · (x − prev[i]) as one fmaf; prev[i] = x.
extern "C" __global__ void nesterov_f32(float* __restrict__ u, float* __restrict__ prev,
                                        long long n, float beta) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float x = u[i];
        u[i] = fmaf(beta, x - prev[i], x);
        prev[i] = x;
    }
}

// y[i] += alpha · x[i] in f64 (x f32), one fma.
extern "C" __global__ void add_scaled_f32_f64(const float* __restrict__ x, double alpha,
                                              double* __restrict__ y, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = fma(alpha, (double)x[i], y[i]);
    }
}

// out[r] = Σ_c a[r, c]², f64; blockDim.x must be ROWSQ_THREADS, grid.x = rows.
extern "C" __global__ void row_sq_norms_f64(const double* __restrict__ a, int rows, int cols,
                                            double* __restrict__ out) {
    __shared__ double part[ROWSQ_THREADS];
    const int r = blockIdx.x;
    double s = 0.0;
    if (r < rows) {
        for (int c = threadIdx.x; c < cols; c += ROWSQ_THREADS) {
            const double v = a[(long long)r * cols + c];
            s = fma(v, v, s);
        }
    }
    part[threadIdx.x] = s;
    __syncthreads();
    for (int h = ROWSQ_THREADS / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) {
            part[threadIdx.x] += part[threadIdx.x + h];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && r < rows) {
        out[r] = part[0];
    }
}

// u[i] += mult · scale[(offset + i) mod cols] · z_{offset + i} (module header), n = rows ·
// cols local entries; thread t takes the groups g of global elements 4g … 4g + 3 that
// meet offset … offset + n − 1, from offset / 4 on.
extern "C" __global__ void add_normal_f32(float* __restrict__ u, long long n, long long offset,
                                          int cols, const float* __restrict__ scale,
                                          float mult, unsigned int key0, unsigned int key1,
                                          unsigned int step) {
    const long long g0 = offset / 4;
    const long long g1 = (offset + n + 3) / 4;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long g = g0 + (long long)blockIdx.x * blockDim.x + threadIdx.x; g < g1;
         g += stride) {
        unsigned int c[4] = {(unsigned int)g, (unsigned int)(g >> 32), step, 0u};
        philox4x32_10(c, key0, key1);
        double z[4];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const double u1 = ((double)c[2 * k] + 0.5) * 2.3283064365386963e-10;
            const double u2 = ((double)c[2 * k + 1] + 0.5) * 2.3283064365386963e-10;
            const double r = sqrt(-2.0 * log(u1));
            const double t = 6.283185307179586 * u2;
            z[2 * k] = r * cos(t);
            z[2 * k + 1] = r * sin(t);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const long long gi = 4 * g + k;
            const long long i = gi - offset;
            if (i >= 0 && i < n) {
                const double s = (double)mult * (double)scale[gi % cols];
                u[i] = (float)((double)u[i] + s * z[k]);
            }
        }
    }
}

// a[r, c] *= w[r] over rows × cols.
extern "C" __global__ void scale_rows_f64(double* __restrict__ a, const double* __restrict__ w,
                                          int rows, int cols) {
    const long long n = (long long)rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        a[i] *= w[i / cols];
    }
}
