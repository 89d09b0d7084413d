// Built-in synthetic languages: deterministic given (name, vocabulary, seed).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "univ/philox.hpp"

namespace univ {

class SyntheticLanguage {
 public:
  virtual ~SyntheticLanguage() = default;
  virtual int vocab() const = 0;
  // One sequence of `length` tokens, all randomness drawn from `rng`.
  virtual void sample(PhiloxStream& rng, int32_t* out, int length) const = 0;
};

// "markov": a random first-order Markov chain; each token has 4 likely successors
//   (90% of the mass, Dirichlet weights) and a 10% uniform floor.
// "induction": the same chain over vocab - 1 tokens, plus a marker token (vocab - 1)
//   after which a span of 3-8 earlier tokens (none a marker) repeats; predicting the span needs
//   induction heads, the chain needs bigram neurons, the marker its own detectors.
std::unique_ptr<SyntheticLanguage> make_language(const std::string& name, int vocab, uint64_t seed);
const std::vector<std::string>& synthetic_language_names();
int default_synthetic_vocab();

}  // namespace univ
