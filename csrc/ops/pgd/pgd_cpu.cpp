// CPU driver of safedl::pgd_step_: at::parallel_for over the flattened batch, one
// vectorisable inner loop per sample segment, in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "pgd.h"
#include "pgd_math.h"

namespace safedl {
namespace pgd {
namespace {

// Elements per parallel task: large enough that thread start-up is noise.
constexpr int64_t kGrain = 32768;

// x86-64 builds carry an AVX2 clone of each inner loop beside the baseline one; the
// loader picks the clone the CPU supports (GCC ifunc). No FMA is enabled, so rounding is
// the same in both clones and the same as the pure-PyTorch reference.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define SAFEDL_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SAFEDL_CPU_CLONES
#endif

// One sample's contiguous run of elements: scalars by value and __restrict__ pointers in
// a plain function, so the compiler vectorises it (inside a lambda, loads through
// captured references blocked vectorisation).
template <typename T>
inline void linf_segment(T* __restrict__ xs, const T* __restrict__ x0s,
                         const T* __restrict__ gs, int64_t len, T a, T e, T lo, T hi) {
  for (int64_t j = 0; j < len; ++j) xs[j] = linf_step<T>(xs[j], x0s[j], gs[j], a, e, lo, hi);
}

// Sum of squares with independent lanes so the compiler vectorises it without
// reassociating floating-point sums on its own.
template <typename T>
inline double sum_squares(const T* __restrict__ v, int64_t len) {
  constexpr int kLanes = 16;
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += v[j + l] * v[j + l];
  }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(acc[l]);
  for (; j < len; ++j) total += static_cast<double>(v[j]) * static_cast<double>(v[j]);
  return total;
}

// One sample of the L2 step: three passes over its (cache-resident) elements.
template <typename T>
inline void l2_sample(T* __restrict__ xs, const T* __restrict__ x0s, const T* __restrict__ gs,
                      int64_t d, T alpha, T eps, T lo, T hi) {
  const T step = l2_step_scale<T>(alpha, static_cast<T>(std::sqrt(sum_squares(gs, d))));
  // Pass 2: write the unprojected delta into x and measure it.
  for (int64_t j = 0; j < d; ++j) xs[j] = l2_delta<T>(xs[j], x0s[j], gs[j], step);
  const T proj = l2_project_scale<T>(eps, static_cast<T>(std::sqrt(sum_squares(xs, d))));
  // Pass 3: project onto the ball and the box.
  for (int64_t j = 0; j < d; ++j) xs[j] = l2_finish<T>(x0s[j], xs[j], proj, lo, hi);
}

// Non-template entry points, so each can carry its own clones.
#define SAFEDL_PGD_ENTRY(T)                                                                  \
  SAFEDL_CPU_CLONES void linf_run(T* __restrict__ xs, const T* __restrict__ x0s,           \
                                  const T* __restrict__ gs, int64_t len, T a, T e, T lo,   \
                                  T hi) {                                                  \
    linf_segment<T>(xs, x0s, gs, len, a, e, lo, hi);                                       \
  }                                                                                        \
  SAFEDL_CPU_CLONES void l2_run(T* __restrict__ xs, const T* __restrict__ x0s,             \
                                const T* __restrict__ gs, int64_t d, T a, T e, T lo, T hi) { \
    l2_sample<T>(xs, x0s, gs, d, a, e, lo, hi);                                            \
  }
SAFEDL_PGD_ENTRY(float)
SAFEDL_PGD_ENTRY(double)
#undef SAFEDL_PGD_ENTRY

template <typename T>
void linf_cpu(T* __restrict__ x, const T* __restrict__ x0, const T* __restrict__ g,
              const T* __restrict__ alpha, int64_t alpha_stride, const T* __restrict__ eps,
              int64_t eps_stride, int64_t n, int64_t d, T lo, T hi) {
  at::parallel_for(0, n * d, kGrain, [&](int64_t begin, int64_t end) {
    if (alpha_stride == 0 && eps_stride == 0) {  // one alpha and eps: a single run
      linf_run(x + begin, x0 + begin, g + begin, end - begin, alpha[0], eps[0], lo, hi);
      return;
    }
    if (d < 64) {  // tiny samples: a call per sample would cost more than its work
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = i / d;
        x[i] = linf_step<T>(x[i], x0[i], g[i], alpha[s * alpha_stride], eps[s * eps_stride],
                            lo, hi);
      }
      return;
    }
    int64_t i = begin;
    while (i < end) {
      const int64_t s = i / d;
      const int64_t seg_end = std::min(end, (s + 1) * d);
      linf_run(x + i, x0 + i, g + i, seg_end - i, alpha[s * alpha_stride],
               eps[s * eps_stride], lo, hi);
      i = seg_end;
    }
  });
}

template <typename T>
void l2_cpu(T* __restrict__ x, const T* __restrict__ x0, const T* __restrict__ g,
            const T* __restrict__ alpha, int64_t alpha_stride, const T* __restrict__ eps,
            int64_t eps_stride, int64_t n, int64_t d, T lo, T hi) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      l2_run(x + s * d, x0 + s * d, g + s * d, d, alpha[s * alpha_stride],
             eps[s * eps_stride], lo, hi);
    }
  });
}

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x0, const at::Tensor& grad,
                  const at::Tensor& alpha, const at::Tensor& eps, c10::string_view norm,
                  double lo, double hi) {
  const Norm kind = check_step_args(x_adv, x0, grad, alpha, eps,
                                    std::string_view(norm.data(), norm.size()), lo, hi);
  TORCH_CHECK_VALUE(x_adv.device().is_cpu(), "x_adv must be on the CPU for this kernel");
  // alpha and eps in the dtype the math runs in (float for half and bfloat16).
  const auto op_dtype = at::toOpMathType(x_adv.scalar_type());
  // (Pairs, not structured bindings: C++17 lambdas cannot capture those.)
  const auto alpha_p = per_sample_param(alpha, op_dtype);
  const auto eps_p = per_sample_param(eps, op_dtype);
  const at::Tensor& a = alpha_p.first;
  const at::Tensor& e = eps_p.first;
  const int64_t as = alpha_p.second;
  const int64_t es = eps_p.second;
  check_budgets(a, e);
  if (x_adv.numel() == 0) return;
  const StepOperands op(x_adv, x0, grad);
  AT_DISPATCH_FLOATING_TYPES(x_adv.scalar_type(), "pgd_step_cpu", [&] {
    auto* kernel = kind == Norm::Linf ? &linf_cpu<scalar_t> : &l2_cpu<scalar_t>;
    kernel(op.work.data_ptr<scalar_t>(), op.x0.const_data_ptr<scalar_t>(),
           op.grad.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), as,
           e.const_data_ptr<scalar_t>(), es, op.n, op.d, static_cast<scalar_t>(lo),
           static_cast<scalar_t>(hi));
  });
  op.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CPU, m) { m.impl("pgd_step_", &pgd_step_cpu); }

}  // namespace pgd
}  // namespace safedl
