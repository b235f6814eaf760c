// CPU driver of safedl::pgd_step_: at::parallel_for over the flattened batch, one
// vectorisable inner loop per sample segment, in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

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
// captured references blocked vectorisation). S is the storage type, T the type the math
// runs in (float for half and bfloat16, else S itself; the casts are then no-ops).
template <typename S, typename T>
inline void linf_segment(S* __restrict__ xs, const S* __restrict__ x0s,
                         const S* __restrict__ gs, int64_t len, T a, T e, T lo, T hi) {
  for (int64_t j = 0; j < len; ++j) {
    xs[j] = static_cast<S>(linf_step<T>(static_cast<T>(xs[j]), static_cast<T>(x0s[j]),
                                        static_cast<T>(gs[j]), a, e, lo, hi));
  }
}

constexpr int kLanes = 16;

// Sum of squares (of v / div when Scaled) with independent lanes so the compiler
// vectorises it without reassociating floating-point sums on its own.
template <bool Scaled, typename S, typename T>
inline double sum_squares(const S* __restrict__ v, int64_t len, T div) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T u = Scaled ? scaled<T>(static_cast<T>(v[j + l]), div) : static_cast<T>(v[j + l]);
      acc[l] += u * u;
    }
  }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(acc[l]);
  for (; j < len; ++j) {
    const T u = Scaled ? scaled<T>(static_cast<T>(v[j]), div) : static_cast<T>(v[j]);
    total += static_cast<double>(u) * static_cast<double>(u);
  }
  return total;
}

// max_j |v_j| (NaN if any v_j is NaN), in lanes as above.
template <typename S, typename T>
inline T max_abs_of(const S* __restrict__ v, int64_t len) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] = max_abs<T>(acc[l], static_cast<T>(v[j + l]));
  }
  T m = T(0);
  for (int l = 0; l < kLanes; ++l) m = max_nan<T>(acc[l], m);
  for (; j < len; ++j) m = max_abs<T>(m, static_cast<T>(v[j]));
  return m;
}

// ||v|| as div * r (pgd_math.h): the unscaled sum where it is accurate (div = 1), else
// the max-abs pass and the scaled sum.
template <typename S, typename T>
inline void norm_parts(const S* __restrict__ v, int64_t d, T& div, T& r) {
  const double sumsq = sum_squares<false, S, T>(v, d, T(1));
  div = T(1);
  if (!norm_is_accurate<T>(static_cast<T>(sumsq), d)) {
    div = norm_divisor<T>(max_abs_of<S, T>(v, d));
    // div == 1: v is zero or not finite, and the unscaled sum is exact (0, inf or NaN).
    if (div != T(1)) {
      r = static_cast<T>(std::sqrt(sum_squares<true, S, T>(v, d, div)));
      return;
    }
  }
  r = static_cast<T>(std::sqrt(sumsq));
}

// Pass 2 of the L2 step: the unprojected delta of every element, into `delta` (x itself
// when S == T). Scaled = false is the common div == 1 case without the division's select.
template <bool Scaled, typename S, typename T>
inline void l2_delta_pass(S* xs, const S* __restrict__ x0s, const S* __restrict__ gs,
                          T* delta, int64_t d, T div, T step) {
  const T gdiv = Scaled ? div : T(1);
  for (int64_t j = 0; j < d; ++j) {
    delta[j] = l2_delta<T>(static_cast<T>(xs[j]), static_cast<T>(x0s[j]),
                           static_cast<T>(gs[j]), gdiv, step);
  }
}

// In place (S == T): one pointer read and written, so it can be __restrict__.
template <bool Scaled, typename T>
inline void l2_delta_inplace(T* __restrict__ xs, const T* __restrict__ x0s,
                             const T* __restrict__ gs, int64_t d, T div, T step) {
  const T gdiv = Scaled ? div : T(1);
  for (int64_t j = 0; j < d; ++j) xs[j] = l2_delta<T>(xs[j], x0s[j], gs[j], gdiv, step);
}

// One sample of the L2 step over its (cache-resident) elements: the gradient's norm,
// the delta (written into x, or into `buf` of d elements of T when S is narrower), the
// delta's norm, then projection onto the ball and the box.
template <typename S, typename T>
inline void l2_sample(S* __restrict__ xs, const S* __restrict__ x0s, const S* __restrict__ gs,
                      T* __restrict__ buf, int64_t d, T alpha, T eps, T lo, T hi) {
  T gdiv, gr;
  norm_parts<S, T>(gs, d, gdiv, gr);
  const T step = l2_step_scale<T>(alpha, gr);
  T* delta;
  if constexpr (std::is_same_v<S, T>) {
    delta = xs;
    if (gdiv == T(1)) {
      l2_delta_inplace<false, T>(xs, x0s, gs, d, gdiv, step);
    } else {
      l2_delta_inplace<true, T>(xs, x0s, gs, d, gdiv, step);
    }
  } else {
    delta = buf;
    if (gdiv == T(1)) {
      l2_delta_pass<false, S, T>(xs, x0s, gs, buf, d, gdiv, step);
    } else {
      l2_delta_pass<true, S, T>(xs, x0s, gs, buf, d, gdiv, step);
    }
  }
  T ddiv, dr;
  norm_parts<T, T>(delta, d, ddiv, dr);
  const T proj = l2_project_scale<T>(eps, ddiv, dr);
  // Pass 3: project onto the ball and the box.
  for (int64_t j = 0; j < d; ++j) {
    xs[j] = static_cast<S>(l2_finish<T>(static_cast<T>(x0s[j]), delta[j], proj, lo, hi));
  }
}

// Non-template entry points, so each can carry its own clones.
#define SAFEDL_PGD_ENTRY(S, T)                                                               \
  SAFEDL_CPU_CLONES void linf_run(S* __restrict__ xs, const S* __restrict__ x0s,           \
                                  const S* __restrict__ gs, int64_t len, T a, T e, T lo,   \
                                  T hi) {                                                  \
    linf_segment<S, T>(xs, x0s, gs, len, a, e, lo, hi);                                    \
  }                                                                                        \
  SAFEDL_CPU_CLONES void l2_run(S* __restrict__ xs, const S* __restrict__ x0s,             \
                                const S* __restrict__ gs, T* __restrict__ buf, int64_t d,  \
                                T a, T e, T lo, T hi) {                                    \
    l2_sample<S, T>(xs, x0s, gs, buf, d, a, e, lo, hi);                                    \
  }
SAFEDL_PGD_ENTRY(float, float)
SAFEDL_PGD_ENTRY(double, double)
SAFEDL_PGD_ENTRY(c10::Half, float)
SAFEDL_PGD_ENTRY(c10::BFloat16, float)
#undef SAFEDL_PGD_ENTRY

template <typename S, typename T>
void linf_cpu(S* __restrict__ x, const S* __restrict__ x0, const S* __restrict__ g,
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
        x[i] = static_cast<S>(linf_step<T>(static_cast<T>(x[i]), static_cast<T>(x0[i]),
                                           static_cast<T>(g[i]), alpha[s * alpha_stride],
                                           eps[s * eps_stride], lo, hi));
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

template <typename S, typename T>
void l2_cpu(S* __restrict__ x, const S* __restrict__ x0, const S* __restrict__ g,
            const T* __restrict__ alpha, int64_t alpha_stride, const T* __restrict__ eps,
            int64_t eps_stride, int64_t n, int64_t d, T lo, T hi) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    // The delta of one sample in T when the storage type is narrower (else x holds it).
    std::vector<T> buf(std::is_same_v<S, T> ? 0 : d);
    for (int64_t s = begin; s < end; ++s) {
      l2_run(x + s * d, x0 + s * d, g + s * d, buf.data(), d, alpha[s * alpha_stride],
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
  const Budgets b(alpha, eps, at::toOpMathType(x_adv.scalar_type()));
  if (x_adv.numel() == 0) return;
  const StepOperands op(x_adv, x0, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(),
                                  "pgd_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto* kernel = kind == Norm::Linf ? &linf_cpu<scalar_t, opmath_t>
                                      : &l2_cpu<scalar_t, opmath_t>;
    kernel(op.work.data_ptr<scalar_t>(), op.x0.const_data_ptr<scalar_t>(),
           op.grad.const_data_ptr<scalar_t>(), b.alpha.const_data_ptr<opmath_t>(),
           b.alpha_stride, b.eps.const_data_ptr<opmath_t>(), b.eps_stride, op.n, op.d,
           static_cast<opmath_t>(lo), static_cast<opmath_t>(hi));
  });
  op.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CPU, m) { m.impl("pgd_step_", &pgd_step_cpu); }

}  // namespace pgd
}  // namespace safedl
