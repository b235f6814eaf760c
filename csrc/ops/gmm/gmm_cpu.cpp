// CPU driver of safedl::gmm1d_em: at::parallel_for over groups; each group runs its whole
// EM loop on one thread, one pass over its points per iteration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "gmm.h"
#include "gmm_math.h"

// AVX2 clones of the E-step beside the baseline (GCC ifunc), as in the pgd driver.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define SAFEDL_GMM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SAFEDL_GMM_CLONES
#endif

namespace safedl {
namespace gmm {
namespace {

// Where one group's results go.
struct GroupOut {
  double* w;
  double* mu;
  double* var;
  double* ll;
  int64_t* n_iter;
  bool* converged;
  int32_t* status;
};

inline void store(const GroupOut& o, const Params& p) {
  for (int i = 0; i < 2; ++i) {
    o.w[i] = p.w[i];
    o.mu[i] = p.mu[i];
    o.var[i] = p.var[i];
  }
}

// One E-step pass over a group's points, written so the compiler vectorises it: kLanes
// independent accumulators per statistic (structure of arrays), libm-free point terms,
// and log(1 + e) summed as the log of a product of (1 + e) in [1, 2], taken every
// kFlush points per lane (2^kFlush cannot overflow).
constexpr int kLanes = 8;
constexpr int kFlush = 32;

// Always inlined, so each clone below compiles its own copy for its target.
template <typename T>
__attribute__((always_inline)) inline Stats e_pass_impl(const T* __restrict__ x, int64_t n, const Coeffs& k) {
  double r0[kLanes] = {}, r1[kLanes] = {}, s0[kLanes] = {}, s1[kLanes] = {};
  double q0[kLanes] = {}, q1[kLanes] = {}, hi[kLanes] = {}, prod[kLanes];
  for (int l = 0; l < kLanes; ++l) prod[l] = 1.0;
  double log_prod = 0.0;
  int64_t j = 0;
  const int64_t full = n - n % kLanes;
  while (j < full) {
    const int64_t stop = std::min<int64_t>(full, j + int64_t{kFlush} * kLanes);
    for (; j < stop; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const PointTerms t = point_terms(static_cast<double>(x[j + l]), k);
        const double w0 = 1.0 - t.r1;
        r0[l] += w0;
        r1[l] += t.r1;
        s0[l] += w0 * t.d0;
        s1[l] += t.r1 * t.d1;
        q0[l] += w0 * t.d0 * t.d0;
        q1[l] += t.r1 * t.d1 * t.d1;
        hi[l] += t.hi;
        prod[l] *= t.one_plus_e;
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      log_prod += std::log(prod[l]);
      prod[l] = 1.0;
    }
  }
  Stats s = zero_stats();
  for (int l = 0; l < kLanes; ++l) {
    s.r[0] += r0[l];
    s.r[1] += r1[l];
    s.s[0] += s0[l];
    s.s[1] += s1[l];
    s.q[0] += q0[l];
    s.q[1] += q1[l];
    s.lse += hi[l] + std::log(prod[l]);
  }
  s.lse += log_prod;
  for (; j < n; ++j) accumulate(s, static_cast<double>(x[j]), k);
  return s;
}

// Non-template entry points, so each can carry its own clones.
SAFEDL_GMM_CLONES Stats e_pass(const float* __restrict__ x, int64_t n, const Coeffs& k) {
  return e_pass_impl<float>(x, n, k);
}
SAFEDL_GMM_CLONES Stats e_pass(const double* __restrict__ x, int64_t n, const Coeffs& k) {
  return e_pass_impl<double>(x, n, k);
}

template <typename T>
void fit_group(const T* __restrict__ x, int64_t n, Params p, int64_t max_iter, double tol,
               double reg_covar, const GroupOut& o) {
  if (n == 0) {
    p = constant_params(0.0, reg_covar);
    store(o, p);
    *o.ll = 0.0;
    *o.n_iter = 0;
    *o.converged = true;
    *o.status = kEmpty;
    return;
  }
  T lo = x[0], hi = x[0];
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) {
    const T v = x[j];
    finite = finite && std::isfinite(v);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  if (!finite) {
    *o.status = kNonFinite;
    return;
  }
  if (lo == hi) {  // one point, or no spread
    store(o, constant_params(static_cast<double>(lo), reg_covar));
    *o.ll = constant_log_likelihood(reg_covar);
    *o.n_iter = 0;
    *o.converged = true;
    *o.status = kConstant;
    return;
  }
  double lower_bound = -std::numeric_limits<double>::infinity();
  bool converged = false;
  int64_t it = 0;
  while (it < max_iter) {
    ++it;
    const Stats s = e_pass(x, n, coeffs_of(p));
    p = m_step(p, s, reg_covar);
    const double prev = lower_bound;
    lower_bound = s.lse / static_cast<double>(n);
    if (has_converged(lower_bound - prev, tol)) {
      converged = true;
      break;
    }
  }
  store(o, p);
  *o.ll = lower_bound;
  *o.n_iter = it;
  *o.converged = converged;
  *o.status = kFitted;
}

Result gmm1d_em_cpu(const at::Tensor& values, const at::Tensor& lengths,
                    const at::Tensor& weights, const at::Tensor& means,
                    const at::Tensor& variances, int64_t max_iter, double tol,
                    double reg_covar) {
  check_em_args(values, lengths, weights, means, variances, max_iter, tol, reg_covar);
  TORCH_CHECK_VALUE(values.device().is_cpu(), "values must be on the CPU for this kernel");
  Outputs out(values);
  const int64_t c = values.size(0);
  if (c == 0) return out.result();
  const Inputs in(values, lengths, weights, means, variances);
  const int64_t stride = in.values.size(1);
  AT_DISPATCH_FLOATING_TYPES(in.values.scalar_type(), "gmm1d_em_cpu", [&] {
    const scalar_t* xv = in.values.const_data_ptr<scalar_t>();
    const int64_t* lv = in.lengths.const_data_ptr<int64_t>();
    const double* wp = in.weights.const_data_ptr<double>();
    const double* mp = in.means.const_data_ptr<double>();
    const double* sp = in.variances.const_data_ptr<double>();
    double* ow = out.weights.data_ptr<double>();
    double* om = out.means.data_ptr<double>();
    double* os = out.variances.data_ptr<double>();
    double* oll = out.log_likelihood.data_ptr<double>();
    int64_t* oit = out.n_iter.data_ptr<int64_t>();
    bool* oc = out.converged.data_ptr<bool>();
    int32_t* ost = out.status.data_ptr<int32_t>();
    at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const Params p = initial_params(wp, mp, sp, g);
        const GroupOut o{ow + 2 * g, om + 2 * g, os + 2 * g, oll + g, oit + g, oc + g, ost + g};
        fit_group<scalar_t>(xv + g * stride, lv[g], p, max_iter, tol, reg_covar, o);
      }
    });
  });
  raise_if_nonfinite(out.status);
  return out.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CPU, m) { m.impl("gmm1d_em", &gmm1d_em_cpu); }

}  // namespace gmm
}  // namespace safedl
