// forward.cu: fused forward pass of every ensemble member over a batch of images.
//
// What: out[j, d, :] = fc1(act(conv2(act(maxpool2(conv1(x[d]))))))  (Arch::Paper), or with
//   one more maxpool2 after conv2 (Arch::Pooled), for every member j and image d. The
//   network is the one of src/model/mod.rs: PyTorch cross-correlation, no biases,
//   channel-major flatten.
// Shapes (row-major, f32):
//   weights  members × P, each row in state_dict order:
//            conv1 [10,1,5,5] at 0, conv2 [20,10,5,5] at 250, fc1 [10, F] at 5250,
//            F = 1280 (Paper) or 320 (Pooled), P = 5250 + 10·F;
//   x        images × 784 (28 × 28 pixels);
//   out      members × images × 10 logits, the only global write.
// Launch geometry: blockDim.x = 32·W (the host uses W = 8), 1-D grid of
//   members × ceil(images / images_per_block) blocks; block b serves member
//   b / groups and images [(b % groups)·ipb, … + ipb). Dynamic shared memory:
//   W·(1440 + 784) floats per-warp maps, then the conv weights with every 5-tap kernel
//   row padded to 8 floats (32 B, so a row is two aligned LDS.128): conv1 [10][5][8] =
//   400 floats, conv2 20 output channels × ([10][5][8] + 4) = 8080 floats (the +4 puts
//   the 4 channel groups of a warp, 5 channels = 2020 floats apart, in banks 0, 4, 8,
//   12). 105,088 B at W = 8, so the host raises the function's dynamic shared memory
//   limit; two blocks still fit an H100/H200 SM (228 KB).
// Why: members share nothing but the input, so a block keeps one member's conv
//   weights (21 KB) in shared memory and each warp runs whole images through the
//   network; no intermediate activation ever leaves the SM. Per image and warp:
//   - conv1 + pool: a lane owns one pooled position (12 × 12 of them, 4.5 per lane)
//     and all 10 channels (the last 16 positions: 5 channels, two lanes each); it keeps
//     its 6 × 6 input patch in registers and computes the 2 × 2 conv outputs under the
//     pool window (pool before the activation: the activations are monotone, so max and
//     activation commute);
//   - conv2: lane = 8·g + y owns output row y (8 positions) of channels 5g … 5g+4:
//     40 accumulators. For each input channel and kernel row it loads one 12-wide row
//     of the pooled map (3 × LDS.128; the 8 rows of a warp fall in disjoint banks,
//     the 4 channel groups broadcast) and the 5 × 5 weights as 5 LDS.128 + 5 LDS
//     (broadcast within a group, the 4 groups in distinct banks), then issues 200
//     FFMAs: 15 FFMA per shared load (the machine code: 1,079 instructions per input
//     channel, 1,000 of them FFMA; scripts/sass-report.sh);
//   - fc1: each lane multiplies its 40 (Paper) or 10 (Pooled, after a shuffle-based
//     2 × 2 pool) features with fc1 weights read through L1 (51 KB per member, reused
//     by every image of the block), and 10 warp sums give the logits.
//   Two blocks of 8 warps fit on an SM (≤ 128 registers per thread: __launch_bounds__).
// Work per image: 476,800 multiply-adds (0.95 MFLOP); J = 5000, B = 64 is 305 GFLOP.
#include "common.cuh"

#define FWD_H1_FLOATS (ENKF_C1 * ENKF_P1 * ENKF_P1)  // 1440: pooled conv1 map of an image
#define FWD_WARP_FLOATS (FWD_H1_FLOATS + ENKF_IMG_PIXELS)  // 2224 per warp (16-B multiple)
#define FWD_W1_FLOATS 400     // conv1 weights [10][5][8] (rows padded to 8)
#define FWD_W2_OC_STRIDE 404  // conv2 weights of one output channel: [10][5][8] + 4

#define FWD_CONV1_FULL 128  // pooled positions done with all channels per lane (4 × 32)

// conv1 (5×5, 1 → 10) at pooled position p (of 12 × 12) for channels [c0, c1): the 2 × 2
// outputs under the pool window from the 6 × 6 input patch, their max, the activation
// (pool before activation: the activations are monotone), into h1[c][p].
__device__ __forceinline__ void fwd_conv1_position(const float* img, const float* w1s,
                                                   float* h1, int p, int c0, int c1,
                                                   int act) {
    const int py = p / ENKF_P1;
    const int px = p - py * ENKF_P1;
    float patch[6][6];
#pragma unroll
    for (int r = 0; r < 6; ++r) {
#pragma unroll
        for (int s = 0; s < 6; ++s) {
            patch[r][s] = img[(2 * py + r) * ENKF_IMG + 2 * px + s];
        }
    }
#pragma unroll 2
    for (int c = c0; c < c1; ++c) {
        float a00 = 0.0f, a01 = 0.0f, a10 = 0.0f, a11 = 0.0f;
#pragma unroll
        for (int ky = 0; ky < ENKF_K; ++ky) {
            const float4 wa = *reinterpret_cast<const float4*>(w1s + c * 40 + ky * 8);
            const float4 wb = *reinterpret_cast<const float4*>(w1s + c * 40 + ky * 8 + 4);
            const float wr[5] = {wa.x, wa.y, wa.z, wa.w, wb.x};
#pragma unroll
            for (int kx = 0; kx < ENKF_K; ++kx) {
                const float w = wr[kx];
                a00 = fmaf(w, patch[ky][kx], a00);
                a01 = fmaf(w, patch[ky][kx + 1], a01);
                a10 = fmaf(w, patch[ky + 1][kx], a10);
                a11 = fmaf(w, patch[ky + 1][kx + 1], a11);
            }
        }
        const float m = fmaxf(fmaxf(a00, a01), fmaxf(a10, a11));
        h1[c * (ENKF_P1 * ENKF_P1) + p] = enkf_activate(m, act);
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) ensemble_forward_f32(
    const float* __restrict__ weights, const float* __restrict__ x, float* __restrict__ out,
    int members, int images, int n_params, int arch, int act, int images_per_block) {
    ENKF_DYNAMIC_SHARED(float4, fwd_smem4);
    float* smem = reinterpret_cast<float*>(fwd_smem4);
    const int warps = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    // Per-warp regions first (16-B aligned for the LDS.128 row loads), then the weights
    // (16-B aligned: 8·2224 floats before them, rows of 8, output channels 404 apart).
    float* h1 = smem + warp * FWD_WARP_FLOATS;  // [10][12][12]
    float* img = h1 + FWD_H1_FLOATS;            // [28][28]
    float* w1s = smem + warps * FWD_WARP_FLOATS;  // [10][5][8]: kernel rows padded to 8
    float* w2s = w1s + FWD_W1_FLOATS;              // [20] × ([10][5][8] + 4)

    const int groups = (images + images_per_block - 1) / images_per_block;
    const int member = blockIdx.x / groups;
    const int group = blockIdx.x - member * groups;
    if (member >= members) {
        return;
    }
    const float* wm = weights + (long long)member * n_params;
    // Weights into the padded layout; the pad floats are never read into an FFMA.
    for (int i = threadIdx.x; i < ENKF_CONV1_LEN + ENKF_CONV2_LEN; i += blockDim.x) {
        const float v = __ldg(wm + i);
        if (i < ENKF_CONV1_LEN) {
            const int c = i / 25, r = i - 25 * (i / 25);
            w1s[c * 40 + (r / 5) * 8 + r % 5] = v;
        } else {
            const int j = i - ENKF_CONV1_LEN;
            const int oc = j / 250, rem = j - 250 * (j / 250);
            const int ci = rem / 25, r = rem - 25 * (rem / 25);
            w2s[oc * FWD_W2_OC_STRIDE + ci * 40 + (r / 5) * 8 + r % 5] = v;
        }
    }
    __syncthreads();

    const float* wfc = wm + ENKF_FC_OFFSET;
    const int d_begin = group * images_per_block;
    const int d_end = min(images, d_begin + images_per_block);
    const int g = lane >> 3;  // conv2 channel group: channels 5g … 5g+4
    const int y = lane & 7;   // conv2 output row

    for (int d = d_begin + warp; d < d_end; d += warps) {
        // ---- the image into shared memory
        const float* xd = x + (long long)d * ENKF_IMG_PIXELS;
        for (int i = lane; i < ENKF_IMG_PIXELS; i += 32) {
            img[i] = __ldg(xd + i);
        }
        __syncwarp();

        // ---- conv1 (5×5, 1 → 10) + maxpool 2×2 + activation → h1 [10][12][12]
        // 144 pooled positions: 4 rounds of 32 with all 10 channels per lane, then the
        // last 16 positions with 5 channels per lane (lanes 16–31 take channels 5–9), so
        // no lane idles through a whole fifth round.
        for (int p = lane; p < FWD_CONV1_FULL; p += 32) {
            fwd_conv1_position(img, w1s, h1, p, 0, ENKF_C1, act);
        }
        fwd_conv1_position(img, w1s, h1, FWD_CONV1_FULL + (lane & 15), 5 * (lane >> 4),
                           5 * (lane >> 4) + 5, act);
        __syncwarp();

        // ---- conv2 (5×5, 10 → 20): lane (g, y) accumulates acc[c][xx] = out[5g+c][y][xx]
        float acc[5][8];
#pragma unroll
        for (int c = 0; c < 5; ++c) {
#pragma unroll
            for (int xx = 0; xx < 8; ++xx) {
                acc[c][xx] = 0.0f;
            }
        }
        for (int ci = 0; ci < ENKF_C1; ++ci) {
#pragma unroll
            for (int ky = 0; ky < ENKF_K; ++ky) {
                const float4* rp =
                    reinterpret_cast<const float4*>(h1 + ci * 144 + (y + ky) * ENKF_P1);
                const float4 q0 = rp[0];
                const float4 q1 = rp[1];
                const float4 q2 = rp[2];
                const float row[12] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y,
                                       q1.z, q1.w, q2.x, q2.y, q2.z, q2.w};
                const float* wp = w2s + (5 * g) * FWD_W2_OC_STRIDE + ci * 40 + ky * 8;
                float wr[5][5];
#pragma unroll
                for (int c = 0; c < 5; ++c) {
                    const float4 wa = *reinterpret_cast<const float4*>(wp + c * FWD_W2_OC_STRIDE);
                    const float4 wb =
                        *reinterpret_cast<const float4*>(wp + c * FWD_W2_OC_STRIDE + 4);
                    wr[c][0] = wa.x;
                    wr[c][1] = wa.y;
                    wr[c][2] = wa.z;
                    wr[c][3] = wa.w;
                    wr[c][4] = wb.x;
                }
#pragma unroll
                for (int kx = 0; kx < ENKF_K; ++kx) {
#pragma unroll
                    for (int c = 0; c < 5; ++c) {
                        const float w = wr[c][kx];
#pragma unroll
                        for (int xx = 0; xx < 8; ++xx) {
                            acc[c][xx] = fmaf(w, row[xx + kx], acc[c][xx]);
                        }
                    }
                }
            }
        }

        // ---- activation (+ pool) and fc1; part[k] is this lane's share of logit k
        float part[ENKF_CLASSES];
#pragma unroll
        for (int k = 0; k < ENKF_CLASSES; ++k) {
            part[k] = 0.0f;
        }
        if (arch == ENKF_ARCH_PAPER) {
            // feature index (5g + c)·64 + y·8 + xx, fc1 row stride 1280
#pragma unroll
            for (int c = 0; c < 5; ++c) {
#pragma unroll
                for (int xx = 0; xx < 8; ++xx) {
                    const float v = enkf_activate(acc[c][xx], act);
                    const float* wf = wfc + (5 * g + c) * 64 + y * 8 + xx;
#pragma unroll
                    for (int k = 0; k < ENKF_CLASSES; ++k) {
                        part[k] = fmaf(__ldg(wf + k * 1280), v, part[k]);
                    }
                }
            }
        } else {
            // 2×2 pool: even rows take the odd row below from lane + 1 (same g).
            // Feature index (5g + c)·16 + (y/2)·4 + px, fc1 row stride 320.
#pragma unroll
            for (int c = 0; c < 5; ++c) {
#pragma unroll
                for (int px = 0; px < 4; ++px) {
                    const float below0 = __shfl_down_sync(0xffffffffu, acc[c][2 * px], 1);
                    const float below1 = __shfl_down_sync(0xffffffffu, acc[c][2 * px + 1], 1);
                    if ((y & 1) == 0) {
                        const float m = fmaxf(fmaxf(acc[c][2 * px], acc[c][2 * px + 1]),
                                              fmaxf(below0, below1));
                        const float v = enkf_activate(m, act);
                        const float* wf = wfc + (5 * g + c) * 16 + (y >> 1) * 4 + px;
#pragma unroll
                        for (int k = 0; k < ENKF_CLASSES; ++k) {
                            part[k] = fmaf(__ldg(wf + k * 320), v, part[k]);
                        }
                    }
                }
            }
        }
        float mine = 0.0f;
#pragma unroll
        for (int k = 0; k < ENKF_CLASSES; ++k) {
            const float s = enkf_warp_sum(part[k]);
            if (lane == k) {
                mine = s;
            }
        }
        if (lane < ENKF_CLASSES) {
            out[((long long)member * images + d) * ENKF_CLASSES + lane] = mine;
        }
        __syncwarp();  // img and h1 are rewritten by the next image of this warp
    }
}
