// backprop.cu: backpropagation through ONE network over a mini-batch, and the SGD and
// Adam updates. CUDA twins of src/cpu/backprop.rs and src/train/optim.rs.
//
// What, per image d of the batch (layer order of the CPU twin: conv1 → activation →
// max-pool → conv2 → activation → (Pooled: max-pool) → flatten → fc1 → softmax):
//   backprop_forward_f32      the forward pass keeping every intermediate (the cache);
//   softmax_xent_backward_f32 the cross-entropy of each image (f64), whether its arg-max
//                             is its label, and d loss / d logits = (p − onehot)/B;
//   backprop_backward_f32     the per-image weight gradient from d loss / d logits,
//                             written to row d of gimg (images × P);
//   grad_reduce_f32           grad[i] = Σ_d gimg[d, i], d ascending: a FIXED order, so the
//                             gradient is bit-identical from run to run;
//   sgd_step_f32, adam_step_f32  the optimizer updates, with exactly the rounding steps of
//                             Sgd::step and Adam::step (__f*_rn: no FMA contraction), so
//                             they are bit-identical to the CPU.
// Shapes (row-major, f32 unless said): weights P (state_dict order: conv1 [10,1,5,5] at 0,
//   conv2 [20,10,5,5] at 250, fc1 [10,F] at 5250, F = 1280 Paper / 320 Pooled);
//   x images × 784; labels images (int); per image (the CPU ForwardCache layout):
//   a1 10×24×24 (activation output, before pooling), p1 10×12×12, arg1 1440 (u32 index
//   into the image's a1), a2 20×8×8, p2 20×4×4 and arg2 320 (Pooled only), logits and
//   probs 10; loss images (f64), correct images (int), dlogits images × 10.
// Launch geometry: the three per-image kernels run one block per image (grid = images,
//   BP_THREADS threads); each image's intermediates live in static shared memory
//   (≤ 43 KB). grad_reduce and the optimizer steps: one thread per weight, 1-D grid.
// Why: a batch is 64 images of one network (~1.5 M multiply-adds each way per image):
//   small work, so the kernels favour a plain, checkable structure (one output element
//   per thread, gathers instead of scatters so no two threads write one address and
//   no atomics) over peak throughput. Max-pool ties: the first maximum in row-major
//   window order with a strictly-greater scan (a NaN wins), exactly as the CPU twin;
//   the backward pass gathers: an input element receives its window's gradient iff it
//   is that window's arg-max (windows do not overlap).
#include "common.cuh"

#define BP_THREADS 256
#define BP_A1 (ENKF_C1 * 24 * 24)       // 5760
#define BP_P1 (ENKF_C1 * ENKF_P1 * ENKF_P1)  // 1440
#define BP_A2 (ENKF_C2 * ENKF_H2 * ENKF_H2)  // 1280
#define BP_P2 (ENKF_C2 * ENKF_P2 * ENKF_P2)  // 320

// Derivative of the activation from its output y, rounded as Activation::
// derivative_from_output (no FMA contraction): logistic y(1−y), ReLU 1 where y > 0,
// tanh 1 − y².
__device__ __forceinline__ float bp_act_derivative(float y, int code) {
    if (code == ENKF_ACT_RELU) {
        return y > 0.0f ? 1.0f : 0.0f;
    }
    if (code == ENKF_ACT_TANH) {
        return __fsub_rn(1.0f, __fmul_rn(y, y));
    }
    return __fmul_rn(y, __fsub_rn(1.0f, y));
}

// Max-pool 2×2 stride 2 of in (c × h × w, shared) into out (c × h/2 × w/2): the first
// maximum of (0,0), (0,1), (1,0), (1,1) by strictly-greater comparison, a NaN winning;
// outs and args go to shared out and global arg (indices into in). Block-strided.
__device__ __forceinline__ void bp_maxpool2(const float* in, int c, int h, int w, float* out,
                                            unsigned int* arg) {
    const int oh = h >> 1;
    const int ow = w >> 1;
    for (int j = threadIdx.x; j < c * oh * ow; j += blockDim.x) {
        const int ch = j / (oh * ow);
        const int r = j - ch * (oh * ow);
        const int y = r / ow;
        const int xo = r - y * ow;
        const int base = (ch * h + 2 * y) * w + 2 * xo;
        int best = base;
        const int cand[3] = {base + 1, base + w, base + w + 1};
#pragma unroll
        for (int q = 0; q < 3; ++q) {
            const float v = in[cand[q]];
            const float b = in[best];
            if (v > b || (isnan(v) && !isnan(b))) {
                best = cand[q];
            }
        }
        out[j] = in[best];
        arg[j] = (unsigned int)best;
    }
}

// ---------------------------------------------------------------------------------------
// Forward with caches. Block d = image d. Shared: the image, a1, p1, a2 (and p2).
extern "C" __global__ void __launch_bounds__(BP_THREADS) backprop_forward_f32(
    const float* __restrict__ weights, const float* __restrict__ x, int images, int arch,
    int act, float* __restrict__ a1, float* __restrict__ p1, unsigned int* __restrict__ arg1,
    float* __restrict__ a2, float* __restrict__ p2, unsigned int* __restrict__ arg2,
    float* __restrict__ logits, float* __restrict__ probs) {
    __shared__ float s_img[ENKF_IMG_PIXELS];
    __shared__ float s_a1[BP_A1];
    __shared__ float s_p1[BP_P1];
    __shared__ float s_a2[BP_A2];
    __shared__ float s_p2[BP_P2];
    __shared__ float s_logits[ENKF_CLASSES];
    const int d = blockIdx.x;
    if (d >= images) {
        return;
    }
    const int fc_in = arch == ENKF_ARCH_POOLED ? BP_P2 : BP_A2;
    const float* w1 = weights;
    const float* w2 = weights + ENKF_CONV1_LEN;
    const float* wf = weights + ENKF_FC_OFFSET;
    const float* xd = x + (long long)d * ENKF_IMG_PIXELS;
    for (int i = threadIdx.x; i < ENKF_IMG_PIXELS; i += blockDim.x) {
        s_img[i] = __ldg(xd + i);
    }
    __syncthreads();

    // conv1 + activation: output (o, y, x), sum over (ky, kx) in the CPU twin's order.
    float* a1d = a1 + (long long)d * BP_A1;
    for (int j = threadIdx.x; j < BP_A1; j += blockDim.x) {
        const int o = j / 576;
        const int r = j - o * 576;
        const int y = r / 24;
        const int xx = r - y * 24;
        float acc = 0.0f;
#pragma unroll
        for (int ky = 0; ky < ENKF_K; ++ky) {
#pragma unroll
            for (int kx = 0; kx < ENKF_K; ++kx) {
                acc = fmaf(__ldg(w1 + o * 25 + ky * 5 + kx), s_img[(y + ky) * ENKF_IMG + xx + kx],
                           acc);
            }
        }
        const float v = enkf_activate(acc, act);
        s_a1[j] = v;
        a1d[j] = v;
    }
    __syncthreads();

    bp_maxpool2(s_a1, ENKF_C1, 24, 24, s_p1, arg1 + (long long)d * BP_P1);
    __syncthreads();
    float* p1d = p1 + (long long)d * BP_P1;
    for (int j = threadIdx.x; j < BP_P1; j += blockDim.x) {
        p1d[j] = s_p1[j];
    }

    // conv2 + activation: output (o, y, x), sum over (i, ky, kx) in the CPU twin's order.
    float* a2d = a2 + (long long)d * BP_A2;
    for (int j = threadIdx.x; j < BP_A2; j += blockDim.x) {
        const int o = j >> 6;
        const int y = (j >> 3) & 7;
        const int xx = j & 7;
        const float* wo = w2 + o * 250;
        float acc = 0.0f;
        for (int i = 0; i < ENKF_C1; ++i) {
#pragma unroll
            for (int ky = 0; ky < ENKF_K; ++ky) {
#pragma unroll
                for (int kx = 0; kx < ENKF_K; ++kx) {
                    acc = fmaf(__ldg(wo + i * 25 + ky * 5 + kx),
                               s_p1[i * 144 + (y + ky) * ENKF_P1 + xx + kx], acc);
                }
            }
        }
        const float v = enkf_activate(acc, act);
        s_a2[j] = v;
        a2d[j] = v;
    }
    __syncthreads();

    const float* feat = s_a2;
    if (arch == ENKF_ARCH_POOLED) {
        bp_maxpool2(s_a2, ENKF_C2, ENKF_H2, ENKF_H2, s_p2, arg2 + (long long)d * BP_P2);
        __syncthreads();
        float* p2d = p2 + (long long)d * BP_P2;
        for (int j = threadIdx.x; j < BP_P2; j += blockDim.x) {
            p2d[j] = s_p2[j];
        }
        feat = s_p2;
    }

    // fc1: warp w computes logits w, w + warps, …: lane-strided partial sums, then a
    // fixed-order warp sum (deterministic).
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    for (int k = warp; k < ENKF_CLASSES; k += blockDim.x >> 5) {
        const float* wk = wf + (long long)k * fc_in;
        float part = 0.0f;
        for (int f = lane; f < fc_in; f += 32) {
            part = fmaf(__ldg(wk + f), feat[f], part);
        }
        part = enkf_warp_sum(part);
        if (lane == 0) {
            s_logits[k] = part;
        }
    }
    __syncthreads();

    // Softmax as the CPU twin: max (first, strictly greater), e^(z − max), divide by the
    // sum taken in class order.
    if (threadIdx.x == 0) {
        float m = s_logits[0];
        for (int k = 1; k < ENKF_CLASSES; ++k) {
            m = s_logits[k] > m ? s_logits[k] : m;
        }
        float e[ENKF_CLASSES];
        float sum = 0.0f;
        for (int k = 0; k < ENKF_CLASSES; ++k) {
            e[k] = expf(s_logits[k] - m);
            sum += e[k];
        }
        for (int k = 0; k < ENKF_CLASSES; ++k) {
            logits[(long long)d * ENKF_CLASSES + k] = s_logits[k];
            probs[(long long)d * ENKF_CLASSES + k] = e[k] / sum;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Softmax cross-entropy and its gradient, one thread per image.
// loss[d] = log Σ_k e^{z_k} − z_label in f64 (max-shifted, as the CPU twin),
// correct[d] = (arg-max with ties to the lowest class == label),
// dlogits[d, k] = (probs[d, k] − [k == label]) · scale, scale = 1/B rounded to f32.
// A label outside 0..9 (the host checks them) yields loss NaN and no gradient.
extern "C" __global__ void softmax_xent_backward_f32(
    const float* __restrict__ logits, const float* __restrict__ probs,
    const int* __restrict__ labels, int images, float scale, double* __restrict__ loss,
    int* __restrict__ correct, float* __restrict__ dlogits) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= images) {
        return;
    }
    const float* z = logits + (long long)d * ENKF_CLASSES;
    const float* p = probs + (long long)d * ENKF_CLASSES;
    float* g = dlogits + (long long)d * ENKF_CLASSES;
    const int label = labels[d];
    int best = 0;
    for (int k = 1; k < ENKF_CLASSES; ++k) {
        if (z[k] > z[best]) {
            best = k;
        }
    }
    const double m = (double)z[best];
    double s = 0.0;
    for (int k = 0; k < ENKF_CLASSES; ++k) {
        s += exp((double)z[k] - m);
    }
    const bool ok = label >= 0 && label < ENKF_CLASSES;
    loss[d] = ok ? m + log(s) - (double)z[label] : nan("");
    correct[d] = (ok && best == label) ? 1 : 0;
    for (int k = 0; k < ENKF_CLASSES; ++k) {
        const float target = (ok && k == label) ? 1.0f : 0.0f;
        g[k] = ok ? __fmul_rn(__fsub_rn(p[k], target), scale) : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------
// Backward of one image per block, from dlogits and the cache; writes row d of gimg
// (images × P), every element of it. Shared: image, p1, dlogits, da2, dp1, da1 (dfeat
// shares da1's space: it is dead before da1 is formed). 10,720 floats = 42.9 KB.
extern "C" __global__ void __launch_bounds__(BP_THREADS) backprop_backward_f32(
    const float* __restrict__ weights, const float* __restrict__ x, int images, int n_params,
    int arch, int act, const float* __restrict__ a1, const float* __restrict__ p1,
    const unsigned int* __restrict__ arg1, const float* __restrict__ a2,
    const float* __restrict__ p2, const unsigned int* __restrict__ arg2,
    const float* __restrict__ dlogits, float* __restrict__ gimg) {
    __shared__ float s_img[ENKF_IMG_PIXELS];
    __shared__ float s_p1[BP_P1];
    __shared__ float s_da2[BP_A2];
    __shared__ float s_dp1[BP_P1];
    __shared__ float s_da1[BP_A1];
    __shared__ float s_dl[ENKF_CLASSES];
    float* s_dfeat = s_da1;  // fc_in ≤ 1280 floats, dead before da1 is written
    const int d = blockIdx.x;
    if (d >= images) {
        return;
    }
    const bool pooled = arch == ENKF_ARCH_POOLED;
    const int fc_in = pooled ? BP_P2 : BP_A2;
    const float* w2 = weights + ENKF_CONV1_LEN;
    const float* wf = weights + ENKF_FC_OFFSET;
    const float* xd = x + (long long)d * ENKF_IMG_PIXELS;
    const float* a1d = a1 + (long long)d * BP_A1;
    const float* p1d = p1 + (long long)d * BP_P1;
    const unsigned int* arg1d = arg1 + (long long)d * BP_P1;
    const float* a2d = a2 + (long long)d * BP_A2;
    const float* featd = pooled ? p2 + (long long)d * BP_P2 : a2d;
    const unsigned int* arg2d = arg2 + (long long)d * BP_P2;  // read only when pooled
    float* g = gimg + (long long)d * n_params;

    for (int i = threadIdx.x; i < ENKF_IMG_PIXELS; i += blockDim.x) {
        s_img[i] = __ldg(xd + i);
    }
    for (int i = threadIdx.x; i < BP_P1; i += blockDim.x) {
        s_p1[i] = p1d[i];
    }
    if (threadIdx.x < ENKF_CLASSES) {
        s_dl[threadIdx.x] = dlogits[(long long)d * ENKF_CLASSES + threadIdx.x];
    }
    __syncthreads();

    // fc1: dW[k, f] = dl[k]·feat[f]; dfeat[f] = Σ_k W[k, f]·dl[k], k ascending.
    for (int f = threadIdx.x; f < fc_in; f += blockDim.x) {
        const float v = featd[f];
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < ENKF_CLASSES; ++k) {
            g[ENKF_FC_OFFSET + k * fc_in + f] = s_dl[k] * v;
            acc = fmaf(__ldg(wf + k * fc_in + f), s_dl[k], acc);
        }
        s_dfeat[f] = acc;
    }
    __syncthreads();

    // Back to conv2's pre-activation: through the second pool (gather: a2 element j gets
    // its window's gradient iff it is the window's arg-max), then × act'(a2).
    for (int j = threadIdx.x; j < BP_A2; j += blockDim.x) {
        float gv;
        if (pooled) {
            const int c = j >> 6;
            const int y = (j >> 3) & 7;
            const int xx = j & 7;
            const int w = c * 16 + (y >> 1) * 4 + (xx >> 1);
            gv = arg2d[w] == (unsigned int)j ? s_dfeat[w] : 0.0f;
        } else {
            gv = s_dfeat[j];
        }
        s_da2[j] = gv * bp_act_derivative(a2d[j], act);
    }
    __syncthreads();

    // conv2 weights: dW2[o, i, ky, kx] = Σ_{y,x} da2[o, y, x]·p1[i, y+ky, x+kx].
    for (int j = threadIdx.x; j < ENKF_CONV2_LEN; j += blockDim.x) {
        const int o = j / 250;
        const int r = j - o * 250;
        const int i = r / 25;
        const int t = r - i * 25;
        const int ky = t / 5;
        const int kx = t - ky * 5;
        const float* dz = s_da2 + o * 64;
        const float* in = s_p1 + i * 144 + ky * ENKF_P1 + kx;
        float acc = 0.0f;
        for (int y = 0; y < ENKF_H2; ++y) {
#pragma unroll
            for (int xx = 0; xx < ENKF_H2; ++xx) {
                acc = fmaf(dz[y * 8 + xx], in[y * ENKF_P1 + xx], acc);
            }
        }
        g[ENKF_CONV1_LEN + j] = acc;
    }
    // conv2 input (gather): dp1[i, Y, X] = Σ_{o,ky,kx} W2[o, i, ky, kx]·da2[o, Y−ky, X−kx]
    // over the taps that land inside the 8 × 8 output.
    for (int j = threadIdx.x; j < BP_P1; j += blockDim.x) {
        const int i = j / 144;
        const int r = j - i * 144;
        const int Y = r / ENKF_P1;
        const int X = r - Y * ENKF_P1;
        float acc = 0.0f;
        for (int o = 0; o < ENKF_C2; ++o) {
            const float* wo = w2 + o * 250 + i * 25;
            const float* dz = s_da2 + o * 64;
#pragma unroll
            for (int ky = 0; ky < ENKF_K; ++ky) {
                const int y = Y - ky;
                if (y < 0 || y >= ENKF_H2) {
                    continue;
                }
#pragma unroll
                for (int kx = 0; kx < ENKF_K; ++kx) {
                    const int xx = X - kx;
                    if (xx >= 0 && xx < ENKF_H2) {
                        acc = fmaf(__ldg(wo + ky * 5 + kx), dz[y * 8 + xx], acc);
                    }
                }
            }
        }
        s_dp1[j] = acc;
    }
    __syncthreads();

    // Through the first pool (gather by arg-max) and the activation: da1 (10 × 24 × 24).
    for (int j = threadIdx.x; j < BP_A1; j += blockDim.x) {
        const int c = j / 576;
        const int r = j - c * 576;
        const int y = r / 24;
        const int xx = r - y * 24;
        const int w = c * 144 + (y >> 1) * ENKF_P1 + (xx >> 1);
        const float gv = arg1d[w] == (unsigned int)j ? s_dp1[w] : 0.0f;
        s_da1[j] = gv * bp_act_derivative(a1d[j], act);
    }
    __syncthreads();

    // conv1 weights: dW1[o, 0, ky, kx] = Σ_{y,x < 24} da1[o, y, x]·img[y+ky, x+kx].
    for (int j = threadIdx.x; j < ENKF_CONV1_LEN; j += blockDim.x) {
        const int o = j / 25;
        const int t = j - o * 25;
        const int ky = t / 5;
        const int kx = t - ky * 5;
        const float* dz = s_da1 + o * 576;
        const float* in = s_img + ky * ENKF_IMG + kx;
        float acc = 0.0f;
        for (int y = 0; y < 24; ++y) {
#pragma unroll 8
            for (int xx = 0; xx < 24; ++xx) {
                acc = fmaf(dz[y * 24 + xx], in[y * ENKF_IMG + xx], acc);
            }
        }
        g[j] = acc;
    }
}

// ---------------------------------------------------------------------------------------
// grad[i] = Σ_{d < images} gimg[d, i], d ascending (fixed order: deterministic).
// One thread per weight; a warp reads 32 consecutive weights of one row (coalesced).
extern "C" __global__ void grad_reduce_f32(const float* __restrict__ gimg, int images,
                                           int n_params, float* __restrict__ grad) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_params) {
        return;
    }
    float s = 0.0f;
    for (int d = 0; d < images; ++d) {
        s += gimg[(long long)d * n_params + i];
    }
    grad[i] = s;
}

// ---------------------------------------------------------------------------------------
// SGD with momentum (torch.optim.SGD), element-wise over n weights, rounding as Sgd::step:
//   momentum == 0: p = p + (−lr)·g;
//   first step:    buf = g;            later: buf = buf·mu + g;   then p = p + (−lr)·buf.
// mode: 0 = no momentum (buf unused), 1 = first step, 2 = later steps.
extern "C" __global__ void sgd_step_f32(float* __restrict__ params,
                                        const float* __restrict__ grad, float* __restrict__ buf,
                                        int n, float lr, float mu, int mode) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    const float gi = grad[i];
    float b;
    if (mode == 0) {
        b = gi;
    } else if (mode == 1) {
        b = gi;
        buf[i] = b;
    } else {
        b = __fadd_rn(__fmul_rn(buf[i], mu), gi);
        buf[i] = b;
    }
    params[i] = __fadd_rn(params[i], __fmul_rn(-lr, b));
}

// Adam (torch.optim.Adam), element-wise over n weights, rounding as Adam::step:
//   m = m + w1·(g − m);  v = v·b2 + (w2·g)·g;  denom = √v / bc2_sqrt + eps;
//   p = p + ((−step_size)·m) / denom.
// step_size = lr / (1 − β₁ᵗ) and bc2_sqrt = √(1 − β₂ᵗ) come from the host (f64, rounded).
extern "C" __global__ void adam_step_f32(float* __restrict__ params,
                                         const float* __restrict__ grad, float* __restrict__ m,
                                         float* __restrict__ v, int n, float step_size,
                                         float bc2_sqrt, float w1, float b2, float w2,
                                         float eps) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    const float gi = grad[i];
    const float mi = __fadd_rn(m[i], __fmul_rn(w1, __fsub_rn(gi, m[i])));
    const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(w2, gi), gi));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    m[i] = mi;
    v[i] = vi;
    params[i] = __fadd_rn(params[i], __fdiv_rn(__fmul_rn(-step_size, mi), denom));
}
