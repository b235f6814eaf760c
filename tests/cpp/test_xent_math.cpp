// Tests of the shared math of the cross-entropy seed ops (csrc/ops/xent/xent_math.h): the
// libm-free float and double exp, the online (max, sum) fold the CUDA driver uses, and the
// seed and VJP elements. Dependency-free: prints failing checks, returns nonzero.
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "expect.h"
#include "ops/xent/xent_math.h"

namespace {

using namespace safedl::xent;

void test_exp_float() {
  float worst = 0.0f;
  for (int i = 0; i <= 400000; ++i) {
    const float x = -87.0f * static_cast<float>(i) / 400000.0f;
    const double want = std::exp(static_cast<double>(x));
    const double rel = std::fabs(static_cast<double>(exp_nonpositive(x)) - want) / want;
    worst = rel > worst ? static_cast<float>(rel) : worst;
  }
  // float's eps is 1.19e-7: within two units in the last place.
  EXPECT(worst < 2.5e-7f, "float: worst relative error %.3g over [-87, 0]", worst);
  EXPECT(exp_nonpositive(0.0f) == 1.0f, "float exp(0) = %.9g", exp_nonpositive(0.0f));
  EXPECT(exp_nonpositive(-88.0f) == 0.0f, "float: below the normal range gives 0");
  EXPECT(exp_nonpositive(-INFINITY) == 0.0f, "float: -inf gives 0");
  EXPECT(std::isnan(exp_nonpositive(NAN)), "float: NaN propagates");
}

void test_exp_double() {
  double worst = 0.0;
  for (int i = 0; i <= 200000; ++i) {
    const double x = -708.0 * i / 200000.0;
    const double want = std::exp(x);
    const double rel = std::fabs(exp_nonpositive(x) - want) / want;
    worst = rel > worst ? rel : worst;
  }
  EXPECT(worst < 2e-15, "double: worst relative error %.3g over [-708, 0]", worst);
  EXPECT(exp_nonpositive(0.0) == 1.0, "double exp(0)");
  EXPECT(exp_nonpositive(-709.0) == 0.0, "double: below -708 gives 0");
  EXPECT(exp_nonpositive(-static_cast<double>(INFINITY)) == 0.0, "double: -inf gives 0");
  EXPECT(std::isnan(exp_nonpositive(static_cast<double>(NAN))), "double: NaN propagates");
}

// The fold of a row split into `lanes` interleaved parts, as the CUDA warp does it.
MaxSum<double> fold(const std::vector<double>& z, int lanes) {
  std::vector<MaxSum<double>> part(lanes, MaxSum<double>{-INFINITY, 0.0});
  for (size_t j = 0; j < z.size(); ++j) part[j % lanes] = push(part[j % lanes], z[j]);
  MaxSum<double> all{-INFINITY, 0.0};
  for (const auto& p : part) all = combine(all, p);
  return all;
}

void test_online_max_sum() {
  const std::vector<std::vector<double>> rows = {
      {0.0}, {1.0, 2.0, 3.0}, {3.0, 2.0, 1.0, -5.0, 40.0, 39.5, -700.0},
      {-INFINITY, 0.5, -INFINITY, 0.25}, {-1e3, -1e3 + 1, -1e3 - 2}};
  for (const auto& z : rows) {
    double m = -INFINITY;
    for (double v : z) m = v > m ? v : m;
    double s = 0.0;
    for (double v : z) s += std::exp(v - m);
    for (int lanes : {1, 2, 3, 32}) {
      const MaxSum<double> ms = fold(z, lanes);
      EXPECT(ms.m == m, "max %.17g vs %.17g (lanes %d)", ms.m, m, lanes);
      EXPECT(std::fabs(ms.s - s) <= 1e-14 * s, "sum %.17g vs %.17g (lanes %d)", ms.s, s, lanes);
    }
  }
  // A row of -inf so far: the sum counts them (so the row ends as NaN, like torch).
  const MaxSum<double> ms = fold({-INFINITY, -INFINITY}, 2);
  EXPECT(ms.m == -INFINITY && ms.s == 2.0, "all -inf: m %g s %g", ms.m, ms.s);
  const MaxSum<double> bad = fold({0.0, NAN, 1.0}, 2);
  EXPECT(std::isnan(bad.s), "NaN in a row makes the sum NaN");
}

void test_elements() {
  EXPECT(seed_value(2.0, 0.25, false) == 0.5, "seed off the label");
  EXPECT(seed_value(2.0, 0.25, true) == -0.5, "seed at the label");
  // p (v - p.v) for p = (0.25, 0.75), v = (1, -1): p.v = -0.5.
  EXPECT(softmax_vjp_value(0.25, 1.0, -0.5) == 0.375, "vjp element 0");
  EXPECT(softmax_vjp_value(0.75, -1.0, -0.5) == -0.375, "vjp element 1");
}

}  // namespace

int main() {
  test_exp_float();
  test_exp_double();
  test_online_max_sum();
  test_elements();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
