// Numbers read from JSON in files: nlohmann's get<int>() converts any number with a
// cast, undefined for a float like 2e29; these check the kind and the range first.
#pragma once
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include <nlohmann/json.hpp>

namespace univ {

// T from a JSON number; std::domain_error for a non-number (or a non-integer where T is
// integral), std::out_of_range for an integer T cannot hold.
template <class T>
T json_number(const nlohmann::json& v) {
  if constexpr (std::is_integral_v<T>) {
    using Limits = std::numeric_limits<T>;
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(Limits::max())) throw std::out_of_range("integer out of range");
      return static_cast<T>(u);
    }
    if (!v.is_number_integer()) throw std::domain_error("not an integer");
    const int64_t i = v.get<int64_t>();
    if (i < static_cast<int64_t>(Limits::min()) || (i > 0 && static_cast<uint64_t>(i) > static_cast<uint64_t>(Limits::max())))
      throw std::out_of_range("integer out of range");
    return static_cast<T>(i);
  } else {
    if (!v.is_number()) throw std::domain_error("not a number");
    return v.get<double>();
  }
}

template <class T>
T json_number(const nlohmann::json& object, const char* key) {
  return json_number<T>(object.at(key));
}

}  // namespace univ
