// Correlation statistics from activation chunks on the GPU: each neuron's shift (its
// mean over the first chunk), shifted sums and co-moment blocks as float64 masters on
// the device (split-TF32 or split-FP16 products span by span, kernels/comoment.cu);
// stats() downloads them once, undoes the FP16 split's power-of-two scales and centers
// them in float64.
#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "univ/cuda/kernels.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/stats.hpp"

namespace univ {

struct CudaStatsAccumulator::Device {
  cuda::Stream stream;
  cuda::CublasHandle cublas{stream.get(), false};
  std::vector<cuda::DeviceBuffer<float>> stacked;                // [m] the split stack of one span, [4, span, N_m]
  std::vector<cuda::DeviceBuffer<float>> inv_scale;              // [m] N_m: the FP16 split's scales
  cuda::DeviceBuffer<int> overflow{1};                           // set when an FP16 part is not finite
  cuda::DeviceBuffer<float> product;                             // the largest block in float32
  std::vector<cuda::DeviceBuffer<float>> shift;                  // [m] N_m
  std::vector<cuda::DeviceBuffer<double>> sums;                  // [m] N_m: sum of x - shift
  std::vector<cuda::DeviceBuffer<double>> cross;                 // pairs i < j in CorrelationStats' order
  std::vector<cuda::DeviceBuffer<double>> within;                // [m] layers x width x width
  std::vector<cuda::DeviceBuffer<float>> staging;                // [m] add_from_host's chunks
};

CudaStatsAccumulator::CudaStatsAccumulator(std::vector<NeuronShape> shapes, int64_t span, SplitPrecision split)
    : shapes_(std::move(shapes)),
      span_(span > 0 ? span : cuda::kComomentSpan),
      split_(split),
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
  size_t largest = 0;
  for (int i = 0; i < K; ++i) {
    d.stacked.emplace_back(4 * size_t(span_) * shapes_[i].neurons());
    largest = std::max(largest, d.within[i].size());
    for (int j = i + 1; j < K; ++j) {
      d.cross.push_back(zeros(size_t(shapes_[i].neurons()) * shapes_[j].neurons()));
      largest = std::max(largest, d.cross.back().size());
    }
  }
  d.product = cuda::DeviceBuffer<float>(largest);
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
  // Co-moments span by span: each span's float32 products join the float64 masters.
  for (int64_t t0 = 0; t0 < n; t0 += span_) {
    const int64_t span = std::min(span_, n - t0);
    for (int m = 0; m < K; ++m) {
      const int N = static_cast<int>(shapes_[m].neurons());
      if (f16)
        cuda::split_f16(d.stacked[m].data(), acts[m] + t0 * N, N, d.shift[m].data(), d.inv_scale[m].data(), N, span,
                        d.overflow.data(), s);
      else
        cuda::split_tf32(d.stacked[m].data(), acts[m] + t0 * N, N, d.shift[m].data(), N, span, s);
    }
    int pair = 0;
    for (int i = 0; i < K; ++i)
      for (int j = i + 1; j < K; ++j, ++pair) {
        const int Ni = static_cast<int>(shapes_[i].neurons()), Nj = static_cast<int>(shapes_[j].neurons());
        cuda::comoment_accumulate(d.cublas.get(), d.cross[pair].data(), Nj, d.stacked[i].data(), Ni, Ni,
                                  d.stacked[j].data(), Nj, Nj, span, d.product.data(), s, split_);
      }
    for (int m = 0; m < K; ++m) {  // every layer's within-layer block in one batched call
      const int N = static_cast<int>(shapes_[m].neurons()), D = shapes_[m].width;
      const float* stacked = d.stacked[m].data();
      cuda::comoment_accumulate(d.cublas.get(), d.within[m].data(), D, stacked, N, D, stacked, N, D, span,
                                d.product.data(), s, split_, shapes_[m].layers, D);
    }
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

void CudaStatsAccumulator::synchronize() const { device_->stream.synchronize(); }

CorrelationStats CudaStatsAccumulator::stats() const {
  const Device& d = *device_;
  const cudaStream_t s = d.stream.get();
  CorrelationStats out(shapes_);
  out.count_ = count_;
  if (count_ == 0) return out;
  const int K = static_cast<int>(shapes_.size());
  const double n = static_cast<double>(count_);
  auto download = [&](const auto& buffer) {
    std::vector<std::remove_cv_t<std::remove_pointer_t<decltype(buffer.data())>>> host(buffer.size());
    buffer.download(host.data(), host.size(), s);
    return host;
  };
  // Shifted means mu = sums / n (small: the shift is near the mean), the means, then
  // each raw shifted block S, its FP16 scales undone (powers of two: exact), minus
  // n mu_a mu_b^T.
  std::vector<std::vector<double>> mu(K), scale(K);
  std::vector<std::vector<float>> shift(K), inv_scale(K);
  std::vector<int> overflow(1, 0);
  const bool f16 = split_ == SplitPrecision::f16;
  for (int m = 0; m < K; ++m) {
    mu[m] = download(d.sums[m]);
    shift[m] = download(d.shift[m]);
    if (f16) inv_scale[m] = download(d.inv_scale[m]);
  }
  if (f16) d.overflow.download(overflow.data(), 1, s);
  synchronize();
  if (overflow[0])
    throw std::runtime_error("the FP16 split overflowed: a neuron's values grew over 1000-fold past the first "
                             "chunk's; the TF32 split has the range for them");
  for (int m = 0; m < K; ++m) {
    scale[m].assign(mu[m].size(), 1.0);
    for (size_t k = 0; k < mu[m].size(); ++k) {
      mu[m][k] /= n;
      out.means_[m][k] = mu[m][k] + double(shift[m][k]);
      if (f16) scale[m][k] = 1.0 / double(inv_scale[m][k]);
    }
  }
  auto center = [&](std::vector<double>& block, const double* scale_a, const double* scale_b, const double* mu_a,
                    const double* mu_b, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        block[r * cols + c] = block[r * cols + c] * scale_a[r] * scale_b[c] - n * mu_a[r] * mu_b[c];
  };
  int pair = 0;
  for (int i = 0; i < K; ++i)
    for (int j = i + 1; j < K; ++j, ++pair) {
      std::vector<double>& block = out.cross_[pair];
      block = download(d.cross[pair]);
      synchronize();
      center(block, scale[i].data(), scale[j].data(), mu[i].data(), mu[j].data(), shapes_[i].neurons(),
             shapes_[j].neurons());
    }
  for (int m = 0; m < K; ++m) {
    const int D = shapes_[m].width;
    const std::vector<double> blocks = download(d.within[m]);
    synchronize();
    for (int l = 0; l < shapes_[m].layers; ++l) {
      std::vector<double>& block = out.within_[m][l];
      block.assign(blocks.begin() + int64_t(l) * D * D, blocks.begin() + int64_t(l + 1) * D * D);
      const double *mu_l = mu[m].data() + int64_t(l) * D, *scale_l = scale[m].data() + int64_t(l) * D;
      center(block, scale_l, scale_l, mu_l, mu_l, D, D);
    }
  }
  return out;
}

}  // namespace univ
