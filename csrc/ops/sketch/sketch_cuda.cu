// CUDA driver of safedl::srht_project. The padded, sign-flipped rows go to a workspace;
// the transform stages of half-width < kSmem run in shared memory, one block per
// kSmem-long chunk; the wider stages run one launch each over all butterflies; a last
// kernel gathers the subsample. Current stream; every launch checked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "sketch.h"
#include "sketch_math.h"

namespace safedl {
namespace sketch {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSmem = 2048;  // elements per shared-memory chunk (8 or 16 KiB)

inline int blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 8));
}

// Load one chunk of a row (sign flips, zero padding), run the stages of half-width
// < chunk in shared memory, store it to the workspace.
template <typename T>
__global__ void load_and_local_stages(const T* __restrict__ rows, int64_t row_stride,
                                      int64_t col_stride, int64_t d, int64_t n, int64_t chunk,
                                      uint64_t sign_key, T* __restrict__ work) {
  extern __shared__ unsigned char smem_raw[];
  T* s = reinterpret_cast<T*>(smem_raw);
  const int64_t chunks_per_row = n / chunk;
  const int64_t row = blockIdx.x / chunks_per_row;
  const int64_t base = (blockIdx.x % chunks_per_row) * chunk;
  const T* x = rows + row * row_stride;
  for (int64_t t = threadIdx.x; t < chunk; t += blockDim.x) {
    const int64_t i = base + t;
    s[t] = i < d ? sign_flip<T>(sign_key, static_cast<uint64_t>(i)) * x[i * col_stride] : T(0);
  }
  __syncthreads();
  for (int64_t h = 1; h < chunk; h *= 2) {
    for (int64_t t = threadIdx.x; t < chunk / 2; t += blockDim.x) {
      const int64_t i = (t / h) * 2 * h + (t % h);
      butterfly<T>(s[i], s[i + h]);
    }
    __syncthreads();
  }
  T* w = work + row * n + base;
  for (int64_t t = threadIdx.x; t < chunk; t += blockDim.x) w[t] = s[t];
}

// One stage of half-width h over every row of the workspace.
template <typename T>
__global__ void global_stage(T* __restrict__ work, int64_t b, int64_t n, int64_t h) {
  const int64_t pairs = b * (n / 2);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += stride) {
    const int64_t row = p / (n / 2);
    const int64_t t = p % (n / 2);
    const int64_t i = (t / h) * 2 * h + (t % h);
    T* w = work + row * n;
    butterfly<T>(w[i], w[i + h]);
  }
}

template <typename T>
__global__ void gather(const T* __restrict__ work, int64_t b, int64_t n, int64_t k, int bits,
                       uint64_t perm_key, T scale, T* __restrict__ out) {
  const int64_t total = b * k;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total;
       p += stride) {
    const int64_t row = p / k;
    const int64_t j = p % k;
    out[p] = work[row * n + static_cast<int64_t>(permute_index(j, bits, perm_key))] * scale;
  }
}

at::Tensor srht_project_cuda(const at::Tensor& rows, int64_t out_dim, int64_t seed) {
  check_project_args(rows, out_dim);
  TORCH_CHECK_VALUE(rows.is_cuda(), "rows must be a CUDA tensor for this kernel");
  const c10::cuda::CUDAGuard guard(rows.device());
  const int64_t b = rows.size(0);
  const int64_t d = rows.size(1);
  at::Tensor out = at::empty({b, out_dim}, rows.options());
  if (b == 0) return out;
  const int bits = transform_bits(d);
  const int64_t n = int64_t{1} << bits;
  const int64_t chunk = std::min(n, kSmem);
  const uint64_t key = static_cast<uint64_t>(seed);
  at::Tensor work = at::empty({b, n}, rows.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "srht_project_cuda", [&] {
    const int64_t blocks = b * (n / chunk);
    TORCH_CHECK_VALUE(blocks <= 2147483647LL, "too many rows for one call: ", b);
    load_and_local_stages<scalar_t>
        <<<static_cast<unsigned>(blocks), kThreads, chunk * sizeof(scalar_t), stream>>>(
            rows.const_data_ptr<scalar_t>(), rows.stride(0), rows.stride(1), d, n, chunk,
            stream_key(key, 0), work.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t h = chunk; h < n; h *= 2) {
      global_stage<scalar_t><<<blocks_for(b * n / 2), kThreads, 0, stream>>>(
          work.data_ptr<scalar_t>(), b, n, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const auto scale = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(out_dim)));
    gather<scalar_t><<<blocks_for(b * out_dim), kThreads, 0, stream>>>(
        work.const_data_ptr<scalar_t>(), b, n, out_dim, bits, stream_key(key, 1), scale,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CUDA, m) { m.impl("srht_project", &srht_project_cuda); }

}  // namespace sketch
}  // namespace safedl
