// selftest.cu: small kernels with deliberate faults, for tests/kernel_emu.rs to show that
// the emulation of cuda_emu.hpp catches each kind of fault it claims to catch (a test
// that cannot fail proves nothing). Written as CUDA; never built for a GPU.
//
// All: one block, blockDim.x = 64 (two warps), dynamic shared memory of 64 floats.

// out[t] = the value thread 63 − t stored in shared memory; with `sync` = 0 the barrier
// between the store and the load is missing.
extern "C" __global__ void selftest_exchange(float* out, int sync) {
    ENKF_DYNAMIC_SHARED(float, s);
    const int t = threadIdx.x;
    s[t] = (float)t;
    if (sync) {
        __syncthreads();
    }
    out[t] = s[blockDim.x - 1 - t];
}

// A barrier inside a branch that only the first 16 threads take.
extern "C" __global__ void selftest_divergent_barrier(float* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    }
}

// A full-mask shuffle executed by half of a warp.
extern "C" __global__ void selftest_partial_shuffle(float* out) {
    float v = (float)threadIdx.x;
    if ((threadIdx.x & 31) < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[threadIdx.x] = v;
}

// Writes shared element `index` (the allocation has 64).
extern "C" __global__ void selftest_shared_write(int index) {
    ENKF_DYNAMIC_SHARED(float, s);
    if (threadIdx.x == 0) {
        s[index] = 1.0f;
    }
}

// out[2t] = lane (t) ^ 5 by __shfl_xor_sync, out[2t + 1] = value of lane t + 3 by
// __shfl_down_sync (own value for the top 3 lanes), plus the warp's offset.
extern "C" __global__ void selftest_shuffles(float* out) {
    const float v = (float)threadIdx.x;
    const float x = __shfl_xor_sync(0xffffffffu, v, 5);
    const float d = __shfl_down_sync(0xffffffffu, v, 3);
    out[2 * threadIdx.x] = x;
    out[2 * threadIdx.x + 1] = d;
}

// Reads a float4 from p + offset floats: misaligned unless offset is a multiple of 4.
extern "C" __global__ void selftest_vector_load(const float* p, int offset, float* out) {
    const float4 v = *reinterpret_cast<const float4*>(p + offset);
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}
