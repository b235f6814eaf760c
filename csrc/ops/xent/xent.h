// Argument checks shared by the CPU and CUDA drivers of safedl::xent_seed and
// safedl::xent_seed_backward.
#pragma once

#include <ATen/ATen.h>

#include "../../common/checks.h"

namespace safedl {
namespace xent {

// Floating dtypes with a kernel on `logits`' device: float32/float64 everywhere, plus
// float16/bfloat16 on CUDA (computed in float).
inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK_VALUE(logits.dim() == 2, name, " must be 2-D (N, K), got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  const bool wide = dt == at::kFloat || dt == at::kDouble;
  const bool narrow = dt == at::kHalf || dt == at::kBFloat16;
  TORCH_CHECK_TYPE(wide || (narrow && logits.is_cuda()), name,
                   " must be float32 or float64 (or float16/bfloat16 on CUDA), got ", dt,
                   " on ", logits.device());
}

// labels: (N,) int64 on logits' device. Their range is checked by the drivers (a scan on
// the CPU, range_error() on CUDA).
inline void check_labels(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0),
                    "labels must have shape (", logits.size(0), ") to match logits ",
                    logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels must be on ", logits.device(),
                    " like logits, got ", labels.device());
}

// The error for labels outside [0, k), given their minimum and maximum.
inline void check_label_range(int64_t lo, int64_t hi, int64_t k) {
  TORCH_CHECK_VALUE(lo >= 0 && hi < k, "labels must lie in [0, ", k, ") for logits with ", k,
                    " classes, got values in [", lo, ", ", hi, "]");
}

inline void check_seed_args(const at::Tensor& logits, const at::Tensor& labels) {
  check_logits(logits, "logits");
  check_labels(logits, labels);
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& logits) {
  check_logits(logits, "logits");
  check_same_shape(grad, "grad", logits, "logits");
  check_same_device_dtype(grad, "grad", logits, "logits");
}

}  // namespace xent
}  // namespace safedl
