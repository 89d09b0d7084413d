// A host emulator of the CUDA the toolkit's kernels use, for machines without a GPU:
// every CUDA thread of a block is a fiber (its own stack, switched on one host thread),
// run until it finishes or reaches a barrier; __syncthreads and warp barriers release
// when every thread of the block or warp is there, and warp shuffles and ballots are
// an exchange through memory at a warp barrier. Streams, events and graphs are
// emulated in include/cuda_runtime.h: outside a capture work runs at once; a captured
// graph keeps each node's edges and replays in an order they allow.
// It checks logic, indexing, ordering and the limits a launch must keep, not performance
// or the GPU's memory model.
#pragma once
#define UNIV_CUDA_EMULATOR 1  // kernels/common.cuh's asynchronous copies take the emulator's

#include <algorithm>
#include <atomic>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __noinline__
#define __grid_constant__
#define __restrict__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
// The vector types with CUDA's alignment, so that the emulated build's alignment check
// (-fsanitize=alignment) finds the vector loads that would fault on the GPU.
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline int2 make_int2(int x, int y) { return {x, y}; }
using std::isfinite;
using std::max;
using std::min;
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// The host compiler contracts nothing (no -ffp-contract=fast with FMA instructions).
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
template <class T>
T __ldg(const T* p) { return *p; }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

struct Block {
  std::vector<char> shared;                       // the dynamic array, its exact size
  std::vector<std::vector<char>> static_arrays;   // per __shared__ declaration of the file: empty until reached
  std::vector<double> exchange;                   // two slots per thread for shuffles and ballots
  std::vector<char> parity;                       // per thread: which of its slots the next exchange takes
  std::vector<std::vector<std::pair<float*, const float*>>> async_copies;  // per thread: not yet landed
};
inline thread_local Block* current = nullptr;
inline Block& block() { return *current; }
inline int thread_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// Switching between a block's threads. On x86-64 the callee-saved registers, the
// floating-point control words and the stack pointer, in a few instructions (ucontext's
// swapcontext makes a system call per switch for the signal mask, and the QR kernels'
// 512 threads switch millions of times); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .weak emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .popsection
)");
struct FiberContext {
  void* sp = nullptr;
  // Made to run entry (which never returns) on the stack [stack, stack + bytes): the
  // words emu_switch pops (default control words, zero registers), entry as the return
  // address, and a null one above it, entry's stack aligned as after a call.
  void start(char* stack, size_t bytes, void (*entry)()) {
    auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
    uint64_t* frame = top - 9;
    frame[0] = 0x1f80 | (uint64_t(0x037f) << 32);  // MXCSR and the x87 control word
    for (int r = 1; r <= 6; ++r) frame[r] = 0;
    frame[7] = reinterpret_cast<uint64_t>(entry);
    frame[8] = 0;
    sp = frame;
  }
  static void swap(FiberContext& from, FiberContext& to) { emu_switch(&from.sp, to.sp); }
};
#else
struct FiberContext {
  ucontext_t context;
  void start(char* stack, size_t bytes, void (*entry)()) {
    getcontext(&context);
    context.uc_stack.ss_sp = stack;
    context.uc_stack.ss_size = bytes;
    context.uc_link = nullptr;
    makecontext(&context, entry, 0);
  }
  static void swap(FiberContext& from, FiberContext& to) { swapcontext(&from.context, &to.context); }
};
#endif

// The fibers of one block size on one host thread, made once and reused block after
// block. Threads run in index order until each finishes or waits at a
// barrier, the next round in reverse order, so that a barrier a kernel lacks shows in
// either direction; a barrier releases when all its threads are there. A thread that
// finishes while others wait at a barrier, or threads waiting at different ones, abort.
class Team {
 public:
  enum class State { runnable, at_block_barrier, at_warp_barrier, done };
  explicit Team(int n) : fibers_(n) {
    for (Fiber& f : fibers_) {
      f.stack = static_cast<char*>(mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
      if (f.stack == MAP_FAILED) fail("no memory for a thread's stack");
      mprotect(f.stack, kGuardBytes, PROT_NONE);  // an overflowing stack faults
    }
  }
  // body() as every thread of a block with `threads` threads.
  void run(dim3 threads, const std::function<void()>& body) {
    const int n = static_cast<int>(fibers_.size());
    body_ = &body;
    for (Fiber& f : fibers_) {
      f.context.start(f.stack + kGuardBytes, kStackBytes - kGuardBytes, &Team::entry);
      f.state = State::runnable;
    }
    Team* const outer = running_team;
    running_team = this;
    for (int live = n, round = 0; live > 0; ++round) {
      for (int k = 0; k < n; ++k) {
        const int t = round % 2 ? n - 1 - k : k;
        if (fibers_[t].state != State::runnable) continue;
        running_ = t;
        threadIdx = dim3(t % threads.x, t / threads.x % threads.y, t / (threads.x * threads.y));
        FiberContext::swap(scheduler_, fibers_[t].context);
        live -= fibers_[t].state == State::done;
      }
      if (live > 0) release_barriers();
    }
    running_team = outer;
  }
  // From the running thread: wait at the block's barrier or at its warp's.
  static void wait(State at) {
    Team& team = *running_team;
    Fiber& f = team.fibers_[team.running_];
    f.state = at;
    FiberContext::swap(f.context, team.scheduler_);
  }

 private:
  static constexpr size_t kStackBytes = size_t(256) << 10, kGuardBytes = 4096;
  struct Fiber {
    FiberContext context;
    char* stack = nullptr;
    State state = State::done;
  };
  static inline thread_local Team* running_team = nullptr;

  [[noreturn]] static void fail(const char* what) {
    std::fprintf(stderr, "emulator: %s\n", what);
    std::abort();
  }
  [[noreturn]] static void entry() {
    Team& team = *running_team;
    (*team.body_)();
    Fiber& f = team.fibers_[team.running_];
    f.state = State::done;
    FiberContext::swap(f.context, team.scheduler_);
    fail("a finished thread was resumed");
  }
  // After a round: every group (the block, or a warp) whose threads all wait at its
  // barrier goes on; if none can, the kernel is stuck.
  void release_barriers() {
    const int n = static_cast<int>(fibers_.size());
    bool runnable = false;
    auto release = [&](int first, int last, State at) {
      int waiting = 0, done = 0;
      for (int t = first; t < last; ++t) {
        waiting += fibers_[t].state == at;
        done += fibers_[t].state == State::done;
      }
      if (waiting == 0 || waiting + done < last - first) return;
      if (done > 0) fail("threads finished while others wait at a barrier they skipped");
      for (int t = first; t < last; ++t) fibers_[t].state = State::runnable;
      runnable = true;
    };
    release(0, n, State::at_block_barrier);
    for (int w = 0; w < n; w += 32) release(w, std::min(n, w + 32), State::at_warp_barrier);
    if (!runnable) fail("threads wait at different barriers: the kernel cannot go on");
  }

  std::vector<Fiber> fibers_;
  FiberContext scheduler_;
  const std::function<void()>* body_ = nullptr;
  int running_ = 0;
};
inline Team& team(int n) {
  static thread_local std::vector<std::unique_ptr<Team>> teams(1025);
  if (!teams[n]) teams[n] = std::make_unique<Team>(n);
  return *teams[n];
}

// sm_90's limits on a launch, which the GPU enforces and the emulator checks: threads
// and grid extents, and shared memory, 48 KiB a block (static and dynamic together)
// unless the kernel opted into more dynamic memory by cudaFuncSetAttribute, up to 227
// KiB in all. A block's static arrays are those it reached (the GPU counts every one
// of the kernel's).
constexpr size_t kSharedDefault = 48 * 1024, kSharedOptIn = 232448;
inline std::mutex opt_ins_mutex;
inline std::map<const void*, size_t> opt_ins;  // kernel -> the dynamic shared memory it may use
inline void opt_in_shared(const void* kernel, size_t bytes) {
  std::lock_guard lock(opt_ins_mutex);
  opt_ins[kernel] = bytes;
}
template <class... Params>
const void* kernel_key(void (*kernel)(Params...)) {
  return reinterpret_cast<const void*>(kernel);
}
inline const void* kernel_key(const void* kernel) { return kernel; }
[[noreturn]] inline void launch_fails(const char* name, const std::string& why) {
  std::fprintf(stderr, "emulator: the launch of %s would fail on the GPU: %s\n", name, why.c_str());
  std::abort();
}
inline void check_launch_shape(dim3 grid, dim3 threads, const char* name) {
  const size_t n = size_t(threads.x) * threads.y * threads.z;
  if (n == 0 || n > 1024 || threads.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u)
    launch_fails(name, "grid " + std::to_string(grid.x) + " x " + std::to_string(grid.y) + " x " +
                           std::to_string(grid.z) + ", block " + std::to_string(threads.x) + " x " +
                           std::to_string(threads.y) + " x " + std::to_string(threads.z));
}
// A kernel's __launch_bounds__ (tests/emulator/translate.py puts the check at its start).
inline void check_block_size(int max_threads, const char* name) {
  const size_t n = size_t(blockDim.x) * blockDim.y * blockDim.z;
  if (n > size_t(max_threads))
    launch_fails(name, std::to_string(n) + " threads a block, above its launch bounds' " + std::to_string(max_threads));
}
// The dynamic shared memory `kernel` opted into (0: none).
inline size_t opted_in_shared(const void* kernel) {
  std::lock_guard lock(opt_ins_mutex);
  const auto it = opt_ins.find(kernel);
  return it == opt_ins.end() ? 0 : it->second;
}
inline void check_shared(const Block& b, size_t opted, const char* name) {
  size_t static_total = 0;
  for (const auto& array : b.static_arrays) static_total += array.size();
  const size_t dynamic = b.shared.size();
  const auto bytes = [](size_t n) { return std::to_string(n) + " bytes"; };
  if (static_total > kSharedDefault) launch_fails(name, bytes(static_total) + " of static shared memory");
  if (opted + static_total > kSharedOptIn)
    launch_fails(name, "opted into " + bytes(opted) + " of dynamic shared memory beside " + bytes(static_total) +
                           " static: above 227 KiB");
  if (dynamic > (opted ? opted : kSharedDefault - static_total))
    launch_fails(name, bytes(dynamic) + " of dynamic shared memory beside " + bytes(static_total) + " static, " +
                           (opted ? "opted into " + bytes(opted) : std::string("not opted into more than 48 KiB")));
}
// The block's static array number `slot` of its file (a __shared__ declaration), `bytes`
// long, allocated when a thread first reaches it.
inline char* static_shared(size_t slot, size_t bytes) {
  Block& b = block();
  if (b.static_arrays.size() <= slot) b.static_arrays.resize(slot + 1);
  if (b.static_arrays[slot].empty()) b.static_arrays[slot].assign(bytes, 0x7f);
  return b.static_arrays[slot].data();
}

// kernel() over the grid, block after block, in an order shuffled anew at each launch:
// on the GPU the blocks run at once in no order, so that a result that depends on
// their order shows as a difference between launches.
inline std::atomic<unsigned> launches{0};
template <class Kernel>
void launch(dim3 grid, dim3 threads, size_t shared_bytes, const void* key, const char* name, const Kernel& kernel) {
  check_launch_shape(grid, threads, name);
  const size_t opted = opted_in_shared(key);
  const int n = threads.x * threads.y * threads.z;
  std::vector<uint64_t> order(uint64_t(grid.x) * grid.y * grid.z);
  std::iota(order.begin(), order.end(), uint64_t(0));
  std::shuffle(order.begin(), order.end(), std::mt19937(++launches));
  for (const uint64_t i : order) {
    Block b;
    b.shared.assign(shared_bytes, 0x7f);  // not zeros: what a kernel forgets to write shows
    b.exchange.assign(2 * (size_t(n + 31) / 32 * 32), 0.0);
    b.parity.assign(n, 0);
    b.async_copies.assign(n, {});
    Block* const outer = current;
    current = &b;
    blockIdx = dim3(i % grid.x, i / grid.x % grid.y, i / grid.x / grid.y), gridDim = grid, blockDim = threads;
    team(n).run(threads, [&] { kernel(); });
    current = outer;
    check_shared(b, opted, name);
    for (const auto& copies : b.async_copies)
      if (!copies.empty()) {
        std::fprintf(stderr, "emulator: a thread's asynchronous copies were never waited for\n");
        std::abort();
      }
  }
}

// Asynchronous copies (cp.async): each lands only when its thread waits for its copies,
// reading its source then, so that a read of the destination before the wait, or a
// source changed before it, shows.
inline void copy_async(float* shared_dst, const float* global_src) {
  block().async_copies[thread_rank()].emplace_back(shared_dst, global_src);
}
inline void wait_async_copies() {
  auto& copies = block().async_copies[thread_rank()];
  for (const auto& [dst, src] : copies) *dst = *src;
  copies.clear();
}

inline void sync_block() { Team::wait(Team::State::at_block_barrier); }
inline void sync_warp() { Team::wait(Team::State::at_warp_barrier); }

// Value v of every lane of the caller's warp, through the exchange slots. Exchanges
// alternate between two sets of slots, so one barrier each suffices: a lane writes a
// set again only after the next exchange's barrier, which every lane reaches after
// reading this one.
template <class T, class Use>
auto warp_exchange(T v, const Use& use) {
  const int rank = thread_rank(), lane = rank % 32, warp = rank / 32;
  char& parity = block().parity[rank];
  double* slot = block().exchange.data() + (2 * warp + parity) * 32;
  parity ^= 1;
  slot[lane] = static_cast<double>(v);
  sync_warp();
  return use(slot, lane);
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
  const char* name;  // the kernel's, or what else the node does
};
inline std::vector<Node>* capture = nullptr;
inline Stream default_stream;
inline void enqueue(Stream* s, std::function<void()> work, const char* name) {
  if (!capture) {
    work();
    return;
  }
  if (!s) s = &default_stream;
  Node node{std::move(work), s->waits, name};
  if (s->last >= 0) node.deps.push_back(s->last);
  s->waits.clear();
  capture->push_back(std::move(node));
  s->last = static_cast<int>(capture->size()) - 1;
}
// The name of kernel F with its template arguments' values, from the compiler's name of
// this function ("... [with auto F = &ns::kernel<true>]" in GCC and Clang).
template <auto F>
const char* kernel_name() {
  static const std::string name = [](const std::string& pretty) {
    const size_t from = pretty.find("F = ") + 4, to = pretty.rfind(']');
    const std::string text = pretty.substr(from, to - from);
    const size_t scope = text.rfind("::", text.find('<'));
    return scope == std::string::npos ? text : text.substr(scope + 2);
  }(__PRETTY_FUNCTION__);
  return name.c_str();
}
// Graph replays pick among ready nodes at random from this seed (0: capture order).
inline unsigned graph_order_seed = 0;
// The last captured graph's nodes (kernels, copies, emulated cuBLAS calls) and its
// longest chain of dependent nodes, which bounds a replay's time on a GPU from below,
// with the names of that chain's nodes in order.
struct GraphShape {
  size_t nodes = 0;
  int longest_chain = 0;
  std::vector<const char*> chain;
};
inline GraphShape last_graph;

}  // namespace emu

inline void __syncthreads() { emu::sync_block(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return std::atomic_ref(*address).fetch_add(value); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  return emu::warp_exchange(v, [&](const double* slot, int lane) { return static_cast<T>(slot[lane ^ offset]); });
}
template <class T>
T __shfl_sync(unsigned, T v, int source) {
  return emu::warp_exchange(v, [&](const double* slot, int) { return static_cast<T>(slot[source % 32]); });
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  return emu::warp_exchange(predicate ? 1 : 0, [](const double* slot, int) {
    unsigned mask = 0;
    for (int l = 0; l < 32; ++l)
      if (slot[l] != 0) mask |= 1u << l;
    return mask;
  });
}
