// .npy header parsing and integer arrays.
#include "univ/npy.hpp"

#include <cctype>
#include <charconv>
#include <cstring>

#include "univ/error.hpp"
#include "univ/fileio.hpp"

namespace univ {

namespace {

constexpr std::string_view kMagic = "\x93NUMPY";

// The header is a Python dict literal: {'descr': '<i8', 'fortran_order': False, 'shape': (3, 4), }
class DictParser {
 public:
  DictParser(std::string_view text, const std::string& what) : text_(text), what_(what) {}

  NpyHeader parse() {
    NpyHeader h;
    bool have_descr = false, have_order = false, have_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = quoted();
      expect(':');
      skip_space();
      if (key == "descr") {
        h.descr = quoted();
        have_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = boolean();
        have_order = true;
      } else if (key == "shape") {
        h.shape = tuple();
        have_shape = true;
      } else {
        fail("unknown header key '" + key + "'");
      }
      skip_space();
      if (peek() == ',') ++pos_;
    }
    if (!have_descr || !have_order || !have_shape) fail("header lacks descr, fortran_order or shape");
    return h;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw UserError(what_ + " is not a valid .npy file: " + why);
  }
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) fail(std::string("expected '") + c + "' in the header");
    ++pos_;
  }
  std::string quoted() {
    skip_space();
    const char q = peek();
    if (q != '\'' && q != '"') fail("expected a quoted string in the header");
    const size_t end = text_.find(q, pos_ + 1);
    if (end == std::string_view::npos) fail("unterminated string in the header");
    std::string s(text_.substr(pos_ + 1, end - pos_ - 1));
    pos_ = end + 1;
    return s;
  }
  bool boolean() {
    if (text_.substr(pos_, 4) == "True") return pos_ += 4, true;
    if (text_.substr(pos_, 5) == "False") return pos_ += 5, false;
    fail("fortran_order is neither True nor False");
  }
  std::vector<int64_t> tuple() {
    expect('(');
    std::vector<int64_t> dims;
    while (true) {
      skip_space();
      if (peek() == ')') break;
      if (!std::isdigit(static_cast<unsigned char>(peek()))) fail("bad shape in the header");
      int64_t v = 0;
      while (std::isdigit(static_cast<unsigned char>(peek()))) {
        if (v > (int64_t(1) << 50)) fail("shape too large");
        v = v * 10 + (text_[pos_++] - '0');
      }
      dims.push_back(v);
      skip_space();
      if (peek() == ',') ++pos_;
    }
    ++pos_;
    return dims;
  }

  std::string_view text_;
  std::string what_;
  size_t pos_ = 0;
};

uint32_t little_endian(std::string_view bytes) {
  uint32_t v = 0;
  for (size_t i = bytes.size(); i-- > 0;) v = (v << 8) | static_cast<unsigned char>(bytes[i]);
  return v;
}

}  // namespace

int64_t NpyHeader::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t NpyHeader::item_size() const {
  size_t size = 0;
  if (descr.size() < 3) return 0;
  const auto [end, ec] = std::from_chars(descr.data() + 2, descr.data() + descr.size(), size);
  return ec == std::errc() && end == descr.data() + descr.size() && size <= 16 ? size : 0;
}

NpyHeader parse_npy_header(std::string_view file, const std::string& what) {
  if (file.size() < 10 || file.substr(0, 6) != kMagic)
    throw UserError(what + " is not a .npy file (no \\x93NUMPY magic)");
  const int major = static_cast<unsigned char>(file[6]);
  if (major < 1 || major > 3) throw UserError(what + ": unsupported .npy version " + std::to_string(major));
  const size_t len_bytes = major == 1 ? 2 : 4;
  const size_t header_len = little_endian(file.substr(8, len_bytes));
  const size_t start = 8 + len_bytes;
  if (file.size() < start + header_len) throw UserError(what + " is truncated inside its .npy header");
  NpyHeader h = DictParser(file.substr(start, header_len), what).parse();
  h.data_offset = start + header_len;
  if (h.item_size() == 0) throw UserError(what + ": unsupported dtype '" + h.descr + "'");
  const int64_t bytes = array_bytes(h.shape, static_cast<int64_t>(h.item_size()));
  if (bytes < 0) throw UserError(what + ": the shape in its header is impossibly large");
  const auto expected = static_cast<size_t>(bytes);
  if (file.size() - h.data_offset < expected)
    throw UserError(what + " is truncated: its header promises " + std::to_string(expected) + " data bytes, it holds " +
                    std::to_string(file.size() - h.data_offset));
  return h;
}

std::vector<int64_t> npy_integers(std::string_view file, const std::string& what) {
  const NpyHeader h = parse_npy_header(file, what);
  const char order = h.descr[0], kind = h.descr[1];
  const size_t size = h.item_size();
  if ((kind != 'i' && kind != 'u') || (size != 1 && size != 2 && size != 4 && size != 8))
    throw UserError(what + ": token files need an integer dtype, got '" + h.descr + "'");
  if (order == '>' && size > 1) throw UserError(what + ": big-endian .npy files are not supported");
  if (h.fortran_order && h.shape.size() > 1)
    throw UserError(what + ": Fortran-ordered .npy files are not supported; save with numpy.ascontiguousarray");
  std::vector<int64_t> out(static_cast<size_t>(h.numel()));
  const char* data = file.data() + h.data_offset;
  for (size_t i = 0; i < out.size(); ++i) {
    uint64_t raw = 0;
    std::memcpy(&raw, data + i * size, size);  // little-endian host
    if (kind == 'i' && size < 8 && (raw >> (8 * size - 1)) & 1) raw |= ~uint64_t(0) << (8 * size);  // sign-extend
    out[i] = static_cast<int64_t>(raw);
  }
  return out;
}

std::string npy_bytes(const std::string& descr, const std::vector<int64_t>& shape, std::string_view data) {
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ",";
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Magic (6) + version (2) + length (2) + dict + padding + '\n' is a multiple of 64.
  const size_t total = (10 + dict.size() + 1 + 63) / 64 * 64;
  dict.append(total - 10 - dict.size() - 1, ' ');
  dict += '\n';
  std::string out(kMagic);
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(dict.size() & 0xff);
  out += static_cast<char>(dict.size() >> 8);
  out += dict;
  out.append(data);
  return out;
}

}  // namespace univ
