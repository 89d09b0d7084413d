// The CUDA runtime calls of the library, emulated on the host (emulator.hpp):
// device memory is host memory filled with NaN bytes, copies are memcpy, streams and
// events order a captured graph's nodes, and a graph replays its nodes in an order
// their edges allow (at random from emu::graph_order_seed, which exposes a missing edge).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../emulator.hpp"

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorInvalidDevice = 101 };
typedef emu::Stream* cudaStream_t;
typedef emu::Event* cudaEvent_t;
struct EmuGraph {
  std::vector<emu::Node> nodes;
};
typedef EmuGraph* cudaGraph_t;
typedef EmuGraph* cudaGraphExec_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum { cudaStreamNonBlocking = 1, cudaEventDefault = 0, cudaEventDisableTiming = 2 };
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMemoryPoolsSupported,
  cudaDevAttrComputeCapabilityMajor
};
typedef struct EmuMemPool* cudaMemPool_t;
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold };
#define cudaStreamPerThread (static_cast<cudaStream_t>(nullptr))

inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n);
  std::memset(*p, 0xff, n);
  return cudaSuccess;
}
inline cudaError_t cudaMallocHost(void** p, size_t n) { return cudaMalloc(p, n); }
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }
// The stream-ordered pool's calls: fresh NaN-filled memory each time, freed at once.
struct EmuMemPool {};
inline cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int) {
  static EmuMemPool the_pool;
  *pool = &the_pool;
  return cudaSuccess;
}
inline cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
inline cudaError_t cudaMemPoolTrimTo(cudaMemPool_t, size_t) { return cudaSuccess; }
inline cudaError_t cudaMallocFromPoolAsync(void** p, size_t n, cudaMemPool_t, cudaStream_t) { return cudaMalloc(p, n); }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t stream = nullptr) {
  emu::enqueue(stream, [=] { std::memcpy(d, s, n); }, "memcpy");
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2DAsync(void* d, size_t d_pitch, const void* s, size_t s_pitch, size_t width,
                                     size_t height, cudaMemcpyKind, cudaStream_t stream = nullptr) {
  emu::enqueue(
      stream,
      [=] {
        for (size_t r = 0; r < height; ++r)
          std::memcpy(static_cast<char*>(d) + r * d_pitch, static_cast<const char*>(s) + r * s_pitch, width);
      },
      "memcpy2D");
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* d, int value, size_t n, cudaStream_t stream = nullptr) {
  emu::enqueue(stream, [=] { std::memset(d, value, n); }, "memset");
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  *s = new emu::Stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = new emu::Event;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr) {
  if (emu::capture) e->node = (s ? s : &emu::default_stream)->last;
  return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned = 0) {
  if (emu::capture && e->node >= 0) (s ? s : &emu::default_stream)->waits.push_back(e->node);
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 0;
  return cudaSuccess;
}
// A capture's state and the nodes the stream's next one will follow (kernels, unless
// named as copies or fills). translate.py rewrites launch_chained's calls into ordinary
// launches, so the emulator only answers chains_launches' questions.
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone, cudaStreamCaptureStatusActive };
typedef const emu::Node* cudaGraphNode_t;
struct cudaGraphEdgeData {};
enum cudaGraphNodeType { cudaGraphNodeTypeKernel, cudaGraphNodeTypeMemcpy, cudaGraphNodeTypeMemset };
inline cudaError_t cudaStreamGetCaptureInfo(cudaStream_t s, cudaStreamCaptureStatus* status, unsigned long long*,
                                            cudaGraph_t*, const cudaGraphNode_t** follows,
                                            const cudaGraphEdgeData** edges, size_t* count) {
  static thread_local std::vector<cudaGraphNode_t> nodes;
  static thread_local std::vector<cudaGraphEdgeData> no_data;
  nodes.clear();
  *status = emu::capture ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  if (!s) s = &emu::default_stream;
  if (emu::capture) {
    for (int d : s->waits) nodes.push_back(&(*emu::capture)[d]);
    if (s->last >= 0) nodes.push_back(&(*emu::capture)[s->last]);
  }
  no_data.assign(nodes.size(), {});
  *follows = nodes.data(), *edges = no_data.data(), *count = nodes.size();
  return cudaSuccess;
}
inline cudaError_t cudaGraphNodeGetType(cudaGraphNode_t node, cudaGraphNodeType* type) {
  const std::string name = node->name;
  *type = name.rfind("memcpy", 0) == 0 ? cudaGraphNodeTypeMemcpy
          : name == "memset"           ? cudaGraphNodeTypeMemset
                                       : cudaGraphNodeTypeKernel;
  return cudaSuccess;
}
// Declared for launch_chained's template (kernels/common.cuh), which runs only on CUDA.
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 6 };
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  union {
    int programmaticStreamSerializationAllowed;
  } val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
inline cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
  emu::capture = new std::vector<emu::Node>;
  s->last = -1;
  s->waits.clear();
  return cudaSuccess;
}
// As CUDA requires, every captured node must lead into the origin stream's last one.
inline cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph) {
  std::vector<emu::Node>& nodes = *emu::capture;
  std::vector<char> joined(nodes.size(), 0);
  if (s->last >= 0) joined[s->last] = 1;
  for (int i = static_cast<int>(nodes.size()) - 1; i >= 0; --i)
    if (joined[i])
      for (int d : nodes[i].deps) joined[d] = 1;
  for (size_t i = 0; i < nodes.size(); ++i)
    if (!joined[i]) {
      std::fprintf(stderr, "emulator: captured node %zu is not joined into the origin stream\n", i);
      std::abort();
    }
  // Nodes come in capture order, after what they wait for: each one's longest chain
  // ending there, and the node before it on that chain.
  std::vector<int> chain(nodes.size(), 1), before(nodes.size(), -1);
  emu::last_graph = {nodes.size(), 0, {}};
  int end = -1;
  for (size_t i = 0; i < nodes.size(); ++i) {
    for (int d : nodes[i].deps)
      if (chain[d] + 1 > chain[i]) chain[i] = chain[d] + 1, before[i] = d;
    if (chain[i] > emu::last_graph.longest_chain) emu::last_graph.longest_chain = chain[i], end = static_cast<int>(i);
  }
  for (int i = end; i >= 0; i = before[i]) emu::last_graph.chain.insert(emu::last_graph.chain.begin(), nodes[i].name);
  *graph = new EmuGraph{std::move(nodes)};
  delete emu::capture;
  emu::capture = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  *exec = new EmuGraph{graph->nodes};
  return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t) {
  static std::mt19937 rng;
  static unsigned seeded = 0;
  if (emu::graph_order_seed != seeded) rng.seed(seeded = emu::graph_order_seed);
  const std::vector<emu::Node>& nodes = exec->nodes;
  std::vector<int> waiting(nodes.size());
  std::vector<std::vector<int>> users(nodes.size());
  std::vector<int> ready;
  for (size_t i = 0; i < nodes.size(); ++i) {
    waiting[i] = static_cast<int>(nodes[i].deps.size());
    for (int d : nodes[i].deps) users[d].push_back(static_cast<int>(i));
    if (!waiting[i]) ready.push_back(static_cast<int>(i));
  }
  while (!ready.empty()) {
    const auto pick = emu::graph_order_seed ? ready.begin() + rng() % ready.size()
                                            : std::min_element(ready.begin(), ready.end());
    const int i = *pick;
    ready.erase(pick);
    nodes[i].work();
    for (int u : users[i])
      if (--waiting[u] == 0) ready.push_back(u);
  }
  return cudaSuccess;
}
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t g) {
  delete g;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
// One device, the emulator, with sm_90's limits where the code asks for them.
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  size_t totalGlobalMem;
};
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  *prop = {"host emulator", 9, 0, size_t(1) << 30};
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  // sm_90's opt-in shared memory per block and compute capability
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 232448
           : attr == cudaDevAttrComputeCapabilityMajor     ? 9
                                                           : 1;
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int value) {
  if (value < 0 || size_t(value) > emu::kSharedOptIn) return cudaErrorInvalidValue;
  emu::opt_in_shared(emu::kernel_key(kernel), value);
  return cudaSuccess;
}
