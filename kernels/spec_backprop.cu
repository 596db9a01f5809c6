// spec_backprop.cu: backpropagation through ONE layer-spec network (src/model/spec.rs)
// over a mini-batch of B images: the loss and its output gradient, and every layer's
// backward step. The forward pass that keeps each op's output is spec.cu's kernels run
// with one member; src/gpu/spec_backplan.rs lists the launches (shared with the CPU twins
// of the same names in src/cpu/spec_backprop_kernels.rs, which run the same list).
//
// Layout (row-major, f32): a layer's values are B × len, len = C·H·W (channel-major
// planes, as torch) or its features; g is the gradient of the loss with respect to such
// values (same layout); weights in torch's order (conv: co × c × k × k); the gradient of
// a weight or bias block is written, not added (every parameter belongs to one layer).
//
// Kernels and launch geometry:
//   spec_act_backward_f32      g ← g · act'(y) from the activation's output y; 1-D
//                              grid-stride, one thread per value.
//   spec_conv2d_dgrad_f32      the input gradient of a conv2d: one thread per input value
//                              (a gather over (o, ky, kx): no two threads write one
//                              address, no atomics); 1-D grid-stride.
//   spec_conv2d_wgrad_f32      the weight gradient of a conv2d: one block of
//                              SPEC_RED_THREADS threads per weight (grid-stride over the
//                              weights), thread t sums the positions j ≡ t (mod
//                              SPEC_RED_THREADS) of the B × oh × ow products, then
//                              spec_block_sum.
//   spec_bias_grad_f32         the bias gradient (Σ over images and a plane): as wgrad,
//                              one block per bias entry.
//   spec_pool2d_backward_f32   max-/average-pool (window = stride = k): one thread per
//                              input value; max-pool recomputes its window's first
//                              maximum (the forward's rule) and takes the window's
//                              gradient iff it is that maximum; inputs outside the
//                              floored windows get 0.
//   spec_softmax_xent_f32      per image: softmax in f32 as the CPU's softmax_into, the
//                              cross-entropy in f64, whether the arg-max (ties to the
//                              lowest class) is the label, and g = (p − onehot)·scale,
//                              scale = 1/B; one thread per image, 1-D grid.
//   spec_mse_backward_f32      per image: Σ (o − t)² in f64 and g = (o − t)·scale, scale =
//                              2/(B·k); one thread per image.
// Determinism: every sum runs in a fixed order (a thread's own terms ascending, then the
// block's tree halving 128, 64, ..., 1), so a gradient is bit-identical from run to run,
// and the twins repeat exactly these operations (fmaf in the products, __f*_rn where the
// CPU path rounds separately): bit for bit in the emulation; on hardware too, except for
// the loss kernel's expf / exp / log (the device's rounding, within 2 ulp).
#include "common.cuh"

// Threads of every reduction block (the host launches exactly this many; the twins and
// src/gpu/spec_backplan.rs's SPEC_RED_THREADS repeat the value).
#define SPEC_RED_THREADS 256

// The sum of v over the block (blockDim.x = SPEC_RED_THREADS), valid in thread 0:
// sh[t] = v_t, then for s = 128, 64, ..., 1: sh[t] += sh[t + s] for t < s. Ends with a
// barrier, so the block may reuse sh at once.
__device__ __forceinline__ float spec_block_sum(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = SPEC_RED_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) {
            sh[threadIdx.x] = __fadd_rn(sh[threadIdx.x], sh[threadIdx.x + s]);
        }
        __syncthreads();
    }
    const float total = sh[0];
    __syncthreads();
    return total;
}

// g[i] ← g[i] · act'(y[i]) for i < n: logistic y(1 − y), tanh 1 − y², ReLU 1 where y > 0
// else 0, heaviside 0 (it has no useful gradient); each product rounded on its own, as
// the CPU's spec_act_derivative. ENKF_ACT_NONE leaves g as it is.
extern "C" __global__ void spec_act_backward_f32(float* __restrict__ g,
                                                 const float* __restrict__ y, long long n,
                                                 int act) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = y[i];
        float d;
        if (act == ENKF_ACT_NONE) {
            continue;
        } else if (act == ENKF_ACT_RELU) {
            d = v > 0.0f ? 1.0f : 0.0f;
        } else if (act == ENKF_ACT_TANH) {
            d = __fsub_rn(1.0f, __fmul_rn(v, v));
        } else if (act == ENKF_ACT_HEAVISIDE) {
            d = 0.0f;
        } else {
            d = __fmul_rn(v, __fsub_rn(1.0f, v));
        }
        g[i] = __fmul_rn(g[i], d);
    }
}

// Input gradient of a conv2d (square kernel k, stride, zero padding): g (images × co × oh
// × ow), w (co × c × k × k) → din (images × c × h × wd), din[d, ci, iy, ix] = Σ over o,
// ky, kx (ascending) of w[o, ci, ky, kx] · g[d, o, y, x] for the output positions with
// y·stride + ky − pad = iy and x·stride + kx − pad = ix; s = fmaf(w, g, s) from 0.
extern "C" __global__ void spec_conv2d_dgrad_f32(const float* __restrict__ g,
                                                 const float* __restrict__ w,
                                                 float* __restrict__ din, int images, int c,
                                                 int h, int wd, int co, int oh, int ow, int k,
                                                 int stride, int pad) {
    const long long in_plane = (long long)h * wd;
    const long long in_image = (long long)c * in_plane;
    const long long n = (long long)images * in_image;
    const long long plane = (long long)oh * ow;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long d = i / in_image;
        const long long rest = i - d * in_image;
        const int ci = (int)(rest / in_plane);
        const int pos = (int)(rest - (long long)ci * in_plane);
        const int iy = pos / wd;
        const int ix = pos - iy * wd;
        const float* gd = g + d * co * plane;
        float s = 0.0f;
        for (int o = 0; o < co; ++o) {
            const float* wo = w + ((long long)o * c + ci) * k * k;
            const float* go = gd + (long long)o * plane;
            for (int ky = 0; ky < k; ++ky) {
                const int ty = iy + pad - ky;
                if (ty < 0 || ty % stride != 0 || ty / stride >= oh) {
                    continue;
                }
                const int y = ty / stride;
                for (int kx = 0; kx < k; ++kx) {
                    const int tx = ix + pad - kx;
                    if (tx < 0 || tx % stride != 0 || tx / stride >= ow) {
                        continue;
                    }
                    s = fmaf(wo[ky * k + kx], go[(long long)y * ow + tx / stride], s);
                }
            }
        }
        din[i] = s;
    }
}

// Weight gradient of a conv2d: in (images × c × h × wd), g (images × co × oh × ow) → dw
// (co × c × k × k), dw[o, ci, ky, kx] = Σ over d, y, x of g[d, o, y, x] · in[d, ci,
// y·stride + ky − pad, x·stride + kx − pad] (taps in the padding skipped). Block b takes
// weights b, b + gridDim.x, ...; thread t the flat positions j = t, t + 256, ... of
// images × oh × ow (d-major), acc = fmaf(g, in, acc); then spec_block_sum.
extern "C" __global__ void __launch_bounds__(SPEC_RED_THREADS)
    spec_conv2d_wgrad_f32(const float* __restrict__ in, const float* __restrict__ g,
                          float* __restrict__ dw, int images, int c, int h, int wd, int co,
                          int oh, int ow, int k, int stride, int pad) {
    __shared__ float sh[SPEC_RED_THREADS];
    const int kk = k * k;
    const long long n_w = (long long)co * c * kk;
    const long long plane = (long long)oh * ow;
    const long long positions = (long long)images * plane;
    for (long long wi = blockIdx.x; wi < n_w; wi += gridDim.x) {
        const int o = (int)(wi / ((long long)c * kk));
        const int rest = (int)(wi - (long long)o * c * kk);
        const int ci = rest / kk;
        const int ky = (rest - ci * kk) / k;
        const int kx = rest - ci * kk - ky * k;
        float acc = 0.0f;
        for (long long j = threadIdx.x; j < positions; j += SPEC_RED_THREADS) {
            const long long d = j / plane;
            const int pos = (int)(j - d * plane);
            const int y = pos / ow;
            const int x = pos - y * ow;
            const int iy = y * stride + ky - pad;
            const int ix = x * stride + kx - pad;
            if (iy < 0 || iy >= h || ix < 0 || ix >= wd) {
                continue;
            }
            const float gv = g[(d * co + o) * plane + pos];
            const float xv = in[((d * c + ci) * h + iy) * (long long)wd + ix];
            acc = fmaf(gv, xv, acc);
        }
        const float total = spec_block_sum(acc, sh);
        if (threadIdx.x == 0) {
            dw[wi] = total;
        }
    }
}

// Bias gradient: g (images × channels × plane) → db (channels), db[o] = Σ over d and q of
// g[d, o, q]. Block b takes channels b, b + gridDim.x, ...; thread t the flat indices j =
// t, t + 256, ... of images × plane (d-major), acc = __fadd_rn(acc, g); then
// spec_block_sum.
extern "C" __global__ void __launch_bounds__(SPEC_RED_THREADS)
    spec_bias_grad_f32(const float* __restrict__ g, float* __restrict__ db, int images,
                       int channels, int plane) {
    __shared__ float sh[SPEC_RED_THREADS];
    const long long count = (long long)images * plane;
    for (long long o = blockIdx.x; o < channels; o += gridDim.x) {
        float acc = 0.0f;
        for (long long j = threadIdx.x; j < count; j += SPEC_RED_THREADS) {
            const long long d = j / plane;
            const long long q = j - d * plane;
            acc = __fadd_rn(acc, g[(d * channels + o) * plane + q]);
        }
        const float total = spec_block_sum(acc, sh);
        if (threadIdx.x == 0) {
            db[o] = total;
        }
    }
}

// Backward of a max- (mode 0) or average-pool (mode 1), window = stride = k, floored
// output: in (planes × h × wd, the pool's input), g (planes × oh × ow) → din (planes × h ×
// wd). Max: din = g of the window iff this input is the window's first maximum in
// row-major order (strictly greater, a NaN winning: spec_pool2d_f32's rule), else 0.
// Average: din = g · (1/k²), 1/k² rounded to f32. Outside the windows: 0.
extern "C" __global__ void spec_pool2d_backward_f32(const float* __restrict__ in,
                                                    const float* __restrict__ g,
                                                    float* __restrict__ din, long long planes,
                                                    int h, int wd, int oh, int ow, int k,
                                                    int mode) {
    const long long in_plane = (long long)h * wd;
    const long long n = planes * in_plane;
    const float inv = 1.0f / (float)(k * k);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long p = i / in_plane;
        const int pos = (int)(i - p * in_plane);
        const int iy = pos / wd;
        const int ix = pos - iy * wd;
        const int wy = iy / k;
        const int wx = ix / k;
        if (wy >= oh || wx >= ow) {
            din[i] = 0.0f;
            continue;
        }
        const float gv = g[p * oh * ow + (long long)wy * ow + wx];
        if (mode == 0) {
            const float* src = in + p * in_plane + (long long)(wy * k) * wd + wx * k;
            float v = src[0];
            int best = 0;
            for (int ky = 0; ky < k; ++ky) {
                for (int kx = 0; kx < k; ++kx) {
                    const float t = src[(long long)ky * wd + kx];
                    if (t > v || (t != t && v == v)) {
                        v = t;
                        best = ky * k + kx;
                    }
                }
            }
            din[i] = best == (iy - wy * k) * k + (ix - wx * k) ? gv : 0.0f;
        } else {
            din[i] = __fmul_rn(gv, inv);
        }
    }
}

// Softmax cross-entropy of image d < images (logits images × classes, labels the host
// checked below classes): the softmax as softmax_into (max by a strictly-greater scan
// from z[0], e = expf(z − max), the sum in class order, p = e / sum); loss[d] = max + log
// Σ exp(z − max) − z[label] in f64 from the f32 logits; correct[d] = (arg-max, ties to
// the lowest class, == label); g[d, ·] = (p − onehot) · scale. A label out of range
// yields loss NaN, correct 0 and g 0.
extern "C" __global__ void spec_softmax_xent_f32(const float* __restrict__ logits,
                                                 const int* __restrict__ labels, int images,
                                                 int classes, float scale,
                                                 double* __restrict__ loss,
                                                 int* __restrict__ correct,
                                                 float* __restrict__ g) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= images) {
        return;
    }
    const float* z = logits + (long long)d * classes;
    float* gd = g + (long long)d * classes;
    const int label = labels[d];
    const bool ok = label >= 0 && label < classes;
    int best = 0;
    for (int j = 1; j < classes; ++j) {
        if (z[j] > z[best]) {
            best = j;
        }
    }
    float mx = z[0];
    for (int j = 0; j < classes; ++j) {
        if (z[j] > mx) {
            mx = z[j];
        }
    }
    float sum = 0.0f;
    for (int j = 0; j < classes; ++j) {
        const float e = expf(__fsub_rn(z[j], mx));
        gd[j] = e;
        sum = __fadd_rn(sum, e);
    }
    for (int j = 0; j < classes; ++j) {
        const float p = __fdiv_rn(gd[j], sum);
        const float target = (ok && j == label) ? 1.0f : 0.0f;
        gd[j] = ok ? __fmul_rn(__fsub_rn(p, target), scale) : 0.0f;
    }
    const double m = (double)z[best];
    double s = 0.0;
    for (int j = 0; j < classes; ++j) {
        s = __dadd_rn(s, exp((double)z[j] - m));
    }
    loss[d] = ok ? (m + log(s)) - (double)z[label] : nan("");
    correct[d] = (ok && best == label) ? 1 : 0;
}

// Squared error of image d < images (out and targets images × k): loss[d] = Σ_j
// ((double)o − (double)t)² in j order, each square and sum rounded on its own; g[d, j] =
// (o − t) · scale in f32.
extern "C" __global__ void spec_mse_backward_f32(const float* __restrict__ out,
                                                 const float* __restrict__ targets, int images,
                                                 int k, float scale, double* __restrict__ loss,
                                                 float* __restrict__ g) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= images) {
        return;
    }
    const long long at = (long long)d * k;
    double s = 0.0;
    for (int j = 0; j < k; ++j) {
        const float o = out[at + j];
        const float t = targets[at + j];
        const double e = (double)o - (double)t;
        s = __dadd_rn(s, __dmul_rn(e, e));
        g[at + j] = __fmul_rn(__fsub_rn(o, t), scale);
    }
    loss[d] = s;
}
