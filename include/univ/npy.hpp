// NumPy .npy files (format versions 1-3): header parsing, integer reads, writes.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace univ {

struct NpyHeader {
  std::string descr;  // e.g. "<i8", "|u1", "<f4"
  bool fortran_order = false;
  std::vector<int64_t> shape;
  size_t data_offset = 0;  // bytes from the start of the file
  int64_t numel() const;
  size_t item_size() const;  // from descr
};

// Parses and checks the header of an in-memory .npy file; `what` names it in errors
// (UserError: bad magic, unsupported version, malformed dictionary, truncated data).
NpyHeader parse_npy_header(std::string_view file, const std::string& what);

// The integers of an in-memory .npy file (any width, signed or unsigned,
// little-endian), flattened in C order. UserError for other dtypes, Fortran order
// with more than one axis, or a truncated file.
std::vector<int64_t> npy_integers(std::string_view file, const std::string& what);

// The bytes of a C-ordered .npy file (version 1.0) holding `data`.
std::string npy_bytes(const std::string& descr, const std::vector<int64_t>& shape, std::string_view data);

}  // namespace univ
