// The GPU path of correlate's statistics (host/cuda/stats_accumulator.cpp and
// kernels/comoment.cu, run on the host emulator) against float64 two-pass references,
// for machines without a GPU: both splits on data whose means are a thousand
// deviations, odd widths, chunks and spans and groups of spans cut short, the
// within-layer blocks (exactly symmetric) and the means, and the FP16 split's
// overflow. The emulated GEMM adds in order in float32, as tensor cores need not: it
// checks the layouts, strides and bookkeeping, not the GPU's own rounding, which the
// GPU tests (tests/test_cuda_stats.cpp) judge.
#include <cstdio>
#include <vector>

#include "emulator.hpp"
#include "gpu_stats.hpp"
#include "report.hpp"
#include "stats_reference.hpp"
#include "univ/stats.hpp"

namespace {

using namespace univ;
using emu::report;
using testing::correlated_acts;
using testing::gpu_stats;
using testing::worst_cross_error;
using testing::worst_mean_error;
using testing::worst_within_error;

bool thousand_deviations() {
  // Chunks of 1999, 1, 1200 and 517 tokens in spans of 256, groups of 3 per float64
  // pass: groups of 3, 3 and 1 span and a span of 207, one of 1 token, ...; then the
  // defaults (spans of 1024, groups as memory allows) on the same data.
  const std::vector<NeuronShape> shapes{{2, 37}, {1, 50}, {3, 21}};
  const std::vector<int64_t> chunks{1999, 1, 1200, 517};
  const int64_t n = 1999 + 1 + 1200 + 517;
  const auto acts = correlated_acts(shapes, n, 1e3, 7);
  bool ok = true;
  for (const SplitPrecision split : {SplitPrecision::f16, SplitPrecision::tf32}) {
    std::printf("3 models, widths 37, 50 and 21, %lld tokens, %s split\n", static_cast<long long>(n),
                split == SplitPrecision::f16 ? "FP16" : "TF32");
    for (const int64_t span : {int64_t(256), int64_t(0)}) {
      const CorrelationStats s = gpu_stats(acts, shapes, chunks, span, split, span > 0 ? 3 : 0);
      std::printf(" %s\n", span > 0 ? "spans of 256, 3 per float64 pass" : "default spans and groups");
      ok &= report("cross blocks, worst |dr|", worst_cross_error(acts, shapes, s, n));
      ok &= report("within-layer block (model 2, layer 1), worst |dr|", worst_within_error(acts[2], shapes[2], s, 2, 1, n));
      ok &= report("means, worst relative error", worst_mean_error(acts, shapes, s, n), 1e-9);
    }
  }
  return ok;
}

bool fp16_overflow() {
  // Values a million times the first chunk's leave FP16's range even after scaling.
  std::printf("values a million times the first chunk's\n");
  const std::vector<NeuronShape> shapes{{1, 4}, {1, 4}};
  auto acts = correlated_acts(shapes, 200, 0.0, 10);
  for (size_t i = 100 * 4; i < acts[1].size(); ++i) acts[1][i] *= 1e6f;
  bool reported = false;
  try {
    gpu_stats(acts, shapes, {100, 100}, 0, SplitPrecision::f16);
  } catch (const Fp16SplitOverflow&) {
    reported = true;
  }
  bool ok = report("the FP16 split's overflow reported", reported ? 0.0 : INFINITY);
  ok &= report("the TF32 split's statistics, worst |dr|",
               worst_cross_error(acts, shapes, gpu_stats(acts, shapes, {100, 100}, 0, SplitPrecision::tf32), 200));
  return ok;
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  bool ok = thousand_deviations();
  ok &= fp16_overflow();
  std::printf("%s\n", ok ? "the emulated CUDA statistics follow the float64 references" : "FAILED");
  return ok ? 0 : 1;
}
