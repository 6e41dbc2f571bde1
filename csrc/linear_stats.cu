// linear_stats (reference.linear_stats): out[k] += scale * sum_{all indices but dim} f(x[..., k, ...]),
// f = square or identity.  x: fp16/bf16/fp32/fp64 viewed as contiguous (A, K, I); out: float32 or
// float64 (the flat buffer's dtype, also the accumulation type).  See NOTE: [column reduce].
#include <algorithm>
#include "reduce.cuh"

namespace adafisher {

cudaError_t launch_linear_stats(const void* x, DType xt, void* out, DType ot, int64_t A_, int64_t K,
                                int64_t I, bool square, double scale, void* partials, cudaStream_t s) {
  AF_DISPATCH_ACC(ot, A, AF_DISPATCH_IN(xt, T,
      launch_reduce<T, A>(static_cast<const T*>(x), static_cast<A*>(out), A_, K, I, square,
                          static_cast<A>(scale), NoAffine{}, static_cast<A*>(partials), s)));
  return cudaGetLastError();
}

}  // namespace adafisher
