// Shared device helpers: element loads in fp32/fp64, block reductions, dtype dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include "launchers.h"

namespace adafisher {

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Load an input element into the accumulation type A (float or double).
template <typename A, typename T> __device__ __forceinline__ A load_as(const T* p, int64_t i) {
  return static_cast<A>(to_f<T>(p[i]));
}
template <> __device__ __forceinline__ double load_as<double, double>(const double* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float load_as<float, double>(const double* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The VB-byte word one thread loads at once: a vector, or one element (VB = sizeof(T)).
template <int VB> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };
template <typename T, int VB> union Word { typename VecOf<VB>::type u; T v[VB / sizeof(T)]; };

// The VB-byte word at p (p VB-byte aligned), one load.
template <typename T, int VB>
__device__ __forceinline__ Word<T, VB> load_word(const T* p) {
  Word<T, VB> w;
  w.u = *reinterpret_cast<const typename VecOf<VB>::type*>(p);
  return w;
}

// Warp-wide sum (all 32 lanes take part); every lane gets the result.
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum; every thread gets the result.  `sh` holds >= 32 entries.
template <typename A> __device__ A block_sum(A v, A* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  A r = 0;
  for (int i = 0; i < nw; ++i) r += sh[i];
  __syncthreads();
  return r;
}

template <typename A> __device__ A block_min(A v, A* sh) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  A r = sh[0];
  for (int i = 1; i < nw; ++i) r = min(r, sh[i]);
  __syncthreads();
  return r;
}

template <typename A> __device__ A block_max(A v, A* sh) { return -block_min<A>(-v, sh); }

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a / b for 0 <= a and 0 < b: a 32-bit division where both fit (about a dozen instructions),
// the 64-bit one (a long subroutine) where not
__device__ __forceinline__ int64_t div_nonneg(int64_t a, int64_t b) {
  return a <= INT32_MAX && b <= INT32_MAX
             ? static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b))
             : a / b;
}

}  // namespace adafisher

// Dispatch helpers: bind `using T = ...` for an input dtype / `using A = ...` for an acc dtype.
#define AF_DISPATCH_IN(dt, T, ...)                                              \
  switch (dt) {                                                                 \
    case ::adafisher::DType::F16: { using T = __half; __VA_ARGS__; break; }     \
    case ::adafisher::DType::BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    case ::adafisher::DType::F32: { using T = float; __VA_ARGS__; break; }      \
    case ::adafisher::DType::F64: { using T = double; __VA_ARGS__; break; }     \
    default: return cudaErrorInvalidValue;                                      \
  }
#define AF_DISPATCH_ACC(dt, A, ...)                                             \
  switch (dt) {                                                                 \
    case ::adafisher::DType::F32: { using A = float; __VA_ARGS__; break; }      \
    case ::adafisher::DType::F64: { using A = double; __VA_ARGS__; break; }     \
    default: return cudaErrorInvalidValue;                                      \
  }
