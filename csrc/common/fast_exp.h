// exp(x) for x <= 0 without libm, shared by the ops whose CPU loops must vectorise
// (gmm1d_em's E-step, the xent seed's softmax) and by their CUDA kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace safedl {

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

// Double: the same reduction with a degree-12 polynomial (relative error < 2e-15); 0 below
// -708. t's low mantissa bits hold k (t = 1.5 * 2^52 + k): (bits(t) + 1023) << 52 is the
// bit pattern of 2^k, with integer operations only (no double -> int64 conversion, which
// AVX2 lacks).
SAFEDL_HOST_DEVICE double exp_nonpositive(double x) {
  const double xc = x < -708.0 ? -708.0 : x;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double t = xc * 1.4426950408889634 + shifter;
  const double kf = t - shifter;
  const double r = (xc - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10;
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
  return x < -708.0 ? 0.0 : p * scale;
}

}  // namespace safedl
