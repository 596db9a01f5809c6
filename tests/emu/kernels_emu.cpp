// kernels_emu.cpp: every kernel of kernels/*.cu compiled for the CPU emulation of
// cuda_emu.hpp, with one C entry point per kernel for tests/kernel_emu.rs.
//
// Build (done by the test): c++ -std=c++17 -O2 -mfma -ffp-contract=fast -fPIC -shared
//   -Ikernels -Itests/emu tests/emu/kernels_emu.cpp -o kernels_emu.so
// (-ffp-contract=off instead of -mfma -ffp-contract=fast on a CPU without FMA).
// Each entry point `emu_<kernel>(launch, kernel arguments…)` runs the kernel over the
// launch's grid and returns 0, or 1 with the reason in emu_last_error().
#include "cuda_emu.hpp"

#include "backprop.cu"
#include "forward.cu"
#include "linalg.cu"
#include "reduce.cu"
#include "spec.cu"
#include "spec_backprop.cu"

#define EMU_ENTRY(kernel, params, args)                                      \
    extern "C" int emu_##kernel(const emu::Launch* launch, EMU_UNPAREN params) { \
        return emu::launch(*launch, [=] { kernel args; });                   \
    }
#define EMU_UNPAREN(...) __VA_ARGS__

extern "C" const char* emu_last_error() { return emu::S.error.c_str(); }

// forward.cu
EMU_ENTRY(ensemble_forward_f32,
          (const float* weights, const float* x, float* out, int members, int images,
           int n_params, int arch, int act, int images_per_block),
          (weights, x, out, members, images, n_params, arch, act, images_per_block))

// reduce.cu
EMU_ENTRY(row_mean_f32, (const float* a, int rows, int cols, float* out),
          (a, rows, cols, out))
EMU_ENTRY(row_mean_f64, (const float* a, int rows, int cols, double* mean),
          (a, rows, cols, mean))
EMU_ENTRY(center_and_innovate_f64,
          (const float* g, const float* y, const double* mean, int rows, int cols,
           double* centred, double* innov),
          (g, y, mean, rows, cols, centred, innov))
EMU_ENTRY(f64_to_f32, (const double* src, float* dst, long long n), (src, dst, n))
EMU_ENTRY(add_f64, (const double* x, double* y, long long n), (x, y, n))
EMU_ENTRY(inflate_rows_f32, (float* u, const float* mean, int rows, int cols, float lambda),
          (u, mean, rows, cols, lambda))
EMU_ENTRY(nesterov_f32, (float* u, float* prev, long long n, float beta), (u, prev, n, beta))
EMU_ENTRY(add_scaled_f32_f64, (const float* x, double alpha, double* y, long long n),
          (x, alpha, y, n))
EMU_ENTRY(row_std_f32, (const float* a, const float* mean, int rows, int cols, float* out),
          (a, mean, rows, cols, out))
EMU_ENTRY(add_normal_f32,
          (float* u, long long n, long long offset, int cols, const float* scale, float mult,
           unsigned int key0, unsigned int key1, unsigned int step),
          (u, n, offset, cols, scale, mult, key0, key1, step))
EMU_ENTRY(scale_rows_f64, (double* a, const double* w, int rows, int cols), (a, w, rows, cols))
EMU_ENTRY(row_sq_norms_f64, (const double* a, int rows, int cols, double* out),
          (a, rows, cols, out))

// spec.cu
EMU_ENTRY(spec_conv2d_f32,
          (const float* in, long long in_mstride, const float* w, long long w_base,
           long long w_stride, long long b_off, float* out, int members, int images, int c,
           int h, int wd, int co, int oh, int ow, int k, int stride, int pad, int act),
          (in, in_mstride, w, w_base, w_stride, b_off, out, members, images, c, h, wd, co, oh,
           ow, k, stride, pad, act))
EMU_ENTRY(spec_pool2d_f32,
          (const float* in, long long in_mstride, float* out, long long planes,
           long long planes_per_member, int h, int wd, int oh, int ow, int k, int mode,
           int act),
          (in, in_mstride, out, planes, planes_per_member, h, wd, oh, ow, k, mode, act))
EMU_ENTRY(spec_bias_act_f32,
          (const float* in, long long in_mstride, float* out, const float* w, long long w_base,
           long long w_stride, int has_bias, int members, int images, int len, int plane,
           int act),
          (in, in_mstride, out, w, w_base, w_stride, has_bias, members, images, len, plane,
           act))

// spec_backprop.cu
EMU_ENTRY(spec_act_backward_f32, (float* g, const float* y, long long n, int act),
          (g, y, n, act))
EMU_ENTRY(spec_conv2d_dgrad_f32,
          (const float* g, const float* w, float* din, int images, int c, int h, int wd,
           int co, int oh, int ow, int k, int stride, int pad),
          (g, w, din, images, c, h, wd, co, oh, ow, k, stride, pad))
EMU_ENTRY(spec_conv2d_wgrad_f32,
          (const float* in, const float* g, float* dw, int images, int c, int h, int wd,
           int co, int oh, int ow, int k, int stride, int pad),
          (in, g, dw, images, c, h, wd, co, oh, ow, k, stride, pad))
EMU_ENTRY(spec_bias_grad_f32, (const float* g, float* db, int images, int channels, int plane),
          (g, db, images, channels, plane))
EMU_ENTRY(spec_pool2d_backward_f32,
          (const float* in, const float* g, float* din, long long planes, int h, int wd,
           int oh, int ow, int k, int mode),
          (in, g, din, planes, h, wd, oh, ow, k, mode))
EMU_ENTRY(spec_softmax_xent_f32,
          (const float* logits, const int* labels, int images, int classes, float scale,
           double* loss, int* correct, float* g),
          (logits, labels, images, classes, scale, loss, correct, g))
EMU_ENTRY(spec_mse_backward_f32,
          (const float* out, const float* targets, int images, int k, float scale,
           double* loss, float* g),
          (out, targets, images, k, scale, loss, g))

// linalg.cu
EMU_ENTRY(add_diagonal_f64, (double* a, int n, double shift), (a, n, shift))
EMU_ENTRY(unit_block_lower_f64, (double* a, int n, int bs), (a, n, bs))
EMU_ENTRY(block_cholesky_solve_small_f64,
          (const double* a, int n, int bs, double* rhs, int nrhs, int* info,
           double* bad_pivot, int mode),
          (a, n, bs, rhs, nrhs, info, bad_pivot, mode))

// backprop.cu
EMU_ENTRY(backprop_forward_f32,
          (const float* weights, const float* x, int images, int arch, int act, float* a1,
           float* p1, unsigned int* arg1, float* a2, float* p2, unsigned int* arg2,
           float* logits, float* probs),
          (weights, x, images, arch, act, a1, p1, arg1, a2, p2, arg2, logits, probs))
EMU_ENTRY(softmax_xent_backward_f32,
          (const float* logits, const float* probs, const int* labels, int images,
           float scale, double* loss, int* correct, float* dlogits),
          (logits, probs, labels, images, scale, loss, correct, dlogits))
EMU_ENTRY(backprop_backward_f32,
          (const float* weights, const float* x, int images, int n_params, int arch, int act,
           const float* a1, const float* p1, const unsigned int* arg1, const float* a2,
           const float* p2, const unsigned int* arg2, const float* dlogits, float* gimg),
          (weights, x, images, n_params, arch, act, a1, p1, arg1, a2, p2, arg2, dlogits,
           gimg))
EMU_ENTRY(grad_reduce_f32, (const float* gimg, int images, int n_params, float* grad),
          (gimg, images, n_params, grad))
EMU_ENTRY(sgd_step_f32,
          (float* params, const float* grad, float* buf, int n, float lr, float mu, int mode),
          (params, grad, buf, n, lr, mu, mode))
EMU_ENTRY(adam_step_f32,
          (float* params, const float* grad, float* m, float* v, int n, float step_size,
           float bc2_sqrt, float w1, float b2, float w2, float eps),
          (params, grad, m, v, n, step_size, bc2_sqrt, w1, b2, w2, eps))

// selftest.cu: faults the emulation must catch
#include "selftest.cu"
EMU_ENTRY(selftest_exchange, (float* out, int sync), (out, sync))
EMU_ENTRY(selftest_divergent_barrier, (float* out), (out))
EMU_ENTRY(selftest_partial_shuffle, (float* out), (out))
EMU_ENTRY(selftest_shared_write, (int index), (index))
EMU_ENTRY(selftest_shuffles, (float* out), (out))
EMU_ENTRY(selftest_vector_load, (const float* p, int offset, float* out), (p, offset, out))
