// embedding_stats (reference.embedding_stats): token frequencies, out[v] += #{j : idx[j] == v}.
// idx: int32/int64, any shape (contiguous, n entries); out: float32/float64.  Indices outside
// [0, n_out) are ignored (the binding checks nothing on the host to stay sync-free).
#include <algorithm>
#include "common.cuh"

namespace adafisher {

template <typename I, typename A>
__global__ void embedding_stats_kernel(const I* __restrict__ idx, int64_t n, A* __restrict__ out, int64_t n_out) {
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t v = static_cast<int64_t>(idx[j]);
    if (v >= 0 && v < n_out) atomicAdd(out + v, A(1));
  }
}

cudaError_t launch_embedding_stats(const void* idx, DType it, int64_t n, void* out, DType ot,
                                   int64_t n_out, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = (unsigned)std::min<int64_t>(cdiv(n, 256), 4096);
  AF_DISPATCH_ACC(ot, A,
    if (it == DType::I64) {
      embedding_stats_kernel<int64_t, A><<<grid, 256, 0, s>>>(static_cast<const int64_t*>(idx), n, static_cast<A*>(out), n_out);
    } else if (it == DType::I32) {
      embedding_stats_kernel<int32_t, A><<<grid, 256, 0, s>>>(static_cast<const int32_t*>(idx), n, static_cast<A*>(out), n_out);
    } else {
      return cudaErrorInvalidValue;
    });
  return cudaGetLastError();
}

}  // namespace adafisher
