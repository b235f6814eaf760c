// Declarations and argument checks shared by the CPU and CUDA drivers of gmm1d_em.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>
#include <string>
#include <tuple>

#include "../../common/checks.h"

namespace safedl {
namespace gmm {

// Per-group outcome of the pre-scan, written by the kernels.
enum GroupStatus : int32_t {
  kFitted = 0,     // EM ran
  kEmpty = 1,      // lengths[c] == 0
  kConstant = 2,   // one point, or all values equal
  kNonFinite = 3,  // a NaN or an infinity among the group's values: an error
};

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_params(const at::Tensor& p, const char* name, const at::Tensor& values) {
  const int64_t c = values.size(0);
  TORCH_CHECK_VALUE(p.dim() == 2 && p.size(0) == c && p.size(1) == 2, name,
                    " must have shape (", c, ", 2), got ", p.sizes());
  TORCH_CHECK_TYPE(p.scalar_type() == at::kDouble, name, " must be float64, got ",
                   p.scalar_type());
  TORCH_CHECK_VALUE(p.device() == values.device(), name, " must be on ", values.device(),
                    ", got ", p.device());
}

// Validates the arguments of gmm1d_em. Reads a few reductions of the small tensors
// (lengths and the initial parameters), which synchronises a CUDA stream once.
inline void check_em_args(const at::Tensor& values, const at::Tensor& lengths,
                          const at::Tensor& weights, const at::Tensor& means,
                          const at::Tensor& variances, int64_t max_iter, double tol,
                          double reg_covar) {
  TORCH_CHECK_VALUE(values.dim() == 2, "values must be 2-D (C, L), got shape ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                   "values must be float32 or float64, got ", values.scalar_type());
  const int64_t c = values.size(0);
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == c,
                    "lengths must have shape (", c, "), got ", lengths.sizes());
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, "lengths must be int64, got ",
                   lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.device() == values.device(), "lengths must be on ",
                    values.device(), ", got ", lengths.device());
  check_params(weights, "weights", values);
  check_params(means, "means", values);
  check_params(variances, "variances", values);
  TORCH_CHECK_VALUE(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK_VALUE(std::isfinite(tol) && tol >= 0, "tol must be finite and >= 0, got ", tol);
  TORCH_CHECK_VALUE(std::isfinite(reg_covar) && reg_covar > 0,
                    "reg_covar must be finite and > 0, got ", reg_covar);
  if (c == 0) return;
  const int64_t lo = lengths.min().item<int64_t>();
  const int64_t hi = lengths.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi <= values.size(1), "lengths must lie in [0, ",
                    values.size(1), "], got values in [", lo, ", ", hi, "]");
  TORCH_CHECK_VALUE(at::isfinite(means).all().item<bool>(), "means must be finite");
  TORCH_CHECK_VALUE(at::logical_and(at::isfinite(variances), variances > 0).all().item<bool>(),
                    "variances must be finite and > 0");
  TORCH_CHECK_VALUE(at::logical_and(at::isfinite(weights), weights >= 0).all().item<bool>(),
                    "weights must be finite and >= 0");
  TORCH_CHECK_VALUE((weights.sum(1) > 0).all().item<bool>(),
                    "weights must have a positive sum in every group");
}

// Raises a ValueError naming the groups whose status is kNonFinite (up to 10 of them).
inline void raise_if_nonfinite(const at::Tensor& status_cpu) {
  const int32_t* st = status_cpu.const_data_ptr<int32_t>();
  const int64_t c = status_cpu.numel();
  std::ostringstream bad;
  int64_t count = 0;
  for (int64_t i = 0; i < c; ++i) {
    if (st[i] != kNonFinite) continue;
    if (count < 10) bad << (count ? ", " : "") << i;
    ++count;
  }
  if (count == 0) return;
  if (count > 10) bad << ", ... (" << count << " groups)";
  TORCH_CHECK_VALUE(false, "values must be finite: NaN or infinity in group(s) ", bad.str());
}

// The inputs as contiguous tensors (copies only where a caller's tensor is not).
struct Inputs {
  Inputs(const at::Tensor& v, const at::Tensor& len, const at::Tensor& w, const at::Tensor& m,
         const at::Tensor& s)
      : values(v.contiguous()),
        lengths(len.contiguous()),
        weights(w.contiguous()),
        means(m.contiguous()),
        variances(s.contiguous()) {}
  at::Tensor values, lengths, weights, means, variances;
};

// The six outputs, allocated on values' device.
struct Outputs {
  explicit Outputs(const at::Tensor& values) {
    const int64_t c = values.size(0);
    const auto f64 = values.options().dtype(at::kDouble);
    weights = at::empty({c, 2}, f64);
    means = at::empty({c, 2}, f64);
    variances = at::empty({c, 2}, f64);
    log_likelihood = at::empty({c}, f64);
    n_iter = at::empty({c}, values.options().dtype(at::kLong));
    converged = at::empty({c}, values.options().dtype(at::kBool));
    status = at::empty({c}, values.options().dtype(at::kInt));
  }
  Result result() const {
    return {weights, means, variances, log_likelihood, n_iter, converged};
  }
  at::Tensor weights, means, variances, log_likelihood, n_iter, converged, status;
};

}  // namespace gmm
}  // namespace safedl
