// CPU driver of safedl::xent_seed and safedl::xent_seed_backward: at::parallel_for over
// rows; each row is a few short loops over its (cache-resident) elements (max, exp, sum,
// scale; the VJP adds a dot product and the result), each written so the compiler
// vectorises it: plain maps, independent accumulator lanes for reductions, libm-free exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "xent.h"
#include "xent_math.h"

// AVX2 clones of the row loops beside the baseline (GCC ifunc), as in the pgd driver.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define SAFEDL_XENT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SAFEDL_XENT_CLONES
#endif

namespace safedl {
namespace xent {
namespace {

// Elements per parallel task.
constexpr int64_t kGrain = 16384;
// Independent accumulators per reduction (two AVX2 vectors of float, four of double).
constexpr int kLanes = 16;

// Maximum of a row; NaNs are skipped here and propagate through the exponentials. The
// lanes are 256 bytes of accumulators (8 AVX2 registers): with fewer, GCC 12 unrolls the
// lane loop and then fails to vectorise the selects; with these it emits vmaxps.
template <typename T>
__attribute__((always_inline)) inline T row_max(const T* __restrict__ z, int64_t k) {
  constexpr int kMaxLanes = 256 / static_cast<int>(sizeof(T));
  T acc[kMaxLanes];
  for (int l = 0; l < kMaxLanes; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kMaxLanes <= k; j += kMaxLanes) {
    const T* __restrict__ zj = z + j;
    for (int l = 0; l < kMaxLanes; ++l) acc[l] = max_of(acc[l], zj[l]);
  }
  T m = -std::numeric_limits<T>::infinity();
  for (int l = 0; l < kMaxLanes; ++l) m = max_of(m, acc[l]);
  for (; j < k; ++j) m = max_of(m, z[j]);
  return m;
}

// Sum of a row with independent lanes (no reassociation of one running sum).
template <typename T>
__attribute__((always_inline)) inline T row_sum(const T* __restrict__ e, int64_t k) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += e[j + l];
  }
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < k; ++j) s += e[j];
  return s;
}

// e_j = exp(z_j - m) into e (a plain map, so it vectorises for any k); returns their sum.
template <typename T>
__attribute__((always_inline)) inline T row_exp(const T* __restrict__ z, T m, T* __restrict__ e,
                                                int64_t k) {
  for (int64_t j = 0; j < k; ++j) e[j] = exp_nonpositive(z[j] - m);
  return row_sum(e, k);
}

// Rows [0, rows) of the seed: out = softmax(z) - onehot(y).
template <typename T>
__attribute__((always_inline)) inline void seed_rows_impl(const T* __restrict__ z,
                                                          const int64_t* __restrict__ y,
                                                          T* __restrict__ out, int64_t rows,
                                                          int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* zr = z + r * k;
    T* o = out + r * k;
    const T inv = T(1) / row_exp(zr, row_max(zr, k), o, k);
    const int64_t label = y[r];
    const T e_label = o[label];
    for (int64_t j = 0; j < k; ++j) o[j] *= inv;
    o[label] = seed_value(e_label, inv, true);
  }
}

// Rows [0, rows) of the softmax VJP: out = p (v - p.v), p = softmax(z).
template <typename T>
__attribute__((always_inline)) inline void vjp_rows_impl(const T* __restrict__ v,
                                                         const T* __restrict__ z,
                                                         T* __restrict__ out, int64_t rows,
                                                         int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* zr = z + r * k;
    const T* vr = v + r * k;
    T* o = out + r * k;
    const T inv = T(1) / row_exp(zr, row_max(zr, k), o, k);
    for (int64_t j = 0; j < k; ++j) o[j] *= inv;
    T acc[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= k; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += o[j + l] * vr[j + l];
    }
    T dot = 0;
    for (int l = 0; l < kLanes; ++l) dot += acc[l];
    for (; j < k; ++j) dot += o[j] * vr[j];
    for (j = 0; j < k; ++j) o[j] = softmax_vjp_value(o[j], vr[j], dot);
  }
}

// Non-template entry points, so each can carry its own clones.
#define SAFEDL_XENT_ENTRY(T)                                                                 \
  SAFEDL_XENT_CLONES void seed_rows(const T* __restrict__ z, const int64_t* __restrict__ y, \
                                    T* __restrict__ out, int64_t rows, int64_t k) {        \
    seed_rows_impl<T>(z, y, out, rows, k);                                                 \
  }                                                                                        \
  SAFEDL_XENT_CLONES void vjp_rows(const T* __restrict__ v, const T* __restrict__ z,        \
                                   T* __restrict__ out, int64_t rows, int64_t k) {         \
    vjp_rows_impl<T>(v, z, out, rows, k);                                                  \
  }
SAFEDL_XENT_ENTRY(float)
SAFEDL_XENT_ENTRY(double)
#undef SAFEDL_XENT_ENTRY

int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(k, 1)); }

at::Tensor xent_seed_cpu(const at::Tensor& logits, const at::Tensor& labels) {
  check_seed_args(logits, labels);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits must be on the CPU for this kernel");
  const int64_t n = logits.size(0);
  const int64_t k = logits.size(1);
  const at::Tensor y = labels.contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  if (n > 0) {
    const auto [lo, hi] = std::minmax_element(yp, yp + n);
    check_label_range(*lo, *hi, k);
  }
  at::Tensor out = at::empty({n, k}, logits.options());
  if (out.numel() == 0) return out;
  const at::Tensor z = logits.contiguous();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "xent_seed_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(k), [&](int64_t begin, int64_t end) {
      seed_rows(zp + begin * k, yp + begin, op + begin * k, end - begin, k);
    });
  });
  return out;
}

at::Tensor xent_seed_backward_cpu(const at::Tensor& grad, const at::Tensor& logits) {
  check_backward_args(grad, logits);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits must be on the CPU for this kernel");
  const int64_t n = logits.size(0);
  const int64_t k = logits.size(1);
  at::Tensor out = at::empty({n, k}, logits.options());
  if (out.numel() == 0) return out;
  const at::Tensor z = logits.contiguous();
  const at::Tensor v = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "xent_seed_backward_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(k), [&](int64_t begin, int64_t end) {
      vjp_rows(vp + begin * k, zp + begin * k, op + begin * k, end - begin, k);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CPU, m) {
  m.impl("xent_seed", &xent_seed_cpu);
  m.impl("xent_seed_backward", &xent_seed_backward_cpu);
}

}  // namespace xent
}  // namespace safedl
