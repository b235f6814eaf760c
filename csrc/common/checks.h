// Argument checks shared by every native op. Messages name the argument, what was
// expected and what came, so an error read from Python says what to fix.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace safedl {

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), a_name, " and ", b_name,
                    " must have the same shape, got ", a.sizes(), " and ", b.sizes());
}

inline void check_same_device_dtype(const at::Tensor& a, const char* a_name,
                                    const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), a_name, " and ", b_name,
                    " must be on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name,
                   " must have the same dtype, got ", a.scalar_type(), " and ",
                   b.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor, got ", t.scalar_type());
}

// A per-sample parameter: a one-element tensor (same value for every sample) or a
// 1-D tensor with one value per sample.
inline void check_per_sample(const at::Tensor& p, const char* name, int64_t n,
                             const at::Tensor& like) {
  TORCH_CHECK_VALUE(p.numel() == 1 || (p.dim() == 1 && p.size(0) == n), name,
                    " must hold one value or one value per sample (", n, "), got shape ",
                    p.sizes());
  TORCH_CHECK_VALUE(p.device() == like.device(), name, " must be on ", like.device(),
                    ", got ", p.device());
}

}  // namespace safedl
