// CUDA device discovery (built only with CUDA).
#pragma once
#include <string>

namespace univ::cuda {

// Usable devices; 0 when there is no driver or no GPU (never throws).
int device_count();
// "NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)" for device `index`.
std::string device_description(int index);
// Makes device `index` the calling thread's current device; UserError when it fails.
void select_device(int index);

}  // namespace univ::cuda
