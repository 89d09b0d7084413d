// File helpers: whole-file reads with clear errors, durable and atomic writes, hashing.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace univ {

// The whole file; UserError naming the path and the reason when it cannot be read.
std::string read_file(const std::filesystem::path& path);

// A whole file mapped read-only into memory (RAII); UserError when it cannot be.
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&&) = delete;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  std::string_view bytes() const { return {static_cast<const char*>(data_), size_}; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Writes `data` to `path` and flushes it to the disk (fsync) before returning.
void write_file_durable(const std::filesystem::path& path, std::string_view data);

// Writes to a temporary file beside `path`, flushes it, then renames it over `path`:
// readers see the old file or the new one, never a part.
void write_file_atomic(const std::filesystem::path& path, std::string_view data);

// Flushes a directory's entries (renames, creations) to the disk.
void fsync_directory(const std::filesystem::path& dir);

// Bytes of a C-ordered array of `shape` with items of `item_size` bytes; -1 for a
// negative dimension or a size that overflows (what a corrupt header may claim).
int64_t array_bytes(const std::vector<int64_t>& shape, int64_t item_size);

// FNV-1a, 64-bit: a fingerprint for data files and a checksum for our own files.
uint64_t fnv1a64(std::string_view data, uint64_t hash = 0xcbf29ce484222325ull);
std::string hex64(uint64_t value);

}  // namespace univ
