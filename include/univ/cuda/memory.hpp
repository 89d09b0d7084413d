// RAII for CUDA resources: device and pinned buffers, streams, events, cuBLAS handles,
// graphs.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <utility>
#include <vector>

#include "univ/cuda/check.hpp"

namespace univ::cuda {

// Device memory comes from the current device's stream-ordered pool, told to keep what
// is given back for the next allocation rather than return it to the driver: cudaFree
// waits for the whole device and unmaps the memory, and cudaMalloc maps it again, while
// a short job such as the seed correlation step makes and frees some thirty buffers (its
// networks, their activations, the accumulator, the baseline's workspace). A buffer is
// usable on every stream once allocated; it goes back, as with cudaFree, after all the
// device's work so far, which may still use it. An allocation the pool cannot serve
// hands the pool's unused memory back to the driver and tries once more. Devices
// without pools use cudaMalloc and cudaFree.
// The current device's default pool, or null where it has none (cudaMalloc then
// reports any error of the device).
inline cudaMemPool_t device_pool() noexcept {
  int device = 0, supported = 0;
  cudaMemPool_t pool = nullptr;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess || !supported ||
      cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess)
    return nullptr;
  return pool;
}
inline void* device_allocate(size_t bytes) {
  void* p = nullptr;
  const cudaMemPool_t pool = device_pool();
  if (!pool) {
    UNIV_CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  uint64_t keep_all = ~uint64_t(0);
  UNIV_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all));
  const cudaError_t first = cudaMallocFromPoolAsync(&p, bytes, pool, cudaStreamPerThread);
  if (first == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // not a sticky error: cleared, the pool trimmed, once more
    UNIV_CUDA_CHECK(cudaDeviceSynchronize());
    UNIV_CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
    UNIV_CUDA_CHECK(cudaMallocFromPoolAsync(&p, bytes, pool, cudaStreamPerThread));
  } else {
    check_cuda(first, "cudaMallocFromPoolAsync", __FILE__, __LINE__);
  }
  UNIV_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  return p;
}
inline void device_free(void* p) noexcept {
  if (cudaDeviceSynchronize() != cudaSuccess) return;  // a failed device keeps what it holds
  if (device_pool())
    cudaFreeAsync(p, cudaStreamPerThread);
  else
    cudaFree(p);
}

// n elements of T in device memory (device_allocate / device_free); move-only.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : size_(n) {
    if (n > 0) data_ = static_cast<T*>(device_allocate(n * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (data_) device_free(data_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  void upload(const T* host, size_t n, cudaStream_t stream, size_t offset = 0) {
    UNIV_CUDA_CHECK(cudaMemcpyAsync(data_ + offset, host, n * sizeof(T), cudaMemcpyHostToDevice, stream));
  }
  void download(T* host, size_t n, cudaStream_t stream, size_t offset = 0) const {
    UNIV_CUDA_CHECK(cudaMemcpyAsync(host, data_ + offset, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
  }
  void fill_bytes(int byte, cudaStream_t stream) {
    if (size_) UNIV_CUDA_CHECK(cudaMemsetAsync(data_, byte, size_ * sizeof(T), stream));
  }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

// Page-locked host memory: pinning pages is slow and cudaFreeHost waits for the device,
// so blocks of up to 1 MiB (a network's batch and step report) are kept when given back,
// after the device's work so far (which may still copy from them), and handed out again
// for the same size; larger ones are freed. The kept blocks live as long as the process.
class PinnedBlocks {
 public:
  static void* take(size_t bytes) {
    if (bytes <= kKeptBytes) {
      const std::lock_guard<std::mutex> lock(mutex());
      auto& blocks = kept();
      for (auto it = blocks.begin(); it != blocks.end(); ++it)
        if (it->second == bytes) {
          void* p = it->first;
          blocks.erase(it);
          return p;
        }
    }
    void* p = nullptr;
    UNIV_CUDA_CHECK(cudaMallocHost(&p, bytes));
    return p;
  }
  static void give_back(void* p, size_t bytes) noexcept {
    if (bytes > kKeptBytes) {
      cudaFreeHost(p);
      return;
    }
    if (cudaDeviceSynchronize() != cudaSuccess) return;  // a failed device keeps what it holds
    const std::lock_guard<std::mutex> lock(mutex());
    kept().emplace_back(p, bytes);
  }

 private:
  static constexpr size_t kKeptBytes = size_t(1) << 20;
  // Never destroyed: at exit the CUDA runtime may be gone before static destructors run.
  static std::vector<std::pair<void*, size_t>>& kept() {
    static auto* blocks = new std::vector<std::pair<void*, size_t>>;
    return *blocks;
  }
  static std::mutex& mutex() {
    static auto* m = new std::mutex;
    return *m;
  }
};

// n elements of T in page-locked host memory (PinnedBlocks), for asynchronous copies;
// move-only.
template <class T>
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t n) : size_(n) {
    if (n > 0) data_ = static_cast<T*>(PinnedBlocks::take(n * sizeof(T)));
  }
  ~PinnedBuffer() {
    if (data_) PinnedBlocks::give_back(data_, size_ * sizeof(T));
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  size_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

class Stream {
 public:
  Stream() { UNIV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }
  void synchronize() const { UNIV_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  cudaStream_t stream_{};
};

class Event {
 public:
  // flags: cudaEventDisableTiming for events that only order streams.
  explicit Event(unsigned flags = cudaEventDefault) { UNIV_CUDA_CHECK(cudaEventCreateWithFlags(&event_, flags)); }
  ~Event() { cudaEventDestroy(event_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t stream) { UNIV_CUDA_CHECK(cudaEventRecord(event_, stream)); }
  // Work enqueued on `stream` from now on waits for the work before the last record().
  void make_wait(cudaStream_t stream) const { UNIV_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0)); }
  // Milliseconds from `start` to this event (both recorded and complete).
  float since(const Event& start) const {
    float ms = 0;
    UNIV_CUDA_CHECK(cudaEventSynchronize(event_));
    UNIV_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, event_));
    return ms;
  }

 private:
  cudaEvent_t event_{};
};

// A cuBLAS handle bound to a stream, with its own workspace (required for graph
// capture). Handles and their workspaces come from a process-wide pool and go back to
// it: making one (cuBLAS's setup and 32 MiB of device memory, freed again with a
// device-wide wait) costs more than a short job that uses it, such as the two forward
// networks and the statistics of one seed correlation step. The pool keeps as many as
// were ever alive at once. The stream must outlive the handle: giving it back waits
// for the work enqueued there, which may still use the workspace.
class CublasHandle {
 public:
  CublasHandle(cudaStream_t stream, bool tf32) : pooled_(take()), stream_(stream) {
    UNIV_CUBLAS_CHECK(cublasSetStream(pooled_.handle, stream));
    UNIV_CUBLAS_CHECK(cublasSetMathMode(pooled_.handle, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  }
  ~CublasHandle() {
    if (cudaStreamSynchronize(stream_) != cudaSuccess) return;  // a failed device keeps what it holds
    const std::lock_guard<std::mutex> lock(pool_mutex());
    pool().push_back(std::move(pooled_));
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return pooled_.handle; }

 private:
  static constexpr size_t kWorkspaceBytes = size_t(32) << 20;
  struct Pooled {
    cublasHandle_t handle{};
    DeviceBuffer<char> workspace;
  };
  // Never destroyed: at exit the CUDA runtime may be gone before static destructors run.
  static std::vector<Pooled>& pool() {
    static auto* pooled = new std::vector<Pooled>;
    return *pooled;
  }
  static std::mutex& pool_mutex() {
    static auto* mutex = new std::mutex;
    return *mutex;
  }
  static Pooled take() {
    {
      const std::lock_guard<std::mutex> lock(pool_mutex());
      if (!pool().empty()) {
        Pooled p = std::move(pool().back());
        pool().pop_back();
        return p;
      }
    }
    Pooled p{nullptr, DeviceBuffer<char>(kWorkspaceBytes)};
    UNIV_CUBLAS_CHECK(cublasCreate(&p.handle));
    UNIV_CUBLAS_CHECK(cublasSetWorkspace(p.handle, p.workspace.data(), kWorkspaceBytes));
    return p;
  }

  Pooled pooled_;
  cudaStream_t stream_;
};

// The work `record` enqueues on a stream, captured once into an executable graph and
// replayed with one launch.
class Graph {
 public:
  Graph(cudaStream_t stream, const std::function<void()>& record) {
    UNIV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      record();
    } catch (...) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(stream, &broken);
      if (broken) cudaGraphDestroy(broken);
      throw;
    }
    UNIV_CUDA_CHECK(cudaStreamEndCapture(stream, &graph_));
    UNIV_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph_, 0));
  }
  ~Graph() {
    if (exec_) cudaGraphExecDestroy(exec_);
    if (graph_) cudaGraphDestroy(graph_);
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void launch(cudaStream_t stream) const { UNIV_CUDA_CHECK(cudaGraphLaunch(exec_, stream)); }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace univ::cuda
