// cuRAND's device Philox4_32_10 as kernels/rotation.cu draws from it, on the host: its
// words are univ::philox4x32_10's for key = seed and counter = (offset / 4, subsequence).
#pragma once
#include <cassert>
#include <cstdint>

#include "../emulator.hpp"
#include "univ/philox.hpp"

struct curandStatePhilox4_32_10_t {
  uint32_t counter[4];
  uint32_t key[2];
};
// Offsets that are multiples of 4 only (a whole block of four words), as rotation.cu's.
inline void curand_init(unsigned long long seed, unsigned long long subsequence, unsigned long long offset,
                        curandStatePhilox4_32_10_t* state) {
  assert(offset % 4 == 0);
  const unsigned long long block = offset / 4;
  *state = {{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), static_cast<uint32_t>(subsequence),
             static_cast<uint32_t>(subsequence >> 32)},
            {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}};
}
inline uint4 curand4(curandStatePhilox4_32_10_t* state) {
  const univ::Philox4x32Block b = univ::philox4x32_10(state->counter, state->key);
  if (++state->counter[0] == 0) ++state->counter[1];
  return {b.word[0], b.word[1], b.word[2], b.word[3]};
}
