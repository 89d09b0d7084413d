// Checks both backends' training loops pass: a NaN in a resumed run's weights stops
// training at its first step, with a message naming the tensor, and leaves the
// checkpoint as it was.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "univ/checkpoint.hpp"
#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/param_layout.hpp"
#include "univ/train.hpp"

namespace univ::testing {

// The checkpoint files of `models` models in dir, read whole.
inline std::vector<std::string> run_files(const std::filesystem::path& dir, int models) {
  std::vector<std::string> out;
  for (int m = 0; m < models; ++m) {
    out.push_back(read_file(model_file(dir, m)));
    out.push_back(read_file(optimizer_file(dir, m)));
  }
  return out;
}

// Trains o (2 models) for 5 steps, sets one value of model 1's `tensor` to NaN in the
// checkpoint, and resumes for 40 steps.
inline void expect_nan_stops_resumed_training(TrainOptions o, const std::string& tensor) {
  o.config.steps = 5;
  train(o, {});
  LoadedCheckpoint ckpt = load_checkpoint(o.out_dir);
  ckpt.config.steps = 40;
  const ParamLayout layout(ckpt.config.model, 2);
  ckpt.state.params[layout.offset(layout.at(tensor), 1)] = NAN;
  save_checkpoint(o.out_dir, ckpt.config, ckpt.data, ckpt.state);
  const std::vector<std::string> before = run_files(o.out_dir, 2);
  o.config = ckpt.config;
  o.resume = load_checkpoint(o.out_dir);
  try {
    train(o, {});
    FAIL() << "training went on past a NaN";
  } catch (const UserError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("at step 6: the loss of model 1 is"), std::string::npos) << what;  // nan, or -nan
    EXPECT_NE(what.find("its parameter " + tensor + " holds a non-finite value"), std::string::npos) << what;
    EXPECT_NE(what.find("the checkpoint of step 5"), std::string::npos) << what;
  }
  EXPECT_EQ(run_files(o.out_dir, 2), before);
}

}  // namespace univ::testing
