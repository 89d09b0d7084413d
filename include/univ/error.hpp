// Error types shared by the toolkit and its programs.
#pragma once
#include <stdexcept>
#include <string>

namespace univ {

// A mistake the user can fix: a bad flag, a missing or corrupt file, a config
// mismatch. Programs print what() as one line and exit non-zero, no stack trace.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace univ
