// Host stand-in for cuda_fp16.h (NOTE: [CUDA emulator]): __half as its bits, conversions rounding
// to nearest even like __float2half_rn.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __half { uint16_t bits; };

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  float f;
  if (e == 0) {
    f = std::ldexp(static_cast<float>(m), -24);            // zero or subnormal
    return sign ? -f : f;
  }
  const uint32_t u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
  std::memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return {static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (x >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (x < 0x38800000u) {                                                 // below 2^-14: subnormal
    // |f| * 2^24 is exact; nearbyint rounds it to nearest even (1024 encodes the smallest normal)
    const float a = std::nearbyint(std::ldexp(std::fabs(f), 24));
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(a))};
  }
  x += 0xc8000fffu + ((x >> 13) & 1u);   // rebias the exponent (127 -> 15) and round to nearest even
  return {static_cast<uint16_t>(sign | (x >> 13))};
}
