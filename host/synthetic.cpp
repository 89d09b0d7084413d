// Synthetic languages: a random Markov chain, and the chain with copied spans.
#include "univ/synthetic.hpp"

#include <algorithm>
#include <cmath>

#include "univ/error.hpp"

namespace univ {

namespace {

constexpr int kSuccessors = 4;
constexpr double kFloorMass = 0.1;

// Row-stochastic matrix stored as cumulative rows; sampling by binary search.
class MarkovChain {
 public:
  MarkovChain(int states, uint64_t seed) : states_(states), cumulative_(size_t(states) * states) {
    PhiloxStream rng(seed, rng_stream(RngPurpose::language, 0));
    std::vector<double> row(states);
    for (int a = 0; a < states; ++a) {
      std::fill(row.begin(), row.end(), kFloorMass / states);
      std::vector<int> chosen;
      double weights[kSuccessors], total = 0;
      while (static_cast<int>(chosen.size()) < std::min(kSuccessors, states)) {
        const int b = static_cast<int>(rng.next_below(states));
        if (std::find(chosen.begin(), chosen.end(), b) != chosen.end()) continue;
        weights[chosen.size()] = -std::log(rng.next_uniform());  // Exp(1): normalised, Dirichlet(1, ..., 1)
        total += weights[chosen.size()];
        chosen.push_back(b);
      }
      for (size_t i = 0; i < chosen.size(); ++i) row[chosen[i]] += (1 - kFloorMass) * weights[i] / total;
      double acc = 0;
      for (int b = 0; b < states; ++b) cumulative_[size_t(a) * states + b] = acc += row[b];
      cumulative_[size_t(a) * states + states - 1] = 1.0;
    }
  }

  int first(PhiloxStream& rng) const { return static_cast<int>(rng.next_below(states_)); }
  int next(PhiloxStream& rng, int current) const {
    const double* row = cumulative_.data() + size_t(current) * states_;
    const double u = rng.next_uniform() * (1.0 - 0x1.0p-53);  // (0, 1)
    return static_cast<int>(std::upper_bound(row, row + states_, u) - row);
  }

 private:
  int states_;
  std::vector<double> cumulative_;
};

class MarkovLanguage final : public SyntheticLanguage {
 public:
  MarkovLanguage(int vocab, uint64_t seed) : chain_(vocab, seed), vocab_(vocab) {}
  int vocab() const override { return vocab_; }
  void sample(PhiloxStream& rng, int32_t* out, int length) const override {
    out[0] = chain_.first(rng);
    for (int i = 1; i < length; ++i) out[i] = chain_.next(rng, out[i - 1]);
  }

 private:
  MarkovChain chain_;
  int vocab_;
};

class InductionLanguage final : public SyntheticLanguage {
 public:
  static constexpr double kCopyRate = 0.08;
  static constexpr int kFirstCopy = 8, kMinSpan = 3, kMaxSpan = 8;

  InductionLanguage(int vocab, uint64_t seed) : chain_(vocab - 1, seed), vocab_(vocab) {}
  int vocab() const override { return vocab_; }
  void sample(PhiloxStream& rng, int32_t* out, int length) const override {
    const int marker = vocab_ - 1;
    out[0] = chain_.first(rng);
    int pos = 1;
    while (pos < length) {
      const bool copy = pos >= kFirstCopy && length - pos > kMinSpan && rng.next_uniform() < kCopyRate;
      const int span = copy ? std::min({kMinSpan + static_cast<int>(rng.next_below(kMaxSpan - kMinSpan + 1)),
                                        length - pos - 1, pos})
                            : 0;
      const int source = copy ? static_cast<int>(rng.next_below(pos - span + 1)) : 0;
      if (!copy || std::find(out + source, out + source + span, marker) != out + source + span) {
        out[pos] = chain_.next(rng, out[pos - 1]);  // copied spans never hold a marker, so neither does out[pos - 1]
        ++pos;
        continue;
      }
      out[pos++] = marker;
      for (int i = 0; i < span; ++i) out[pos + i] = out[source + i];
      pos += span;
    }
  }

 private:
  MarkovChain chain_;
  int vocab_;
};

}  // namespace

const std::vector<std::string>& synthetic_language_names() {
  static const std::vector<std::string> names{"markov", "induction"};
  return names;
}

int default_synthetic_vocab() { return 64; }

std::unique_ptr<SyntheticLanguage> make_language(const std::string& name, int vocab, uint64_t seed) {
  if (name == "markov") {
    if (vocab < 2) throw UserError("synthetic:markov needs a vocabulary of at least 2 tokens");
    return std::make_unique<MarkovLanguage>(vocab, seed);
  }
  if (name == "induction") {
    if (vocab < 3) throw UserError("synthetic:induction needs a vocabulary of at least 3 tokens");
    return std::make_unique<InductionLanguage>(vocab, seed);
  }
  throw UserError("unknown synthetic language '" + name + "' (expected synthetic:markov or synthetic:induction)");
}

}  // namespace univ
