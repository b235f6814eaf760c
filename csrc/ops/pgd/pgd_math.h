// The arithmetic of one projected-gradient step, shared by the CPU and CUDA drivers.
//
// L-inf: x <- clamp(clamp(x + alpha * sign(g), x0 - eps, x0 + eps), lo, hi)
// L2:    x <- clamp(x0 + s_proj * (x + s_step * g - x0), lo, hi)
//        with s_step = alpha / ||g||_2 (0 when g == 0) and
//        s_proj = min(1, eps / ||x + s_step * g - x0||_2), both per sample.
//
// L2 norms are taken scaled: ||v|| = m * ||v / m|| with m = max_j |v_j| (see
// norm_divisor), so no square underflows or overflows. Unscaled, float32 gradients below
// ~1e-19 (or above ~1e19) gave ||g|| = 0 (or inf) and the sample did not move.
//
// Everything here is branch-light and free of libm calls, so the CPU loop vectorises.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../../common/host_device.h"

namespace safedl {
namespace pgd {

// sign(g) in {-1, 0, +1} as torch.sign computes it (NaN maps to 0). The specification of
// signed_step below, which the kernels use.
template <typename T>
SAFEDL_HOST_DEVICE T sign_of(T g) {
  return static_cast<T>(static_cast<int>(g > T(0)) - static_cast<int>(g < T(0)));
}

// min/max written as comparisons (not fminf/fmaxf): vectorisable, and a NaN in v passes
// through, as torch.clamp does.
template <typename T>
SAFEDL_HOST_DEVICE T clamp_to(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// max(v, b) as torch.maximum: a NaN in either gives NaN (through v + b; v == b gives v).
// Written so that GCC still vectorises the loops around it: it does not for
// `v > b || v != v`, nor for a NaN test of v ahead of the comparison.
template <typename T>
SAFEDL_HOST_DEVICE T max_nan(T v, T b) {
  return v >= b ? v : (v < b ? b : v + b);
}

// Clamp onto the L-inf ball [x0 - eps, x0 + eps] (eps finite). A NaN x0 gives NaN, as the
// reference's torch.maximum / torch.minimum with NaN bounds do: clamp_to alone passed v
// through (its comparisons with NaN bounds are false), so a NaN x0 left x + alpha.
// Infinite x0 gives bounds of x0 and x0, and x0, as torch does.
template <typename T>
SAFEDL_HOST_DEVICE T clamp_to_ball(T v, T x0, T eps) {
  // Clamped first, then selected: with the clamp inside the select GCC if-converts both
  // together into four blends instead of two max/min and one blend.
  const T clamped = clamp_to(v, x0 - eps, x0 + eps);
  return x0 == x0 ? clamped : x0;
}

// alpha * sign(g) for alpha >= 0, as alpha with g's sign bit where g < 0 or g > 0 and 0
// elsewhere (zero and NaN gradients). Equal to alpha * sign_of(g) bit for bit (including
// -0.0 for alpha = 0, g < 0), in fewer vector operations: copysign is a bitwise and/or.
template <typename T>
SAFEDL_HOST_DEVICE T signed_step(T alpha, T g) {
  return (g < T(0) || g > T(0)) ? std::copysign(alpha, g) : T(0);
}

// A valid step size or radius (alpha, eps): >= 0 and finite. NaN fails.
template <typename T>
SAFEDL_HOST_DEVICE bool budget_ok(T v) {
  return v >= T(0) && v <= std::numeric_limits<T>::max();
}

// One L-inf step for one element. The order of operations matches the pure-PyTorch
// reference exactly, so float32 results are bit-identical to it (NaN in x, x0 or the
// result included).
template <typename T>
SAFEDL_HOST_DEVICE T linf_step(T x, T x0, T g, T alpha, T eps, T lo, T hi) {
  const T stepped = x + signed_step(alpha, g);
  const T in_ball = clamp_to_ball(stepped, x0, eps);
  return clamp_to(in_ball, lo, hi);
}

// Projection of an element onto the L-inf ball and the box, without a step
// (used after a random start).
template <typename T>
SAFEDL_HOST_DEVICE T linf_project(T x, T x0, T eps, T lo, T hi) {
  return clamp_to(clamp_to_ball(x, x0, eps), lo, hi);
}

// ---- L2 norms, scaled ----------------------------------------------------------------
//
// Per sample: m = max_j |v_j| (fold max_abs over the elements, from 0), then
// div = norm_divisor(m), r = sqrt(sum_j scaled(v_j, div)^2) and ||v|| = div * r.
// For finite non-zero v, r lies in [1, sqrt(d)]: its squares neither underflow nor
// overflow. A zero v gives div = 1 and r = 0; a NaN (inf) in v gives div = 1 and r NaN
// (inf), the values the unscaled norm gives.
//
// The drivers first sum the unscaled squares (one pass, no division); where
// norm_is_accurate says that sum is as good as the scaled one they use it with div = 1
// (the same quantity up to rounding), and only otherwise take the two scaled passes.

// Whether an unscaled sum of squares (of d elements) is as accurate as the scaled one:
// no square overflowed, and the squares that underflowed, each off by at most the
// smallest denormal, sum to under epsilon^2 of it (the floor is min / epsilon per element).
template <typename T>
SAFEDL_HOST_DEVICE bool norm_is_accurate(T sumsq, int64_t d) {
  const T floor = std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();
  return sumsq <= std::numeric_limits<T>::max() && sumsq >= floor * static_cast<T>(d);
}

// Running max of |v| that propagates NaN (as torch.amax does), for m.
template <typename T>
SAFEDL_HOST_DEVICE T max_abs(T m, T v) {
  const T a = v < T(0) ? -v : v;
  return max_nan(a, m);
}

// The divisor of a sample's elements: m itself when it is positive and finite, else 1.
template <typename T>
SAFEDL_HOST_DEVICE T norm_divisor(T m) {
  return (m > T(0) && m <= std::numeric_limits<T>::max()) ? m : T(1);
}

// One element divided by its sample's divisor (|result| <= 1 for finite input). A
// division, not a multiplication by 1 / div: 1 / div overflows for denormal div.
template <typename T>
SAFEDL_HOST_DEVICE T scaled(T v, T div) {
  return div == T(1) ? v : v / div;  // v / 1 == v: the select only skips the division
}

// Per-sample factor that turns the scaled gradient u = g / div into a step of L2 length
// alpha: alpha / ||u||, with ||u|| = r as above. A zero (or NaN) gradient gives 0: the
// sample does not move. (With r >= 1 for finite g, alpha / r cannot overflow; the guard
// stays for callers that pass an unscaled norm.)
template <typename T>
SAFEDL_HOST_DEVICE T l2_step_scale(T alpha, T grad_norm) {
  const T s = grad_norm > T(0) ? alpha / grad_norm : T(0);
  return s <= std::numeric_limits<T>::max() ? s : T(0);
}

// Per-sample factor that shrinks a perturbation of L2 length div * r onto the ball of
// radius eps: min(1, eps / (div * r)), computed as (eps / div) / r so that neither the
// norm nor the quotient overflows. 1 inside the ball and for a NaN norm (as
// `norm > eps ? eps / norm : 1` gives).
template <typename T>
SAFEDL_HOST_DEVICE T l2_project_scale(T eps, T div, T r) {
  const T q = eps / div;
  return r > q ? q / r : T(1);
}

// delta for one element after the L2 step (before projection), from the gradient's
// divisor and the step scale of the scaled gradient.
template <typename T>
SAFEDL_HOST_DEVICE T l2_delta(T x, T x0, T g, T grad_div, T step_scale) {
  return (x + step_scale * scaled(g, grad_div)) - x0;
}

// Final value of one element after projection onto the ball and the box.
template <typename T>
SAFEDL_HOST_DEVICE T l2_finish(T x0, T delta, T project_scale, T lo, T hi) {
  return clamp_to(x0 + delta * project_scale, lo, hi);
}

}  // namespace pgd
}  // namespace safedl
