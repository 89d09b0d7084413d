// Fuzzes the safetensors reader: any bytes must give a valid file or a UserError.
#include <cstddef>
#include <cstdint>
#include <string>

#include "univ/error.hpp"
#include "univ/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const univ::SafetensorsFile f(std::string(reinterpret_cast<const char*>(data), size), "input");
    std::vector<float> out;
    for (const auto& [name, entry] : f.entries()) {
      (void)f.data(name);
      if (entry.dtype == "F32") {
        out.resize((entry.end - entry.begin) / sizeof(float));
        f.read_f32(name, entry.shape, out.data());
      }
    }
  } catch (const univ::UserError&) {
  }
  return 0;
}
