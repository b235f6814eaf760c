// CUDA driver of safedl::pgd_step_: a grid-stride elementwise kernel for L-inf and one
// block per sample (two block reductions) for L2, on the current stream.
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

template <typename scalar_t, typename opmath_t>
__global__ void l2_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x0,
                          const scalar_t* __restrict__ g, const opmath_t* __restrict__ alpha,
                          int64_t alpha_stride, const opmath_t* __restrict__ eps,
                          int64_t eps_stride, int64_t n, int64_t d, opmath_t lo,
                          opmath_t hi) {
  using Reduce = cub::BlockReduce<opmath_t, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ opmath_t shared_scale;
  for (int64_t s = blockIdx.x; s < n; s += gridDim.x) {
    scalar_t* xs = x + s * d;
    const scalar_t* x0s = x0 + s * d;
    const scalar_t* gs = g + s * d;
    opmath_t part = 0;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const opmath_t v = static_cast<opmath_t>(gs[j]);
      part += v * v;
    }
    opmath_t total = Reduce(temp).Sum(part);
    if (threadIdx.x == 0) shared_scale = l2_step_scale<opmath_t>(alpha[s * alpha_stride],
                                                                   sqrt(total));
    __syncthreads();
    const opmath_t step = shared_scale;
    part = 0;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const opmath_t delta = l2_delta<opmath_t>(static_cast<opmath_t>(xs[j]),
                                                static_cast<opmath_t>(x0s[j]),
                                                static_cast<opmath_t>(gs[j]), step);
      part += delta * delta;
    }
    __syncthreads();  // temp storage is reused
    total = Reduce(temp).Sum(part);
    if (threadIdx.x == 0) shared_scale = l2_project_scale<opmath_t>(eps[s * eps_stride],
                                                                      sqrt(total));
    __syncthreads();
    const opmath_t proj = shared_scale;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const opmath_t x0j = static_cast<opmath_t>(x0s[j]);
      const opmath_t delta = l2_delta<opmath_t>(static_cast<opmath_t>(xs[j]), x0j,
                                                static_cast<opmath_t>(gs[j]), step);
      xs[j] = static_cast<scalar_t>(l2_finish<opmath_t>(x0j, delta, proj, lo, hi));
    }
    __syncthreads();  // shared_scale is rewritten for the next sample
  }
}

void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x0, const at::Tensor& grad,
                   const at::Tensor& alpha, const at::Tensor& eps, c10::string_view norm,
                   double lo, double hi) {
  const Norm kind = check_step_args(x_adv, x0, grad, alpha, eps,
                                    std::string_view(norm.data(), norm.size()), lo, hi);
  TORCH_CHECK_VALUE(x_adv.is_cuda(), "x_adv must be a CUDA tensor for this kernel");
  const c10::cuda::CUDAGuard guard(x_adv.device());
  // alpha and eps in the dtype the math runs in; their check reads one flag back from the
  // device (a sync per call, the price of refusing a NaN or negative eps in the op).
  const auto op_dtype = at::toOpMathType(x_adv.scalar_type());
  // (Pairs, not structured bindings: C++17 lambdas cannot capture those.)
  const auto alpha_p = per_sample_param(alpha, op_dtype);
  const auto eps_p = per_sample_param(eps, op_dtype);
  const at::Tensor& a = alpha_p.first;
  const at::Tensor& e = eps_p.first;
  const int64_t as = alpha_p.second;
  const int64_t es = eps_p.second;
  check_budgets(a, e);
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
          op.grad.const_data_ptr<scalar_t>(), a.const_data_ptr<opmath_t>(), as,
          e.const_data_ptr<opmath_t>(), es, total, d, static_cast<opmath_t>(lo),
          static_cast<opmath_t>(hi));
    } else {
      const int64_t blocks = std::min<int64_t>(n, 65535);
      l2_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
          op.work.data_ptr<scalar_t>(), op.x0.const_data_ptr<scalar_t>(),
          op.grad.const_data_ptr<scalar_t>(), a.const_data_ptr<opmath_t>(), as,
          e.const_data_ptr<opmath_t>(), es, n, d, static_cast<opmath_t>(lo),
          static_cast<opmath_t>(hi));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  op.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CUDA, m) { m.impl("pgd_step_", &pgd_step_cuda); }

}  // namespace pgd
}  // namespace safedl
