// NOTE: [column reduce] The one reduction behind linear_stats, conv_stats (batch map Q) and
// norm_stats: x viewed as contiguous (A, K, I), out[k] += scale * sum_{a,i} f(x[a,k,i]) where
// f(v) = (v - mu) * rs (optional affine, mu/rs per channel k or per (a, k / cpg)), then squared or
// not.  Accumulation in A (float32 or float64, the buffer dtype); partial sums of each block meet
// in `out` through atomicAdd, so out keeps its "ADD into" contract.
//
// NOTE: [single writer] Partial sums added atomically in whatever order the blocks finish round
// differently from run to run (the last bits of a float32 sum).  Under
// torch.use_deterministic_algorithms(True) the bindings pass deterministic = true and the reduction
// is not split over blocks (gridDim.y == 1): each out[k] then takes exactly one add per launch, so
// the bits are the same on every run, at the cost of fewer blocks for tall inputs (the Triton
// kernels keep their grid and sum stored partials instead: NOTE: [ordered partials]).  The other
// statistics kernels are deterministic as they are (conv's lattice and norm's coefficients: one
// block per entry; embedding's counts: equal addends of 1).
#pragma once
#include "common.cuh"

namespace adafisher {

struct Affine {
  int mode;          // 0 none, 1 per channel k, 2 per (a / rows_per_sample, k / cpg), 3 subtract mu[k] only
  const void* mu;    // acc type
  const void* rs;    // acc type
  int64_t groups;    // mode 2: number of groups (cpg = K / groups)
  int64_t rows_per_sample = 1;   // mode 2: rows a of one sample (a channels_last x: its positions)
};

template <typename A>
__device__ __forceinline__ A affine_apply(A v, const Affine& af, int64_t a, int64_t k, int64_t K) {
  if (af.mode == 0) return v;
  if (af.mode == 3) return v - static_cast<const A*>(af.mu)[k];
  int64_t j = af.mode == 1 ? k : (a / af.rows_per_sample) * af.groups + k / (K / af.groups);
  return (v - static_cast<const A*>(af.mu)[j]) * static_cast<const A*>(af.rs)[j];
}

// I == 1: block (32, 8), one column tile of 32 features per blockIdx.x, rows split over
// threadIdx.y and blockIdx.y (coalesced: a warp reads 32 consecutive features of one row).
template <typename T, typename A>
__global__ void reduce_rows_kernel(const T* __restrict__ x, A* __restrict__ out, int64_t R, int64_t K,
                                   bool square, A scale, Affine af) {
  __shared__ A sh[8][33];
  const int64_t k = blockIdx.x * 32 + threadIdx.x;
  A acc = 0;
  if (k < K) {
    for (int64_t r = blockIdx.y * 8 + threadIdx.y; r < R; r += (int64_t)gridDim.y * 8) {
      A v = affine_apply<A>(load_as<A, T>(x, r * K + k), af, r, k, K);
      acc += square ? v * v : v;
    }
  }
  sh[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    A t = 0;
    for (int y = 0; y < 8; ++y) t += sh[y][threadIdx.x];
    atomicAdd(out + k, t * scale);
  }
}

// I > 1: one block per (feature k, split), threads stride over the (a, i) plane of that feature.
template <typename T, typename A>
__global__ void reduce_planes_kernel(const T* __restrict__ x, A* __restrict__ out, int64_t Ar, int64_t K,
                                     int64_t I, bool square, A scale, Affine af) {
  __shared__ A sh[32];
  const int64_t k = blockIdx.x;
  const int64_t n = Ar * I;
  A acc = 0;
  for (int64_t j = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.y * blockDim.x) {
    const int64_t a = j / I, i = j - a * I;
    A v = affine_apply<A>(load_as<A, T>(x, (a * K + k) * I + i), af, a, k, K);
    acc += square ? v * v : v;
  }
  acc = block_sum<A>(acc, sh);
  if (threadIdx.x == 0) atomicAdd(out + k, acc * scale);
}

template <typename T, typename A>
void launch_reduce(const T* x, A* out, int64_t Ar, int64_t K, int64_t I, bool square, A scale,
                   Affine af, bool deterministic, cudaStream_t s) {
  if (Ar == 0 || K == 0 || I == 0) return;
  if (I == 1) {
    const int64_t gx = cdiv(K, 32);
    // enough blocks to fill an H100 (132 SMs x ~8 blocks), each row slice >= 64 rows
    const int64_t gy = deterministic ? 1 : std::max<int64_t>(1, std::min<int64_t>(cdiv(Ar, 64), cdiv(2048, gx)));
    reduce_rows_kernel<T, A><<<dim3((unsigned)gx, (unsigned)std::min<int64_t>(gy, 65535)), dim3(32, 8), 0, s>>>(
        x, out, Ar, K, square, scale, af);
  } else {
    const int64_t n = Ar * I;
    const int64_t gy = deterministic ? 1 : std::max<int64_t>(1, std::min<int64_t>(cdiv(n, 256 * 8), cdiv(2048, K)));
    reduce_planes_kernel<T, A><<<dim3((unsigned)K, (unsigned)std::min<int64_t>(gy, 65535)), 256, 0, s>>>(
        x, out, Ar, K, I, square, scale, af);
  }
}

}  // namespace adafisher
