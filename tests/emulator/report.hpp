// One line per quantity the emulator checks compare: its error against the tolerance.
#pragma once
#include <cstdio>

namespace emu {

constexpr double kTolerance = 1e-5;  // float32 kernels against references, other summation orders

inline bool report(const char* what, double error, double tolerance = kTolerance) {
  const bool ok = error < tolerance;
  std::printf("  %-48s %.2e %s\n", what, error, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace emu
