// safetensors writer and validating reader, with our checksum in the metadata.
#include "univ/safetensors.hpp"

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/json_number.hpp"

namespace univ {

namespace {

constexpr uint64_t kMaxHeader = 100'000'000;  // the official reader's limit

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// What the checksum covers besides the data: every tensor's name, dtype, shape and
// offsets, and every metadata pair but the checksum itself, in sorted order.
std::string checksum_preamble(const std::map<std::string, SafetensorsFile::Entry>& entries,
                              const std::map<std::string, std::string>& metadata) {
  std::string s;
  for (const auto& [name, e] : entries)
    s += name + '\0' + e.dtype + '\0' + shape_text(e.shape) + '\0' + std::to_string(e.begin) + '\0' +
         std::to_string(e.end) + '\n';
  for (const auto& [k, v] : metadata)
    if (k != kChecksumKey) s += k + '\0' + v + '\n';
  return s;
}

}  // namespace

size_t safetensors_dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes{
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4},      {"I16", 2},
      {"I8", 1},  {"U64", 8}, {"U32", 4}, {"U16", 2},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

std::string safetensors_bytes(const std::vector<TensorBytes>& tensors, std::map<std::string, std::string> metadata) {
  std::map<std::string, SafetensorsFile::Entry> entries;
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (const auto& t : tensors) {
    if (array_bytes(t.shape, static_cast<int64_t>(safetensors_dtype_size(t.dtype))) !=
        static_cast<int64_t>(t.data.size()))
      throw std::invalid_argument("safetensors_bytes: " + t.name + " holds the wrong number of bytes");
    entries[t.name] = {t.dtype, t.shape, offset, offset + t.data.size()};
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.data.size()}}};
    offset += t.data.size();
  }
  metadata.erase(kChecksumKey);
  uint64_t checksum = fnv1a64(checksum_preamble(entries, metadata));
  for (const auto& t : tensors) checksum = fnv1a64(t.data, checksum);
  metadata[kChecksumKey] = hex64(checksum);
  header["__metadata__"] = metadata;

  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as the official writer does
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += json;
  out.reserve(out.size() + offset);
  for (const auto& t : tensors) out.append(t.data);
  return out;
}

SafetensorsFile::SafetensorsFile(std::string bytes, std::string what, bool require_checksum)
    : SafetensorsFile(std::move(bytes), {}, std::move(what), require_checksum) {}

SafetensorsFile SafetensorsFile::borrow(std::string_view bytes, std::string what, bool require_checksum) {
  return SafetensorsFile({}, bytes, std::move(what), require_checksum);
}

SafetensorsFile::SafetensorsFile(std::string owned, std::string_view borrowed, std::string what, bool require_checksum)
    : owned_(std::move(owned)), borrowed_(borrowed), borrowing_(borrowed.data() != nullptr), what_(std::move(what)) {
  const std::string_view bytes_ = bytes();
  auto fail = [&](const std::string& why) { throw UserError(what_ + " is not a valid safetensors file: " + why); };
  if (bytes_.size() < 8) fail("shorter than its 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes_[i]);
  if (n > kMaxHeader) fail("header length " + std::to_string(n) + " is implausible");
  if (n > bytes_.size() - 8) fail("truncated inside the header");
  data_start_ = 8 + n;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes_.substr(8, n));
  } catch (const nlohmann::json::exception&) {
    fail("the header is not valid JSON");
  }
  if (!header.is_object()) fail("the header is not a JSON object");
  const size_t data_size = bytes_.size() - data_start_;
  try {
    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        for (const auto& [k, v] : value.items()) metadata_[k] = v.get<std::string>();
        continue;
      }
      Entry e;
      e.dtype = value.at("dtype").get<std::string>();
      for (const auto& d : value.at("shape")) e.shape.push_back(json_number<int64_t>(d));
      std::vector<uint64_t> offsets;
      for (const auto& o : value.at("data_offsets")) offsets.push_back(json_number<uint64_t>(o));
      if (offsets.size() != 2 || offsets[0] > offsets[1]) fail("bad data_offsets for " + key);
      e.begin = offsets[0];
      e.end = offsets[1];
      const size_t item = safetensors_dtype_size(e.dtype);
      if (item == 0) fail("unknown dtype " + e.dtype + " for " + key);
      const int64_t bytes = array_bytes(e.shape, static_cast<int64_t>(item));
      if (bytes < 0 || static_cast<uint64_t>(bytes) != e.end - e.begin) fail("shape and offsets disagree for " + key);
      entries_[key] = std::move(e);
    }
  } catch (const UserError&) {
    throw;
  } catch (const std::exception&) {  // a JSON value of the wrong kind or range
    fail("malformed tensor entry or metadata");
  }
  std::vector<const Entry*> by_offset;
  for (const auto& [name, e] : entries_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  size_t expected = 0;
  for (const Entry* e : by_offset) {
    if (e->begin != expected) fail("tensor data overlaps or leaves gaps");
    expected = e->end;
  }
  if (expected != data_size)
    fail(expected > data_size ? "truncated: the tensors need " + std::to_string(expected) + " data bytes, " +
                                    std::to_string(data_size) + " are there"
                              : "trailing bytes after the tensor data");
  if (require_checksum && !has_checksum()) throw UserError(what_ + " is corrupt: its checksum is missing");
  if (has_checksum()) {
    uint64_t checksum = fnv1a64(checksum_preamble(entries_, metadata_));
    checksum = fnv1a64(bytes_.substr(data_start_), checksum);
    if (hex64(checksum) != metadata_.at(kChecksumKey)) throw UserError(what_ + " is corrupt: its checksum does not match");
  }
}

const std::string& SafetensorsFile::meta(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) throw UserError(what_ + " lacks the metadata entry " + key);
  return it->second;
}

std::string_view SafetensorsFile::data(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw UserError(what_ + " has no tensor " + name);
  return bytes().substr(data_start_ + it->second.begin, it->second.end - it->second.begin);
}

void SafetensorsFile::read_f32(const std::string& name, const std::vector<int64_t>& shape, float* out) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw UserError(what_ + " has no tensor " + name);
  if (it->second.dtype != "F32") throw UserError(what_ + ": tensor " + name + " is " + it->second.dtype + ", not F32");
  if (it->second.shape != shape)
    throw UserError(what_ + ": tensor " + name + " has shape " + shape_text(it->second.shape) + ", expected " +
                    shape_text(shape));
  const std::string_view d = data(name);
  if (!d.empty()) std::memcpy(out, d.data(), d.size());  // empty tensors: out may be null
}

}  // namespace univ
