// linalg.cu: the small dense kernels of the EnKF update that cuBLAS/cuSOLVER do not cover.
//
// All matrices row-major f64. n × n matrices hold `blocks` diagonal blocks of size bs
// (n = blocks · bs); rhs is nrhs × n.
//
// add_diagonal_f64: a[i, i] += shift; 1-D grid over i.
// unit_block_lower_f64: a ← I − S(a), S = strictly block-lower part (block size bs);
//   1-D grid-stride over the n² entries.
// block_cholesky_solve_small_f64 (bs ≤ 32): rhs[:, block d] ← rhs[:, block d] · A_dd⁻¹
//   (mode 0), or ← rhs[:, block d] · L⁻ᵀ with A_dd = L Lᵀ (mode 1, whitening: the
//   forward substitution only; the EnKF gain's bounded factors).
//   grid (blocks, ceil(nrhs / blockDim.x)), blockDim.x = 128. Every CTA of column d
//   factors A_dd = L Lᵀ in shared memory (right-looking Cholesky on the lower triangle,
//   bs ≤ 32 steps; redundant across the CTAs of a column, but a 10 × 10 factor costs
//   less than loading the CTA's rows); then each thread solves one rhs row:
//   x = rhs row block (bs values in registers), L z = xᵀ, Lᵀ w = z, row ← wᵀ (mode 1
//   stops at z: row ← zᵀ).
//   Loops run to the compile-time bound 32 with an `i < bs` guard so the row stays in
//   registers. CTAs with blockIdx.y = 0 write info[d] = 0, or k + 1 when pivot k
//   (0-based) is not positive (then bad_pivot[d] = its value) and no row is written.
//   Why this shape: the sequential rule has 64 blocks of 10 and nrhs = J = 5000 rows;
//   one thread per (row, block) gives 320k independent solves.
#include "common.cuh"

#define CHOL_MAX_BS 32

extern "C" __global__ void add_diagonal_f64(double* __restrict__ a, int n, double shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        a[(long long)i * n + i] += shift;
    }
}

extern "C" __global__ void unit_block_lower_f64(double* __restrict__ a, int n, int bs) {
    const long long total = (long long)n * n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += stride) {
        const int r = (int)(i / n);
        const int c = (int)(i - (long long)r * n);
        if (c / bs < r / bs) {
            a[i] = -a[i];
        } else {
            a[i] = (r == c) ? 1.0 : 0.0;
        }
    }
}

extern "C" __global__ void block_cholesky_solve_small_f64(const double* __restrict__ a, int n,
                                                          int bs, double* __restrict__ rhs,
                                                          int nrhs, int* __restrict__ info,
                                                          double* __restrict__ bad_pivot,
                                                          int mode) {
    __shared__ double L[CHOL_MAX_BS][CHOL_MAX_BS + 1];
    __shared__ int failed;
    __shared__ double failed_value;
    const int d = blockIdx.x;
    const int tid = threadIdx.x;
    const long long base = (long long)d * bs * n + (long long)d * bs;
    for (int idx = tid; idx < bs * bs; idx += blockDim.x) {
        const int i = idx / bs;
        const int j = idx - i * bs;
        L[i][j] = a[base + (long long)i * n + j];
    }
    if (tid == 0) {
        failed = 0;
        failed_value = 0.0;
    }
    __syncthreads();

    for (int k = 0; k < bs; ++k) {
        if (tid == 0) {
            const double p = L[k][k];
            if (!(p > 0.0)) {  // also catches NaN
                failed = k + 1;
                failed_value = p;
            } else {
                L[k][k] = sqrt(p);
            }
        }
        __syncthreads();
        if (failed != 0) {
            break;  // uniform: every thread reads the same shared value after the barrier
        }
        for (int i = k + 1 + tid; i < bs; i += blockDim.x) {
            L[i][k] /= L[k][k];
        }
        __syncthreads();
        const int t = bs - k - 1;
        for (int idx = tid; idx < t * t; idx += blockDim.x) {
            const int i = k + 1 + idx / t;
            const int j = k + 1 + idx % t;
            if (j <= i) {
                L[i][j] -= L[i][k] * L[j][k];
            }
        }
        __syncthreads();
    }

    if (blockIdx.y == 0 && tid == 0) {
        info[d] = failed;
        bad_pivot[d] = failed_value;
    }
    if (failed != 0) {
        return;
    }

    const int r = blockIdx.y * blockDim.x + tid;
    if (r >= nrhs) {
        return;
    }
    double* row = rhs + (long long)r * n + (long long)d * bs;
    double v[CHOL_MAX_BS];
#pragma unroll
    for (int i = 0; i < CHOL_MAX_BS; ++i) {
        v[i] = (i < bs) ? row[i] : 0.0;
    }
    // L z = v (forward substitution)
#pragma unroll
    for (int i = 0; i < CHOL_MAX_BS; ++i) {
        if (i < bs) {
            double s = v[i];
#pragma unroll
            for (int k = 0; k < i; ++k) {
                s -= L[i][k] * v[k];
            }
            v[i] = s / L[i][i];
        }
    }
    // Lᵀ w = z (back substitution; (Lᵀ)[i][k] = L[k][i]); mode 1 keeps z.
    if (mode == 0) {
#pragma unroll
        for (int ii = 0; ii < CHOL_MAX_BS; ++ii) {
            const int i = CHOL_MAX_BS - 1 - ii;
            if (i < bs) {
                double s = v[i];
#pragma unroll
                for (int k = i + 1; k < CHOL_MAX_BS; ++k) {
                    if (k < bs) {
                        s -= L[k][i] * v[k];
                    }
                }
                v[i] = s / L[i][i];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < CHOL_MAX_BS; ++i) {
        if (i < bs) {
            row[i] = v[i];
        }
    }
}
