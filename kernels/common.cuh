// common.cuh: definitions shared by every kernel family of enkf-dnn.
//
// Kernels include nothing but this file, so NVRTC can compile them without an include
// path (build.rs inlines it textually on the NVRTC route). Only CUDA built-ins are used
// here: no <cstdint>, no <cuda_runtime.h>.
//
// Index arithmetic that can exceed 2^31 (members × images × 10 at J = 100,000, rows ×
// cols of the EnKF matrices) is done in `long long`.
#pragma once

// The dynamic shared memory array of a kernel. The CPU emulation of the kernels
// (tests/emu/cuda_emu.hpp) defines its own before including this file.
#ifndef ENKF_DYNAMIC_SHARED
#define ENKF_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// Activation codes, equal to `Activation::code()` in src/model/mod.rs.
#define ENKF_ACT_LOGISTIC 0
#define ENKF_ACT_RELU 1
#define ENKF_ACT_TANH 2
// Layer-spec networks only (`SpecActivation::code()` in src/model/spec.rs): heaviside,
// and "no activation" for the spec kernels' optional epilogue.
#define ENKF_ACT_HEAVISIDE 3
#define ENKF_ACT_NONE -1

// Architecture codes, set by the host wrapper (src/gpu/forward.rs).
#define ENKF_ARCH_PAPER 0
#define ENKF_ARCH_POOLED 1

// Network constants, equal to those of src/model/mod.rs.
#define ENKF_IMG 28
#define ENKF_IMG_PIXELS 784
#define ENKF_CLASSES 10
#define ENKF_K 5
#define ENKF_C1 10
#define ENKF_P1 12
#define ENKF_C2 20
#define ENKF_H2 8
#define ENKF_P2 4
#define ENKF_CONV1_LEN 250
#define ENKF_CONV2_LEN 5000
#define ENKF_FC_OFFSET 5250

// The activation, exactly as `Activation::apply` (IEEE expf and division: no fast math).
__device__ __forceinline__ float enkf_activate(float x, int code) {
    if (code == ENKF_ACT_RELU) {
        return fmaxf(x, 0.0f);
    }
    if (code == ENKF_ACT_TANH) {
        return tanhf(x);
    }
    return 1.0f / (1.0f + expf(-x));
}

// A layer-spec activation (codes above, ENKF_ACT_NONE: the identity), exactly as
// `SpecActivation::apply`: heaviside is 0 for x < 0, 1 for x ≥ 0, and keeps a NaN.
__device__ __forceinline__ float enkf_spec_activate(float x, int code) {
    if (code == ENKF_ACT_NONE) {
        return x;
    }
    if (code == ENKF_ACT_HEAVISIDE) {
        return x < 0.0f ? 0.0f : (x >= 0.0f ? 1.0f : x);
    }
    return enkf_activate(x, code);
}

// Sum over the 32 lanes of a full warp; every lane gets the total.
__device__ __forceinline__ float enkf_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}
