// Tests of csrc/ops/pgd/pgd_math.h in float and double. Dependency-free: a plain main
// that prints every failing check and returns nonzero if any failed.
//
// Built a second time with SAFEDL_TEST_OPS_LIBRARY (CMake target test_safedl_ops): then
// it links libtorch, dlopen()s the safedl_ops library (SAFEDL_OPS_LIBRARY_PATH) and
// checks that safedl::pgd_step_ registered and runs on the CPU.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "expect.h"
#include "ops/pgd/pgd_math.h"

namespace {

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "float"; }
template <>
const char* type_name<double>() { return "double"; }

// Exact (bitwise-value) equality, NaN == NaN.
template <typename T>
bool same(T a, T b) {
  return (std::isnan(a) && std::isnan(b)) || a == b;
}

template <typename T>
bool close(T a, T b, T tol) {
  return std::fabs(a - b) <= tol;
}

}  // namespace

using namespace safedl::pgd;

template <typename T>
void test_sign_of() {
  const char* t = type_name<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  const T tiny = std::numeric_limits<T>::denorm_min();
  struct Case { T g, want; };
  const Case cases[] = {{T(3), T(1)},   {T(-2), T(-1)}, {T(0), T(0)},  {T(-0.0), T(0)},
                        {nan, T(0)},    {-nan, T(0)},   {inf, T(1)},   {-inf, T(-1)},
                        {tiny, T(1)},   {-tiny, T(-1)}, {T(1e-30), T(1)}};
  for (const Case& c : cases) {
    const T got = sign_of<T>(c.g);
    EXPECT(same(got, c.want), "[%s] sign_of(%g) = %g, want %g", t, double(c.g), double(got),
           double(c.want));
  }
}

// The kernels use signed_step (copysign + mask); it must equal alpha * sign_of(g) bit for
// bit, the product the pure-PyTorch reference computes.
template <typename T>
void test_signed_step() {
  const char* t = type_name<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  const T tiny = std::numeric_limits<T>::denorm_min();
  const T grads[] = {T(3), T(-2), T(0), T(-0.0), nan, -nan, inf, -inf, tiny, -tiny, T(1e-30)};
  const T alphas[] = {T(0), T(2) / T(255), T(0.5), T(1e-20), T(7)};
  for (const T a : alphas) {
    for (const T g : grads) {
      const T got = signed_step<T>(a, g);
      const T want = a * sign_of<T>(g);
      EXPECT(std::memcmp(&got, &want, sizeof(T)) == 0,
             "[%s] signed_step(%g, %g) = %g, want %g (bitwise)", t, double(a), double(g),
             double(got), double(want));
    }
  }
}

template <typename T>
void test_clamp_to() {
  const char* t = type_name<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  struct Case { T v, lo, hi, want; };
  const Case cases[] = {{T(-1), T(0), T(1), T(0)},      {T(2), T(0), T(1), T(1)},
                        {T(0.5), T(0), T(1), T(0.5)},   {T(0), T(0), T(1), T(0)},
                        {T(1), T(0), T(1), T(1)},       {T(0.3), T(0.5), T(0.5), T(0.5)},
                        {T(-5), T(-4), T(-3), T(-4)},   {T(-1), T(-4), T(-3), T(-3)}};
  for (const Case& c : cases) {
    const T got = clamp_to<T>(c.v, c.lo, c.hi);
    EXPECT(same(got, c.want), "[%s] clamp_to(%g, %g, %g) = %g, want %g", t, double(c.v),
           double(c.lo), double(c.hi), double(got), double(c.want));
  }
  // A NaN value passes through, as torch.clamp does.
  EXPECT(std::isnan(clamp_to<T>(nan, T(0), T(1))), "[%s] clamp_to(NaN, 0, 1) is not NaN", t);
}

// max_nan is torch.maximum: NaN from either side. clamp_to_ball: NaN from v or x0.
template <typename T>
void test_nan_propagation() {
  const char* t = type_name<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  EXPECT(same(max_nan<T>(T(1), T(2)), T(2)) && same(max_nan<T>(T(3), T(2)), T(3)),
         "[%s] max_nan of numbers is not the max", t);
  EXPECT(std::isnan(max_nan<T>(nan, T(2))) && std::isnan(max_nan<T>(T(2), nan)),
         "[%s] max_nan drops a NaN", t);
  EXPECT(std::isnan(clamp_to_ball<T>(T(0.5), nan, T(0.1))),
         "[%s] clamp_to_ball(0.5, x0=NaN) is not NaN", t);
  EXPECT(std::isnan(clamp_to_ball<T>(nan, T(0.5), T(0.1))),
         "[%s] clamp_to_ball(NaN, x0=0.5) is not NaN", t);
  EXPECT(same(clamp_to_ball<T>(T(0.9), T(0.5), T(0.25)), T(0.75)),
         "[%s] clamp_to_ball(0.9, 0.5, 0.25) != 0.75", t);
  // Infinite x0: the ball is {x0}, as torch.maximum/minimum with infinite bounds give.
  EXPECT(same(clamp_to_ball<T>(T(0.5), inf, T(0.1)), inf) &&
             same(clamp_to_ball<T>(T(0.5), -inf, T(0.1)), -inf),
         "[%s] clamp_to_ball with infinite x0 is not x0", t);
  // The step: NaN in x0 or x gives NaN (was x + alpha for a NaN x0).
  for (const T g : {T(1), T(-1), T(0)}) {
    EXPECT(std::isnan(linf_step<T>(T(0.5), nan, g, T(0.1), T(0.2), T(0), T(1))),
           "[%s] linf_step with x0 = NaN, g = %g is not NaN", t, double(g));
    EXPECT(std::isnan(linf_step<T>(nan, T(0.5), g, T(0.1), T(0.2), T(0), T(1))),
           "[%s] linf_step with x = NaN, g = %g is not NaN", t, double(g));
    EXPECT(std::isnan(linf_project<T>(T(0.5), nan, T(0.2), T(0), T(1))),
           "[%s] linf_project with x0 = NaN is not NaN", t);
  }
}

template <typename T>
void test_budget_ok() {
  const char* t = type_name<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  EXPECT(budget_ok<T>(T(0)) && budget_ok<T>(T(0.03)) && budget_ok<T>(std::numeric_limits<T>::max()),
         "[%s] budget_ok refuses a valid value", t);
  EXPECT(!budget_ok<T>(T(-0.1)) && !budget_ok<T>(nan) && !budget_ok<T>(inf) &&
             !budget_ok<T>(-inf) && !budget_ok<T>(-std::numeric_limits<T>::denorm_min()),
         "[%s] budget_ok accepts a negative or non-finite value", t);
}

// linf_step on a grid: the result equals an independently written reference (clamp to
// the intersection of ball and box) and lies inside both whenever x0 is in the box.
template <typename T>
void test_linf_step_grid() {
  const char* t = type_name<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T lo = T(0), hi = T(1);
  const T eps_values[] = {T(0), T(8) / T(255), T(0.3)};
  const T x0_values[] = {T(0), T(0.1), T(0.5), T(0.97), T(1)};
  const T grad_values[] = {T(-2), T(-1e-30), T(0), T(-0.0), T(1e-30), T(3), nan};
  int failures_before = g_failures;
  for (T eps : eps_values) {
    const T alpha_values[] = {T(0), T(0.01), eps / T(4), eps, T(2) * eps};
    for (T x0 : x0_values) {
      for (int k = -3; k <= 3; ++k) {
        const T x = x0 + T(k) * eps / T(2);  // inside and outside the ball
        for (T g : grad_values) {
          for (T alpha : alpha_values) {
            const T got = linf_step<T>(x, x0, g, alpha, eps, lo, hi);
            // Reference: explicit sign, then clamp to [max(x0-eps, lo), min(x0+eps, hi)].
            const T s = g > T(0) ? T(1) : (g < T(0) ? T(-1) : T(0));
            const T stepped = x + alpha * s;
            const T ball_lo = x0 - eps, ball_hi = x0 + eps;
            const T low = ball_lo > lo ? ball_lo : lo;
            const T high = ball_hi < hi ? ball_hi : hi;
            const T want = stepped < low ? low : (stepped > high ? high : stepped);
            EXPECT(same(got, want),
                   "[%s] linf_step(x=%.9g, x0=%.9g, g=%g, alpha=%.9g, eps=%.9g) = %.17g, "
                   "want %.17g", t, double(x), double(x0), double(g), double(alpha),
                   double(eps), double(got), double(want));
            EXPECT(got >= ball_lo && got <= ball_hi,
                   "[%s] linf_step(x=%.9g, x0=%.9g, g=%g, alpha=%.9g, eps=%.9g) = %.17g "
                   "outside the eps-ball", t, double(x), double(x0), double(g),
                   double(alpha), double(eps), double(got));
            EXPECT(got >= lo && got <= hi,
                   "[%s] linf_step(x=%.9g, x0=%.9g, g=%g, alpha=%.9g, eps=%.9g) = %.17g "
                   "outside the box", t, double(x), double(x0), double(g), double(alpha),
                   double(eps), double(got));
            // A zero (or NaN) gradient does not move x: only the projection applies.
            if (!(g > T(0)) && !(g < T(0))) {
              const T proj = linf_project<T>(x, x0, eps, lo, hi);
              EXPECT(same(got, proj),
                     "[%s] zero-grad linf_step(x=%.9g, x0=%.9g, g=%g) = %.17g, "
                     "linf_project gives %.17g", t, double(x), double(x0), double(g),
                     double(got), double(proj));
            }
            if (g_failures - failures_before > 20) return;  // enough output
          }
        }
      }
    }
  }
  // Zero gradient inside ball and box: x comes back unchanged.
  const T x = T(0.25), x0 = T(0.3);
  EXPECT(same(linf_step<T>(x, x0, T(0), T(0.01), T(0.1), lo, hi), x),
         "[%s] zero-grad linf_step moved a point inside ball and box", t);
  // The step itself: one alpha in the sign direction.
  EXPECT(same(linf_step<T>(T(0.5), T(0.5), T(7), T(0.125), T(0.25), lo, hi), T(0.625)),
         "[%s] linf_step(0.5, 0.5, +, 0.125, 0.25) != 0.625", t);
  EXPECT(same(linf_step<T>(T(0.5), T(0.5), T(-7), T(0.5), T(0.25), lo, hi), T(0.25)),
         "[%s] linf_step(0.5, 0.5, -, 0.5, 0.25) != 0.25 (ball clip)", t);
  EXPECT(same(linf_step<T>(T(0.875), T(0.875), T(1), T(0.25), T(0.25), lo, hi), T(1)),
         "[%s] linf_step(0.875, 0.875, +, 0.25, 0.25) != 1 (box clip)", t);
}

template <typename T>
void test_l2_scales() {
  const char* t = type_name<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  // Step scale: alpha / ||g||, and 0 for a zero or NaN norm.
  EXPECT(same(l2_step_scale<T>(T(0.5), T(0)), T(0)), "[%s] l2_step_scale(0.5, 0) != 0", t);
  EXPECT(same(l2_step_scale<T>(T(0.5), nan), T(0)), "[%s] l2_step_scale(0.5, NaN) != 0", t);
  EXPECT(same(l2_step_scale<T>(T(0.5), T(2)), T(0.25)), "[%s] l2_step_scale(0.5, 2) != 0.25", t);
  EXPECT(same(l2_step_scale<T>(T(0), T(3)), T(0)), "[%s] l2_step_scale(0, 3) != 0", t);
  // A denormal norm: alpha / norm overflows to inf; the sample must not move.
  EXPECT(same(l2_step_scale<T>(T(1), std::numeric_limits<T>::denorm_min()), T(0)),
         "[%s] l2_step_scale(1, denorm_min) != 0", t);
  // Projection scale (div = 1: the unscaled norm): 1 inside the ball (and on its
  // surface), eps / n outside.
  const T one = T(1);
  EXPECT(same(l2_project_scale<T>(T(0.5), one, T(0)), T(1)),
         "[%s] l2_project_scale(0.5, 1, 0) != 1", t);
  EXPECT(same(l2_project_scale<T>(T(0.5), one, T(0.25)), T(1)),
         "[%s] l2_project_scale(0.5, 1, 0.25) != 1", t);
  EXPECT(same(l2_project_scale<T>(T(0.5), one, T(0.5)), T(1)),
         "[%s] l2_project_scale(0.5, 1, 0.5) != 1", t);
  EXPECT(same(l2_project_scale<T>(T(0.5), one, T(2)), T(0.25)),
         "[%s] l2_project_scale(0.5, 1, 2) != 0.25", t);
  const T n = T(3), eps = T(0.7);
  EXPECT(same(l2_project_scale<T>(eps, one, n), eps / n),
         "[%s] l2_project_scale(0.7, 1, 3) != 0.7/3", t);
  EXPECT(same(l2_project_scale<T>(T(0), one, T(1)), T(0)),
         "[%s] l2_project_scale(0, 1, 1) != 0", t);
  EXPECT(same(l2_project_scale<T>(T(0.5), one, nan), T(1)),
         "[%s] l2_project_scale(0.5, 1, NaN) != 1", t);
  // Scaled: ||delta|| = div * r, never formed. A huge div: (eps / div) / r, a denormal
  // here (the unscaled norm, inf, gave 0); a tiny div: eps / div overflows, inside the ball.
  const T big = std::numeric_limits<T>::max() / T(4);
  const T tiny = std::numeric_limits<T>::denorm_min();
  const T huge_proj = l2_project_scale<T>(T(0.5), big, T(2));
  EXPECT(same(huge_proj, (T(0.5) / big) / T(2)) && huge_proj > T(0),
         "[%s] l2_project_scale(0.5, max/4, 2) = %g", t, double(huge_proj));
  EXPECT(same(l2_project_scale<T>(T(0.5), tiny, T(2)), T(1)),
         "[%s] l2_project_scale(0.5, denorm_min, 2) != 1", t);
  EXPECT(same(l2_project_scale<T>(T(3) * tiny, T(4) * tiny, T(1.25)), T(0.6)),
         "[%s] l2_project_scale(3 dmin, 4 dmin, 1.25) != 0.6", t);
}

// The pieces of the scaled norm.
template <typename T>
void test_norm_pieces() {
  const char* t = type_name<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  const T tiny = std::numeric_limits<T>::denorm_min();
  EXPECT(same(max_abs<T>(T(0), T(-3)), T(3)) && same(max_abs<T>(T(5), T(-3)), T(5)),
         "[%s] max_abs is not the max of |v|", t);
  EXPECT(std::isnan(max_abs<T>(T(0), nan)) && std::isnan(max_abs<T>(nan, T(7))),
         "[%s] max_abs drops a NaN", t);
  EXPECT(same(norm_divisor<T>(T(4)), T(4)) && same(norm_divisor<T>(tiny), tiny),
         "[%s] norm_divisor of a positive finite m is not m", t);
  EXPECT(same(norm_divisor<T>(T(0)), T(1)) && same(norm_divisor<T>(inf), T(1)) &&
             same(norm_divisor<T>(nan), T(1)),
         "[%s] norm_divisor of 0, inf or NaN is not 1", t);
  EXPECT(same(scaled<T>(T(3) * tiny, T(4) * tiny), T(0.75)) && same(scaled<T>(nan, T(1)), nan),
         "[%s] scaled is not v / div", t);
  // The unscaled sum of squares is used only where it is exact enough.
  EXPECT(norm_is_accurate<T>(T(1), 1000) && norm_is_accurate<T>(T(1e-20), 10),
         "[%s] norm_is_accurate refuses an ordinary sum", t);
  EXPECT(!norm_is_accurate<T>(T(0), 10) && !norm_is_accurate<T>(inf, 10) &&
             !norm_is_accurate<T>(nan, 10) &&
             !norm_is_accurate<T>(std::numeric_limits<T>::min(), 10),
         "[%s] norm_is_accurate accepts 0, inf, NaN or an underflowing sum", t);
}

// ||v|| as div * r, the way the drivers compute it (unscaled where that is accurate).
template <typename T>
void norm_parts(const T* v, int n, T& div, T& r) {
  T sumsq = T(0);
  for (int j = 0; j < n; ++j) sumsq += v[j] * v[j];
  div = T(1);
  if (!norm_is_accurate<T>(sumsq, n)) {
    T m = T(0);
    for (int j = 0; j < n; ++j) m = max_abs<T>(m, v[j]);
    div = norm_divisor<T>(m);
    if (div != T(1)) {
      T s = T(0);
      for (int j = 0; j < n; ++j) s += scaled<T>(v[j], div) * scaled<T>(v[j], div);
      r = std::sqrt(s);
      return;
    }
  }
  r = std::sqrt(sumsq);
}

// One full L2 step on a 2-element sample, the way the drivers do it.
template <typename T>
void l2_step_2(const T x[2], const T x0[2], const T g[2], T alpha, T eps, T lo, T hi,
               T out[2]) {
  T gdiv, gr;
  norm_parts<T>(g, 2, gdiv, gr);
  const T step = l2_step_scale<T>(alpha, gr);
  T delta[2];
  for (int j = 0; j < 2; ++j) delta[j] = l2_delta<T>(x[j], x0[j], g[j], gdiv, step);
  T ddiv, dr;
  norm_parts<T>(delta, 2, ddiv, dr);
  const T proj = l2_project_scale<T>(eps, ddiv, dr);
  for (int j = 0; j < 2; ++j) out[j] = l2_finish<T>(x0[j], delta[j], proj, lo, hi);
}

template <typename T>
void test_l2_full_step() {
  const char* t = type_name<T>();
  // Numbers chosen to be exact in binary, so every result is exact.
  {
    // ||g|| = 5, step = 1.25 / 5 = 0.25, delta = (0.75, 1.0), ||delta|| = 1.25 > eps
    // = 0.625: scale 0.5, delta -> (0.375, 0.5), x -> (0.875, 1.0): on the box edge.
    const T x0[2] = {T(0.5), T(0.5)}, x[2] = {T(0.5), T(0.5)}, g[2] = {T(3), T(4)};
    T out[2];
    l2_step_2<T>(x, x0, g, T(1.25), T(0.625), T(0), T(1), out);
    EXPECT(same(out[0], T(0.875)) && same(out[1], T(1)),
           "[%s] L2 step (ball projection) gave (%.17g, %.17g), want (0.875, 1)", t,
           double(out[0]), double(out[1]));
  }
  {
    // Same step from x0 = (0.75, 0.25) with g = (3, -4): delta (0.75, -1.0) -> scaled
    // (0.375, -0.5), x -> (1.125, -0.25), then the box gives (1, 0).
    const T x0[2] = {T(0.75), T(0.25)}, x[2] = {T(0.75), T(0.25)}, g[2] = {T(3), T(-4)};
    T out[2];
    l2_step_2<T>(x, x0, g, T(1.25), T(0.625), T(0), T(1), out);
    EXPECT(same(out[0], T(1)) && same(out[1], T(0)),
           "[%s] L2 step (box clip) gave (%.17g, %.17g), want (1, 0)", t, double(out[0]),
           double(out[1]));
  }
  {
    // Inside the ball: no projection. step = 0.5 / 5 = 0.1, delta = (0.3, 0.4) + (x - x0).
    const T x0[2] = {T(0.5), T(0.5)}, x[2] = {T(0.5), T(0.5)}, g[2] = {T(-3), T(4)};
    T out[2];
    l2_step_2<T>(x, x0, g, T(0.5), T(1), T(0), T(1), out);
    const T tol = std::numeric_limits<T>::epsilon() * T(4);
    EXPECT(close(out[0], T(0.2), tol) && close(out[1], T(0.9), tol),
           "[%s] L2 step (inside ball) gave (%.17g, %.17g), want (0.2, 0.9)", t,
           double(out[0]), double(out[1]));
  }
  {
    // Zero gradient: x stays where it is, only projected (here it is inside: unchanged).
    const T x0[2] = {T(0.5), T(0.5)}, x[2] = {T(0.625), T(0.25)}, g[2] = {T(0), T(0)};
    T out[2];
    l2_step_2<T>(x, x0, g, T(0.5), T(1), T(0), T(1), out);
    EXPECT(same(out[0], x[0]) && same(out[1], x[1]),
           "[%s] zero-grad L2 step moved x: (%.17g, %.17g)", t, double(out[0]),
           double(out[1]));
    // ... and outside the ball it is only pulled back: delta (0.125, -0.25) has norm
    // sqrt(0.078125); with eps = norm / 2 it halves.
    const T eps = std::sqrt(T(0.078125)) / T(2);
    l2_step_2<T>(x, x0, g, T(0.5), eps, T(0), T(1), out);
    const T tol = std::numeric_limits<T>::epsilon() * T(4);
    EXPECT(close(out[0], T(0.5625), tol) && close(out[1], T(0.375), tol),
           "[%s] zero-grad L2 step outside the ball gave (%.17g, %.17g), want (0.5625, "
           "0.375)", t, double(out[0]), double(out[1]));
  }
}

// Gradients and perturbations at the ends of the dtype's range: (3, 4) * 2^k. Their
// squares underflow or overflow, but the scaled norm makes every k give the step of
// k = 0 exactly (before: no move, or a perturbation projected to nothing).
template <typename T>
void test_l2_extreme_scales() {
  const char* t = type_name<T>();
  const int lo_exp = std::numeric_limits<T>::min_exponent - std::numeric_limits<T>::digits + 2;
  const int hi_exp = std::numeric_limits<T>::max_exponent - 4;
  const int exps[] = {lo_exp, lo_exp + 5, std::numeric_limits<T>::min_exponent - 1,
                      -80, -40, 0, 40, 80, hi_exp};
  for (const int k : exps) {
    if (k < lo_exp || k > hi_exp) continue;  // (-80 and 80 still fit float)
    // The step, as test_l2_full_step's first case: ends on (0.875, 1.0).
    const T x0[2] = {T(0.5), T(0.5)}, x[2] = {T(0.5), T(0.5)};
    const T g[2] = {std::ldexp(T(3), k), std::ldexp(T(4), k)};
    T out[2];
    l2_step_2<T>(x, x0, g, T(1.25), T(0.625), T(0), T(1), out);
    EXPECT(same(out[0], T(0.875)) && same(out[1], T(1)),
           "[%s] L2 step with g = (3, 4) * 2^%d gave (%.17g, %.17g), want (0.875, 1)", t, k,
           double(out[0]), double(out[1]));
    // Inside the ball: a step of length exactly alpha = 0.125 along (0.6, 0.8).
    l2_step_2<T>(x, x0, g, T(0.125), T(1), T(0), T(1), out);
    EXPECT(same(out[0], T(0.5) + T(0.075)) && same(out[1], T(0.5) + T(0.1)),
           "[%s] L2 step of 0.125 with g = (3, 4) * 2^%d gave (%.17g, %.17g)", t, k,
           double(out[0]), double(out[1]));
    // The projection of a perturbation (3, 4) * 2^k onto the ball of radius 2.5 * 2^k:
    // halved, exactly.
    const T z[2] = {T(0), T(0)};
    const T big = std::numeric_limits<T>::max();
    l2_step_2<T>(g, z, z, T(0), std::ldexp(T(2.5), k), -big, big, out);
    EXPECT(same(out[0], std::ldexp(T(1.5), k)) && same(out[1], std::ldexp(T(2), k)),
           "[%s] L2 projection of (3, 4) * 2^%d onto radius 2.5 * 2^%d gave (%.17g, "
           "%.17g)", t, k, k, double(out[0]), double(out[1]));
  }
}

template <typename T>
void test_all() {
  test_sign_of<T>();
  test_signed_step<T>();
  test_clamp_to<T>();
  test_nan_propagation<T>();
  test_budget_ok<T>();
  test_linf_step_grid<T>();
  test_l2_scales<T>();
  test_norm_pieces<T>();
  test_l2_full_step<T>();
  test_l2_extreme_scales<T>();
}

#ifdef SAFEDL_TEST_OPS_LIBRARY
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <string>

using PgdStepSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, c10::string_view, double,
                        double);

void test_ops_library() {
  const c10::OperatorName name("safedl::pgd_step_", "");
  EXPECT(!c10::Dispatcher::singleton().findSchema(name).has_value(),
         "safedl::pgd_step_ registered before the library was loaded");
  void* lib = dlopen(SAFEDL_OPS_LIBRARY_PATH, RTLD_NOW | RTLD_GLOBAL);
  EXPECT(lib != nullptr, "dlopen(%s): %s", SAFEDL_OPS_LIBRARY_PATH, dlerror());
  if (lib == nullptr) return;
  auto handle = c10::Dispatcher::singleton().findSchema(name);
  EXPECT(handle.has_value(), "safedl::pgd_step_ not registered after dlopen");
  if (!handle) return;
  EXPECT(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU),
         "safedl::pgd_step_ has no CPU kernel");
#ifdef SAFEDL_TEST_WITH_CUDA
  EXPECT(handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA),
         "safedl::pgd_step_ has no CUDA kernel");
#endif
  auto op = handle->typed<PgdStepSig>();

  const at::Tensor x0 = at::full({2, 2}, 0.5, at::kFloat);
  const at::Tensor grad = at::tensor({3.0f, 4.0f, -1.0f, 0.0f}).view({2, 2});
  // L-inf, per-sample eps: row 0 moves by alpha, row 1 is clipped to its eps.
  at::Tensor x = x0.clone();
  op.call(x, x0, grad, at::tensor({0.125f}), at::tensor({0.25f, 0.0625f}), "linf", 0.0, 1.0);
  const at::Tensor want_linf = at::tensor({0.625f, 0.625f, 0.4375f, 0.5f}).view({2, 2});
  EXPECT(at::equal(x, want_linf), "linf pgd_step_ gave %s",
         c10::str(x.flatten()).c_str());
  // L2: row 0 is the hand-computed step of test_l2_full_step (-> 0.875, 1.0); row 1
  // steps 1.25 along (-1, 0), is pulled back to 0.625 by the ball, then clipped by the box.
  x = x0.clone();
  op.call(x, x0, grad, at::tensor({1.25f}), at::tensor({0.625f}), "l2", 0.0, 1.0);
  const at::Tensor want_l2 = at::tensor({0.875f, 1.0f, 0.0f, 0.5f}).view({2, 2});
  EXPECT(at::equal(x, want_l2), "l2 pgd_step_ gave %s", c10::str(x.flatten()).c_str());
  // Bad arguments raise, not crash.
  bool threw = false;
  try {
    op.call(x, x0, grad, at::tensor({0.1f}), at::tensor({0.1f}), "l3", 0.0, 1.0);
  } catch (const c10::Error&) {
    threw = true;
  }
  EXPECT(threw, "pgd_step_ with norm='l3' did not throw");
  // The op checks eps and alpha itself (the raw op is documented).
  for (const float bad : {-0.1f, std::numeric_limits<float>::quiet_NaN()}) {
    threw = false;
    try {
      op.call(x, x0, grad, at::tensor({0.1f}), at::tensor({0.1f, bad}), "linf", 0.0, 1.0);
    } catch (const c10::ValueError& err) {
      threw = std::string(err.what()).find("eps must be >= 0 and finite") != std::string::npos;
    }
    EXPECT(threw, "pgd_step_ with eps = %g did not raise the eps error", double(bad));
  }
  // Half precision on the CPU: computed in float, stored in half (the L-inf case above).
  at::Tensor xh = x0.to(at::kHalf);
  op.call(xh, x0.to(at::kHalf), grad.to(at::kHalf), at::tensor({0.125f}),
          at::tensor({0.25f, 0.0625f}), "linf", 0.0, 1.0);
  EXPECT(at::equal(xh.to(at::kFloat), want_linf), "half linf pgd_step_ gave %s",
         c10::str(xh.flatten()).c_str());
}
#endif

int main() {
#ifdef SAFEDL_TEST_OPS_LIBRARY
  test_ops_library();
  const char* what = "safedl_ops library";
#else
  test_all<float>();
  test_all<double>();
  const char* what = "pgd_math";
#endif
  if (g_failures != 0) {
    std::printf("%s: %d of %d checks FAILED\n", what, g_failures, g_checks);
    return 1;
  }
  std::printf("%s: all %d checks passed\n", what, g_checks);
  return 0;
}
