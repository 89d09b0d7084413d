// Test helper for the PyTorch comparison: runs one batch (the run's first training
// batch) through every model of a checkpoint and writes inputs, targets, logits, losses
// and every parameter gradient to a safetensors file. With `cuda`, losses and gradients
// come from the CUDA backend (a step at learning rate 0); logits always from the CPU model.
//   dump_step RUN_DIR OUT.safetensors [cpu|cuda]
#include <cstdio>
#include <iostream>
#include <string>

#include "univ/backend.hpp"
#include "univ/checkpoint.hpp"
#include "univ/cpu/model.hpp"
#include "univ/data.hpp"
#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/safetensors.hpp"

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::cerr << "usage: dump_step RUN_DIR OUT.safetensors [cpu|cuda]\n";
    return 2;
  }
  try {
    const univ::LoadedCheckpoint ckpt = univ::load_checkpoint(argv[1]);
    const univ::RunConfig& c = ckpt.config;
    const univ::DataSource source = univ::open_data(c.data);
    const univ::DataSplits splits = univ::make_splits(source, c);
    univ::BatchSampler sampler(c, splits);
    const int M = c.models, B = c.batch, T = c.model.seq_len, V = c.model.vocab;
    std::vector<int32_t> inputs(int64_t(M) * B * T), targets(inputs.size());
    sampler.fill(0, inputs.data(), targets.data());

    univ::cpu::Model<float> model(c.model, M, B);
    model.params() = ckpt.state.params;
    std::vector<float> losses(M);
    model.forward(inputs.data(), targets.data(), B, losses.data(), true);
    model.backward();
    std::vector<float> grads = model.grads();
    if (argc == 4 && univ::resolve_device(argv[3]) == univ::Device::cuda) {
      auto backend = univ::make_backend(univ::Device::cuda, c);
      backend->set_state(ckpt.state);
      const univ::StepStats stats = backend->step(inputs.data(), targets.data(), 0.0);
      for (int m = 0; m < M; ++m) losses[m] = static_cast<float>(stats.loss[m]);
      grads = backend->gradients();
    }

    auto bytes = [](const auto* data, size_t n) {
      return std::string_view(reinterpret_cast<const char*>(data), n * sizeof(*data));
    };
    std::vector<univ::TensorBytes> tensors{
        {"inputs", "I32", {M, B, T}, bytes(inputs.data(), inputs.size())},
        {"targets", "I32", {M, B, T}, bytes(targets.data(), targets.size())},
        {"logits", "F32", {M, B, T, V}, bytes(model.logits(), size_t(M) * B * T * V)},
        {"loss", "F32", {M}, bytes(losses.data(), losses.size())}};
    for (const auto& t : model.layout().tensors())
      for (int m = 0; m < M; ++m) {
        tensors.push_back({"grad." + std::to_string(m) + "." + t.name, "F32", t.shape,
                           bytes(grads.data() + model.layout().offset(t, m), t.numel)});
      }
    univ::write_file_atomic(argv[2], univ::safetensors_bytes(tensors, {}));
  } catch (const univ::UserError& e) {
    std::cerr << "dump_step: error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
