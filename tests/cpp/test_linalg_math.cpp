// Tests of the shared math of the linalg ops: csrc/ops/gmm/gmm_math.h (the libm-free
// exp and the E-step terms) and csrc/ops/sketch/sketch_math.h (the counter-based
// permutation and signs). Dependency-free: prints failing checks, returns nonzero.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "expect.h"
#include "ops/gmm/gmm_math.h"
#include "ops/sketch/sketch_math.h"

namespace {

void test_exp_nonpositive() {
  using safedl::gmm::exp_nonpositive;
  double worst = 0.0;
  for (int i = 0; i <= 200000; ++i) {
    const double x = -708.0 * i / 200000.0;
    const double want = std::exp(x);
    const double rel = std::fabs(exp_nonpositive(x) - want) / want;
    worst = rel > worst ? rel : worst;
  }
  EXPECT(worst < 2e-15, "worst relative error %.3g over [-708, 0]", worst);
  EXPECT(exp_nonpositive(0.0) == 1.0, "exp(0) = %.17g", exp_nonpositive(0.0));
  EXPECT(exp_nonpositive(-709.0) == 0.0, "below -708 gives 0");
  EXPECT(exp_nonpositive(-1e300) == 0.0, "far below gives 0");
  EXPECT(exp_nonpositive(-INFINITY) == 0.0, "-inf gives 0");
}

void test_point_terms() {
  using namespace safedl::gmm;
  Params p{{0.3, 0.7}, {-1.0, 2.0}, {0.5, 2.0}};
  const Coeffs k = coeffs_of(p);
  for (double x : {-50.0, -3.0, -1.0, 0.0, 0.5, 2.0, 7.0, 80.0}) {
    const PointTerms t = point_terms(x, k);
    double a[2];
    for (int i = 0; i < 2; ++i) {
      const double d = x - p.mu[i];
      a[i] = std::log(p.w[i]) - 0.5 * std::log(2 * M_PI * p.var[i]) - 0.5 * d * d / p.var[i];
    }
    const double hi = a[0] > a[1] ? a[0] : a[1];
    const double lse = hi + std::log(std::exp(a[0] - hi) + std::exp(a[1] - hi));
    const double r1 = std::exp(a[1] - lse);
    EXPECT(std::fabs(t.r1 - r1) < 1e-14, "x=%g r1 %.17g vs %.17g", x, t.r1, r1);
    EXPECT(std::fabs(t.hi + std::log(t.one_plus_e) - lse) < 1e-12 * (1 + std::fabs(lse)),
           "x=%g lse", x);
  }
}

void test_permutation_and_signs() {
  using namespace safedl::sketch;
  for (int bits : {0, 1, 2, 3, 5, 10, 17}) {
    const uint64_t n = 1ULL << bits;
    std::vector<char> seen(n, 0);
    bool ok = true;
    for (uint64_t j = 0; j < n; ++j) {
      const uint64_t v = permute_index(j, bits, stream_key(42, 1));
      ok = ok && v < n && !seen[v];
      if (v < n) seen[v] = 1;
    }
    EXPECT(ok, "permute_index is a bijection of [0, 2^%d)", bits);
  }
  EXPECT(transform_bits(1) == 0 && transform_bits(2) == 1 && transform_bits(3) == 2 &&
             transform_bits(150528) == 18,
         "transform_bits");
  int plus = 0;
  for (uint64_t i = 0; i < 100000; ++i) plus += sign_flip<double>(stream_key(7, 0), i) > 0;
  EXPECT(plus > 49000 && plus < 51000, "balanced signs: %d of 100000 positive", plus);
  double a = 3.0, b = 1.0;
  butterfly(a, b);
  EXPECT(a == 4.0 && b == 2.0, "butterfly");
}

}  // namespace

int main() {
  test_exp_nonpositive();
  test_point_terms();
  test_permutation_and_signs();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
