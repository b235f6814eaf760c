// Declarations and the argument checks shared by the CPU and CUDA drivers of pgd_step_.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string_view>

#include "../../common/checks.h"

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

}  // namespace pgd
}  // namespace safedl
