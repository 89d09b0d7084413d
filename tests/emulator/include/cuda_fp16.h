// CUDA's half type and its conversions, emulated by the host compiler's IEEE binary16
// (_Float16: round to nearest even, as __float2half_rn).
#pragma once
using __half = _Float16;
inline __half __float2half_rn(float x) { return static_cast<__half>(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }
