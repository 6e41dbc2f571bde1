// Host stand-in for cuda_bf16.h (NOTE: [CUDA emulator]): __nv_bfloat16 as its bits, converted by
// c10's own routines (round to nearest even, like __float2bfloat16_rn).
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

struct __nv_bfloat16 { uint16_t bits; };

inline float __bfloat162float(__nv_bfloat16 h) { return c10::detail::f32_from_bits(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::detail::round_to_nearest_even(f)}; }
