// NOTE: [column reduce] The one reduction behind linear_stats, conv_stats (batch map Q) and
// norm_stats: x viewed as contiguous (A, K, I), out[k] += scale * sum_{a,i} f(x[a,k,i]) where
// f(v) = (v - mu) * rs (optional affine, mu/rs per channel k or per (a, k / cpg)), then squared or
// not.  Accumulation in A (float32 or float64, the buffer dtype); partial sums of each block meet
// in `out` through atomicAdd, so out keeps its "ADD into" contract (conv_stats' batch map keeps
// them stored, one row per row block: launch_reduce_blocks, `work` in launchers.h).  Rows (I == 1)
// or plane rows (I > 1) that start 16- or 8-byte aligned are read 16 or 8 bytes per thread, the
// rest one element at a time (the kernels' VB).
//
// Deterministic algorithms (NOTE: [ordered partials] in fisher_kernels/linear_stats.py): given
// `partials` (reduce_partials_size(K) entries, launchers.h), a split reduction's blocks store their
// sums in row blockIdx.y of a (gridDim.y, K) scratch and sum_partials_kernel adds the rows to out in
// a fixed order: same grid, same bits on every run.  An unsplit one (gridDim.y == 1) adds directly:
// one add per entry.  The other statistics kernels are deterministic as they are (conv's lattice
// and norm's coefficients: one block per entry; embedding's counts: equal addends of 1).
#pragma once
#include "common.cuh"

namespace adafisher {

// f(v) of an entry v at row a, feature k of K: the map the column reduce applies before squaring.
// NOTE: [affine maps] A type, not a runtime mode: the plain sums (linear_stats, conv_stats, norm's
// mean pass and S statistics) compile without the map's branches and loads of mu/rs.  With them,
// reduce_rows_kernel<float, float, 16> took 80 registers on sm_90, 40 without.
struct NoAffine {
  template <typename A>
  __device__ __forceinline__ A operator()(A v, int64_t, int64_t, int64_t) const { return v; }
};

struct Affine {      // (v - mu) * rs
  int mode;          // 1 per channel k, 2 per (a / rows_per_sample, k / cpg), 3 subtract mu[k] only
  const void* mu;    // acc type
  const void* rs;    // acc type
  int64_t groups;    // mode 2: number of groups (cpg = K / groups)
  int64_t rows_per_sample = 1;   // mode 2: rows a of one sample (a channels_last x: its positions)

  template <typename A>
  __device__ __forceinline__ A operator()(A v, int64_t a, int64_t k, int64_t K) const {
    if (mode == 3) return v - static_cast<const A*>(mu)[k];
    // the common cases divide nothing: a 64-bit division per element is a long subroutine
    const int64_t sample = rows_per_sample == 1 ? a : a / rows_per_sample;
    const int64_t j = mode == 1 ? k : sample * groups + (groups == 1 ? 0 : k / (K / groups));
    return (v - static_cast<const A*>(mu)[j]) * static_cast<const A*>(rs)[j];
  }
};

// A block's sum t of feature k: added to out[k], or stored in its row of partials.
template <typename A>
__device__ __forceinline__ void emit(A* out, A* partials, int64_t K, int64_t k, A t) {
  if (partials != nullptr) partials[blockIdx.y * K + k] = t;
  else atomicAdd(out + k, t);
}

// NOTE: [words in flight] A thread issues the loads of its next kWordsInFlight words before it
// uses any of them (the column reduces here, norm_stats' row_moments).  `#pragma unroll 4` over
// the strided loop did not: each copy's exit test and affine branches sat between the loads, and
// the sm_90 SASS consumed every load before issuing the next: one load in flight per thread
// (conv S at 64x2048x7x7, I = 49 words of 4 bytes, measured 37.6 us against Triton's 19.6 on an
// H200).  Each thread still sums its words in the order of the plain strided loop.
constexpr int kWordsInFlight = 4;

// I == 1: block (32, 8), one column tile of 32 * V features per blockIdx.x (V = VB / sizeof(T)
// consecutive features per thread, one VB-byte load: VB = 16 or 8 where every row starts so
// aligned, else one element), rows split over threadIdx.y and blockIdx.y (coalesced: a warp reads
// 32 * VB contiguous bytes of one row).  Each feature's rows are summed in the same order whatever
// VB, so every width gives the same bits.
template <typename T, typename A, int VB, typename F>
__global__ void reduce_rows_kernel(const T* __restrict__ x, A* __restrict__ out, A* __restrict__ partials,
                                   int64_t R, int64_t K, bool square, A scale, F f) {
  constexpr int V = VB / sizeof(T);
  __shared__ A sh[8][32 * V + 1];
  const int64_t k0 = ((int64_t)blockIdx.x * 32 + threadIdx.x) * V;
  A acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0;
  if (k0 < K) {
    const int64_t step = (int64_t)gridDim.y * 8;
    for (int64_t r = blockIdx.y * 8 + threadIdx.y; r < R; r += kWordsInFlight * step) {
      Word<T, VB> in[kWordsInFlight];     // NOTE: [words in flight]
#pragma unroll
      for (int u = 0; u < kWordsInFlight; ++u)
        if (r + u * step < R) in[u] = load_word<T, VB>(x + (r + u * step) * K + k0);
#pragma unroll
      for (int u = 0; u < kWordsInFlight; ++u)
        if (r + u * step < R) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A v = f(load_as<A, T>(in[u].v, j), r + u * step, k0 + j, K);
            acc[j] += square ? v * v : v;
          }
        }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) sh[threadIdx.y][threadIdx.x * V + j] = acc[j];
  __syncthreads();
  for (int f = threadIdx.y * 32 + threadIdx.x; f < 32 * V; f += 256) {
    const int64_t k = (int64_t)blockIdx.x * 32 * V + f;
    if (k < K) {
      A t = 0;
      for (int y = 0; y < 8; ++y) t += sh[y][f];
      emit<A>(out, partials, K, k, t * scale);
    }
  }
}

// I > 1: one block per (feature k, split), threads stride over the (a, i) plane of that feature,
// V = VB / sizeof(T) consecutive positions of a plane row per VB-byte load (VB = 16 or 8 where
// every plane row starts so aligned, else one element).
template <typename T, typename A, int VB, typename F>
__global__ void reduce_planes_kernel(const T* __restrict__ x, A* __restrict__ out, A* __restrict__ partials,
                                     int64_t Ar, int64_t K, int64_t I, bool square, A scale, F f) {
  constexpr int V = VB / sizeof(T);
  __shared__ A sh[32];
  const int64_t k = blockIdx.x;
  // word i of plane row a (word j = a * iv + i); the thread's next word, j + step, is carried
  // without a division: a 64-bit one per word is a long subroutine
  const int64_t iv = I / V, step = (int64_t)gridDim.y * blockDim.x, da = step / iv, di = step - da * iv;
  const int64_t j0 = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
  int64_t a = j0 / iv, i = j0 - a * iv;
  A acc = 0;
  while (a < Ar) {
    Word<T, VB> in[kWordsInFlight];       // NOTE: [words in flight]
    int64_t row[kWordsInFlight];
#pragma unroll
    for (int u = 0; u < kWordsInFlight; ++u) {
      row[u] = a;
      if (a < Ar) in[u] = load_word<T, VB>(x + (a * K + k) * I + i * V);
      i += di;
      a += da;
      if (i >= iv) { i -= iv; ++a; }
    }
#pragma unroll
    for (int u = 0; u < kWordsInFlight; ++u)
      if (row[u] < Ar) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A v = f(load_as<A, T>(in[u].v, e), row[u], k, K);
          acc += square ? v * v : v;
        }
      }
  }
  acc = block_sum<A>(acc, sh);
  if (threadIdx.x == 0) emit<A>(out, partials, K, k, acc * scale);
}

// out[k] += sum over rows y < n of partials[y * K + k]: block (32, 8), 32 columns a block, warp
// w adding rows w, w + 8, ... in order, then the 8 warps' sums in order: the same bits on every
// run.  (A thread a column over all n rows left GPT-2's 768 columns on 3 blocks, each thread 256
// rows long.)
template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ partials, A* __restrict__ out, int64_t n, int64_t K) {
  __shared__ A sh[8][32];
  const int64_t k = (int64_t)blockIdx.x * 32 + threadIdx.x;
  A t = 0;
  if (k < K)
    for (int64_t y = threadIdx.y; y < n; y += 8) t += partials[y * K + k];
  sh[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y != 0 || k >= K) return;
  A sum = 0;
  for (int w = 0; w < 8; ++w) sum += sh[w][threadIdx.x];
  out[k] += sum;
}

template <typename A>
void launch_sum_partials(const A* partials, A* out, int64_t n, int64_t K, cudaStream_t s) {
  sum_partials_kernel<A><<<(unsigned)cdiv(K, 32), dim3(32, 8), 0, s>>>(partials, out, n, K);
}

template <typename T, typename A, int VB, typename F>
void launch_reduce_words(const T* x, A* out, A* part, int64_t Ar, int64_t K, int64_t I, int64_t gy, bool square,
                         A scale, F f, cudaStream_t s) {
  if (I == 1)
    reduce_rows_kernel<T, A, VB, F><<<dim3((unsigned)cdiv(K, 32 * (VB / sizeof(T))), (unsigned)gy), dim3(32, 8), 0,
                                      s>>>(x, out, part, Ar, K, square, scale, f);
  else
    reduce_planes_kernel<T, A, VB, F><<<dim3((unsigned)K, (unsigned)gy), 256, 0, s>>>(x, out, part, Ar, K, I, square,
                                                                                      scale, f);
}

// The blocks' sums of the (A, K, I) reduction split over gy blocks per feature: added into out, or,
// given part, stored in its rows (gy rows of K, each entry written once: no fill needed).
template <typename T, typename A, typename F>
void launch_reduce_blocks(const T* x, A* out, A* part, int64_t Ar, int64_t K, int64_t I, int64_t gy, bool square,
                          A scale, F f, cudaStream_t s) {
  // the widest load, 16 or 8 bytes, at which every row (I == 1) or plane row (I > 1) starts aligned
  // (bf16 14x14 maps: 392-byte rows, 8-byte loads); else one element (float64 inputs always)
  const int64_t row_bytes = (I == 1 ? K : I) * static_cast<int64_t>(sizeof(T));
  const auto addr = reinterpret_cast<uintptr_t>(x);
  int vb = 0;
  if (sizeof(T) < 8)
    for (int b : {16, 8})
      if (vb == 0 && row_bytes % b == 0 && addr % b == 0) vb = b;
  if constexpr (sizeof(T) < 8) {
    if (vb == 16) launch_reduce_words<T, A, 16>(x, out, part, Ar, K, I, gy, square, scale, f, s);
    if (vb == 8) launch_reduce_words<T, A, 8>(x, out, part, Ar, K, I, gy, square, scale, f, s);
  }
  if (vb == 0) launch_reduce_words<T, A, sizeof(T)>(x, out, part, Ar, K, I, gy, square, scale, f, s);
}

template <typename T, typename A, typename F>
void launch_reduce(const T* x, A* out, int64_t Ar, int64_t K, int64_t I, bool square, A scale,
                   F f, A* partials, cudaStream_t s) {
  if (Ar == 0 || K == 0 || I == 0) return;
  const int64_t gy = reduce_split(Ar, K, I, sizeof(T));    // NOTE: [row tiles] in launchers.h
  A* part = gy > 1 ? partials : nullptr;
  launch_reduce_blocks<T, A>(x, out, part, Ar, K, I, gy, square, scale, f, s);
  if (part != nullptr)
    launch_sum_partials<A>(part, out, gy, K, s);
}

}  // namespace adafisher
