// Philox4x32-10 against Random123's known-answer vectors, and the stream helpers.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "univ/philox.hpp"

namespace univ {
namespace {

TEST(Philox, KnownAnswerVectors) {
  struct Case {
    uint32_t counter[4], key[2], expected[4];
  };
  const Case cases[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Case& c : cases) {
    const Philox4x32Block out = philox4x32_10(c.counter, c.key);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out.word[i], c.expected[i]);
  }
}

TEST(Philox, StreamsAreDeterministicAndDistinct) {
  PhiloxStream a(42, 7), b(42, 7), c(42, 8), d(43, 7);
  std::set<uint64_t> seen;
  for (int i = 0; i < 100; ++i) {
    const uint64_t x = a.next_u64();
    EXPECT_EQ(x, b.next_u64());
    seen.insert(x);
    seen.insert(c.next_u64());
    seen.insert(d.next_u64());
  }
  EXPECT_EQ(seen.size(), 300u);
}

TEST(Philox, UniformNormalAndBelowHaveTheRightMoments) {
  PhiloxStream rng(1, 2);
  const int n = 200000;
  double sum_u = 0, sum_n = 0, sum_n2 = 0;
  int below_counts[5] = {};
  for (int i = 0; i < n; ++i) {
    const double u = rng.next_uniform();
    ASSERT_GT(u, 0.0);
    ASSERT_LE(u, 1.0);
    sum_u += u;
    const double z = rng.next_normal();
    sum_n += z;
    sum_n2 += z * z;
    const uint64_t k = rng.next_below(5);
    ASSERT_LT(k, 5u);
    ++below_counts[k];
  }
  EXPECT_NEAR(sum_u / n, 0.5, 0.005);
  EXPECT_NEAR(sum_n / n, 0.0, 0.01);
  EXPECT_NEAR(sum_n2 / n, 1.0, 0.01);
  for (int c : below_counts) EXPECT_NEAR(c / double(n), 0.2, 0.005);
}

}  // namespace
}  // namespace univ
