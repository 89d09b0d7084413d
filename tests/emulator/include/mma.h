// The warp matrix operations (nvcuda::wmma) of the TF32 kernels, emulated on the host
// (emulator.hpp). A fragment's elements are spread over the warp's lanes in an order of
// the emulator's own (lane l holds elements l, l + 32, ... of the tile, row by row):
// the hardware's order is unspecified, and code that only loads, stores, fills and
// multiplies fragments, or changes every element alike, works with any. mma_sync
// gathers the operands through the warp's exchange slots and adds in k order;
// __float_to_tf32 rounds to TF32's 10 mantissa bits, to nearest, ties away from zero.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../emulator.hpp"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct tile_shape {  // rows x cols of the fragment's tile
  static constexpr int rows = M, cols = N;
};
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  float x[num_elements];
  // The tile's row and column of this lane's element i.
  static int row(int i) { return (emu::thread_rank() % 32 + 32 * i) / cols; }
  static int col(int i) { return (emu::thread_rank() % 32 + 32 * i) % cols; }
};

inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x1000u) & 0xffffe000u;  // add half of TF32's last place, keep its 10 bits
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int i = 0; i < F::num_elements; ++i)
    f.x[i] = std::is_same_v<Layout, col_major> ? p[F::col(i) * ldm + F::row(i)] : p[F::row(i) * ldm + F::col(i)];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  for (int i = 0; i < F::num_elements; ++i)
    (layout == mem_col_major ? p[F::col(i) * ldm + F::row(i)] : p[F::row(i) * ldm + F::col(i)]) = f.x[i];
}

// The whole tile of a fragment, from every lane of the warp.
template <class F>
void gather(const F& f, float (&tile)[F::rows][F::cols]) {
  for (int i = 0; i < F::num_elements; ++i)
    emu::warp_exchange(f.x[i], [&](const double* slot, int) {
      for (int lane = 0; lane < 32; ++lane) {
        const int e = lane + 32 * i;
        tile[e / F::cols][e % F::cols] = static_cast<float>(slot[lane]);
      }
      return 0;
    });
}

template <int M, int N, int K, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float ta[M][K], tb[K][N];
  gather(a, ta);
  gather(b, tb);
  using F = fragment<accumulator, M, N, K, float>;
  float out[F::num_elements];
  for (int i = 0; i < F::num_elements; ++i) {
    float acc = c.x[i];
    for (int k = 0; k < K; ++k) acc += ta[F::row(i)][k] * tb[k][F::col(i)];
    out[i] = acc;
  }
  for (int i = 0; i < F::num_elements; ++i) d.x[i] = out[i];
}

}  // namespace nvcuda::wmma
