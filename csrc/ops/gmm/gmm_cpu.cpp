// CPU driver of safedl::gmm1d_em: at::parallel_for over groups; each group runs its whole
// EM loop on one thread, one pass over its points per iteration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "gmm.h"
#include "gmm_math.h"

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

// One E-step pass over a group's points. Four independent partial sums keep the
// floating-point dependency chains short.
template <typename T>
inline Stats e_pass(const T* __restrict__ x, int64_t n, const Coeffs& k) {
  constexpr int kLanes = 4;
  Stats part[kLanes];
  for (int l = 0; l < kLanes; ++l) part[l] = zero_stats();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) accumulate(part[l], static_cast<double>(x[j + l]), k);
  }
  for (; j < n; ++j) accumulate(part[0], static_cast<double>(x[j]), k);
  return add_stats(add_stats(part[0], part[1]), add_stats(part[2], part[3]));
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
  const at::Tensor v = values.contiguous();
  const at::Tensor len = lengths.contiguous();
  const at::Tensor w0 = weights.contiguous();
  const at::Tensor m0 = means.contiguous();
  const at::Tensor s0 = variances.contiguous();
  const int64_t stride = v.size(1);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "gmm1d_em_cpu", [&] {
    const scalar_t* xv = v.const_data_ptr<scalar_t>();
    const int64_t* lv = len.const_data_ptr<int64_t>();
    const double* wp = w0.const_data_ptr<double>();
    const double* mp = m0.const_data_ptr<double>();
    const double* sp = s0.const_data_ptr<double>();
    double* ow = out.weights.data_ptr<double>();
    double* om = out.means.data_ptr<double>();
    double* os = out.variances.data_ptr<double>();
    double* oll = out.log_likelihood.data_ptr<double>();
    int64_t* oit = out.n_iter.data_ptr<int64_t>();
    bool* oc = out.converged.data_ptr<bool>();
    int32_t* ost = out.status.data_ptr<int32_t>();
    at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        Params p;
        const double wsum = wp[2 * g] + wp[2 * g + 1];
        for (int i = 0; i < 2; ++i) {
          p.w[i] = wp[2 * g + i] / wsum;
          p.mu[i] = mp[2 * g + i];
          p.var[i] = sp[2 * g + i];
        }
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
