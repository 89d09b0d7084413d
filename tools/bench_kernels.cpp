// bench_kernels: times every CUDA kernel of the training step (CUDA events, warm-up,
// median of many launches) beside the card's measured copy bandwidth and GEMM rate,
// whole training steps per configuration, the correlation statistics and the seed
// experiment's whole correlation step. Tables on stdout; --json FILE also writes them
// for machines. --timeline instead traces queued training steps kernel by kernel.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "univ/analysis.hpp"
#include "univ/backend.hpp"
#include "univ/config.hpp"
#include "univ/correlate.hpp"
#include "univ/cuda/device_query.hpp"
#include "univ/cuda/kernels.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/error.hpp"
#include "univ/init.hpp"
#include "univ/param_layout.hpp"
#include "univ/philox.hpp"
#include "univ/stats.hpp"
#include "univ/step_timeline.hpp"
#include "kernel_trace.hpp"

namespace {

using univ::cuda::DeviceBuffer;

struct Bench {
  univ::cuda::Stream stream;
  int warmup = 5, repeats = 50;

  // Median milliseconds of one call of `work` (enqueued on `stream`).
  double time_ms(const std::function<void()>& work) {
    for (int i = 0; i < warmup; ++i) work();
    std::vector<double> ms;
    univ::cuda::Event start, stop;
    for (int i = 0; i < repeats; ++i) {
      start.record(stream.get());
      work();
      stop.record(stream.get());
      ms.push_back(stop.since(start));
    }
    std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
    return ms[ms.size() / 2];
  }
};

DeviceBuffer<float> random_device(size_t n, cudaStream_t stream, float scale = 1.0f) {
  std::vector<float> host(n);
  uint32_t x = 12345;
  for (float& v : host) {  // xorshift: any non-zero data
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    v = scale * (static_cast<float>(x % 20001) / 10000.0f - 1.0f);
  }
  DeviceBuffer<float> d(n);
  d.upload(host.data(), n, stream);
  return d;
}

struct Row {
  std::string name;
  double ms, bytes, flops;
};

// The card's ceilings: a large device-to-device copy (bytes read + written) and a large SGEMM.
nlohmann::json ceilings(Bench& b, cublasHandle_t fp32, cublasHandle_t tf32) {
  const size_t n = size_t(1) << 28;  // 1 GiB of floats
  DeviceBuffer<float> src(n), dst(n);
  src.fill_bytes(1, b.stream.get());
  const double copy_ms = b.time_ms([&] {
    UNIV_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), n * sizeof(float), cudaMemcpyDeviceToDevice, b.stream.get()));
  });
  const int g = 8192;
  auto A = random_device(size_t(g) * g, b.stream.get()), B = random_device(size_t(g) * g, b.stream.get());
  DeviceBuffer<float> C(size_t(g) * g);
  const float one = 1, zero = 0;
  auto gemm_ms = [&](cublasHandle_t h) {
    return b.time_ms([&] {
      UNIV_CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, g, g, g, &one, A.data(), g, B.data(), g, &zero,
                                    C.data(), g));
    });
  };
  const double flops = 2.0 * g * g * g;
  return {{"copy_GBps", 2.0 * n * sizeof(float) / copy_ms / 1e6},
          {"sgemm_fp32_TFLOPs", flops / gemm_ms(fp32) / 1e9},
          {"sgemm_tf32_TFLOPs", flops / gemm_ms(tf32) / 1e9}};
}

// h: cuBLAS in fp32; h_tf32: on the tensor cores (the rows that compare precisions).
std::vector<Row> kernel_rows(Bench& b, cublasHandle_t h, cublasHandle_t h_tf32, const univ::RunConfig& rc) {
  namespace k = univ::cuda;
  const auto& c = rc.model;
  const int M = rc.models, B = rc.batch, T = c.seq_len, C = c.d_model, H = c.heads, D = c.d_mlp, V = c.vocab;
  const int N = B * T;
  const double rows = double(M) * N, f = sizeof(float);
  const cudaStream_t s = b.stream.get();
  auto x = random_device(size_t(rows) * std::max({3 * C, D, V}), s), y = random_device(size_t(rows) * std::max({3 * C, D, V}), s);
  auto w = random_device(size_t(M) * std::max(3 * C, std::max(D, V)) * std::max(C, D), s, 0.05f);
  auto bias = random_device(size_t(M) * std::max({3 * C, D, V}), s), dbias = random_device(size_t(M) * std::max({3 * C, D, V}), s);
  auto att = random_device(size_t(M) * B * H * T * T, s), stats = random_device(size_t(rows) * 2, s);
  auto lse = random_device(size_t(rows) * H, s);  // rewritten by the flash forward's rows before a backward reads it
  auto pos = random_device(size_t(M) * T * C, s), post = random_device(size_t(rows) * D, s);
  std::vector<int32_t> tok(static_cast<size_t>(rows));
  for (size_t i = 0; i < tok.size(); ++i) tok[i] = static_cast<int32_t>(i * 7 % V);
  DeviceBuffer<int32_t> tokens(tok.size());
  tokens.upload(tok.data(), tok.size(), s);
  DeviceBuffer<float> losses(M), row_loss(static_cast<size_t>(rows));
  // Backward rows time an op with its column sums' stage 2, as one op's share of a pass.
  const int64_t room = std::max({2 * k::column_sum_partials(M, N, C), k::column_sum_partials(M, N, D),
                                 k::matmul_backward_partials(M, N, C, D)});
  DeviceBuffer<float> scratch(static_cast<size_t>(room));
  k::ColumnSums sums(scratch.data(), room);
  std::vector<Row> out;
  auto add = [&](const std::string& name, double bytes, double flops, const std::function<void()>& work) {
    out.push_back({name, b.time_ms(work), bytes, flops});
  };
  std::vector<int32_t> host_token_rows(tok.size()), host_token_starts(size_t(M) * (V + 1));
  k::sort_positions_by_token(host_token_rows.data(), host_token_starts.data(), tok.data(), M, N, V);
  DeviceBuffer<int32_t> token_rows(host_token_rows.size()), token_starts(host_token_starts.size());
  token_rows.upload(host_token_rows.data(), host_token_rows.size(), s);
  token_starts.upload(host_token_starts.data(), host_token_starts.size(), s);
  add("embedding_backward", rows * C * f + double(M) * V * C * f * 2, rows * C, [&] {
    k::embedding_backward(w.data(), pos.data(), x.data(), token_rows.data(), token_starts.data(), M, B, T, C, V, s);
  });
  add("embedding_layernorm_forward", rows * C * f * 4, rows * C * 9, [&] {
    k::embedding_layernorm_forward(y.data(), stats.data(), stats.data() + size_t(rows), x.data(), tokens.data(),
                                   w.data(), pos.data(), int64_t(T) * C, w.data(), bias.data(), M, B, T, C, V, s);
  });
  {  // the first layer's QKV product with the embedding's norm before it
    DeviceBuffer<float> qkv(static_cast<size_t>(rows) * 3 * C);
    const k::EmbeddingNorm e{y.data(), stats.data(), stats.data() + size_t(rows), x.data(), tokens.data(), w.data(),
                             pos.data(), int64_t(T) * C, w.data(), bias.data(), V};
    const k::RowProduct product = k::linear_product(qkv.data(), y.data(), w.data(), N, C, 3 * C);
    const double bytes = (rows * C * 4 + rows * 4 * C + 3.0 * M * C * C) * f, flops = rows * C * 9 + 6 * rows * C * C;
    add("embedding_linear qkv", bytes, flops, [&] { k::embedding_linear(h, e, product, M, B, T); });
    add("apart: embedding_layernorm_forward + matmul_forward qkv", bytes, flops, [&] {
      k::embedding_layernorm_forward(e, M, B, T, C, s);
      k::matmul_forward(h, qkv.data(), y.data(), w.data(), M, N, C, 3 * C);
    });
  }
  add("add_layernorm_forward", rows * C * f * 4, rows * C * 10,
      [&] { k::add_layernorm_forward(y.data(), stats.data(), stats.data() + size_t(rows), x.data(), bias.data(), y.data() + size_t(rows) * C, w.data(), bias.data(), M, N, C, s); });
  add("layernorm_backward", rows * C * f * 5, rows * C * 14, [&] {
    k::layernorm_backward_input(y.data(), y.data(), x.data(), x.data(), bias.data(), stats.data(), stats.data() + size_t(rows), M, N, C, s);
    k::layernorm_backward_params(w.data(), dbias.data(), sums, x.data(), x.data(), stats.data(), stats.data() + size_t(rows), M, N, C, s);
    sums.finish(s);
  });
  add("matmul_forward fc", (rows * C + rows * D + double(M) * D * C) * f, 2 * rows * C * D,
      [&] { k::matmul_forward(h, y.data(), x.data(), w.data(), M, N, C, D); });
  add("matmul_backward fc", (2 * rows * D + 2 * rows * C + 2.0 * M * D * C) * f, 4 * rows * C * D,
      [&] {
        k::matmul_backward_input(h, y.data(), x.data(), w.data(), M, N, C, D);
        k::matmul_backward_weight(h, w.data(), sums, x.data(), x.data(), M, N, C, D);
        sums.finish(s);
      });
  add("matmul_forward_activation fc", (rows * C + 2 * rows * D + double(M) * D * C) * f, 2 * rows * C * D,
      [&] { k::matmul_forward_activation(h, y.data(), post.data(), x.data(), w.data(), bias.data(), M, N, C, D, k::Act::gelu); });
  add("matmul_backward_input_activation fc2", (rows * C + 2 * rows * D + double(M) * D * C) * f, 2 * rows * C * D,
      [&] { k::matmul_backward_input_activation(h, y.data(), x.data(), w.data(), x.data(), M, N, D, C, k::Act::gelu); });
  // The products that close a layer with the row op after them: one launch where a row
  // fits the own kernel's tile (else the same two as apart), and apart (cuBLAS, then
  // the op's kernel) to compare.
  float *mean = stats.data(), *rstd = stats.data() + size_t(rows);
  for (const auto& [name, K] : {std::pair<std::string, int>{"proj", C}, {"out", D}}) {
    const double bytes = (rows * K + 4 * rows * C + double(M) * C * K) * f, flops = 2 * rows * C * K + rows * C * 10;
    add("add_layernorm_product " + name, bytes, flops, [&, K = K] {
      k::run_row_product(h,
                         k::add_layernorm_product(post.data(), mean, rstd, y.data(), x.data(), w.data(), bias.data(),
                                                  x.data(), bias.data(), bias.data(), N, K, C),
                         M);
    });
    add("apart: matmul_forward + add_layernorm_forward " + name, bytes, flops, [&, K = K] {
      k::matmul_forward(h, y.data(), x.data(), w.data(), M, N, K, C);
      k::add_layernorm_forward(post.data(), mean, rstd, y.data(), bias.data(), x.data(), bias.data(), bias.data(), M,
                               N, C, s);
    });
  }
  for (const auto& [name, K] : {std::pair<std::string, int>{"fc", D}, {"qkv", 3 * C}, {"lm_head", V}}) {
    const double bytes = (rows * K + 4 * rows * C + double(M) * C * K) * f, flops = 2 * rows * C * K + rows * C * 14;
    add("backward_input_layernorm_product " + name, bytes, flops, [&, K = K] {
      k::run_row_product(h,
                         k::backward_input_layernorm_product(y.data(), post.data(), x.data(), x.data(), w.data(),
                                                             x.data(), bias.data(), mean, rstd, N, C, K),
                         M);
    });
    add("apart: matmul_backward_input + layernorm_backward_input " + name, bytes, flops, [&, K = K] {
      k::matmul_backward_input(h, y.data(), x.data(), w.data(), M, N, C, K);
      k::layernorm_backward_input(post.data(), x.data(), y.data(), x.data(), bias.data(), mean, rstd, M, N, C, s);
    });
  }
  {  // the MLP sublayer: one kernel each way where it fits, against its two products apart
    DeviceBuffer<float> resid_out(static_cast<size_t>(rows) * C), next_ln(resid_out.size());
    k::MlpSublayer mlp{};
    mlp.ln2 = mlp.resid_mid = mlp.dresid_out = x.data(), mlp.fc_w = mlp.out_w = w.data();
    mlp.fc_b = mlp.out_b = mlp.next_w = mlp.next_b = mlp.ln2_w = bias.data();
    mlp.pre = mlp.dpre = post.data(), mlp.post = y.data(), mlp.resid_out = mlp.dln2 = resid_out.data();
    mlp.next_ln = mlp.dresid_mid = next_ln.data(), mlp.next_mean = mean, mlp.ln2_mean = mean;
    mlp.next_rstd = rstd, mlp.ln2_rstd = rstd, mlp.N = N, mlp.C = C, mlp.D = D, mlp.act = k::Act::gelu;
    const double bytes = (rows * (4 * C + 2 * D) + 2.0 * M * C * D) * f, flops = 4 * rows * C * D;
    add("mlp_forward", bytes, flops, [&] { k::mlp_forward(h, mlp, M); });
    add("apart: matmul_forward_activation + add_layernorm_product", bytes, flops, [&] {
      k::matmul_forward_activation(h, mlp.pre, mlp.post, mlp.ln2, mlp.fc_w, mlp.fc_b, M, N, C, D, mlp.act);
      k::run_row_product(h,
                         k::add_layernorm_product(mlp.next_ln, mean, rstd, mlp.resid_out, mlp.post, mlp.out_w,
                                                  mlp.out_b, mlp.resid_mid, mlp.next_w, mlp.next_b, N, D, C),
                         M);
    });
    add("mlp_backward", bytes, flops, [&] { k::mlp_backward(h, mlp, M); });
    k::MlpSublayer mlp_tf32 = mlp;  // the kernel's products (or cuBLAS's) on the tensor cores
    mlp_tf32.tf32 = true;
    add("tf32: mlp_forward", bytes, flops, [&] { k::mlp_forward(h_tf32, mlp_tf32, M); });
    add("tf32: mlp_backward", bytes, flops, [&] { k::mlp_backward(h_tf32, mlp_tf32, M); });
    add("apart: matmul_backward_input_activation + backward_input_layernorm_product", bytes, flops, [&] {
      k::matmul_backward_input_activation(h, mlp.dpre, mlp.dresid_out, mlp.out_w, mlp.pre, M, N, D, C, mlp.act);
      k::run_row_product(h,
                         k::backward_input_layernorm_product(mlp.dln2, mlp.dresid_mid, mlp.dresid_out, mlp.dpre,
                                                             mlp.fc_w, mlp.resid_mid, mlp.ln2_w, mean, rstd, N, C, D),
                         M);
    });
    // With the row products a step runs beside it: before the forward, the attention's
    // projection and ln2; after it, the head (logits, loss, the gradient at the last
    // layer's output); before the backward, the layer above's QKV input gradient.
    DeviceBuffer<float> ln2(resid_out.size()), resid_mid(resid_out.size()), dlnf(resid_out.size());
    DeviceBuffer<float> dresid_top(resid_out.size()), dresid(resid_out.size()), logits(static_cast<size_t>(rows) * V);
    const k::RowProduct proj = k::add_layernorm_product(ln2.data(), mean, rstd, resid_mid.data(), x.data(), w.data(),
                                                        bias.data(), x.data(), bias.data(), bias.data(), N, C, C);
    const k::RowProduct head[] = {
        k::crossentropy_product(row_loss.data(), logits.data(), next_ln.data(), w.data(), tokens.data(), N, C, V, true),
        k::backward_input_layernorm_product(dlnf.data(), dresid_top.data(), nullptr, logits.data(), w.data(),
                                            resid_out.data(), bias.data(), mean, rstd, N, C, V)};
    const k::RowProduct qkv_input = k::backward_input_layernorm_product(
        dlnf.data(), dresid.data(), x.data(), x.data(), w.data(), x.data(), bias.data(), mean, rstd, N, C, 3 * C);
    k::MlpSublayer forward = mlp, backward = mlp;
    forward.ln2 = ln2.data(), forward.resid_mid = resid_mid.data(), forward.before = &proj;
    forward.after = head, forward.after_count = 2;
    backward.dresid_out = dresid.data(), backward.before = &qkv_input;
    const double staged_bytes = bytes + (6 * rows * C + 2 * rows * V + 2.0 * M * C * (C + V)) * f;
    const double forward_flops = flops + 2 * rows * C * (C + 2.0 * V), backward_flops = flops + 6 * rows * C * C;
    add("mlp_forward with projection and head", staged_bytes, forward_flops, [&] { k::mlp_forward(h, forward, M); });
    add("apart: projection, mlp_forward, head", staged_bytes, forward_flops, [&] {
      k::run_row_product(h, proj, M);
      k::mlp_forward(h, mlp, M);
      for (const auto& p : head) k::run_row_product(h, p, M);
    });
    // below the last layer: the next layer's QKV product after it in place of the head
    DeviceBuffer<float> next_qkv(static_cast<size_t>(rows) * 3 * C);
    const k::RowProduct qkv_product = k::linear_product(next_qkv.data(), next_ln.data(), w.data(), N, C, 3 * C);
    k::MlpSublayer forward_qkv = forward;
    forward_qkv.after = &qkv_product, forward_qkv.after_count = 1;
    const double qkv_bytes = bytes + (6 * rows * C + double(M) * C * C + 4 * rows * C + 3.0 * M * C * C) * f;
    const double qkv_flops = flops + 2 * rows * C * C + 6 * rows * C * C;
    add("mlp_forward with projection and next QKV", qkv_bytes, qkv_flops, [&] { k::mlp_forward(h, forward_qkv, M); });
    add("apart: projection, mlp_forward, next QKV", qkv_bytes, qkv_flops, [&] {
      k::run_row_product(h, proj, M);
      k::mlp_forward(h, mlp, M);
      k::run_row_product(h, qkv_product, M);
    });
    add("mlp_backward with QKV input gradient", staged_bytes, backward_flops, [&] { k::mlp_backward(h, backward, M); });
    add("apart: QKV input gradient, mlp_backward", staged_bytes, backward_flops, [&] {
      k::run_row_product(h, qkv_input, M);
      k::mlp_backward(h, mlp, M);
    });
    // and after it the attention's projection's input gradient, as a step runs it
    const k::RowProduct proj_input = k::backward_input_product(dlnf.data(), next_ln.data(), w.data(), N, C, C);
    k::MlpSublayer backward_both = backward;
    backward_both.after = &proj_input, backward_both.after_count = 1;
    const double both_bytes = staged_bytes + (2 * rows * C + double(M) * C * C) * f;
    const double both_flops = backward_flops + 2 * rows * C * C;
    add("mlp_backward with QKV and projection input gradients", both_bytes, both_flops,
        [&] { k::mlp_backward(h, backward_both, M); });
    add("apart: QKV input gradient, mlp_backward, projection input gradient", both_bytes, both_flops, [&] {
      k::run_row_product(h, qkv_input, M);
      k::mlp_backward(h, mlp, M);
      k::run_row_product(h, proj_input, M);
    });
  }
  {
    const double bytes = (rows * C + 2 * rows * V + double(M) * V * C) * f, flops = 2 * rows * C * V + rows * V * 6;
    add("crossentropy_product", bytes, flops, [&] {
      k::run_row_product(
          h, k::crossentropy_product(row_loss.data(), y.data(), x.data(), w.data(), tokens.data(), N, C, V, true), M);
    });
    add("apart: matmul_forward + crossentropy_forward_backward", bytes, flops, [&] {
      k::matmul_forward(h, y.data(), x.data(), w.data(), M, N, C, V);
      k::crossentropy_forward_backward(row_loss.data(), y.data(), tokens.data(), M, N, V, true, s);
    });
  }
  add("bias_activation_forward", rows * D * f * 3, rows * D * 4,
      [&] { k::bias_activation_forward(x.data(), y.data(), bias.data(), M, N, D, k::Act::gelu, s); });
  add("bias_activation_backward", rows * D * f * 3, rows * D * 8,
      [&] {
        k::bias_activation_backward(y.data(), dbias.data(), sums, x.data(), x.data(), M, N, D, k::Act::gelu, s);
        sums.finish(s);
      });
  const double att_flops = double(M) * B * H * T * T * (C / H) * 2;  // causal: half of 2 products
  add("attention_forward", (rows * 4 * C + double(M) * B * H * T * T) * f, att_flops,
      [&] { k::attention_forward(y.data(), att.data(), x.data(), bias.data(), M, B, T, C, H, s); });
  add("attention_backward", (rows * 8 * C + double(M) * B * H * T * T) * f, 2 * att_flops,
      [&] { k::attention_backward(y.data(), x.data(), x.data(), x.data(), bias.data(), att.data(), M, B, T, C, H, s); });
  for (const bool tf32 : {false, true}) {  // flash attention's way, in float32 and on the tensor cores
    const std::string suffix = tf32 ? "_flash_tf32" : "_flash";
    if (k::attention_flash_fits(T, C, H, false, tf32))
      add("attention_forward" + suffix, (rows * 4 * C + double(M) * B * H * T * T) * f, att_flops, [&] {
        k::attention_forward_flash(y.data(), att.data(), nullptr, x.data(), bias.data(), M, B, T, C, H, tf32, s);
      });
    if (k::attention_flash_fits(T, C, H, true, tf32))
      add("attention_backward" + suffix, (rows * 8 * C + double(M) * B * H * T * T) * f, 2 * att_flops, [&] {
        k::attention_backward_flash(y.data(), x.data(), x.data(), x.data(), bias.data(), att.data(), nullptr, M, B, T,
                                    C, H, tf32, s);
      });
    if (k::attention_flash_recomputes(T, C, H, tf32)) {  // no T x T matrix through memory
      add("attention_forward" + suffix + " keeping lse", rows * 4 * C * f, att_flops, [&] {
        k::attention_forward_flash(y.data(), nullptr, lse.data(), x.data(), bias.data(), M, B, T, C, H, tf32, s);
      });
      add("attention_backward" + suffix + " from lse", rows * 8 * C * f, 3 * att_flops, [&] {
        k::attention_backward_flash(y.data(), x.data(), x.data(), x.data(), bias.data(), nullptr, lse.data(), M, B, T,
                                    C, H, tf32, s);
      });
    }
  }
  {  // the attention with its products: one kernel each way where a sequence is one chunk
    auto qkv = random_device(size_t(rows) * 3 * C, s), dqkv = random_device(size_t(rows) * 3 * C, s);
    k::AttentionWithProducts a{};
    a.ln = a.dproj = x.data(), a.qkv_w = a.proj_w = w.data(), a.qkv_b = bias.data(), a.qkv = qkv.data();
    a.att = att.data(), a.out = y.data(), a.datty = post.data(), a.dqkv = dqkv.data(), a.for_backward = true;
    a.B = B, a.T = T, a.C = C, a.H = H;
    const double qkv_flops = 2 * rows * C * 3 * C, proj_flops = 2 * rows * C * C;
    add("attention_forward_with_products", (rows * 8 * C + double(M) * (B * H * T * T + 3 * C * C)) * f,
        att_flops + qkv_flops, [&] { k::attention_forward_with_products(h, a, M); });
    add("apart: matmul_forward qkv + attention_forward", (rows * 8 * C + double(M) * (B * H * T * T + 3 * C * C)) * f,
        att_flops + qkv_flops, [&] {
          k::matmul_forward(h, a.qkv, a.ln, a.qkv_w, M, N, C, 3 * C);
          k::attention_forward(a.out, a.att, a.qkv, a.qkv_b, M, B, T, C, H, s);
        });
    add("attention_backward_with_products", (rows * 9 * C + double(M) * (B * H * T * T + C * C)) * f,
        2 * att_flops + proj_flops, [&] { k::attention_backward_with_products(h, a, M); });
    add("apart: matmul_backward_input proj + attention_backward",
        (rows * 9 * C + double(M) * (B * H * T * T + C * C)) * f, 2 * att_flops + proj_flops, [&] {
          k::matmul_backward_input(h, a.datty, a.dproj, a.proj_w, M, N, C, C);
          k::attention_backward(a.dqkv, a.datty, a.out, a.qkv, a.qkv_b, a.att, M, B, T, C, H, s);
        });
    k::AttentionWithProducts on_tensor_cores = a;  // what --precision tf32 runs
    on_tensor_cores.tf32 = true, on_tensor_cores.lse = lse.data();
    if (k::attention_flash_fits(T, C, H, false, true))
      add("tf32: attention_forward_with_products", (rows * 8 * C + double(M) * (B * H * T * T + 3 * C * C)) * f,
          att_flops + qkv_flops, [&] { k::attention_forward_with_products(h_tf32, on_tensor_cores, M); });
    if (k::attention_flash_fits(T, C, H, true, true))
      add("tf32: attention_backward_with_products", (rows * 9 * C + double(M) * (B * H * T * T + C * C)) * f,
          2 * att_flops + proj_flops, [&] { k::attention_backward_with_products(h_tf32, on_tensor_cores, M); });
  }
  if (k::block_forward_fits(T, C, H, D)) {  // outputs share buffers: timing only
    k::BlockForward fb{};
    fb.resid_in = x.data(), fb.tokens = tokens.data(), fb.wte = w.data(), fb.pos = pos.data();
    fb.ln1_w = fb.ln1_b = fb.ln2_w = fb.ln2_b = fb.qkv_b = fb.proj_b = fb.fc_b = fb.out_b = bias.data();
    fb.qkv_w = fb.proj_w = fb.fc_w = fb.out_w = w.data();
    fb.ln1 = fb.qkv = fb.atty = fb.resid_mid = fb.ln2 = fb.resid_out = y.data();
    fb.ln1_mean = fb.ln2_mean = stats.data(), fb.ln1_rstd = fb.ln2_rstd = stats.data() + size_t(rows);
    fb.att = att.data(), fb.pre = fb.post = post.data();
    fb.B = B, fb.T = T, fb.C = C, fb.H = H, fb.D = D, fb.V = V, fb.scale = k::attention_scale(C / H), fb.act = k::Act::gelu;
    const double weights = double(M) * (4.0 * C * C + 2.0 * C * D);
    add("block_forward (fused layer)", (rows * (8 * C + 2 * D) + weights + double(M) * B * H * T * T) * f,
        2 * rows * (4.0 * C * C + 2.0 * C * D) + att_flops, [&] { k::block_forward(fb, M, s); });
    if (k::block_backward_fits(T, C, H, D)) {
      k::BlockBackward bb{};
      bb.dresid_out = bb.resid_in = bb.resid_mid = x.data(), bb.qkv = x.data(), bb.pre = post.data();
      bb.ln1_mean = bb.ln2_mean = stats.data(), bb.ln1_rstd = bb.ln2_rstd = stats.data() + size_t(rows);
      bb.att = att.data(), bb.ln1_w = bb.ln2_w = bias.data(), bb.qkv_w = bb.proj_w = bb.fc_w = bb.out_w = w.data();
      bb.dpre = bb.dln2 = bb.dresid_mid = bb.dqkv = bb.dln1 = bb.dresid_in = y.data();
      float* shares = y.data();  // [M, B, columns] each: room in y (rows x max(3C, D))
      bb.sums = {shares, shares, shares, shares, shares, shares, shares, shares};
      bb.B = B, bb.T = T, bb.C = C, bb.H = H, bb.D = D, bb.scale = fb.scale, bb.act = k::Act::gelu;
      add("block_backward (fused layer, input gradients, bias and norm sums)",
          (rows * (10 * C + 2 * D) + weights + double(M) * B * H * T * T) * f,
          2 * rows * (4.0 * C * C + 2.0 * C * D) + 2 * att_flops, [&] { k::block_backward(bb, M, s); });
    }
  }
  add("crossentropy_forward_backward", rows * V * f * 2, rows * V * 6, [&] {
    k::crossentropy_forward_backward(row_loss.data(), y.data(), tokens.data(), M, N, V, true, s);
    k::mean_loss_per_model(losses.data(), row_loss.data(), M, N, s);
  });
  return out;
}

// A backend for rc with its models' initial parameters, and `steps` steps' tokens.
struct BenchBackend {
  std::unique_ptr<univ::TrainBackend> backend;
  std::vector<int32_t> tokens;
  size_t per_step;
};
BenchBackend bench_backend(const univ::RunConfig& rc, univ::Precision precision, int steps, univ::CudaFusion fusion,
                           univ::CudaLaunch launch) {
  BenchBackend b{univ::make_backend(univ::Device::cuda, rc, precision, fusion, launch), {},
                 size_t(rc.models) * rc.batch * rc.model.seq_len};
  const univ::ParamLayout layout(rc.model, rc.models);
  univ::TrainState s{std::vector<float>(layout.total()), std::vector<float>(layout.total()),
                     std::vector<float>(layout.total()), 0};
  univ::init_parameters(layout, rc.model, rc.seeds, s.params.data());
  b.backend->set_state(s);
  b.tokens.resize(b.per_step * steps);
  for (size_t i = 0; i < b.tokens.size(); ++i) b.tokens[i] = static_cast<int32_t>(i * 31 % rc.model.vocab);
  return b;
}

// Milliseconds per training step of the whole backend: one step() at a time (its batch
// up, the graph's replay, the wait), median of `steps`; or queued, `steps` of them in
// one steps() call (runs of replays without the host between them), the median of three
// such calls over `steps`.
double step_ms(const univ::RunConfig& rc, univ::Precision precision, int steps,
               univ::CudaFusion fusion = univ::CudaFusion::sublayers, bool queued = false,
               univ::CudaLaunch launch = univ::CudaLaunch::ordered) {
  auto [backend, tokens, per_step] = bench_backend(rc, precision, steps, fusion, launch);
  const std::vector<double> lr(steps, 1e-4);
  for (int i = 0; i < 10; ++i) backend->step(tokens.data(), tokens.data(), 1e-4);  // capture, warm-up
  std::vector<double> ms;
  for (int i = 0; i < (queued ? 3 : steps); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    if (queued)
      backend->steps(tokens.data(), tokens.data(), lr.data(), steps);
    else
      backend->step(tokens.data() + per_step * i, tokens.data() + per_step * i, 1e-4);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
                 (queued ? steps : 1));
  }
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return ms[ms.size() / 2];
}

// --timeline: `steps` queued steps kernel by kernel after a warm-up run, and the step of
// median span described (univ::describe_step).
void print_timeline(univ::KernelTrace& trace, const std::string& name, const univ::RunConfig& rc,
                    univ::Precision precision, univ::CudaLaunch launch, int steps) {
  auto [backend, tokens, per_step] = bench_backend(rc, precision, steps, univ::CudaFusion::sublayers, launch);
  const std::vector<double> lr(steps, 1e-4);
  backend->steps(tokens.data(), tokens.data(), lr.data(), steps);  // capture, warm-up
  trace.take();
  backend->steps(tokens.data(), tokens.data(), lr.data(), steps);
  std::vector<univ::StepTimeline> timelines =
      univ::step_timelines(trace.take(), "load_queued_step_kernel", launch == univ::CudaLaunch::chained);
  std::printf("\n== %s, %s, queued, %s: %zu steps traced\n", name.c_str(), univ::to_string(precision).c_str(),
              launch == univ::CudaLaunch::chained ? "chained" : "ordered", timelines.size());
  if (timelines.empty()) return;
  std::sort(timelines.begin(), timelines.end(),
            [](const univ::StepTimeline& a, const univ::StepTimeline& b) { return a.span_us < b.span_us; });
  std::printf("spans %.1f / %.1f / %.1f us (least, median, most); the median step:\n%s", timelines.front().span_us,
              timelines[timelines.size() / 2].span_us, timelines.back().span_us,
              univ::describe_step(timelines[timelines.size() / 2]).c_str());
}

univ::RunConfig seed_config() {
  univ::RunConfig c;
  c.model = {64, 32, 64, 4, 256, 2, univ::Activation::relu, univ::PosEncoding::learned};
  c.models = 2;
  c.seeds = {0, 1};
  c.batch = 64;
  return c;
}

univ::RunConfig large_config() {
  univ::RunConfig c;
  c.model = {256, 128, 256, 8, 1024, 4, univ::Activation::relu, univ::PosEncoding::learned};
  c.models = 1;
  c.seeds = {0};
  c.batch = 64;
  return c;
}

// Accuracy of the GPU statistics: 2 models of 64 neurons and 16901 tokens whose means
// are about a thousand standard deviations (correlated through 4 shared latents), on
// the device once, and their correlations from the CPU path's float64 statistics
// (exact shifted values in float64: the reference).
class StatisticsAccuracy {
 public:
  StatisticsAccuracy() {
    const int latents = 4;
    std::mt19937_64 rng(12);
    std::normal_distribution<double> normal;
    std::vector<double> loading(size_t(2) * kNeurons * latents);
    for (double& w : loading) w = normal(rng);
    std::vector<std::vector<float>> acts(2, std::vector<float>(size_t(kTokens) * kNeurons));
    for (int64_t t = 0; t < kTokens; ++t) {
      double z[latents];
      for (double& v : z) v = normal(rng);
      for (int m = 0; m < 2; ++m)
        for (int k = 0; k < kNeurons; ++k) {
          double x = 2000.0 * (1 + k % 7) + 0.5 * normal(rng);
          for (int j = 0; j < latents; ++j) x += loading[(size_t(m) * kNeurons + k) * latents + j] * z[j];
          acts[m][t * kNeurons + k] = static_cast<float>(x);
        }
    }
    univ::CpuStatsAccumulator cpu({kShape, kShape});
    cpu.add({acts[0].data(), acts[1].data()}, kTokens);
    reference_ = univ::correlation_matrix(cpu.stats(), 0, 1);
    for (const auto& x : acts) {
      device_.emplace_back(x.size());
      device_.back().upload(x.data(), x.size(), nullptr);
    }
    UNIV_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // The worst |r - r_reference| with `split` parts and float32 sums over `span` tokens,
  // the tokens added in chunks of 8192.
  double worst_error(univ::SplitPrecision split, int64_t span) const {
    univ::CudaStatsAccumulator acc({kShape, kShape}, span, split);
    for (int64_t t0 = 0; t0 < kTokens; t0 += 8192) {
      const int64_t len = std::min<int64_t>(8192, kTokens - t0);
      acc.add({device_[0].data() + t0 * kNeurons, device_[1].data() + t0 * kNeurons}, len);
    }
    const std::vector<double> r = univ::correlation_matrix(acc.stats(), 0, 1);
    double worst = 0;
    for (size_t k = 0; k < r.size(); ++k) worst = std::max(worst, std::abs(r[k] - reference_[k]));
    return worst;
  }

 private:
  static constexpr int kNeurons = 64;
  static constexpr int64_t kTokens = 4 * 4096 + 517;
  static constexpr univ::NeuronShape kShape{1, kNeurons};
  std::vector<double> reference_;
  std::vector<DeviceBuffer<float>> device_;
};

// The correlation engine on 2 models of 16 layers x 256 neurons (4096 x 4096 cross
// block, and the within-layer blocks): one chunk of 16384 tokens through
// CudaStatsAccumulator (column sums, split co-moments, float64 masters), median of
// several, projected to 1M tokens, with the default (FP16 split, float32 sums over
// spans of 1024 tokens, 16 spans per float64 pass) and with other splits, spans and
// groups, each beside its accuracy (StatisticsAccuracy); beside them cuBLAS's plain A^T
// B on the same chunk (fp32 and TF32, no shift, float32 result), the product a
// framework would call.
nlohmann::json correlation(Bench& b, cublasHandle_t fp32, cublasHandle_t tf32) {
  const univ::NeuronShape shape{16, 256};
  const int N = static_cast<int>(shape.neurons()), chunk = 16384;
  const int64_t tokens = int64_t(1) << 20;
  const cudaStream_t s = b.stream.get();
  auto a = random_device(size_t(chunk) * N, s), x = random_device(size_t(chunk) * N, s, 2.0f);
  b.stream.synchronize();
  // Median ms of one chunk through an accumulator with float32 spans of `span` tokens,
  // spans_per_pass of them per float64 pass (0: the default).
  auto chunk_ms = [&](int64_t span, univ::SplitPrecision split, int spans_per_pass) {
    univ::CudaStatsAccumulator acc({shape, shape}, span, split, spans_per_pass);
    std::vector<double> ms;
    for (int i = 0; i < 6; ++i) {  // the first add sets the shift and warms up
      const auto t0 = std::chrono::steady_clock::now();
      acc.add({a.data(), x.data()}, chunk);
      acc.synchronize();
      if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
    return ms[ms.size() / 2];
  };
  const double chunks = double(tokens) / chunk;
  nlohmann::json variants = nlohmann::json::array();
  const StatisticsAccuracy accuracy;
  for (const auto split : {univ::SplitPrecision::f16, univ::SplitPrecision::tf32})
    for (int64_t span : {int64_t(512), int64_t(1024), int64_t(2048), int64_t(4096)}) {
      const double error = accuracy.worst_error(split, span);
      for (int spans_per_pass : {1, 8, 16})
        variants.push_back({{"split", split == univ::SplitPrecision::f16 ? "fp16" : "tf32"},
                            {"span", span},
                            {"spans_per_pass", spans_per_pass},
                            {"worst_r_error", error},
                            {"projected_ms", chunk_ms(span, split, spans_per_pass) * chunks}});
    }
  const double default_ms = chunk_ms(0, univ::SplitPrecision::f16, 0);
  DeviceBuffer<float> product(size_t(N) * N);
  const float one = 1, zero = 0;
  const int saved = b.repeats;
  b.repeats = 10;
  auto gemm_ms = [&](cublasHandle_t h) {
    return b.time_ms([&] {
      UNIV_CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, N, N, chunk, &one, x.data(), N, a.data(), N, &zero,
                                    product.data(), N));
    });
  };
  const double sgemm_ms = gemm_ms(fp32), tf32_ms = gemm_ms(tf32);
  b.repeats = saved;
  return {{"neurons", N},
          {"tokens", tokens},
          {"chunk_tokens", chunk},
          {"span", univ::cuda::kComomentSpan},
          {"chunk_ms", default_ms},
          {"projected_ms", default_ms * chunks},
          {"cross_block_TFLOPs", 2.0 * N * N * chunk / default_ms / 1e9},
          {"variants", variants},
          {"cublas_sgemm_fp32_projected_ms", sgemm_ms * chunks},
          {"cublas_sgemm_tf32_projected_ms", tf32_ms * chunks}};
}

// The seed experiment's correlation step in process, after one untimed run (CUDA and
// cuBLAS start-up): 2 freshly initialised seed models, forward over the 32,000 tokens
// of the test split with the statistics on the GPU, the rotations drawn meanwhile (as
// correlate does), then the analysis (index matching, 8 baseline + 8 null draws) with
// the rotation baseline on the GPU; median of several. Beside it the same analysis on
// this host's CPU, the forward and statistics phase by phase, and the Haar kernels alone.
nlohmann::json correlation_step(Bench& b) {
  std::vector<univ::LoadedModel> models(2);
  for (int m = 0; m < 2; ++m) {
    univ::RunConfig rc = seed_config();
    rc.models = 1;
    rc.seeds = {uint64_t(m)};
    const univ::ParamLayout layout(rc.model, 1);
    models[m].checkpoint.run = rc;
    models[m].checkpoint.params.resize(layout.total());
    univ::init_parameters(layout, rc.model, rc.seeds, models[m].checkpoint.params.data());
  }
  const int batch = 512;
  const univ::HeldOutTokens tokens = univ::held_out_tokens(models[0], std::nullopt, 0, {}, batch);
  univ::AnalysisOptions o;
  o.device = univ::Device::cuda;
  auto ms_since = [](std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  auto median = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  std::vector<double> forward_ms, analysis_ms, total_ms;
  univ::CorrelationStats stats;
  for (int i = 0; i < 6; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const univ::PreparedRotations rotations({models[0].shape(), models[1].shape()}, o);  // drawn while streaming
    stats = univ::stream_statistics(models, tokens, univ::Site::pre, batch, {}, univ::Device::cuda).stats;
    const auto t1 = std::chrono::steady_clock::now();
    univ::analyze(stats, o, {}, &rotations);
    if (i == 0) continue;  // start-up
    forward_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    analysis_ms.push_back(ms_since(t1));
    total_ms.push_back(ms_since(t0));
  }
  // Forward and statistics phase by phase, as stream_statistics runs them: making the
  // two forward networks, then the accumulator, the forward passes (side by side), the
  // accumulator's adds (waited for), stats(), and releasing the accumulator, then the
  // networks; with the networks' kernels by sublayers (correlate's), and, phases
  // suffixed _ops and _blocks, by op and by transformer block.
  std::map<std::string, std::vector<double>> phase_ms;
  for (const auto fusion : {univ::CudaFusion::sublayers, univ::CudaFusion::ops, univ::CudaFusion::blocks})
    for (int i = 0; i < 5; ++i) {
      std::map<std::string, double> ms;
      auto t = std::chrono::steady_clock::now();
      auto lap = [&](const std::string& phase) {
        ms[phase + (fusion == univ::CudaFusion::sublayers ? "" : "_" + univ::to_string(fusion))] += ms_since(t);
        t = std::chrono::steady_clock::now();
      };
      auto nets = std::make_unique<std::vector<std::unique_ptr<univ::DeviceForward>>>();
      std::vector<DeviceBuffer<float>> acts;
      for (const auto& m : models) {
        univ::RunConfig config = m.checkpoint.run;
        config.batch = batch;
        nets->push_back(univ::make_device_forward(config, m.checkpoint.params, fusion));
        acts.emplace_back(size_t(batch) * config.model.seq_len * m.shape().neurons());
      }
      lap("setup_networks");
      auto acc = std::make_unique<univ::CudaStatsAccumulator>(std::vector{models[0].shape(), models[1].shape()});
      acc->synchronize();
      lap("setup_accumulator");
      univ::for_each_batch(tokens, batch, models[0].checkpoint.run.model.seq_len,
                           [&](const int32_t* inputs, const int32_t* targets, int rows, int64_t n) {
                             for (int m = 0; m < 2; ++m) (*nets)[m]->start(inputs, targets, rows, false, acts[m].data(), n);
                             for (int m = 0; m < 2; ++m) (*nets)[m]->finish();
                             lap("forward");
                             acc->add({acts[0].data(), acts[1].data()}, n);
                             acc->synchronize();
                             lap("statistics");
                           });
      acc->stats();
      lap("stats_download");
      acc.reset();
      lap("release_accumulator");
      acts.clear();
      nets.reset();
      lap("release_networks");
      for (const auto& [phase, value] : ms) phase_ms[phase].push_back(value);
    }
  nlohmann::json phases;
  for (const auto& [phase, values] : phase_ms) phases[phase] = median(values);
  o.device = univ::Device::cpu;
  const auto t_cpu = std::chrono::steady_clock::now();
  univ::analyze(stats, o);
  const double cpu_analysis_ms = ms_since(t_cpu);

  const univ::NeuronShape shape = models[0].shape();
  const int draws = o.baseline_draws + o.null_draws, batch_q = draws * shape.layers;
  DeviceBuffer<double> q(size_t(batch_q) * shape.width * shape.width), work(q.size());
  DeviceBuffer<uint64_t> streams(batch_q);
  std::vector<uint64_t> ids(batch_q);
  for (int i = 0; i < batch_q; ++i) ids[i] = univ::rng_stream(univ::RngPurpose::rotation, 1, uint32_t(i));
  streams.upload(ids.data(), ids.size(), b.stream.get());
  const int saved = b.repeats;
  b.repeats = 10;
  const double haar_ms = b.time_ms([&] {
    univ::cuda::gaussian_matrices(work.data(), streams.data(), 0, shape.width, batch_q, b.stream.get());
    univ::cuda::haar_q_batched(q.data(), work.data(), shape.width, batch_q, b.stream.get());
  });
  b.repeats = saved;
  return {{"tokens", tokens.tokens},
          {"neurons_per_model", shape.neurons()},
          {"draws", draws},
          {"forward_and_statistics_ms", median(forward_ms)},
          {"forward_and_statistics_phases_ms", phases},
          {"analysis_ms", median(analysis_ms)},
          {"step_ms", median(total_ms)},
          {"analysis_cpu_ms", cpu_analysis_ms},
          {"haar_matrices", batch_q},
          {"haar_width", shape.width},
          {"haar_ms", haar_ms}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_kernels: times the CUDA kernels and training steps against the card's copy bandwidth and "
               "GEMM rate"};
  std::string json;
  int repeats = 50, steps = 200;
  bool timeline = false;
  app.add_option("--json", json, "also write the results to this file as one JSON object");
  app.add_flag("--timeline", timeline,
               "instead: record every kernel of 30 queued training steps per configuration (CUPTI) and print the "
               "median step's span, each stream's busy time, the chain of kernels that bounded it with the gaps "
               "between them, and the time per kernel");
  app.add_option("--repeats", repeats, "timed launches per kernel (median reported)")->capture_default_str();
  app.add_option("--steps", steps, "timed training steps per configuration")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    if (univ::cuda_device_count() == 0) throw univ::UserError("no CUDA device is available");
    univ::cuda::prepare_attention_kernels();
    univ::cuda::prepare_mlp_kernels();
    univ::cuda::prepare_block_kernels();
    if (timeline) {
      univ::KernelTrace trace;
      for (const auto& [name, rc] :
           {std::pair{"seed (2 models)", seed_config()}, std::pair{"large (1 model)", large_config()}})
        for (const univ::Precision precision : {univ::Precision::fp32, univ::Precision::tf32})
          for (const univ::CudaLaunch launch : {univ::CudaLaunch::ordered, univ::CudaLaunch::chained})
            print_timeline(trace, name, rc, precision, launch, 30);
      return 0;
    }
    Bench b;
    b.repeats = repeats;
    univ::cuda::CublasHandle fp32(b.stream.get(), false), tf32(b.stream.get(), true);
    nlohmann::json report{{"device", univ::cuda::device_description(0)}, {"ceilings", ceilings(b, fp32.get(), tf32.get())}};
    for (const auto& [name, rc] : {std::pair{"seed (2 models)", seed_config()}, std::pair{"large (1 model)", large_config()}}) {
      nlohmann::json kernels = nlohmann::json::array();
      for (const Row& r : kernel_rows(b, fp32.get(), tf32.get(), rc))
        kernels.push_back({{"kernel", r.name}, {"ms", r.ms}, {"GBps", r.bytes / r.ms / 1e6}, {"GFLOPs", r.flops / r.ms / 1e6}});
      report["configs"].push_back({{"config", name},
                                   {"kernels", kernels},
                                   {"step_ms_fp32", step_ms(rc, univ::Precision::fp32, steps)},
                                   {"step_ms_tf32", step_ms(rc, univ::Precision::tf32, steps)},
                                   {"queued_step_ms_fp32", step_ms(rc, univ::Precision::fp32, steps,
                                                                   univ::CudaFusion::sublayers, true)},
                                   {"queued_step_ms_tf32", step_ms(rc, univ::Precision::tf32, steps,
                                                                   univ::CudaFusion::sublayers, true)},
                                   {"queued_step_ms_fp32_chained",
                                    step_ms(rc, univ::Precision::fp32, steps, univ::CudaFusion::sublayers, true,
                                            univ::CudaLaunch::chained)},
                                   {"queued_step_ms_tf32_chained",
                                    step_ms(rc, univ::Precision::tf32, steps, univ::CudaFusion::sublayers, true,
                                            univ::CudaLaunch::chained)},
                                   {"step_ms_fp32_ops", step_ms(rc, univ::Precision::fp32, steps,
                                                                univ::CudaFusion::ops)},
                                   {"queued_step_ms_fp32_ops", step_ms(rc, univ::Precision::fp32, steps,
                                                                       univ::CudaFusion::ops, true)},
                                   {"queued_step_ms_tf32_ops", step_ms(rc, univ::Precision::tf32, steps,
                                                                       univ::CudaFusion::ops, true)},
                                   {"step_ms_fp32_blocks", step_ms(rc, univ::Precision::fp32, steps,
                                                                   univ::CudaFusion::blocks)}});
    }
    report["correlation"] = correlation(b, fp32.get(), tf32.get());
    report["correlation_step"] = correlation_step(b);
    if (!json.empty()) {
      std::ofstream file(json);
      file << report.dump(2) << '\n';
      if (!file) throw univ::UserError("cannot write " + json);
    }
    const auto& cl = report["ceilings"];
    std::printf("%s\ncopy %.0f GB/s, SGEMM %.1f TFLOP/s fp32, %.1f TFLOP/s tf32\n",
                report["device"].get<std::string>().c_str(), cl["copy_GBps"].get<double>(),
                cl["sgemm_fp32_TFLOPs"].get<double>(), cl["sgemm_tf32_TFLOPs"].get<double>());
    for (const auto& cfg : report["configs"]) {
      std::printf("\n%s: training step %.3f ms fp32, %.3f ms tf32; queued %.3f ms fp32, %.3f ms tf32, kernels "
                  "chained %.3f ms fp32, %.3f ms tf32 (fp32 with a launch per op: %.3f ms, with a kernel per block: "
                  "%.3f ms)\n",
                  cfg["config"].get<std::string>().c_str(), cfg["step_ms_fp32"].get<double>(),
                  cfg["step_ms_tf32"].get<double>(), cfg["queued_step_ms_fp32"].get<double>(),
                  cfg["queued_step_ms_tf32"].get<double>(), cfg["queued_step_ms_fp32_chained"].get<double>(),
                  cfg["queued_step_ms_tf32_chained"].get<double>(), cfg["step_ms_fp32_ops"].get<double>(),
                  cfg["step_ms_fp32_blocks"].get<double>());
      std::printf("  %-30s %10s %10s %10s\n", "kernel", "us", "GB/s", "GFLOP/s");
      for (const auto& k : cfg["kernels"])
        std::printf("  %-30s %10.1f %10.1f %10.1f\n", k["kernel"].get<std::string>().c_str(),
                    k["ms"].get<double>() * 1000, k["GBps"].get<double>(), k["GFLOPs"].get<double>());
    }
    const auto& c = report["correlation"];
    std::printf("\ncorrelation statistics, 2 x %d neurons over %lld tokens (chunks of %d): %.1f ms (cross block "
                "%.1f TFLOP/s useful); cuBLAS A^T B alone: %.1f ms fp32, %.1f ms TF32\n",
                c["neurons"].get<int>(), static_cast<long long>(c["tokens"].get<int64_t>()),
                c["chunk_tokens"].get<int>(), c["projected_ms"].get<double>(), c["cross_block_TFLOPs"].get<double>(),
                c["cublas_sgemm_fp32_projected_ms"].get<double>(), c["cublas_sgemm_tf32_projected_ms"].get<double>());
    for (const auto& v : c["variants"])
      std::printf("  %s split, float32 sums over %lld tokens, %d per float64 pass: %.1f ms, worst |dr| %.1e\n",
                  v["split"].get<std::string>().c_str(), static_cast<long long>(v["span"].get<int64_t>()),
                  v["spans_per_pass"].get<int>(), v["projected_ms"].get<double>(), v["worst_r_error"].get<double>());
    const auto& r = report["correlation_step"];
    std::printf("seed correlation step, 2 x %d neurons over %lld tokens, %d draws each way: %.1f ms (forward and "
                "statistics %.1f ms, analysis %.1f ms; the analysis on this host's CPU %.1f ms); %d Haar matrices of "
                "%d: %.2f ms\n  forward and statistics by phase (ms):",
                r["neurons_per_model"].get<int>(), static_cast<long long>(r["tokens"].get<int64_t>()),
                r["draws"].get<int>(), r["step_ms"].get<double>(), r["forward_and_statistics_ms"].get<double>(),
                r["analysis_ms"].get<double>(), r["analysis_cpu_ms"].get<double>(), r["haar_matrices"].get<int>(),
                r["haar_width"].get<int>(), r["haar_ms"].get<double>());
    for (const auto& [phase, value] : r["forward_and_statistics_phases_ms"].items())
      std::printf(" %s %.2f", phase.c_str(), value.get<double>());
    std::printf("\n");
  } catch (const std::exception& e) {  // a user's error, or CUPTI refusing the trace
    std::cerr << "bench_kernels: error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
