// correlate's GPU paths: checkpoints run forward on the GPU with their MLP activations
// handed to the statistics kernels on the device; activation files are read into
// pinned double buffers, the next chunk read while the GPU reduces the current one.
#include "correlate_stream.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "univ/backend.hpp"
#include "univ/cuda/memory.hpp"

namespace univ {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// run(split) with the FP16 split, or again with the TF32 split if FP16 overflowed (the
// accumulator reports it at the chunk where it happened).
template <class Run>
StreamResult with_tf32_fallback(const Run& run) {
  try {
    return run(SplitPrecision::f16);
  } catch (const Fp16SplitOverflow&) {
    std::fprintf(stderr, "correlate: activations grew past the FP16 split's range; statistics again with the "
                         "TF32 split\n");
    return run(SplitPrecision::tf32);
  }
}

StreamResult stream_forward_statistics(const std::vector<LoadedModel>& models, const HeldOutTokens& tokens, Site site,
                                       int batch, const std::function<void(const StreamProgress&)>& progress,
                                       SplitPrecision split) {
  const auto start = Clock::now();
  const int K = static_cast<int>(models.size());
  const int T = models[0].checkpoint.run.model.seq_len;
  std::vector<NeuronShape> shapes;
  std::vector<std::unique_ptr<DeviceForward>> nets;
  std::vector<cuda::DeviceBuffer<float>> chunk;
  for (const auto& m : models) {
    RunConfig config = m.checkpoint.run;
    config.models = 1;
    config.batch = batch;
    shapes.push_back(m.shape());
    nets.push_back(make_device_forward(config, m.checkpoint.params));
    chunk.emplace_back(size_t(batch) * T * m.shape().neurons());
  }
  CudaStatsAccumulator acc(shapes, 0, split);
  StreamResult result;
  result.loss.assign(K, 0.0);
  std::vector<const float*> ptrs;
  for (const auto& c : chunk) ptrs.push_back(c.data());
  int64_t done = 0;
  for_each_batch(tokens, batch, T, [&](const int32_t* inputs, const int32_t* targets, int b, int64_t n) {
    acc.synchronize();  // the previous chunk is reduced: its buffers are free
    for (int m = 0; m < K; ++m) nets[m]->start(inputs, targets, b, site == Site::post, chunk[m].data(), n);
    for (int m = 0; m < K; ++m) result.loss[m] += nets[m]->finish() * double(b);  // the K ran side by side
    acc.add(ptrs, n);  // on the accumulator's stream, while the host prepares the next batch
    done += n;
    if (progress) progress({done, tokens.tokens, seconds_since(start)});
  });
  const int64_t count = tokens.sequences.count();
  for (double& l : result.loss) l /= static_cast<double>(std::max<int64_t>(count, 1));
  result.stats = acc.stats();
  result.seconds = seconds_since(start);
  return result;
}

StreamResult stream_file_statistics(const std::vector<ActivationModel>& models, int64_t first, int64_t last,
                                    int64_t chunk, const std::function<void(const StreamProgress&)>& progress,
                                    SplitPrecision split) {
  const auto start = Clock::now();
  const size_t K = models.size();
  std::vector<NeuronShape> shapes;
  for (const auto& m : models) shapes.push_back(m.shape);
  CudaStatsAccumulator acc(shapes, 0, split);
  std::vector<cuda::PinnedBuffer<float>> pinned[2];
  for (auto& buffers : pinned)
    for (const auto& s : shapes) buffers.emplace_back(size_t(chunk) * s.neurons());
  StreamResult result;
  auto read = [&](int64_t at, int slot) {
    const int64_t n = std::min(chunk, last - at);
    for (size_t m = 0; m < K; ++m) {
      models[m].read(at, n, pinned[slot][m].data());
      result.bytes_read += static_cast<double>(n * shapes[m].neurons() * models[m].files[0].item_size());
    }
  };
  if (first < last) read(first, 0);
  int slot = 0;
  for (int64_t at = first; at < last; at += chunk, slot ^= 1) {
    const int64_t n = std::min(chunk, last - at);
    std::vector<const float*> ptrs;
    for (const auto& b : pinned[slot]) ptrs.push_back(b.data());
    acc.add_from_host(ptrs, n);
    if (at + chunk < last) read(at + chunk, slot ^ 1);  // while the GPU copies and reduces this chunk
    acc.synchronize();
    if (progress) progress({at + n - first, last - first, seconds_since(start), result.bytes_read});
  }
  result.stats = acc.stats();
  result.seconds = seconds_since(start);
  return result;
}

}  // namespace

StreamResult stream_statistics_cuda(const std::vector<LoadedModel>& models, const HeldOutTokens& tokens, Site site,
                                    int batch, const std::function<void(const StreamProgress&)>& progress) {
  return with_tf32_fallback(
      [&](SplitPrecision split) { return stream_forward_statistics(models, tokens, site, batch, progress, split); });
}

StreamResult stream_activation_statistics_cuda(const std::vector<ActivationModel>& models, int64_t first,
                                               int64_t last, int64_t chunk,
                                               const std::function<void(const StreamProgress&)>& progress) {
  return with_tf32_fallback(
      [&](SplitPrecision split) { return stream_file_statistics(models, first, last, chunk, progress, split); });
}

}  // namespace univ
