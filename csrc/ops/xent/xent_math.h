// The arithmetic of the cross-entropy seed ops, shared by the CPU and CUDA drivers of
// safedl::xent_seed and safedl::xent_seed_backward. Row by row, with z one row of logits:
//
//   m = max_j z_j,  e_j = exp(z_j - m),  S = sum_j e_j,  p_j = e_j / S   (softmax)
//   xent_seed:           out_j = p_j - [j == y]
//   xent_seed_backward:  out_j = p_j (v_j - p.v)      ((diag(p) - p p^T) v, the VJP of
//                                                       softmax, hence of the seed)
//
// exp is evaluated without libm (exp_nonpositive below: its argument z_j - m is <= 0), so
// the CPU loops vectorise; half and bfloat16 compute in float.
#pragma once

#include <cstdint>
#include <cstring>

#include "../../common/fast_exp.h"
#include "../../common/host_device.h"

namespace safedl {
namespace xent {

using safedl::exp_nonpositive;  // csrc/common/fast_exp.h

// The larger of a and b; a NaN in b is skipped (as in a running maximum whose NaNs are
// left to propagate through the exponentials instead).
template <typename T>
SAFEDL_HOST_DEVICE T max_of(T a, T b) {
  return b > a ? b : a;
}

// A row's running (max, sum of exp(z - max)) in one pass ("online softmax"): the CUDA
// driver folds each lane's elements with push() and the lanes with combine().
template <typename T>
struct MaxSum {
  T m;  // running maximum (-inf when empty)
  T s;  // sum of exp(z - m) over the elements seen
};

// exp(a - b) for a <= b, with exp(-inf - -inf) taken as exp(0) = 1: equal maxima of -inf
// (a row of -inf so far) count like equal finite values, and an all -inf row still ends
// as NaN when its elements are divided out in the second pass, as torch.softmax gives.
template <typename T>
SAFEDL_HOST_DEVICE T exp_diff(T a, T b) {
  return a == b ? T(1) : exp_nonpositive(a - b);
}

template <typename T>
SAFEDL_HOST_DEVICE MaxSum<T> push(MaxSum<T> a, T z) {
  if (z > a.m) {
    a.s = a.s * exp_diff(a.m, z) + T(1);
    a.m = z;
  } else {
    a.s += exp_diff(z, a.m);  // z NaN: the sum becomes NaN
  }
  return a;
}

template <typename T>
SAFEDL_HOST_DEVICE MaxSum<T> combine(MaxSum<T> a, MaxSum<T> b) {
  if (b.s == T(0)) return a;  // an empty side
  if (a.s == T(0)) return b;
  if (b.m > a.m) {
    const MaxSum<T> t = a;
    a = b;
    b = t;
  }
  a.s += b.s * exp_diff(b.m, a.m);
  return a;
}

// One seed element: p_j - [j == y], with inv_sum = 1 / S.
template <typename T>
SAFEDL_HOST_DEVICE T seed_value(T e, T inv_sum, bool is_label) {
  return e * inv_sum - (is_label ? T(1) : T(0));
}

// One element of the softmax VJP: p_j (v_j - p.v).
template <typename T>
SAFEDL_HOST_DEVICE T softmax_vjp_value(T p, T v, T p_dot_v) {
  return p * (v - p_dot_v);
}

}  // namespace xent
}  // namespace safedl
