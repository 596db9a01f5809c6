// cuda_emu.hpp: runs the CUDA kernels of kernels/*.cu, unchanged, on the CPU.
//
// Why: most sessions of this project have no GPU. Compiling the kernel sources as C++
// against this header and running them with the launch geometry of src/gpu/geometry.rs
// checks their indexing, loop bounds, shared-memory layout, barrier placement and warp
// shuffles against the CPU twins (tests/kernel_emu.rs), in CI, with no device.
//
// How: every CUDA thread of a block is a fiber (ucontext) with its own stack; a block's
// fibers run one at a time in a fixed order (ascending, or descending when the launch
// asks for `reverse`), each until it reaches a barrier or returns. Blocks run one after
// the other in the same order. So:
//   - __syncthreads() parks the thread until every thread of the block is parked there;
//     a block barrier that some thread of the block can no longer reach (it returned) is
//     reported as an error, as is a warp barrier reached by only part of a warp (this is
//     the CUDA programming guide's rule, a barrier only where the whole block arrives;
//     sm_70+ hardware is more lenient and counts exited threads as arrived);
//   - __syncwarp() and the __shfl_*_sync exchanges park until every lane of the warp
//     is there (only full masks are accepted: the kernels use nothing else);
//   - a thread reading shared data another thread writes without a barrier between
//     them sees the wrong value in one of the two orders (the tests run both);
//   - dynamic shared memory is filled with NaN before each block (a read of an element
//     never written shows up as NaN) and fenced by guard bytes checked after each block;
//   - a float4/float2/double2 copied from or to a misaligned address is an error.
// What it cannot see: races inside a warp between barriers of a real GPU's lockstep
// execution (none are allowed by the CUDA model anyway), timing, occupancy, resource
// limits (registers, the device's shared memory size), and the GPU's expf/tanhf
// rounding (the host libm is used). __f*_rn and fmaf round as on the device. Plain a·b + c is contracted to
// an FMA by nvcc (--fmad=true); the test compiles with -mfma -ffp-contract=fast where the
// CPU has FMA, so such expressions fuse here too (GCC's choices need not match nvcc's
// everywhere), and with -ffp-contract=off elsewhere.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <utility>

struct dim3 {
    unsigned int x, y, z;
};
using uint3 = dim3;
namespace emu {
// Reports a vector load or store from an address the device would fault on.
void misaligned(const void* p, unsigned align, const char* type);
}  // namespace emu

// CUDA's vector types. A vector access through a misaligned address is a fault on the
// device ("misaligned address") but works on x86, so every copy from or into memory
// goes through these constructors and assignments, which check the address: kernels
// read vectors as `const float4 q = *reinterpret_cast<const float4*>(p)`.
#define EMU_VECTOR_TYPE(name, elem, n, align, ...)                       \
    struct alignas(align) name {                                        \
        elem __VA_ARGS__;                                               \
        name() = default;                                               \
        name(const name& o) {                                           \
            ::emu::misaligned(&o, align, #name);                        \
            std::memcpy(static_cast<void*>(this), &o, sizeof(elem) * n); \
        }                                                               \
        name& operator=(const name& o) {                                \
            ::emu::misaligned(this, align, #name);                      \
            ::emu::misaligned(&o, align, #name);                        \
            std::memcpy(static_cast<void*>(this), &o, sizeof(elem) * n); \
            return *this;                                               \
        }                                                               \
    };
EMU_VECTOR_TYPE(float4, float, 4, 16, x, y, z, w)
EMU_VECTOR_TYPE(float2, float, 2, 8, x, y)
EMU_VECTOR_TYPE(double2, double, 2, 16, x, y)
#undef EMU_VECTOR_TYPE

namespace emu {

// The launch as the Rust test passes it (#[repr(C)] twin in tests/kernel_emu.rs).
struct Launch {
    unsigned int grid[3];
    unsigned int block[3];
    unsigned int shared_mem_bytes;
    int reverse;  // 0: threads and blocks in ascending order, 1: descending
};

enum class Park { Run, Block, Warp, Done };

// A fiber's stack: kStackBytes below a PROT_NONE guard page, so that an overflow
// faults instead of corrupting the neighbouring fiber.
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kPageBytes = 4096;

struct Stack {
    unsigned char* base = nullptr;  // the guard page; the stack follows it
    Stack() = default;
    Stack(const Stack&) = delete;
    Stack& operator=(const Stack&) = delete;
    Stack(Stack&& o) noexcept : base(o.base) { o.base = nullptr; }
    Stack& operator=(Stack&& o) noexcept {
        std::swap(base, o.base);
        return *this;
    }
    ~Stack() {
        if (base != nullptr) {
            munmap(base, kPageBytes + kStackBytes);
        }
    }
    // Maps the stack on first use; false when the system refuses.
    bool ensure() {
        if (base != nullptr) {
            return true;
        }
        void* p = mmap(nullptr, kPageBytes + kStackBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            return false;
        }
        base = static_cast<unsigned char*>(p);
        return mprotect(base, kPageBytes, PROT_NONE) == 0;
    }
    unsigned char* top() const { return base + kPageBytes; }
};

struct Fiber {
    ucontext_t ctx;
    Stack stack;
    Park park = Park::Run;
    unsigned int tid = 0;  // linear thread index in the block
    dim3 idx{0, 0, 0};
};
constexpr size_t kGuardBytes = 64 * 1024;  // overruns up to 64 KB are reported
constexpr unsigned char kGuard = 0xA5;

struct State {
    dim3 grid{1, 1, 1}, block{1, 1, 1}, block_idx{0, 0, 0}, thread_idx{0, 0, 0};
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    ucontext_t sched;
    std::function<void()> body;
    std::string error;
    std::vector<uint64_t> shfl;         // one exchange slot per thread
    std::vector<unsigned char> shared;  // guard | dynamic shared memory | guard
    size_t shared_bytes = 0;
};

// One emulator per OS thread: the Rust test harness runs tests on several threads, and
// a launch runs all its fibers on the calling thread.
inline thread_local State S;

inline void fail(const std::string& what) {
    if (S.error.empty()) {
        char where[160];
        std::snprintf(where, sizeof where, " (block (%u,%u,%u), thread (%u,%u,%u))",
                      S.block_idx.x, S.block_idx.y, S.block_idx.z, S.thread_idx.x,
                      S.thread_idx.y, S.thread_idx.z);
        S.error = what + where;
    }
}

inline void misaligned(const void* p, unsigned align, const char* type) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    if (a % align != 0) {
        char what[128];
        std::snprintf(what, sizeof what, "misaligned %s access at %#llx (needs %u-byte alignment)",
                      type, static_cast<unsigned long long>(a), align);
        fail(what);
    }
}

// Parks the running fiber and returns to the scheduler.
inline void park(Park how) {
    Fiber* f = S.current;
    f->park = how;
    swapcontext(&f->ctx, &S.sched);
}

inline void check_mask(unsigned int mask, const char* what) {
    if (mask != 0xffffffffu) {
        fail(std::string(what) + ": only full-warp masks are emulated");
        park(Park::Done);
    }
}

inline void entry() {
    S.body();
    S.current->park = Park::Done;
    // returning resumes uc_link, the scheduler
}

inline unsigned char* dynamic_shared() { return S.shared.data() + kGuardBytes; }

inline bool guards_intact() {
    const size_t n = S.shared.size();
    for (size_t i = 0; i < kGuardBytes; ++i) {
        if (S.shared[i] != kGuard || S.shared[n - 1 - i] != kGuard) {
            return false;
        }
    }
    return true;
}

// Releases parked fibers when a barrier is complete. Returns false (with the error set)
// on a barrier that can never complete.
inline bool release(size_t n) {
    bool released = false;
    for (size_t w = 0; w < n; w += 32) {
        const size_t end = w + 32 < n ? w + 32 : n;
        size_t at_warp = 0;
        for (size_t t = w; t < end; ++t) {
            at_warp += S.fibers[t].park == Park::Warp;
        }
        if (at_warp == 0) {
            continue;
        }
        if (at_warp != end - w) {
            S.error = "a warp barrier or shuffle reached by only some lanes of warp " +
                      std::to_string(w / 32) + " (the others wait elsewhere or returned)";
            return false;
        }
        for (size_t t = w; t < end; ++t) {
            S.fibers[t].park = Park::Run;
        }
        released = true;
    }
    if (released) {
        return true;
    }
    size_t at_block = 0, done = 0;
    for (size_t t = 0; t < n; ++t) {
        at_block += S.fibers[t].park == Park::Block;
        done += S.fibers[t].park == Park::Done;
    }
    if (at_block == 0) {
        return true;  // all done
    }
    if (done != 0) {
        S.error = "__syncthreads() waits for " + std::to_string(done) +
                  " thread(s) of the block that already returned";
        return false;
    }
    for (size_t t = 0; t < n; ++t) {
        S.fibers[t].park = Park::Run;
    }
    return true;
}

// Runs `body` as a kernel launch. Returns 0, or 1 with the message in S.error.
inline int launch(const Launch& l, std::function<void()> body) {
    S.error.clear();
    S.grid = {l.grid[0], l.grid[1], l.grid[2]};
    S.block = {l.block[0], l.block[1], l.block[2]};
    const size_t n = size_t(l.block[0]) * l.block[1] * l.block[2];
    const size_t blocks = size_t(l.grid[0]) * l.grid[1] * l.grid[2];
    if (n == 0 || n > 1024 || blocks == 0 || l.grid[0] > 0x7fffffffu || l.grid[1] > 65535 ||
        l.grid[2] > 65535 || l.block[2] > 64) {
        S.error = "invalid launch geometry";
        return 1;
    }
    if (l.shared_mem_bytes > 227 * 1024) {
        S.error = "more than 227 KB of dynamic shared memory per block";
        return 1;
    }
    S.body = std::move(body);
    if (S.fibers.size() < n) {
        S.fibers.resize(n);
    }
    S.shfl.assign(n, 0);
    S.shared_bytes = l.shared_mem_bytes;
    S.shared.assign(l.shared_mem_bytes + 2 * kGuardBytes, kGuard);
    for (size_t b = 0; b < blocks; ++b) {
        const size_t bl = l.reverse ? blocks - 1 - b : b;
        S.block_idx = {unsigned(bl % l.grid[0]), unsigned(bl / l.grid[0] % l.grid[1]),
                       unsigned(bl / (size_t(l.grid[0]) * l.grid[1]))};
        std::memset(S.shared.data() + kGuardBytes, 0xff, S.shared_bytes);  // NaN
        for (size_t t = 0; t < n; ++t) {
            Fiber& f = S.fibers[t];
            if (!f.stack.ensure()) {
                S.error = "cannot map a fiber stack";
                return 1;
            }
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.top();
            f.ctx.uc_stack.ss_size = kStackBytes;
            f.ctx.uc_link = &S.sched;
            makecontext(&f.ctx, entry, 0);
            f.park = Park::Run;
            f.tid = unsigned(t);
            f.idx = {unsigned(t % l.block[0]), unsigned(t / l.block[0] % l.block[1]),
                     unsigned(t / (size_t(l.block[0]) * l.block[1]))};
        }
        for (;;) {
            bool ran = false;
            for (size_t i = 0; i < n; ++i) {
                Fiber& f = S.fibers[l.reverse ? n - 1 - i : i];
                if (f.park != Park::Run) {
                    continue;
                }
                S.current = &f;
                S.thread_idx = f.idx;
                swapcontext(&S.sched, &f.ctx);
                ran = true;
                if (!S.error.empty()) {
                    return 1;
                }
            }
            if (!release(n)) {
                return 1;
            }
            bool all_done = true;
            for (size_t t = 0; t < n; ++t) {
                all_done = all_done && S.fibers[t].park == Park::Done;
            }
            if (all_done) {
                break;
            }
            if (!ran) {
                bool any_run = false;
                for (size_t t = 0; t < n; ++t) {
                    any_run = any_run || S.fibers[t].park == Park::Run;
                }
                if (!any_run) {
                    S.error = "deadlock: no thread can make progress";
                    return 1;
                }
            }
        }
        if (!guards_intact()) {
            S.error = "dynamic shared memory written outside its " +
                      std::to_string(S.shared_bytes) + " bytes";
            return 1;
        }
    }
    return 0;
}

template <class T>
inline T exchange(T v, unsigned int src_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
    const unsigned int tid = S.current->tid;
    const unsigned int lane = tid & 31u;
    std::memcpy(&S.shfl[tid], &v, sizeof(T));
    park(Park::Warp);
    T r = v;
    const size_t src = size_t(tid - lane) + src_lane;
    if (src_lane < 32 && src < S.shfl.size()) {
        std::memcpy(&r, &S.shfl[src], sizeof(T));
    }
    park(Park::Warp);  // nobody overwrites a slot before every lane has read
    return r;
}

}  // namespace emu

#define threadIdx (::emu::S.thread_idx)
#define blockIdx (::emu::S.block_idx)
#define blockDim (::emu::S.block)
#define gridDim (::emu::S.grid)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared arrays: one per OS thread (tests launch from several threads at once);
// the fibers of a launch all run on the launching thread.
#define __shared__ static thread_local
#define ENKF_DYNAMIC_SHARED(type, name) \
    type* name = reinterpret_cast<type*>(::emu::dynamic_shared())

inline void __syncthreads() { ::emu::park(::emu::Park::Block); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    ::emu::check_mask(mask, "__syncwarp");
    ::emu::park(::emu::Park::Warp);
}
template <class T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask) {
    ::emu::check_mask(mask, "__shfl_xor_sync");
    return ::emu::exchange(v, (::emu::S.current->tid & 31u) ^ unsigned(lane_mask));
}
template <class T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta) {
    ::emu::check_mask(mask, "__shfl_down_sync");
    const unsigned int lane = ::emu::S.current->tid & 31u;
    return ::emu::exchange(v, lane + delta < 32 ? lane + delta : lane);
}

template <class T>
inline T __ldg(const T* p) {
    return *p;
}
// Correctly rounded single operations that are never fused into an FMA, as on the
// device: the empty asm makes the rounded result opaque to the compiler, so that with
// -ffp-contract=fast (which the test uses where the CPU has FMA, to contract a·b + c in
// plain expressions as nvcc does) __fadd_rn(__fmul_rn(a, b), c) stays two roundings.
inline float emu_rounded(float r) {
#if defined(__x86_64__)
    __asm__("" : "+x"(r));
#else
    __asm__("" : "+r"(r));
#endif
    return r;
}
inline float __fadd_rn(float a, float b) { return emu_rounded(a + b); }
inline float __fsub_rn(float a, float b) { return emu_rounded(a - b); }
inline float __fmul_rn(float a, float b) { return emu_rounded(a * b); }
inline float __fdiv_rn(float a, float b) { return emu_rounded(a / b); }
inline float __fsqrt_rn(float a) { return emu_rounded(std::sqrt(a)); }
inline double emu_rounded(double r) {
#if defined(__x86_64__)
    __asm__("" : "+x"(r));
#else
    __asm__("" : "+r"(r));
#endif
    return r;
}
inline double __dadd_rn(double a, double b) { return emu_rounded(a + b); }
inline double __dmul_rn(double a, double b) { return emu_rounded(a * b); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
using std::isnan;
