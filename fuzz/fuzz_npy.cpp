// Fuzzes the .npy reader: any bytes must give a header (and integers) or a UserError.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "univ/error.hpp"
#include "univ/npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view file(reinterpret_cast<const char*>(data), size);
  try {
    (void)univ::parse_npy_header(file, "input");
    (void)univ::npy_integers(file, "input");
  } catch (const univ::UserError&) {
  }
  return 0;
}
