// Writes valid inputs for every fuzz target: DIR/safetensors/*, DIR/npy/*, DIR/stats/*.
#include <cstdint>
#include <filesystem>
#include <vector>

#include "univ/fileio.hpp"
#include "univ/npy.hpp"
#include "univ/safetensors.hpp"
#include "univ/stats.hpp"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const fs::path dir = argv[1];
  for (const char* sub : {"safetensors", "npy", "stats"}) fs::create_directories(dir / sub);
  const std::vector<float> f{1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -1.0f};
  const std::vector<int64_t> i{1, 2, 3};
  const std::string_view fb(reinterpret_cast<const char*>(f.data()), f.size() * 4);
  const std::string_view ib(reinterpret_cast<const char*>(i.data()), i.size() * 8);
  univ::write_file_durable(dir / "safetensors" / "two.safetensors",
                           univ::safetensors_bytes({{"w", "F32", {2, 3}, fb}, {"ids", "I64", {3}, ib}},
                                                   {{"format", "univ.checkpoint.v1"}, {"univ.step", "7"}}));
  univ::write_file_durable(dir / "safetensors" / "scalar_and_empty.safetensors",
                           univ::safetensors_bytes({{"s", "F32", {}, fb.substr(0, 4)}, {"e", "F32", {0, 3}, {}}}, {}));
  univ::write_file_durable(dir / "npy" / "i8.npy", univ::npy_bytes("<i8", {3}, ib));
  univ::write_file_durable(dir / "npy" / "f4.npy", univ::npy_bytes("<f4", {2, 3}, fb));
  univ::write_file_durable(dir / "npy" / "u1.npy", univ::npy_bytes("|u1", {4}, "abcd"));
  univ::CorrelationStats stats({{1, 2}, {2, 1}});
  stats.save(dir / "stats" / "empty.stats", {{"univ.site", "pre"}});
  return 0;
}
