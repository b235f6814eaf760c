// Argument checks shared by the CPU and CUDA drivers of the sketch ops.
#pragma once

#include <ATen/ATen.h>

#include "../../common/checks.h"
#include "sketch_math.h"

namespace safedl {
namespace sketch {

inline void check_project_args(const at::Tensor& rows, int64_t out_dim) {
  check_floating(rows, "rows");
  TORCH_CHECK_VALUE(rows.dim() == 2, "rows must be a (B, d) matrix, got shape ", rows.sizes());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
                   "rows must be float32 or float64, got ", rows.scalar_type());
  TORCH_CHECK_VALUE(rows.size(1) >= 1, "rows must have at least one column, got shape ",
                    rows.sizes());
  TORCH_CHECK_VALUE(rows.size(1) <= (int64_t{1} << 40), "rows has too many columns (",
                    rows.size(1), ")");
  const int64_t transform = int64_t{1} << transform_bits(rows.size(1));
  TORCH_CHECK_VALUE(out_dim >= 1 && out_dim <= transform, "out_dim must be in [1, ",
                    transform, "] (the padded transform size of d=", rows.size(1),
                    "), got ", out_dim);
}

}  // namespace sketch
}  // namespace safedl
