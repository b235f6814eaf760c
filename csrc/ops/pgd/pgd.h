// Declarations and the argument checks shared by the CPU and CUDA drivers of pgd_step_.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string_view>
#include <tuple>
#include <utility>

#include "../../common/checks.h"
#include "pgd_math.h"

namespace safedl {
namespace pgd {

enum class Norm { Linf, L2 };

inline Norm parse_norm(std::string_view norm) {
  if (norm == "linf" || norm == "inf") return Norm::Linf;
  if (norm == "l2") return Norm::L2;
  TORCH_CHECK_VALUE(false, "norm must be 'linf' or 'l2', got '", std::string(norm), "'");
  return Norm::Linf;  // unreachable
}

// Validates the arguments of pgd_step_ and returns the parsed norm.
inline Norm check_step_args(const at::Tensor& x_adv, const at::Tensor& x0,
                            const at::Tensor& grad, const at::Tensor& alpha,
                            const at::Tensor& eps, std::string_view norm, double lo,
                            double hi) {
  check_floating(x_adv, "x_adv");
  check_same_shape(x_adv, "x_adv", x0, "x0");
  check_same_shape(x_adv, "x_adv", grad, "grad");
  check_same_device_dtype(x_adv, "x_adv", x0, "x0");
  check_same_device_dtype(x_adv, "x_adv", grad, "grad");
  TORCH_CHECK_VALUE(x_adv.dim() >= 1, "x_adv must have a batch dimension, got a 0-d tensor");
  const int64_t n = x_adv.size(0);
  check_per_sample(alpha, "alpha", n, x_adv);
  check_per_sample(eps, "eps", n, x_adv);
  // x_adv is written while x0 and grad are read: they must not share memory.
  at::assert_no_overlap(x_adv, x0);
  at::assert_no_overlap(x_adv, grad);
  TORCH_CHECK_VALUE(lo <= hi, "lo must be <= hi, got lo=", lo, " hi=", hi);
  return parse_norm(norm);
}

// True when x_adv, x0 and grad can be walked as flat arrays in memory order: each is
// dense and non-overlapping, all three have the same strides, and every sample occupies
// one contiguous block (the batch dimension is outermost in memory). Contiguous NCHW and
// channels-last NHWC tensors both qualify, so neither needs a copy.
inline bool flat_in_memory_order(const at::Tensor& x_adv, const at::Tensor& x0,
                                 const at::Tensor& grad) {
  for (const at::Tensor* t : {&x_adv, &x0, &grad}) {
    if (!t->is_non_overlapping_and_dense()) return false;
  }
  if (x0.strides() != x_adv.strides() || grad.strides() != x_adv.strides()) return false;
  const int64_t n = x_adv.size(0);
  return n <= 1 || x_adv.stride(0) == x_adv.numel() / n;
}

// The operands of one step as flat arrays in memory order. Same-strided dense inputs
// (NCHW or channels-last) are used as they are; anything else is made contiguous, and
// x_adv is then updated through `work`, which finish() writes back.
struct StepOperands {
  StepOperands(const at::Tensor& x_adv_in, const at::Tensor& x0_in, const at::Tensor& grad_in)
      : x_adv(x_adv_in),
        direct(flat_in_memory_order(x_adv_in, x0_in, grad_in)),
        x0(direct ? x0_in : x0_in.contiguous()),
        grad(direct ? grad_in : grad_in.contiguous()),
        work(direct ? x_adv_in : x_adv_in.contiguous()),
        n(x_adv_in.size(0)),
        d(n > 0 ? x_adv_in.numel() / n : 0) {}

  void finish() const {
    if (!direct) x_adv.copy_(work);
  }

  at::Tensor x_adv;
  bool direct;
  at::Tensor x0, grad, work;
  int64_t n, d;
};

// A per-sample parameter (one value or (N,)) in the dtype the kernel computes in, and the
// stride that reads it per sample (0: one value for all).
inline std::pair<at::Tensor, int64_t> per_sample_param(const at::Tensor& p,
                                                       at::ScalarType dtype) {
  return {p.to(dtype).contiguous(), p.numel() == 1 ? 0 : 1};
}

template <typename T>
inline bool all_budgets_ok(const at::Tensor& p) {
  const T* v = p.const_data_ptr<T>();
  bool ok = true;
  for (int64_t i = 0; i < p.numel(); ++i) ok = ok && budget_ok<T>(v[i]);
  return ok;
}

// Every value of alpha and eps (as per_sample_param gives them: contiguous, float or
// double) is >= 0 and finite; else a ValueError naming the argument and the value. On
// the CPU a loop over the values; on a GPU one reduction for both and one host read.
inline void check_budgets(const at::Tensor& alpha, const at::Tensor& eps) {
  bool ok = true;
  if (alpha.is_cpu() && eps.is_cpu()) {
    for (const at::Tensor* p : {&alpha, &eps}) {
      ok = ok && (p->scalar_type() == at::kDouble ? all_budgets_ok<double>(*p)
                                                  : all_budgets_ok<float>(*p));
    }
  } else {
    const auto valid = [](const at::Tensor& p) {
      return at::logical_and(p >= 0, at::isfinite(p)).all();
    };
    ok = at::logical_and(valid(alpha), valid(eps)).item<bool>();
  }
  if (ok) return;
  // The error path: find the first bad value.
  const std::pair<const at::Tensor*, const char*> params[] = {{&alpha, "alpha"},
                                                               {&eps, "eps"}};
  for (const auto& [p, name] : params) {
    const at::Tensor host = p->to(at::kCPU, at::kDouble).contiguous();
    const double* v = host.const_data_ptr<double>();
    for (int64_t i = 0; i < host.numel(); ++i) {
      if (budget_ok<double>(v[i])) continue;
      if (host.numel() == 1) {
        TORCH_CHECK_VALUE(false, name, " must be >= 0 and finite, got ", v[i]);
      }
      TORCH_CHECK_VALUE(false, name, " must be >= 0 and finite, got ", v[i],
                        " for sample ", i);
    }
  }
}

// alpha and eps as the kernels read them: in the dtype the math runs in (float for half
// and bfloat16), contiguous, with the stride that reads them per sample (0: one value for
// all), and checked (>= 0 and finite). Shared by both drivers.
struct Budgets {
  Budgets(const at::Tensor& alpha_in, const at::Tensor& eps_in, at::ScalarType op_dtype) {
    std::tie(alpha, alpha_stride) = per_sample_param(alpha_in, op_dtype);
    std::tie(eps, eps_stride) = per_sample_param(eps_in, op_dtype);
    check_budgets(alpha, eps);
  }
  at::Tensor alpha, eps;
  int64_t alpha_stride = 0, eps_stride = 0;
};

}  // namespace pgd
}  // namespace safedl
