// The check macro of the dependency-free C++ tests: EXPECT(cond, printf-format, ...)
// counts a check and prints the failing condition with its message. Each test program
// includes this once and reports g_checks / g_failures from main().
#pragma once

#include <cstdio>

namespace {

int g_failures = 0;
int g_checks = 0;

}  // namespace

#define EXPECT(cond, ...)                                          \
  do {                                                            \
    ++g_checks;                                                   \
    if (!(cond)) {                                                \
      ++g_failures;                                               \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)
