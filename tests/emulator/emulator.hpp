// A host emulator of the CUDA the training kernels use, for machines without a GPU:
// every CUDA thread of a block is a host thread (a team per block size), __syncthreads
// a barrier, warp shuffles and ballots an exchange through memory. Streams, events and
// graphs are emulated in include/cuda_runtime.h: outside a capture work runs at once;
// a captured graph keeps each node's edges and replays in an order they allow.
// It checks logic, indexing and ordering, not performance or the GPU's memory model.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct int2 {
  int x, y;
};
inline int2 make_int2(int x, int y) { return {x, y}; }
using std::isfinite;
using std::max;
using std::min;
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

struct Block {
  std::vector<char> shared, static_shared;  // dynamic (exact size) and static arrays
  std::unique_ptr<std::barrier<>> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<double> exchange;  // a slot per thread for shuffles and ballots
};
inline thread_local Block* current = nullptr;
inline Block& block() { return *current; }
inline int thread_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// n host threads that run one block's threads at a time; made once per block size and
// never destroyed (their threads outlive main).
class Team {
 public:
  explicit Team(int n) : start_(n + 1), end_(n + 1) {
    for (int i = 0; i < n; ++i)
      threads_.emplace_back([this, i] {
        for (;;) {
          start_.arrive_and_wait();
          work_(i);
          end_.arrive_and_wait();
        }
      });
    for (auto& t : threads_) t.detach();
  }
  void run(const std::function<void(int)>& work) {
    work_ = work;
    start_.arrive_and_wait();
    end_.arrive_and_wait();
  }

 private:
  std::barrier<> start_, end_;
  std::function<void(int)> work_;
  std::vector<std::thread> threads_;
};
inline Team& team(int n) {
  static std::vector<Team*> teams(1025);
  if (!teams[n]) teams[n] = new Team(n);
  return *teams[n];
}

// kernel() over the grid, block after block.
template <class Kernel>
void launch(dim3 grid, dim3 threads, size_t shared_bytes, const Kernel& kernel) {
  const int n = threads.x * threads.y * threads.z;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.shared.assign(shared_bytes, 0x7f);  // not zeros: what a kernel forgets to write shows
        b.static_shared.assign(1 << 18, 0x7f);
        b.sync = std::make_unique<std::barrier<>>(n);
        for (int w = 0; w < (n + 31) / 32; ++w)
          b.warp_sync.push_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
        b.exchange.assign(size_t(n + 31) / 32 * 32, 0.0);
        team(n).run([&](int t) {
          current = &b;
          blockIdx = dim3(x, y, z), gridDim = grid, blockDim = threads;
          threadIdx = dim3(t % threads.x, t / threads.x % threads.y, t / (threads.x * threads.y));
          kernel();
        });
      }
}

// Value v of every lane of the caller's warp, through the exchange slots.
template <class T, class Use>
auto warp_exchange(T v, const Use& use) {
  const int lane = thread_rank() % 32, warp = thread_rank() / 32;
  double* slot = block().exchange.data() + warp * 32;
  slot[lane] = static_cast<double>(v);
  block().warp_sync[warp]->arrive_and_wait();
  const auto out = use(slot, lane);
  block().warp_sync[warp]->arrive_and_wait();
  return out;
}

// Streams and graph capture (include/cuda_runtime.h): while a capture runs, enqueued
// work becomes a node that depends on its stream's last node and on the events the
// stream waited for.
struct Stream {
  int last = -1;
  std::vector<int> waits;
};
struct Event {
  int node = -1;
};
struct Node {
  std::function<void()> work;
  std::vector<int> deps;
};
inline std::vector<Node>* capture = nullptr;
inline Stream default_stream;
inline void enqueue(Stream* s, std::function<void()> work) {
  if (!capture) {
    work();
    return;
  }
  if (!s) s = &default_stream;
  Node node{std::move(work), s->waits};
  if (s->last >= 0) node.deps.push_back(s->last);
  s->waits.clear();
  capture->push_back(std::move(node));
  s->last = static_cast<int>(capture->size()) - 1;
}
// Graph replays pick among ready nodes at random from this seed (0: capture order).
inline unsigned graph_order_seed = 0;
// The last captured graph's nodes (kernels, copies, emulated cuBLAS calls) and its
// longest chain of dependent nodes, which bounds a replay's time on a GPU from below.
struct GraphShape {
  size_t nodes = 0;
  int longest_chain = 0;
};
inline GraphShape last_graph;

}  // namespace emu

inline void __syncthreads() { emu::block().sync->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return std::atomic_ref(*address).fetch_add(value); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block().warp_sync[emu::thread_rank() / 32]->arrive_and_wait(); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  return emu::warp_exchange(v, [&](const double* slot, int lane) { return static_cast<T>(slot[lane ^ offset]); });
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  return emu::warp_exchange(predicate ? 1 : 0, [](const double* slot, int) {
    unsigned mask = 0;
    for (int l = 0; l < 32; ++l)
      if (slot[l] != 0) mask |= 1u << l;
    return mask;
  });
}
