// The step timeline's analysis (bench_kernels --timeline) on kernel spans made up here.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "univ/step_timeline.hpp"

namespace {

using univ::KernelSpan;

std::vector<std::string> chain_names(const univ::StepTimeline& s) {
  std::vector<std::string> names;
  for (size_t i : s.chain) names.push_back(s.kernels[i].name);
  return names;
}

// One step at t0 (ns): load 0-3 us; on stream 1 a 10 us forward and a 20 us backward
// after 1 us gaps; on stream 2 a weight gradient of 25 us that starts with the backward
// and ends last; then the update 2 us after it.
std::vector<KernelSpan> step_at(uint64_t t0) {
  return {{"load_queued_step_kernel", t0, t0 + 3000, 1},
          {"forward", t0 + 4000, t0 + 14000, 1},
          {"backward", t0 + 15000, t0 + 35000, 1},
          {"weight_grad", t0 + 15500, t0 + 40500, 2},
          {"adamw", t0 + 42500, t0 + 44500, 1}};
}

TEST(StepTimeline, SplitsStepsAndFollowsTheBoundingChain) {
  std::vector<KernelSpan> kernels = step_at(1'000'000);
  const std::vector<KernelSpan> second = step_at(1'100'000);
  kernels.insert(kernels.end(), second.begin(), second.end());
  kernels.push_back({"before the first step", 10'000, 20'000, 1});
  std::reverse(kernels.begin(), kernels.end());  // any order

  const std::vector<univ::StepTimeline> steps = univ::step_timelines(kernels, "load_queued_step", false);
  ASSERT_EQ(steps.size(), 2u);
  for (const univ::StepTimeline& s : steps) {
    ASSERT_EQ(s.kernels.size(), 5u);
    EXPECT_EQ(s.kernels.front().name, "load_queued_step_kernel");
    EXPECT_DOUBLE_EQ(s.span_us, 44.5);
    EXPECT_DOUBLE_EQ(s.kernel_us, 3 + 10 + 20 + 25 + 2);
    EXPECT_DOUBLE_EQ(s.busy_us, 3 + 10 + 25.5 + 2);  // backward and weight_grad overlap
    EXPECT_EQ(s.stream_busy_us, (std::vector<std::pair<uint32_t, double>>{{1, 3 + 10 + 20 + 2}, {2, 25}}));
    // adamw waited for weight_grad, which started after forward ended (backward still ran)
    EXPECT_EQ(chain_names(s),
              (std::vector<std::string>{"load_queued_step_kernel", "forward", "weight_grad", "adamw"}));
    EXPECT_DOUBLE_EQ(s.chain_kernel_us, 3 + 10 + 25 + 2);
    EXPECT_DOUBLE_EQ(s.chain_gap_us, 1 + 1.5 + 2);
  }
}

TEST(StepTimeline, AChainedLaunchLinksToTheKernelItOverlaps) {
  // b launched while a ran its last blocks (programmatic dependent launch); c after b;
  // a side kernel within a's time.
  const std::vector<univ::StepTimeline> steps = univ::step_timelines(
      {{"load", 0, 1000, 1},
       {"a", 1500, 9000, 1},
       {"side", 2000, 3000, 2},
       {"b", 8500, 12000, 1},
       {"c", 12500, 13000, 1}},
      "load", true);
  ASSERT_EQ(steps.size(), 1u);
  EXPECT_EQ(chain_names(steps[0]), (std::vector<std::string>{"load", "a", "b", "c"}));
  EXPECT_DOUBLE_EQ(steps[0].chain_gap_us, 0.5 + 0.5);  // the overlap counts as no gap
  EXPECT_DOUBLE_EQ(steps[0].busy_us, 1 + 10.5 + 0.5);
}

TEST(StepTimeline, NoStepWithoutItsFirstKernel) {
  EXPECT_TRUE(univ::step_timelines({{"a", 0, 10, 1}, {"b", 20, 30, 1}}, "load", false).empty());
}

TEST(StepTimeline, ShortKernelNames) {
  EXPECT_EQ(univ::short_kernel_name("void univ::cuda::(anonymous namespace)::mlp_kernel<false>("
                                    "univ::cuda::(anonymous namespace)::MlpProduct)"),
            "mlp_kernel<false>");
  EXPECT_EQ(univ::short_kernel_name("void univ::cuda::(anonymous namespace)::small_matmul_kernel<true, "
                                    "(univ::cuda::(anonymous namespace)::Epilogue)2>(univ::cuda::SmallProduct)"),
            "small_matmul_kernel<true, (Epilogue)2>");
  EXPECT_EQ(univ::short_kernel_name("cutlass::Kernel2<cutlass_80_simt_sgemm_128x32_8x5_nn_align1>(Params)"),
            "Kernel2<cutlass_80_simt_sgemm_128x32_8x5_nn_align1>");
  EXPECT_EQ(univ::short_kernel_name("plain_kernel"), "plain_kernel");
}

TEST(StepTimeline, DescribesTheChainAndTheKernels) {
  const std::vector<univ::StepTimeline> steps = univ::step_timelines(step_at(0), "load_queued_step", false);
  ASSERT_EQ(steps.size(), 1u);
  const std::string text = univ::describe_step(steps[0]);
  EXPECT_NE(text.find("span 44.5 us"), std::string::npos) << text;
  EXPECT_NE(text.find("streams, us with a kernel running: 1: 35.0 2: 25.0"), std::string::npos) << text;
  EXPECT_NE(text.find("bounding chain: 4 kernels, 40.0 us running, 4.5 us between them"), std::string::npos) << text;
  EXPECT_NE(text.find("weight_grad"), std::string::npos) << text;
  // the time per kernel, the largest first
  EXPECT_LT(text.find("25.0      1  weight_grad"), text.find("20.0      1  backward")) << text;
}

}  // namespace
