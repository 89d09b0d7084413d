// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator cuRAND also
// offers. The output is a pure function of (key, counter), so host and device
// code draw identical numbers, and any position of a stream can be drawn without
// drawing the ones before it.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define UNIV_HOST_DEVICE __host__ __device__
#else
#define UNIV_HOST_DEVICE
#endif

namespace univ {

struct Philox4x32Block {
  uint32_t word[4];
};

// counter: 4 words, key: 2 words -> 4 random words.
UNIV_HOST_DEVICE inline Philox4x32Block philox4x32_10(const uint32_t counter[4], const uint32_t key[2]) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// A sequential stream on top of Philox: key = seed, counter = (block index, stream id).
// Different (seed, stream) pairs give independent streams.
class PhiloxStream {
 public:
  PhiloxStream(uint64_t seed, uint64_t stream, uint64_t first_block = 0)
      : key_{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)},
        stream_{static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)},
        block_(first_block) {}

  uint32_t next_u32() {
    if (used_ == 4) refill();
    return buffer_.word[used_++];
  }
  uint64_t next_u64() {
    const uint64_t lo = next_u32();
    return lo | (static_cast<uint64_t>(next_u32()) << 32);
  }
  // Uniform in (0, 1], 53 random bits.
  double next_uniform() { return static_cast<double>((next_u64() >> 11) + 1) * 0x1.0p-53; }
  // Standard normal by Box-Muller (one value per two uniforms; the cosine branch only,
  // so that every value costs the same draws).
  double next_normal() {
    const double radius = std::sqrt(-2.0 * std::log(next_uniform()));
    return radius * std::cos(6.283185307179586476925 * next_uniform());
  }
  // Uniform integer in [0, n) by Lemire's multiply-shift; bias below n / 2^64.
  uint64_t next_below(uint64_t n) {
    __extension__ using u128 = unsigned __int128;
    return static_cast<uint64_t>((static_cast<u128>(next_u64()) * n) >> 64);
  }

 private:
  void refill() {
    const uint32_t counter[4] = {static_cast<uint32_t>(block_), static_cast<uint32_t>(block_ >> 32), stream_[0],
                                 stream_[1]};
    buffer_ = philox4x32_10(counter, key_);
    ++block_;
    used_ = 0;
  }
  uint32_t key_[2];
  uint32_t stream_[2];
  uint64_t block_;
  Philox4x32Block buffer_{};
  int used_ = 4;
};

// Stream ids keep the toolkit's uses of randomness apart: (purpose, a < 2^24, b) -> one stream.
enum class RngPurpose : uint64_t {
  init = 1,
  test_sample = 2,
  train_sample = 3,
  shuffle = 4,
  split = 5,
  language = 6,
  rotation = 7,
  permutation = 8,
};
inline uint64_t rng_stream(RngPurpose purpose, uint32_t a, uint32_t b = 0) {
  return (static_cast<uint64_t>(purpose) << 56) | (static_cast<uint64_t>(a & 0xFFFFFFu) << 32) | b;
}

}  // namespace univ
