// Host stand-in for the part of the CUDA runtime and device language that csrc/ uses, so that the
// unchanged kernels and bindings.cpp compile as C++ and run on the CPU (NOTE: [CUDA emulator] in
// emu.cpp; built by tests/cuda_emu.py, which rewrites `k<<<grid, block, smem, s>>>(args)` into
// `::af_emu::launch(k, grid, block, smem, s)(args)`).  Never part of the real extension.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// one block runs at a time (emu.cpp), so a function-local static is that block's shared memory
// (filled with 0xFF at each block's start: NOTE: [poisoned shared memory] in emu.cpp)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

// the running thread's coordinates, set by the scheduler before it resumes a thread
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace af_emu {
// (file, line): the call site, so that threads at two different barriers are told apart
void syncthreads(const char* file, int line);
int syncthreads_or(int predicate, const char* file, int line);
// value <- lane (lane ^ lane_mask)'s, both lanes in mask
void warp_exchange(void* value, size_t bytes, unsigned mask, int lane_mask, const char* file, int line);
void shared(void* p, size_t bytes);     // after each __shared__ declaration (NOTE: [poisoned shared memory])
using Thunk = void (*)(void*);
cudaError_t run_grid(dim3 grid, dim3 block, Thunk body, void* ctx, const void* kernel = nullptr);

// `kernel<<<grid, block, smem, stream>>>(args...)`: args convert to the kernel's parameter types
// once; every emulated thread calls the kernel with its own copies, as on the device.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  template <typename... Args>
  void operator()(Args&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
    auto call = [&] { std::apply(kernel, params); };
    run_grid(grid, block, [](void* c) { (*static_cast<decltype(call)*>(c))(); }, &call,
             reinterpret_cast<const void*>(kernel));
  }
};
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block};
}
}  // namespace af_emu

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  af_emu::syncthreads(file, line);
}
inline int __syncthreads_or(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return af_emu::syncthreads_or(predicate, file, line);
}
inline void __threadfence() {}   // one host thread: memory is always coherent
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  af_emu::warp_exchange(&v, sizeof(T), mask, lane_mask, file, line);
  return v;
}
// one host thread runs every emulated thread, so a read-modify-write cannot interleave
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
// built with -ffp-contract=off: a * b + c is never fused, as the _rn intrinsics promise
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
// the device's global math overloads
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::pow;
using std::sqrt;
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
