// CPU driver of safedl::srht_project: one row per task, a thread-local buffer of the
// padded transform size, a cache-blocked in-place fast Walsh-Hadamard transform.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "sketch.h"
#include "sketch_math.h"

namespace safedl {
namespace sketch {
namespace {

// Butterfly stages with half-width below this run block by block, so each block stays in
// the L1/L2 cache through all of its stages (4096 floats = 16 KiB).
constexpr int64_t kBlock = 4096;

template <typename T>
inline void stage(T* __restrict__ a, int64_t begin, int64_t end, int64_t h) {
  for (int64_t i = begin; i < end; i += 2 * h) {
    T* __restrict__ lo = a + i;
    T* __restrict__ hi = a + i + h;
    for (int64_t j = 0; j < h; ++j) butterfly<T>(lo[j], hi[j]);
  }
}

// Stages 1 and 2 fused (radix 4), where the inner loops would be too short to vectorise.
template <typename T>
inline void first_two_stages(T* __restrict__ a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 4) {
    const T x0 = a[i], x1 = a[i + 1], x2 = a[i + 2], x3 = a[i + 3];
    const T s0 = x0 + x1, d0 = x0 - x1, s1 = x2 + x3, d1 = x2 - x3;
    a[i] = s0 + s1;
    a[i + 1] = d0 + d1;
    a[i + 2] = s0 - s1;
    a[i + 3] = d0 - d1;
  }
}

// In-place unnormalised Walsh-Hadamard transform of a[0, n), n a power of two.
template <typename T>
void fwht(T* __restrict__ a, int64_t n) {
  const int64_t block = n < kBlock ? n : kBlock;
  for (int64_t base = 0; base < n; base += block) {
    int64_t h = 1;
    if (block >= 4) {
      first_two_stages<T>(a, base, base + block);
      h = 4;
    }
    for (; h < block; h *= 2) stage<T>(a, base, base + block, h);
  }
  for (int64_t h = block; h < n; h *= 2) stage<T>(a, 0, n, h);
}

template <typename T>
void project_cpu(const T* __restrict__ rows, int64_t row_stride, int64_t col_stride, int64_t b,
                 int64_t d, T* __restrict__ out, int64_t k, uint64_t seed) {
  const int bits = transform_bits(d);
  const int64_t n = int64_t{1} << bits;
  const uint64_t sign_key = stream_key(seed, 0);
  const uint64_t perm_key = stream_key(seed, 1);
  std::vector<int64_t> pick(k);
  for (int64_t j = 0; j < k; ++j) pick[j] = static_cast<int64_t>(permute_index(j, bits, perm_key));
  std::vector<T> signs(d);
  for (int64_t i = 0; i < d; ++i) signs[i] = sign_flip<T>(sign_key, static_cast<uint64_t>(i));
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(k)));
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(n);
    T* __restrict__ a = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ x = rows + r * row_stride;
      if (col_stride == 1) {
        for (int64_t i = 0; i < d; ++i) a[i] = signs[i] * x[i];
      } else {
        for (int64_t i = 0; i < d; ++i) a[i] = signs[i] * x[i * col_stride];
      }
      for (int64_t i = d; i < n; ++i) a[i] = T(0);
      fwht<T>(a, n);
      T* __restrict__ o = out + r * k;
      for (int64_t j = 0; j < k; ++j) o[j] = a[pick[j]] * scale;
    }
  });
}

at::Tensor srht_project_cpu(const at::Tensor& rows, int64_t out_dim, int64_t seed) {
  check_project_args(rows, out_dim);
  TORCH_CHECK_VALUE(rows.device().is_cpu(), "rows must be on the CPU for this kernel");
  at::Tensor out = at::empty({rows.size(0), out_dim}, rows.options());
  if (rows.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "srht_project_cpu", [&] {
    project_cpu<scalar_t>(rows.const_data_ptr<scalar_t>(), rows.stride(0), rows.stride(1),
                          rows.size(0), rows.size(1), out.data_ptr<scalar_t>(), out_dim,
                          static_cast<uint64_t>(seed));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CPU, m) { m.impl("srht_project", &srht_project_cpu); }

}  // namespace sketch
}  // namespace safedl
