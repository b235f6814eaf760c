// The arithmetic of batched 2-component 1-D Gaussian-mixture EM, shared by the CPU and
// CUDA drivers of safedl::gmm1d_em. Everything accumulates in double, whatever the dtype
// of the values.
//
// One EM iteration of one group, as scikit-learn's GaussianMixture(2, 'full') in 1-D:
//   E-step from the current (w, mu, var):  a_k(x) = log w_k + log N(x | mu_k, var_k),
//     lse(x) = log(exp(a_0) + exp(a_1)),  r_k(x) = exp(a_k - lse),
//     lower bound = mean over the group of lse(x);
//   M-step:  n_k = sum r_k + 10 * DBL_EPSILON,  mu_k' = sum r_k x / n_k,
//     var_k' = sum r_k (x - mu_k')^2 / n_k + reg_covar,  w_k' = n_k / (n_0 + n_1).
// The sums are taken about the previous means (d = x - mu_k, already computed for the
// log density), so one pass over the points gives everything the M-step needs:
//   sum r_k (x - mu_k')^2 = q_k - 2 delta_k s_k + delta_k^2 sum r_k,
//   with s_k = sum r_k d, q_k = sum r_k d^2 and delta_k = s_k / n_k = mu_k' - mu_k.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../../common/fast_exp.h"
#include "../../common/host_device.h"

namespace safedl {
namespace gmm {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;
// scikit-learn adds 10 * machine epsilon to every component's effective count.
constexpr double kCountEps = 10.0 * std::numeric_limits<double>::epsilon();

// Parameters of one group's two components.
struct Params {
  double w[2];
  double mu[2];
  double var[2];
};

// What the E-step needs per component, precomputed once per iteration:
// a_k(x) = c_k + h_k * (x - mu_k)^2 with h_k = -1 / (2 var_k) and
// c_k = log w_k - (log(2 pi) + log var_k) / 2.
struct Coeffs {
  double mu[2];
  double h[2];
  double c[2];
};

// Sufficient statistics of one pass over a group's points (summed over points).
struct Stats {
  double r[2];   // sum r_k
  double s[2];   // sum r_k (x - mu_k)
  double q[2];   // sum r_k (x - mu_k)^2
  double lse;    // sum lse(x)
};

// Group g's starting parameters from the (C, 2) initial weights, means and variances;
// the weights are renormalised to sum to 1.
SAFEDL_HOST_DEVICE Params initial_params(const double* w, const double* mu, const double* var,
                                         int64_t g) {
  Params p;
  const double wsum = w[2 * g] + w[2 * g + 1];
  for (int i = 0; i < 2; ++i) {
    p.w[i] = w[2 * g + i] / wsum;
    p.mu[i] = mu[2 * g + i];
    p.var[i] = var[2 * g + i];
  }
  return p;
}

SAFEDL_HOST_DEVICE Coeffs coeffs_of(const Params& p) {
  Coeffs k;
  for (int i = 0; i < 2; ++i) {
    k.mu[i] = p.mu[i];
    k.h[i] = -0.5 / p.var[i];
    k.c[i] = log(p.w[i]) - 0.5 * (kLog2Pi + log(p.var[i]));
  }
  return k;
}

SAFEDL_HOST_DEVICE Stats zero_stats() {
  Stats s;
  for (int i = 0; i < 2; ++i) s.r[i] = s.s[i] = s.q[i] = 0.0;
  s.lse = 0.0;
  return s;
}

SAFEDL_HOST_DEVICE Stats add_stats(const Stats& a, const Stats& b) {
  Stats s;
  for (int i = 0; i < 2; ++i) {
    s.r[i] = a.r[i] + b.r[i];
    s.s[i] = a.s[i] + b.s[i];
    s.q[i] = a.q[i] + b.q[i];
  }
  s.lse = a.lse + b.lse;
  return s;
}

// Log joint density of x and component k: log w_k + log N(x | mu_k, var_k).
SAFEDL_HOST_DEVICE double log_joint(double d, double h, double c) { return c + h * d * d; }

using safedl::exp_nonpositive;  // csrc/common/fast_exp.h

// Two-way log-sum-exp and the responsibility of component 1, from a_0 and a_1. The
// smaller responsibility is computed as e / (1 + e) with e = exp(-|a_1 - a_0|), so it
// keeps its relative precision down to underflow. -inf in one of them (a weight of 0)
// gives that component responsibility 0.
// Per-point terms of the E-step. a_i = c_i + h_i d_i^2 are the log joint densities;
// lse(x) = hi + log(one_plus_e) with e = exp(-|a_1 - a_0|); r1 the responsibility of
// component 1.
struct PointTerms {
  double d0, d1, r1, hi, one_plus_e;
};

SAFEDL_HOST_DEVICE PointTerms point_terms(double x, const Coeffs& k) {
  PointTerms t;
  t.d0 = x - k.mu[0];
  t.d1 = x - k.mu[1];
  const double a0 = log_joint(t.d0, k.h[0], k.c[0]);
  const double a1 = log_joint(t.d1, k.h[1], k.c[1]);
  t.hi = a0 > a1 ? a0 : a1;
  const double diff = a1 - a0;
  const double e = exp_nonpositive(-(diff < 0 ? -diff : diff));
  t.one_plus_e = 1.0 + e;
  const double big = 1.0 / t.one_plus_e;
  t.r1 = diff > 0 ? big : e * big;
  return t;
}

// Adds one point to the sufficient statistics (the CUDA driver's per-thread loop; the
// CPU driver runs the same point_terms in a vectorised loop of its own).
SAFEDL_HOST_DEVICE void accumulate(Stats& s, double x, const Coeffs& k) {
  const PointTerms t = point_terms(x, k);
  const double r0 = 1.0 - t.r1;
  s.r[0] += r0;
  s.r[1] += t.r1;
  s.s[0] += r0 * t.d0;
  s.s[1] += t.r1 * t.d1;
  s.q[0] += r0 * t.d0 * t.d0;
  s.q[1] += t.r1 * t.d1 * t.d1;
  s.lse += t.hi + log(t.one_plus_e);
}

SAFEDL_HOST_DEVICE Params m_step(const Params& old, const Stats& s, double reg_covar) {
  Params p;
  double nk[2];
  for (int i = 0; i < 2; ++i) nk[i] = s.r[i] + kCountEps;
  const double total = nk[0] + nk[1];
  for (int i = 0; i < 2; ++i) {
    const double delta = s.s[i] / nk[i];
    double ss = s.q[i] - 2.0 * delta * s.s[i] + delta * delta * s.r[i];
    ss = ss > 0.0 ? ss : 0.0;  // rounding can push an empty component's sum below 0
    p.w[i] = nk[i] / total;
    p.mu[i] = old.mu[i] + delta;
    p.var[i] = ss / nk[i] + reg_covar;
  }
  return p;
}

// The documented result of a group with no spread (one point, or all values equal to x):
// component 0 takes all the weight at x, component 1 is a copy with weight 0, both with
// variance reg_covar. Its mean log-likelihood per point is log N(x | x, reg_covar).
SAFEDL_HOST_DEVICE Params constant_params(double x, double reg_covar) {
  Params p;
  p.w[0] = 1.0;
  p.w[1] = 0.0;
  p.mu[0] = p.mu[1] = x;
  p.var[0] = p.var[1] = reg_covar;
  return p;
}

SAFEDL_HOST_DEVICE double constant_log_likelihood(double reg_covar) {
  return -0.5 * (kLog2Pi + log(reg_covar));
}

// Whether EM stops after an iteration whose lower bound changed by `change`
// (scikit-learn: |change| < tol; the first iteration's change is +inf).
SAFEDL_HOST_DEVICE bool has_converged(double change, double tol) {
  return (change < 0 ? -change : change) < tol;
}

}  // namespace gmm
}  // namespace safedl
