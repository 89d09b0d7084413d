// safetensors files: an 8-byte little-endian header length, a JSON header (dtype,
// shape, data_offsets per tensor; a "__metadata__" string map), then the raw data.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace univ {

// A tensor to write: the bytes of a C-ordered array of `dtype` ("F32", "I64", ...).
struct TensorBytes {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string_view data;
};

// Metadata key holding our checksum: FNV-1a over the tensor table, the other
// metadata and the data, so a flipped bit anywhere is noticed.
inline constexpr const char* kChecksumKey = "univ.checksum";

// The bytes of a safetensors file; the checksum is added to the metadata.
std::string safetensors_bytes(const std::vector<TensorBytes>& tensors, std::map<std::string, std::string> metadata);

class SafetensorsFile {
 public:
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    size_t begin = 0, end = 0;  // within the data section
  };

  // Parses and validates `bytes` as the official reader does (header size, JSON,
  // dtypes, offsets that tile the data section exactly) and checks our checksum when
  // present; with require_checksum (our own files) its absence is a fault too.
  // UserError naming `what` on any fault.
  SafetensorsFile(std::string bytes, std::string what, bool require_checksum = false);
  // The same over bytes it does not own (a memory-mapped file), which must outlive it.
  static SafetensorsFile borrow(std::string_view bytes, std::string what, bool require_checksum = false);

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::map<std::string, Entry>& entries() const { return entries_; }
  bool has_checksum() const { return metadata_.contains(kChecksumKey); }
  // A metadata value; UserError when missing.
  const std::string& meta(const std::string& key) const;
  // A float32 tensor of exactly `shape`, copied into `out`; UserError when missing,
  // of another dtype, or of another shape.
  void read_f32(const std::string& name, const std::vector<int64_t>& shape, float* out) const;
  std::string_view data(const std::string& name) const;
  const std::string& what() const { return what_; }

 private:
  SafetensorsFile(std::string owned, std::string_view borrowed, std::string what, bool require_checksum);
  std::string_view bytes() const { return borrowing_ ? borrowed_ : std::string_view(owned_); }

  std::string owned_;
  std::string_view borrowed_;
  bool borrowing_ = false;
  std::string what_;
  size_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, Entry> entries_;
};

size_t safetensors_dtype_size(const std::string& dtype);  // 0 for unknown dtypes

}  // namespace univ
