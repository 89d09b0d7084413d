#include "kernel_trace.hpp"

#include <cupti.h>
#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <utility>
#include <stdexcept>
#include <string>

namespace univ {

namespace {

std::mutex traced_mutex;
std::vector<KernelSpan> traced;  // what CUPTI's completed buffers held
bool tracing = false;

void check(CUptiResult result, const char* what) {
  if (result == CUPTI_SUCCESS) return;
  const char* text = nullptr;
  cuptiGetResultString(result, &text);
  throw std::runtime_error(std::string("CUPTI: ") + what + ": " + (text ? text : "unknown error"));
}

std::string demangled(const char* name) {
  int status = 0;
  const std::unique_ptr<char, decltype(&std::free)> plain(abi::__cxa_demangle(name, nullptr, nullptr, &status),
                                                          &std::free);
  return status == 0 && plain ? plain.get() : name;
}

constexpr size_t kBufferBytes = 8 << 20;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;  // as many as fit
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::vector<KernelSpan> kernels;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    kernels.push_back({short_kernel_name(demangled(k->name)), k->start, k->end, k->streamId});
  }
  std::free(buffer);
  const std::lock_guard lock(traced_mutex);
  traced.insert(traced.end(), kernels.begin(), kernels.end());
}

}  // namespace

KernelTrace::KernelTrace() {
  if (tracing) throw std::logic_error("KernelTrace: one at a time");
  check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "registering the buffers");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "enabling kernel records");
  tracing = true;
}

KernelTrace::~KernelTrace() {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  const std::lock_guard lock(traced_mutex);
  traced.clear();
  tracing = false;
}

std::vector<KernelSpan> KernelTrace::take() {
  check(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "flushing the records");
  const std::lock_guard lock(traced_mutex);
  return std::exchange(traced, {});
}

}  // namespace univ
