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

#include "../../common/host_device.h"

namespace safedl {
namespace xent {

// exp(x) for x <= 0: Cody-Waite reduction x = k ln2 + r with |r| <= ln2/2, a Taylor
// polynomial in r, and 2^k assembled from its exponent bits (integer operations only).
// Branch-free; NaN propagates; 0 below the smallest normal result (float: -87.3,
// double: -708), -inf included.
SAFEDL_HOST_DEVICE float exp_nonpositive(float x) {
  const float lo = -87.33654f;  // log of the smallest normal float
  const float xc = x < lo ? lo : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504f + shifter;
  const float kf = t - shifter;
  // ln2 split so that kf * kLn2Hi is exact for |k| <= 126.
  const float r = (xc - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;
  // Degree 7: the truncation error is below 1e-8 relative on |r| <= ln2/2.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // t = 1.5 * 2^23 + k, so its low mantissa bits hold k: (bits(t) + 127) << 23 is the bit
  // pattern of 2^k for k in [-126, 0].
  uint32_t t_bits;
  memcpy(&t_bits, &t, sizeof(t_bits));
  const uint32_t bits = (t_bits + 127u) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : p * scale;
}

SAFEDL_HOST_DEVICE double exp_nonpositive(double x) {
  const double lo = -708.0;
  const double xc = x < lo ? lo : x;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double t = xc * 1.4426950408889634 + shifter;
  const double kf = t - shifter;
  const double r = (xc - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10;
  // Degree 12: below 2e-16 relative truncation error on |r| <= ln2/2.
  double p = 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  unsigned long long t_bits;
  memcpy(&t_bits, &t, sizeof(t_bits));
  const unsigned long long bits = (t_bits + 1023ULL) << 52;
  double scale;
  memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0 : p * scale;
}

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
