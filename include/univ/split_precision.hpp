// The parts the GPU statistics split each shifted value into for their tensor-core
// products (kernels/comoment.cu). Plain C++17: shared by the kernels and the host.
#pragma once

namespace univ {

// TF32, or FP16 after a power-of-two scale per neuron (twice the TF32 rate; values may
// not grow more than about 1000-fold past the first chunk's).
enum class SplitPrecision { tf32, f16 };

}  // namespace univ
