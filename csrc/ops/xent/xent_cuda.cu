// CUDA driver of safedl::xent_seed and safedl::xent_seed_backward: one warp per row
// (grid-stride over rows). A row's max and sum of exponentials come from one pass
// ("online softmax": each lane folds its elements, then the lanes are combined with
// shuffles); a second pass writes the seed (the VJP takes one more pass for p.v).
// float16/bfloat16 compute in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "xent.h"
#include "xent_math.h"

namespace safedl {
namespace xent {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;  // rows per block at a time
constexpr int kThreads = kWarps * kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ MaxSum<T> warp_max_sum(MaxSum<T> a) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    MaxSum<T> b;
    b.m = __shfl_xor_sync(kFullMask, a.m, offset);
    b.s = __shfl_xor_sync(kFullMask, a.s, offset);
    a = combine(a, b);
  }
  return a;
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// max and sum of exp(z - max) of one row, the same in every lane of the warp.
template <typename scalar_t, typename acc_t>
__device__ MaxSum<acc_t> row_max_sum(const scalar_t* __restrict__ zr, int64_t k, int lane) {
  MaxSum<acc_t> ms{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  for (int64_t j = lane; j < k; j += kWarpSize) ms = push(ms, static_cast<acc_t>(zr[j]));
  return warp_max_sum(ms);
}

template <typename scalar_t, typename acc_t>
__global__ void seed_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ y,
                            scalar_t* __restrict__ out, int64_t n, int64_t k) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = first; r < n; r += step) {  // warp-uniform
    const scalar_t* zr = z + r * k;
    scalar_t* o = out + r * k;
    const MaxSum<acc_t> ms = row_max_sum<scalar_t, acc_t>(zr, k, lane);
    const acc_t inv = acc_t(1) / ms.s;
    const int64_t label = y[r];
    for (int64_t j = lane; j < k; j += kWarpSize) {
      const acc_t e = exp_nonpositive(static_cast<acc_t>(zr[j]) - ms.m);
      o[j] = static_cast<scalar_t>(seed_value(e, inv, j == label));
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void vjp_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ z,
                           scalar_t* __restrict__ out, int64_t n, int64_t k) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = first; r < n; r += step) {
    const scalar_t* zr = z + r * k;
    const scalar_t* vr = v + r * k;
    scalar_t* o = out + r * k;
    const MaxSum<acc_t> ms = row_max_sum<scalar_t, acc_t>(zr, k, lane);
    const acc_t inv = acc_t(1) / ms.s;
    acc_t part = 0;
    for (int64_t j = lane; j < k; j += kWarpSize) {
      part += exp_nonpositive(static_cast<acc_t>(zr[j]) - ms.m) * inv *
              static_cast<acc_t>(vr[j]);
    }
    const acc_t dot = warp_sum(part);
    for (int64_t j = lane; j < k; j += kWarpSize) {
      const acc_t p = exp_nonpositive(static_cast<acc_t>(zr[j]) - ms.m) * inv;
      o[j] = static_cast<scalar_t>(softmax_vjp_value(p, static_cast<acc_t>(vr[j]), dot));
    }
  }
}

int64_t blocks_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((n + kWarps - 1) / kWarps,
                                                static_cast<int64_t>(sms) * 32));
}

at::Tensor xent_seed_cuda(const at::Tensor& logits, const at::Tensor& labels) {
  check_seed_args(logits, labels);
  TORCH_CHECK_VALUE(logits.is_cuda(), "logits must be a CUDA tensor for this kernel");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const int64_t k = logits.size(1);
  if (n > 0) {  // one synchronisation: the labels' range, read back to the host
    const auto mm = at::aminmax(labels);
    const at::Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
    const int64_t* b = both.const_data_ptr<int64_t>();
    check_label_range(b[0], b[1], k);
  }
  at::Tensor out = at::empty({n, k}, logits.options());
  if (out.numel() == 0) return out;
  const at::Tensor z = logits.contiguous();
  const at::Tensor y = labels.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "xent_seed_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    seed_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
        n, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor xent_seed_backward_cuda(const at::Tensor& grad, const at::Tensor& logits) {
  check_backward_args(grad, logits);
  TORCH_CHECK_VALUE(logits.is_cuda(), "logits must be a CUDA tensor for this kernel");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const int64_t k = logits.size(1);
  at::Tensor out = at::empty({n, k}, logits.options());
  if (out.numel() == 0) return out;
  const at::Tensor z = logits.contiguous();
  const at::Tensor v = grad.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(),
                                  "xent_seed_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    vjp_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        v.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        n, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CUDA, m) {
  m.impl("xent_seed", &xent_seed_cuda);
  m.impl("xent_seed_backward", &xent_seed_backward_cuda);
}

}  // namespace xent
}  // namespace safedl
