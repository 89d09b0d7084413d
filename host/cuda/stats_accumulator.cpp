// Correlation statistics from activation chunks on the GPU: each neuron's shift (its
// mean over the first chunk), shifted sums and co-moment blocks as float64 masters on
// the device (split-FP16 or split-TF32 products of short spans, a group of spans per
// float64 pass, kernels/comoment.cu); stats() centers them on the device, the FP16
// split's power-of-two scales undone, and downloads them once.
#include <algorithm>
#include <stdexcept>

#include "univ/cuda/kernels.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/stats.hpp"

namespace univ {

struct CudaStatsAccumulator::Device {
  cuda::Stream stream;
  cuda::CublasHandle cublas{stream.get(), false};
  std::vector<cuda::DeviceBuffer<float>> stacked;                // [m] a group's stacks, [group, 4, span, N_m] parts
  std::vector<cuda::DeviceBuffer<float>> inv_scale;              // [m] N_m: the FP16 split's scales
  cuda::DeviceBuffer<int> overflow{1};                           // set when an FP16 part is not finite
  cuda::DeviceBuffer<float> products;                            // a group's products of the largest block (scratch
                                                                 // for stats())
  std::vector<cuda::DeviceBuffer<float>> shift;                  // [m] N_m
  std::vector<cuda::DeviceBuffer<double>> sums;                  // [m] N_m: sum of x - shift
  std::vector<cuda::DeviceBuffer<double>> cross;                 // pairs i < j in CorrelationStats' order
  std::vector<cuda::DeviceBuffer<double>> within;                // [m] layers x width x width
  std::vector<cuda::DeviceBuffer<float>> staging;                // [m] add_from_host's chunks
};

namespace {

// Spans per float64 pass: up to 16 (one pass per chunk of 16384 tokens), as far as 2
// GiB holds their stacks and products. At 2 x 4096 neurons that is 16, and the
// statistics of 1M tokens took 292-299 ms on two H100s where 8 took 298-305 (277 and
// 278 on an H200): the float64 masters, read and written once per pass, are touched
// half as often. The group's float64 sum goes into the master, so its size fixes the
// last bits: a fixed budget, never the device's free memory, sets it.
int spans_per_pass_for(const std::vector<NeuronShape>& shapes, int64_t span, SplitPrecision split) {
  const double part_bytes = split == SplitPrecision::f16 ? 2 : 4;
  double per_span = 0, largest = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    per_span += 4.0 * double(span) * double(shapes[i].neurons()) * part_bytes;
    largest = std::max(largest, double(shapes[i].layers) * shapes[i].width * shapes[i].width);
    for (size_t j = i + 1; j < shapes.size(); ++j)
      largest = std::max(largest, double(shapes[i].neurons()) * double(shapes[j].neurons()));
  }
  per_span += 4.0 * largest;
  return static_cast<int>(std::clamp(double(int64_t(2) << 30) / per_span, 1.0, 16.0));
}

}  // namespace

CudaStatsAccumulator::CudaStatsAccumulator(std::vector<NeuronShape> shapes, int64_t span, SplitPrecision split,
                                           int spans_per_pass)
    : shapes_(std::move(shapes)),
      span_(span > 0 ? span : cuda::kComomentSpan),
      split_(split),
      spans_per_pass_(spans_per_pass > 0 ? spans_per_pass : spans_per_pass_for(shapes_, span_, split_)),
      device_(std::make_unique<Device>()) {
  Device& d = *device_;
  const cudaStream_t s = d.stream.get();
  d.overflow.fill_bytes(0, s);
  auto zeros = [&](size_t n) {
    cuda::DeviceBuffer<double> b(n);
    b.fill_bytes(0, s);
    return b;
  };
  const int K = static_cast<int>(shapes_.size());
  for (int m = 0; m < K; ++m) {
    d.shift.emplace_back(shapes_[m].neurons());
    d.inv_scale.emplace_back(shapes_[m].neurons());
    d.sums.push_back(zeros(shapes_[m].neurons()));
    d.within.push_back(zeros(size_t(shapes_[m].layers) * shapes_[m].width * shapes_[m].width));
  }
  const size_t parts_per_float = split_ == SplitPrecision::f16 ? 2 : 1;  // two FP16 parts per float
  size_t largest = 0;
  for (int i = 0; i < K; ++i) {
    d.stacked.emplace_back(size_t(spans_per_pass_) * 4 * size_t(span_) * shapes_[i].neurons() / parts_per_float);
    largest = std::max(largest, d.within[i].size());
    for (int j = i + 1; j < K; ++j) {
      d.cross.push_back(zeros(size_t(shapes_[i].neurons()) * shapes_[j].neurons()));
      largest = std::max(largest, d.cross.back().size());
    }
  }
  d.products = cuda::DeviceBuffer<float>(size_t(spans_per_pass_) * largest);
}

CudaStatsAccumulator::~CudaStatsAccumulator() = default;

void CudaStatsAccumulator::add(const std::vector<const float*>& acts, int64_t n) {
  const int K = static_cast<int>(shapes_.size());
  if (static_cast<int>(acts.size()) != K) throw std::invalid_argument("CudaStatsAccumulator::add: one pointer per model");
  if (n <= 0) return;
  Device& d = *device_;
  const cudaStream_t s = d.stream.get();
  const bool f16 = split_ == SplitPrecision::f16;
  if (count_ == 0)
    for (int m = 0; m < K; ++m) {  // the shift: the first chunk's means (sums is still zero)
      const int N = static_cast<int>(shapes_[m].neurons());
      cuda::column_sums(d.sums[m].data(), acts[m], N, nullptr, N, n, s);
      cuda::shift_from_sums(d.shift[m].data(), d.sums[m].data(), N, n, s);
      d.sums[m].fill_bytes(0, s);
      if (f16) cuda::column_scales(d.inv_scale[m].data(), acts[m], N, d.shift[m].data(), N, n, s);
    }
  for (int m = 0; m < K; ++m) {
    const int N = static_cast<int>(shapes_[m].neurons());
    cuda::column_sums(d.sums[m].data(), acts[m], N, d.shift[m].data(), N, n, s);
  }
  // Co-moments in groups of spans: one split and one batched GEMM per group, whose
  // float32 products join the float64 masters in one pass.
  const int64_t part_bytes = f16 ? 2 : 4;
  for (int64_t t0 = 0; t0 < n;) {
    const int64_t full_spans = (n - t0) / span_;
    const int64_t span = full_spans > 0 ? span_ : n - t0;
    const int group = full_spans > 0 ? static_cast<int>(std::min<int64_t>(full_spans, spans_per_pass_)) : 1;
    auto stack = [&](int m, int g) {  // span g's stack of model m
      return static_cast<const char*>(static_cast<const void*>(d.stacked[m].data())) +
             int64_t(g) * 4 * span * shapes_[m].neurons() * part_bytes;
    };
    for (int m = 0; m < K; ++m) {
      const int N = static_cast<int>(shapes_[m].neurons());
      if (f16)
        cuda::split_f16(d.stacked[m].data(), acts[m] + t0 * N, N, d.shift[m].data(), d.inv_scale[m].data(), N, span,
                        group, d.overflow.data(), s);
      else
        cuda::split_tf32(d.stacked[m].data(), acts[m] + t0 * N, N, d.shift[m].data(), N, span, group, s);
    }
    int pair = 0;
    for (int i = 0; i < K; ++i)
      for (int j = i + 1; j < K; ++j, ++pair) {
        const int Ni = static_cast<int>(shapes_[i].neurons()), Nj = static_cast<int>(shapes_[j].neurons());
        cuda::comoment_products(d.cublas.get(), d.products.data(), stack(i, 0), Ni, Ni, stack(j, 0), Nj, Nj, span,
                                split_, group, 4 * span * Ni, 4 * span * Nj);
        cuda::add_products_to_float64(d.cross[pair].data(), Nj, d.products.data(), Ni, Nj, group, s);
      }
    for (int m = 0; m < K; ++m) {  // every layer's within-layer block in one batched call per span
      const int N = static_cast<int>(shapes_[m].neurons()), D = shapes_[m].width, L = shapes_[m].layers;
      const int64_t blocks = int64_t(L) * D * D;
      for (int g = 0; g < group; ++g)
        cuda::comoment_products(d.cublas.get(), d.products.data() + g * blocks, stack(m, g), N, D, stack(m, g), N, D,
                                span, split_, L, D, D);
      cuda::add_products_to_float64(d.within[m].data(), D, d.products.data(), L * D, D, group, s);
    }
    t0 += group * span;
  }
  count_ += n;
}

void CudaStatsAccumulator::add_from_host(const std::vector<const float*>& host_acts, int64_t n) {
  Device& d = *device_;
  if (host_acts.size() != shapes_.size())
    throw std::invalid_argument("CudaStatsAccumulator::add_from_host: one pointer per model");
  d.staging.resize(shapes_.size());
  std::vector<const float*> acts;
  for (size_t m = 0; m < shapes_.size(); ++m) {
    const size_t size = size_t(n) * shapes_[m].neurons();
    if (d.staging[m].size() < size) d.staging[m] = cuda::DeviceBuffer<float>(size);
    d.staging[m].upload(host_acts[m], size, d.stream.get());
    acts.push_back(d.staging[m].data());
  }
  add(acts, n);
}

void CudaStatsAccumulator::synchronize() const {
  const Device& d = *device_;
  int overflow = 0;
  if (split_ == SplitPrecision::f16) d.overflow.download(&overflow, 1, d.stream.get());
  d.stream.synchronize();
  if (overflow)
    throw Fp16SplitOverflow("the FP16 split overflowed: a neuron's values grew over 1000-fold past the first "
                            "chunk's; the TF32 split has the range for them");
}

CorrelationStats CudaStatsAccumulator::stats() const {
  Device& d = *device_;  // its products' buffer serves as scratch
  const cudaStream_t s = d.stream.get();
  CorrelationStats out(shapes_);
  out.count_ = count_;
  if (count_ == 0) return out;
  const int K = static_cast<int>(shapes_.size());
  const bool f16 = split_ == SplitPrecision::f16;
  // Each block centered on the device (its FP16 scales undone: powers of two, exact)
  // into scratch, the masters left as they are, and downloaded straight into out's.
  size_t largest = 0;
  for (const auto& b : d.cross) largest = std::max(largest, b.size());
  for (const auto& b : d.within) largest = std::max(largest, b.size());
  cuda::DeviceBuffer<double> own_scratch;
  double* scratch = reinterpret_cast<double*>(d.products.data());
  if (d.products.size() < 2 * largest) {
    own_scratch = cuda::DeviceBuffer<double>(largest);
    scratch = own_scratch.data();
  }
  auto inv_scale = [&](int m) { return f16 ? d.inv_scale[m].data() : nullptr; };
  int pair = 0;
  for (int i = 0; i < K; ++i)
    for (int j = i + 1; j < K; ++j, ++pair) {
      cuda::center_comoments(scratch, d.cross[pair].data(), d.sums[i].data(), inv_scale(i), d.sums[j].data(),
                             inv_scale(j), static_cast<int>(shapes_[i].neurons()),
                             static_cast<int>(shapes_[j].neurons()), 1, count_, false, s);
      UNIV_CUDA_CHECK(cudaMemcpyAsync(out.cross_[pair].data(), scratch, out.cross_[pair].size() * sizeof(double),
                                      cudaMemcpyDeviceToHost, s));
    }
  for (int m = 0; m < K; ++m) {
    const int D = shapes_[m].width, L = shapes_[m].layers;
    cuda::center_comoments(scratch, d.within[m].data(), d.sums[m].data(), inv_scale(m), d.sums[m].data(),
                           inv_scale(m), D, D, L, count_, true, s);
    for (int l = 0; l < L; ++l)
      UNIV_CUDA_CHECK(cudaMemcpyAsync(out.within_[m][l].data(), scratch + int64_t(l) * D * D,
                                      out.within_[m][l].size() * sizeof(double), cudaMemcpyDeviceToHost, s));
  }
  // The means: shift + sums / n.
  std::vector<std::vector<double>> sums(K);
  std::vector<std::vector<float>> shift(K);
  for (int m = 0; m < K; ++m) {
    sums[m].resize(d.sums[m].size());
    d.sums[m].download(sums[m].data(), sums[m].size(), s);
    shift[m].resize(d.shift[m].size());
    d.shift[m].download(shift[m].data(), shift[m].size(), s);
  }
  synchronize();
  const double n = static_cast<double>(count_);
  for (int m = 0; m < K; ++m)
    for (size_t k = 0; k < sums[m].size(); ++k) out.means_[m][k] = sums[m][k] / n + double(shift[m][k]);
  return out;
}

}  // namespace univ
