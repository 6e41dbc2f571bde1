// Host stand-in for cuda_fp16.h (NOTE: [CUDA emulator]): __half as its bits, converted by c10's own
// IEEE routines (round to nearest even, like __float2half_rn).
#pragma once
#include <c10/util/Half.h>

#include <cstdint>

struct __half { uint16_t bits; };

inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.bits); }
inline __half __float2half_rn(float f) { return {c10::detail::fp16_ieee_from_fp32_value(f)}; }
