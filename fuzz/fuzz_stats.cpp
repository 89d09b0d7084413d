// Fuzzes the statistics-file reader: any bytes must give statistics or a UserError.
#include <cstddef>
#include <cstdint>
#include <string>

#include "univ/error.hpp"
#include "univ/stats.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    std::map<std::string, std::string> meta;
    const univ::CorrelationStats s =
        univ::CorrelationStats::parse(std::string(reinterpret_cast<const char*>(data), size), "input", &meta);
    (void)s.variance_sums(0);
  } catch (const univ::UserError&) {
  }
  return 0;
}
