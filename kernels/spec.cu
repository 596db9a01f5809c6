// spec.cu: the layers of a layer-spec network (src/model/spec.rs), every member of an
// ensemble chunk at once. The paper's presets keep their fused kernel (forward.cu); this
// family runs any spec, layer by layer (src/gpu/spec_forward.rs plans the launches).
//
// Layout (row-major, f32): activations are members × images × len, len = C·H·W of the
// layer (channel-major planes, as torch) or its features. The first layer reads the
// shared images (images × len, `in_mstride` = 0); later layers read the previous
// layer's chunk (`in_mstride` = images · len). Weights: member r of the chunk has its
// P parameters at w + w_base + r · w_stride (w_stride = P, w_base = first member · P +
// the layer's offset); a layer's weight is in torch's order (conv: co × c × k × k,
// linear: n × f), its bias (when `b_off` ≥ 0, relative to w_base) one value per output
// channel / feature. Linear layers are not here: they are one cuBLAS strided-batched
// GEMM per chunk (the members as the batch), followed by spec_bias_act_f32.
//
// Launch geometry (all three): 1-D grid-stride loops over the flat output index (long
// long), one thread per output value, any grid (the backend uses 256 threads × up to
// 65,536 blocks). Consecutive threads take consecutive output columns of one plane row,
// so the input reads of a warp are contiguous and its weight reads one broadcast.
//
// Arithmetic, matched by the CPU twins of the same names (src/cpu/spec_kernels.rs) bit
// for bit: spec_conv2d_f32 accumulates s = fmaf(w, x, s) in the order (input channel,
// ky, kx) from 0, skipping taps in the zero padding, then adds the bias, then the
// activation; spec_pool2d_f32 takes the first maximum of its window in row-major order
// (strictly greater, a NaN wins, as torch's CPU max_pool2d) or sums the window row by
// row and divides by k², then the activation; spec_bias_act_f32 adds the bias, then the
// activation. The activation (ENKF_ACT_NONE: none) uses IEEE expf/tanhf, so it matches
// the twin to the device's expf/tanhf rounding (2 ulp), exact in the emulation.
#include "common.cuh"

// conv2d (torch Conv2d: square kernel k, stride, zero padding) of the chunk:
// in (members × images × c × h × wd, or images × c × h × wd shared when in_mstride = 0)
// → out (members × images × co × oh × ow), then activation `act`.
extern "C" __global__ void spec_conv2d_f32(const float* __restrict__ in, long long in_mstride,
                                           const float* __restrict__ w, long long w_base,
                                           long long w_stride, long long b_off,
                                           float* __restrict__ out, int members, int images,
                                           int c, int h, int wd, int co, int oh, int ow, int k,
                                           int stride, int pad, int act) {
    const long long plane = (long long)oh * ow;
    const long long per_image = (long long)co * plane;
    const long long per_member = (long long)images * per_image;
    const long long n = (long long)members * per_member;
    const long long in_image = (long long)c * h * wd;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / per_member;
        const long long rest = i - r * per_member;
        const long long d = rest / per_image;
        const long long within = rest - d * per_image;
        const int o = (int)(within / plane);
        const int pos = (int)(within - (long long)o * plane);
        const int y = pos / ow;
        const int x = pos - y * ow;
        const float* wm = w + w_base + r * w_stride;
        const float* wo = wm + (long long)o * c * k * k;
        const float* src = in + r * in_mstride + d * in_image;
        float s = 0.0f;
        for (int ci = 0; ci < c; ++ci) {
            for (int ky = 0; ky < k; ++ky) {
                const int iy = y * stride + ky - pad;
                if (iy < 0 || iy >= h) {
                    continue;
                }
                const float* row = src + ((long long)ci * h + iy) * wd;
                const float* wr = wo + (ci * k + ky) * k;
                for (int kx = 0; kx < k; ++kx) {
                    const int ix = x * stride + kx - pad;
                    if (ix < 0 || ix >= wd) {
                        continue;
                    }
                    s = fmaf(wr[kx], row[ix], s);
                }
            }
        }
        if (b_off >= 0) {
            s += wm[b_off + o];
        }
        out[i] = enkf_spec_activate(s, act);
    }
}

// Max- (mode 0) or average-pool (mode 1), window = stride = k, floored output, over
// `planes` planes of h × wd (members × images × channels, contiguous; or the shared
// images' planes repeated for every member when in_mstride = 0, `planes_per_member`
// planes each) → out (planes × oh × ow), then activation `act`.
extern "C" __global__ void spec_pool2d_f32(const float* __restrict__ in, long long in_mstride,
                                           float* __restrict__ out, long long planes,
                                           long long planes_per_member, int h, int wd, int oh,
                                           int ow, int k, int mode, int act) {
    const long long plane = (long long)oh * ow;
    const long long n = planes * plane;
    const float inv = (float)(k * k);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long p = i / plane;
        const int pos = (int)(i - p * plane);
        const int y = pos / ow;
        const int x = pos - y * ow;
        const long long r = p / planes_per_member;
        const long long q = p - r * planes_per_member;
        const float* src =
            in + r * in_mstride + q * ((long long)h * wd) + (long long)(y * k) * wd + x * k;
        float v;
        if (mode == 0) {
            v = src[0];
            for (int ky = 0; ky < k; ++ky) {
                for (int kx = 0; kx < k; ++kx) {
                    const float t = src[(long long)ky * wd + kx];
                    if (t > v || (t != t && v == v)) {
                        v = t;
                    }
                }
            }
        } else {
            float acc = 0.0f;
            for (int ky = 0; ky < k; ++ky) {
                for (int kx = 0; kx < k; ++kx) {
                    acc += src[(long long)ky * wd + kx];
                }
            }
            v = acc / inv;
        }
        out[i] = enkf_spec_activate(v, act);
    }
}

// Bias and activation of the chunk: out[r, d, j] = act(in[r, d, j] + bias_r[j / plane])
// over members × images × len values (len = channels · plane; linear layers have
// plane 1), the bias of member r at w[w_base + r · w_stride + j / plane] when
// has_bias ≠ 0. in may equal out; in_mstride = 0 reads the shared images.
extern "C" __global__ void spec_bias_act_f32(const float* in, long long in_mstride, float* out,
                                             const float* __restrict__ w, long long w_base,
                                             long long w_stride, int has_bias, int members,
                                             int images, int len, int plane, int act) {
    const long long per_member = (long long)images * len;
    const long long n = (long long)members * per_member;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / per_member;
        const long long rest = i - r * per_member;
        const int j = (int)(rest % len);
        float v = in[r * in_mstride + rest];
        if (has_bias != 0) {
            v += w[w_base + r * w_stride + j / plane];
        }
        out[i] = enkf_spec_activate(v, act);
    }
}
