// CUDA driver of safedl::gmm1d_em: one block per group (grid-stride over groups). Each EM
// iteration is one pass of the block's threads over the group's points and one block
// reduction of the sufficient statistics; thread 0 runs the M-step and the convergence
// test and publishes the new parameters and the stop decision in shared memory, so every
// thread of the block stops after the same iteration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <limits>

#include "gmm.h"
#include "gmm_math.h"

namespace safedl {
namespace gmm {
namespace {

constexpr int kThreads = 256;

// Range and finiteness of a group's values (the pre-scan for degenerate groups).
struct Range {
  double lo;
  double hi;
  int bad;
};

struct RangeOp {
  __device__ Range operator()(const Range& a, const Range& b) const {
    return {a.lo < b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi, a.bad | b.bad};
  }
};

struct StatsOp {
  __device__ Stats operator()(const Stats& a, const Stats& b) const { return add_stats(a, b); }
};

__device__ void store(double* w, double* mu, double* var, const Params& p) {
  for (int i = 0; i < 2; ++i) {
    w[i] = p.w[i];
    mu[i] = p.mu[i];
    var[i] = p.var[i];
  }
}

template <typename T>
__global__ void em_kernel(const T* __restrict__ x, int64_t stride,
                          const int64_t* __restrict__ lengths, const double* __restrict__ w0,
                          const double* __restrict__ m0, const double* __restrict__ v0,
                          int64_t groups, int64_t max_iter, double tol, double reg_covar,
                          double* __restrict__ ow, double* __restrict__ om,
                          double* __restrict__ ov, double* __restrict__ oll,
                          int64_t* __restrict__ oit, bool* __restrict__ oconv,
                          int32_t* __restrict__ ostatus) {
  using StatsReduce = cub::BlockReduce<Stats, kThreads>;
  using RangeReduce = cub::BlockReduce<Range, kThreads>;
  __shared__ union {
    typename StatsReduce::TempStorage stats;
    typename RangeReduce::TempStorage range;
  } temp;
  __shared__ Params params;
  __shared__ int stop;
  const int tid = threadIdx.x;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t n = lengths[g];
    const T* xs = x + g * stride;
    Range part{std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
               0};
    for (int64_t j = tid; j < n; j += kThreads) {
      const double v = static_cast<double>(xs[j]);
      part.bad |= isfinite(v) ? 0 : 1;
      part.lo = v < part.lo ? v : part.lo;
      part.hi = v > part.hi ? v : part.hi;
    }
    const Range range = RangeReduce(temp.range).Reduce(part, RangeOp());
    if (tid == 0) {
      stop = 1;
      if (n == 0) {
        store(ow + 2 * g, om + 2 * g, ov + 2 * g, constant_params(0.0, reg_covar));
        oll[g] = 0.0;
        oit[g] = 0;
        oconv[g] = true;
        ostatus[g] = kEmpty;
      } else if (range.bad) {
        ostatus[g] = kNonFinite;
      } else if (range.lo == range.hi) {
        store(ow + 2 * g, om + 2 * g, ov + 2 * g, constant_params(range.lo, reg_covar));
        oll[g] = constant_log_likelihood(reg_covar);
        oit[g] = 0;
        oconv[g] = true;
        ostatus[g] = kConstant;
      } else {
        params = initial_params(w0, m0, v0, g);
        stop = 0;
      }
    }
    __syncthreads();
    // Only thread 0 reads these; the others follow the shared stop flag.
    double lower_bound = -std::numeric_limits<double>::infinity();
    int64_t it = 0;
    while (!stop) {
      const Coeffs k = coeffs_of(params);
      Stats acc = zero_stats();
      for (int64_t j = tid; j < n; j += kThreads) accumulate(acc, static_cast<double>(xs[j]), k);
      __syncthreads();  // every thread has read params; temp storage is free
      const Stats total = StatsReduce(temp.stats).Reduce(acc, StatsOp());
      if (tid == 0) {
        const Params next = m_step(params, total, reg_covar);
        const double prev = lower_bound;
        lower_bound = total.lse / static_cast<double>(n);
        ++it;
        const bool converged = has_converged(lower_bound - prev, tol);
        params = next;
        if (converged || it >= max_iter) {
          store(ow + 2 * g, om + 2 * g, ov + 2 * g, next);
          oll[g] = lower_bound;
          oit[g] = it;
          oconv[g] = converged;
          ostatus[g] = kFitted;
          stop = 1;
        }
      }
      __syncthreads();
    }
    __syncthreads();  // stop and temp are rewritten for the next group
  }
}

Result gmm1d_em_cuda(const at::Tensor& values, const at::Tensor& lengths,
                     const at::Tensor& weights, const at::Tensor& means,
                     const at::Tensor& variances, int64_t max_iter, double tol,
                     double reg_covar) {
  TORCH_CHECK_VALUE(values.is_cuda(), "values must be a CUDA tensor for this kernel");
  const c10::cuda::CUDAGuard guard(values.device());
  check_em_args(values, lengths, weights, means, variances, max_iter, tol, reg_covar);
  Outputs out(values);
  const int64_t c = values.size(0);
  if (c == 0) return out.result();
  const Inputs in(values, lengths, weights, means, variances);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>(c, 65535);
  AT_DISPATCH_FLOATING_TYPES(in.values.scalar_type(), "gmm1d_em_cuda", [&] {
    em_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        in.values.const_data_ptr<scalar_t>(), in.values.size(1),
        in.lengths.const_data_ptr<int64_t>(), in.weights.const_data_ptr<double>(),
        in.means.const_data_ptr<double>(), in.variances.const_data_ptr<double>(),
        c, max_iter, tol, reg_covar, out.weights.data_ptr<double>(),
        out.means.data_ptr<double>(), out.variances.data_ptr<double>(),
        out.log_likelihood.data_ptr<double>(), out.n_iter.data_ptr<int64_t>(),
        out.converged.data_ptr<bool>(), out.status.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_if_nonfinite(out.status.cpu());
  return out.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(safedl, CUDA, m) { m.impl("gmm1d_em", &gmm1d_em_cuda); }

}  // namespace gmm
}  // namespace safedl
