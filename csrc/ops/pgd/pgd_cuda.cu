// CUDA driver of safedl::pgd_step_: a grid-stride elementwise kernel for L-inf and one
// block per sample (two block norms, each one reduction or, scaled, three) for L2, on the
// current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "pgd.h"
#include "pgd_math.h"

namespace safedl {
namespace pgd {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename opmath_t>
__global__ void linf_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x0,
                            const scalar_t* __restrict__ g,
                            const opmath_t* __restrict__ alpha, int64_t alpha_stride,
                            const opmath_t* __restrict__ eps, int64_t eps_stride,
                            int64_t total, int64_t d, opmath_t lo, opmath_t hi) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t s = i / d;
    x[i] = static_cast<scalar_t>(linf_step<opmath_t>(
        static_cast<opmath_t>(x[i]), static_cast<opmath_t>(x0[i]),
        static_cast<opmath_t>(g[i]), alpha[s * alpha_stride], eps[s * eps_stride], lo, hi));
  }
}

// NaN-propagating max for cub's block reduction of max_j |v_j|.
struct MaxNan {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return max_nan<T>(a, b);
  }
};

// The L2 norm of one sample as div * r (pgd_math.h), by the whole block: the unscaled
// sum of squares where norm_is_accurate says it is enough (div = 1), else the max-abs
// and the scaled sum. value(j) gives element j. Every thread returns the same div and r;
// the branches are uniform across the block. Ends with a barrier, so temp and shared
// can be reused at once.
template <typename opmath_t, typename Reduce, typename Value>
__device__ void block_norm_parts(const Value& value, int64_t d,
                                 typename Reduce::TempStorage& temp, opmath_t& shared,
                                 opmath_t& div, opmath_t& r) {
  opmath_t part = 0;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const opmath_t v = value(j);
    part += v * v;
  }
  opmath_t total = Reduce(temp).Sum(part);
  if (threadIdx.x == 0) shared = total;
  __syncthreads();
  const opmath_t sumsq = shared;
  div = opmath_t(1);
  r = sqrt(sumsq);
  if (!norm_is_accurate<opmath_t>(sumsq, d)) {
    part = 0;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) part = max_abs<opmath_t>(part, value(j));
    __syncthreads();  // everyone has read shared; temp is reused
    total = Reduce(temp).Reduce(part, MaxNan());
    if (threadIdx.x == 0) shared = norm_divisor<opmath_t>(total);
    __syncthreads();
    div = shared;
    // div == 1: v is zero or not finite, and the unscaled sum is exact (0, inf or NaN).
    if (div != opmath_t(1)) {
      part = 0;
      for (int64_t j = threadIdx.x; j < d; j += kThreads) {
        const opmath_t u = scaled<opmath_t>(value(j), div);
        part += u * u;
      }
      __syncthreads();  // as above
      total = Reduce(temp).Sum(part);
      if (threadIdx.x == 0) shared = total;
      __syncthreads();
      r = sqrt(shared);
    }
  }
  __syncthreads();  // shared and temp are free again
}

template <typename scalar_t, typename opmath_t>
__global__ void l2_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x0,
                          const scalar_t* __restrict__ g, const opmath_t* __restrict__ alpha,
                          int64_t alpha_stride, const opmath_t* __restrict__ eps,
                          int64_t eps_stride, int64_t n, int64_t d, opmath_t lo,
                          opmath_t hi) {
  using Reduce = cub::BlockReduce<opmath_t, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ opmath_t shared;
  for (int64_t s = blockIdx.x; s < n; s += gridDim.x) {
    scalar_t* xs = x + s * d;
    const scalar_t* x0s = x0 + s * d;
    const scalar_t* gs = g + s * d;
    opmath_t gdiv, gr;
    const auto grad_at = [&](int64_t j) { return static_cast<opmath_t>(gs[j]); };
    block_norm_parts<opmath_t, Reduce>(grad_at, d, temp, shared, gdiv, gr);
    const opmath_t step = l2_step_scale<opmath_t>(alpha[s * alpha_stride], gr);
    const auto delta_at = [&](int64_t j) {
      return l2_delta<opmath_t>(static_cast<opmath_t>(xs[j]), static_cast<opmath_t>(x0s[j]),
                                static_cast<opmath_t>(gs[j]), gdiv, step);
    };
    opmath_t ddiv, dr;
    block_norm_parts<opmath_t, Reduce>(delta_at, d, temp, shared, ddiv, dr);
    const opmath_t proj = l2_project_scale<opmath_t>(eps[s * eps_stride], ddiv, dr);
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const opmath_t delta = delta_at(j);  // reads xs[j] before this thread writes it
      xs[j] = static_cast<scalar_t>(
          l2_finish<opmath_t>(static_cast<opmath_t>(x0s[j]), delta, proj, lo, hi));
    }
    __syncthreads();  // x of this sample is final before the block moves on
  }
}

void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x0, const at::Tensor& grad,
                   const at::Tensor& alpha, const at::Tensor& eps, c10::string_view norm,
                   double lo, double hi) {
  const Norm kind = check_step_args(x_adv, x0, grad, alpha, eps,
                                    std::string_view(norm.data(), norm.size()), lo, hi);
  TORCH_CHECK_VALUE(x_adv.is_cuda(), "x_adv must be a CUDA tensor for this kernel");
  const c10::cuda::CUDAGuard guard(x_adv.device());
  // The budgets' check reads one flag back from the device (a sync per call, the price of
  // refusing a NaN or negative eps in the op itself).
  const Budgets b(alpha, eps, at::toOpMathType(x_adv.scalar_type()));
  if (x_adv.numel() == 0) return;
  const StepOperands op(x_adv, x0, grad);
  const int64_t n = op.n;
  const int64_t d = op.d;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(),
                                  "pgd_step_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if (kind == Norm::Linf) {
      const int64_t total = n * d;
      const int64_t blocks =
          std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 32);
      linf_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
          op.work.data_ptr<scalar_t>(), op.x0.const_data_ptr<scalar_t>(),
          op.grad.const_data_ptr<scalar_t>(), b.alpha.const_data_ptr<opmath_t>(),
          b.alpha_stride, b.eps.const_data_ptr<opmath_t>(), b.eps_stride, total, d,
          static_cast<opmath_t>(lo), static_cast<opmath_t>(hi));
    } else {
      const int64_t blocks = std::min<int64_t>(n, 65535);
      l2_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
          op.work.data_ptr<scalar_t>(), op.x0.const_data_ptr<scalar_t>(),
          op.grad.const_data_ptr<scalar_t>(), b.alpha.const_data_ptr<opmath_t>(),
          b.alpha_stride, b.eps.const_data_ptr<opmath_t>(), b.eps_stride, n, d,
          static_cast<opmath_t>(lo), static_cast<opmath_t>(hi));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  op.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CUDA, m) { m.impl("pgd_step_", &pgd_step_cuda); }

}  // namespace pgd
}  // namespace safedl
