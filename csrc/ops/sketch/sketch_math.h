// Math of the structured random projection (subsampled randomized Hadamard transform,
// SRHT) shared by the CPU and CUDA drivers of safedl::srht_project.
//
// out[j] = (1/sqrt(k)) * (H * diag(s) * x_padded)[perm(j)],  j < k,
// with H the unnormalised Walsh-Hadamard matrix of size D = 2^bits >= d, s_i = +-1 and perm
// a bijection of [0, D); both come from a counter-based generator keyed by the seed, so
// nothing of size d or D x k is stored and every process computes the same projection.
// E ||out||^2 = ||x||^2.
#pragma once

#include <cstdint>

#include "../../common/host_device.h"

namespace safedl {
namespace sketch {

// SplitMix64 finaliser: a bijective 64-bit mix, used as a counter-based generator.
SAFEDL_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Stream keys: sign flips and the permutation draw from different streams of one seed.
SAFEDL_HOST_DEVICE uint64_t stream_key(uint64_t seed, uint64_t stream) {
  return mix64(mix64(seed) ^ (0xD1B54A32D192ED03ULL * (stream + 1)));
}

// +1 or -1 for coordinate i.
template <typename T>
SAFEDL_HOST_DEVICE T sign_flip(uint64_t sign_key, uint64_t i) {
  return (mix64(sign_key ^ (i * 0x9E3779B97F4A7C15ULL)) >> 63) ? T(-1) : T(1);
}

// A bijection of [0, 2^bits): four rounds of (add key, multiply by an odd constant,
// xor-shift), each a bijection modulo 2^bits. perm(0), ..., perm(k-1) are k distinct
// coordinates of the transform: the subsample.
SAFEDL_HOST_DEVICE uint64_t permute_index(uint64_t j, int bits, uint64_t perm_key) {
  const uint64_t mask = bits >= 64 ? ~0ULL : ((1ULL << bits) - 1ULL);
  const int shift = bits > 1 ? bits / 2 : 1;
  uint64_t x = j & mask;
  uint64_t key = perm_key;
  for (int round = 0; round < 4; ++round) {
    key = mix64(key);
    x = (x + key) & mask;
    x = (x * ((key >> 1) | 1ULL)) & mask;  // odd multiplier: invertible mod 2^bits
    if (bits > 1) x ^= x >> shift;
  }
  return x;
}

// Number of bits of the transform size for d input coordinates: D = 2^bits >= max(d, 1).
SAFEDL_HOST_DEVICE int transform_bits(int64_t d) {
  int bits = 0;
  while ((int64_t{1} << bits) < d) ++bits;
  return bits;
}

// One Walsh-Hadamard butterfly: (a, b) <- (a + b, a - b).
template <typename T>
SAFEDL_HOST_DEVICE void butterfly(T& a, T& b) {
  const T u = a;
  const T v = b;
  a = u + v;
  b = u - v;
}

}  // namespace sketch
}  // namespace safedl
