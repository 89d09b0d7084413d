// Test helper for the interop suite: reads files with univ's own readers and prints
// what they see as JSON, so that a Python test can compare it with numpy and the
// official safetensors package.
//   interop_check tensors FILE.safetensors   metadata and every tensor's values
//   interop_check tokens FILE.npy            the token ids (npy_integers)
//   interop_check matrix SPEC                an activation matrix (ActivationMatrix)
// A UserError is printed as {"error": "..."} with exit status 0.
#include <cstdio>
#include <cstring>
#include <iostream>

#include <nlohmann/json.hpp>

#include "univ/activations.hpp"
#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/npy.hpp"
#include "univ/safetensors.hpp"

namespace {

template <class T>
nlohmann::json decode(std::string_view bytes) {
  nlohmann::json out = nlohmann::json::array();
  for (size_t i = 0; i + sizeof(T) <= bytes.size(); i += sizeof(T)) {
    T v;
    std::memcpy(&v, bytes.data() + i, sizeof(T));
    out.push_back(v);
  }
  return out;
}

nlohmann::json values(const std::string& dtype, std::string_view bytes) {
  if (dtype == "F64") return decode<double>(bytes);
  if (dtype == "F32") return decode<float>(bytes);
  if (dtype == "I64") return decode<int64_t>(bytes);
  if (dtype == "I32") return decode<int32_t>(bytes);
  if (dtype == "F16" || dtype == "BF16") {
    nlohmann::json out = nlohmann::json::array();
    for (uint16_t h : decode<uint16_t>(bytes))
      out.push_back(dtype == "F16" ? univ::half_to_float(h) : univ::bfloat16_to_float(h));
    return out;
  }
  return nullptr;
}

nlohmann::json run(const std::string& command, const std::string& path) {
  if (command == "tensors") {
    const univ::SafetensorsFile f(univ::read_file(path), path);
    nlohmann::json tensors = nlohmann::json::object();
    for (const auto& [name, e] : f.entries())
      tensors[name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"values", values(e.dtype, f.data(name))}};
    return {{"metadata", f.metadata()}, {"tensors", tensors}};
  }
  if (command == "tokens") return {{"tokens", univ::npy_integers(univ::read_file(path), path)}};
  if (command == "matrix") {
    const univ::ActivationMatrix m(path);
    std::vector<float> v(m.rows() * m.cols());
    m.read(0, m.rows(), 0, m.cols(), v.data(), m.cols());
    return {{"rows", m.rows()}, {"cols", m.cols()}, {"values", v}};
  }
  throw std::invalid_argument("unknown command " + command);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: interop_check tensors|tokens|matrix FILE\n";
    return 2;
  }
  try {
    std::cout << run(argv[1], argv[2]).dump() << '\n';
  } catch (const univ::UserError& e) {
    std::cout << nlohmann::json{{"error", e.what()}}.dump() << '\n';
  }
  return 0;
}
