// norm_stats (reference.norm_stats, Proposition 3.1 of the paper): out[c] += sum_{r,i} xhat[r,c,i]^2.
// x: (R, C, I) contiguous (or, in sample mode, channels_last: strides (C*I, 1, C)), fp16/bf16/fp32/fp64;
// out/work/arithmetic: float32 or float64.
// NOTE: [norm passes] Everything goes through the column reduce of reduce.cuh with an affine map:
//  * channel mode, batch statistics: mean = reduce(x) / N, var = reduce((x - mean)^2) / N (two
//    passes, as the reference: biased variance), then out += N var / (var + eps), which is
//    sum ((x - mean) * rsqrt(var + eps))^2 over the N entries: no third pass over x (0 where var
//    overflowed to inf around a finite mean: rsqrt(inf) = 0);
//  * channel mode, running statistics given: one pass with the given mean/var;
//  * sample mode: one block (a warp for short rows, NOTE: [row warps]) per (r, group) computes mu
//    (if center) and rsqrt(ms + eps) over its C/groups * I entries (contiguous; for a
//    channels_last x, I runs of C/groups channels C apart, NOTE: [memory order]), then one reduce
//    pass (over x as (R * I, C, 1) when channels_last).
//    A row of more than kMomentChunk entries gets a block per chunk, each writing its chunk's mean
//    and centred sum of squares, joined per row by sample_combine_kernel (NOTE: [moment chunks]
//    in fisher_kernels/norm_stats.py: a 3-D U-Net's GroupNorm(8) at batch 1 would run on 8 blocks).
#include <algorithm>
#include "reduce.cuh"

namespace adafisher {

constexpr int64_t kWarpRow = 2048;      // NOTE: [row warps]

template <typename A, typename M>
__global__ void channel_coeffs_kernel(const M* mean, const M* var, A* mu, A* rs, int64_t C, A inv_n, A eps,
                                      int stage) {
  // stage 0: mu = sum / N (in place); 1: mu (the output) += N var / (var + eps) with var =
  // rs / N (rs holds sum (x - mean)^2, NOTE: [norm passes]), 0 where var overflowed around a
  // finite mean (xhat = 0 there, as the layer's rsqrt(inf) makes it); 2: from given mean/var
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += (int64_t)gridDim.x * blockDim.x) {
    if (stage == 0) mu[c] *= inv_n;
    else if (stage == 1) {
      const A v = rs[c] * inv_n;
      mu[c] += (isinf(v) && isfinite(static_cast<A>(mean[c]))) ? A(0) : v / (v + eps) / inv_n;
    }
    else { mu[c] = static_cast<A>(mean[c]); rs[c] = A(1) / sqrt(static_cast<A>(var[c]) + eps); }
  }
}

// Entries [lo, hi) of row = (r, group): entry j at xr + j, or (runs > 0, channels_last) at
// xr + (j / runs) * C + j % runs with runs = C / groups.  Their mean m (0 without center) and
// centred sum of squares s2, summed over the threads t < stride that share the row by `sum`.
// NOTE: [row words] Thread t takes V = 16 / sizeof(T) consecutive entries at a time (lo a
// multiple of V), read as one 16-byte load where the row starts 16-byte aligned and is
// contiguous (or channels_last with C/groups and C multiples of V), else one element at a
// time: the same entries per thread in the same order either way, so the bits do not depend
// on the alignment.  One element per thread per step left a bfloat16 GroupNorm row at 2 bytes a
// load (1x256x32768: 0.059 ms, Triton's 0.029; H200).
template <typename T, typename A, typename Sum>
__device__ __forceinline__ void row_moments(const T* __restrict__ x, int64_t row, int64_t n, int64_t lo,
                                            int64_t hi, int t, int stride, bool center, int64_t groups,
                                            int64_t C, int64_t runs, Sum sum, A& m, A& s2) {
  constexpr int V = 16 / sizeof(T);
  const int64_t r = row / groups, grp = row - r * groups;
  const T* xr = runs > 0 ? x + r * n * groups + grp * runs : x + row * n;
  auto at = [&](int64_t j) {
    if (runs == 0) return j;
    const int64_t run = div_nonneg(j, runs);
    return run * C + (j - run * runs);
  };
  // channels_last: a word stays in one run of C/groups channels when runs and C are multiples
  // of V (j is), and starts aligned with xr
  const bool words = (runs == 0 || (runs % V == 0 && C % V == 0)) &&
                     reinterpret_cast<uintptr_t>(xr) % 16 == 0;
  // f(v) for each of the entries [j, min(j + V, hi)), in order
  auto each = [&](int64_t j, auto f) {
    if (words && j + V <= hi) {
      const Word<T, 16> in = load_word<T, 16>(xr + at(j));
#pragma unroll
      for (int e = 0; e < V; ++e) f(load_as<A, T>(in.v, e));
    } else {
      for (int64_t e = j; e < min(j + V, hi); ++e) f(load_as<A, T>(xr, at(e)));
    }
  };
  // f over the thread's entries in order, the loads of kWordsInFlight whole words issued first
  // (NOTE: [words in flight] in reduce.cuh), the rest through `each`
  const int64_t step = (int64_t)stride * V;
  auto pass = [&](auto f) {
    for (int64_t j = lo + (int64_t)t * V; j < hi; j += kWordsInFlight * step) {
      if (words && j + (kWordsInFlight - 1) * step + V <= hi) {
        Word<T, 16> in[kWordsInFlight];
#pragma unroll
        for (int u = 0; u < kWordsInFlight; ++u)
          in[u] = load_word<T, 16>(xr + at(j + u * step));
#pragma unroll
        for (int u = 0; u < kWordsInFlight; ++u)
#pragma unroll
          for (int e = 0; e < V; ++e) f(load_as<A, T>(in[u].v, e));
      } else {
        for (int u = 0; u < kWordsInFlight && j + u * step < hi; ++u) each(j + u * step, f);
      }
    }
  };
  m = 0;
  if (center) {
    A s = 0;
    pass([&](A v) { s += v; });
    m = sum(s) / A(hi - lo);
  }
  A q = 0;
  pass([&](A v) { v -= m; q += v * v; });
  s2 = sum(q);
}

// block (row, k), k < nc: entries [k chunk, (k + 1) chunk) of the row's n.  nc == 1: the row's
// mu and rs; else the chunk's mean to pm and centred sum of squares to pm2.
template <typename T, typename A>
__global__ void sample_coeffs_kernel(const T* __restrict__ x, A* mu, A* rs, A* pm, A* pm2, int64_t n,
                                     int64_t nc, A eps, bool center, int64_t groups, int64_t C, int64_t runs) {
  __shared__ A sh[32];
  const int64_t row = blockIdx.x / nc, k = blockIdx.x - row * nc;
  const int64_t lo = k * kMomentChunk, hi = min(n, lo + kMomentChunk);
  A m, s2;
  row_moments<T, A>(x, row, n, lo, hi, threadIdx.x, blockDim.x, center, groups, C, runs,
                    [&](A v) { return block_sum<A>(v, sh); }, m, s2);
  if (threadIdx.x != 0) return;
  if (nc > 1) { pm[blockIdx.x] = m; pm2[blockIdx.x] = s2; }
  else { mu[row] = m; rs[row] = A(1) / sqrt(s2 / A(n) + eps); }
}

// NOTE: [row warps] A row of at most kWarpRow entries (LayerNorm's features, a small GroupNorm
// group) gets a warp, 8 rows a block.  With a block each, GPT-2's 16384 LayerNorm rows of 768 ran
// at 8% of bandwidth on an H200 (Triton's programs of 4 warps: 22%); not profiled, the suspects
// are 3 entries per thread between two block-wide sums, in 16 waves of blocks.  Same sums as a
// block's, in another order.
template <typename T, typename A>
__global__ void sample_coeffs_warp_kernel(const T* __restrict__ x, A* mu, A* rs, int64_t rows, int64_t n,
                                          A eps, bool center, int64_t groups, int64_t C, int64_t runs) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;            // a whole warp: the shuffles below involve no exited lane
  A m, s2;
  row_moments<T, A>(x, row, n, 0, n, threadIdx.x & 31, 32, center, groups, C, runs,
                    [](A v) { return warp_sum<A>(v); }, m, s2);
  if ((threadIdx.x & 31) != 0) return;
  mu[row] = m;
  rs[row] = A(1) / sqrt(s2 / A(n) + eps);
}

// warp per row: mu = sum_k cnt_k m_k / n, M2 = sum_k M2_k + cnt_k (m_k - mu)^2 (NOTE: [moment
// chunks]), lane l taking chunks l, l + 32, ...  (A thread per row walked a row's chunks one
// after another: a 3-D U-Net's GroupNorm(8) at batch 1, 64 chunks a row, ran on 8 threads.)
template <typename A>
__global__ void sample_combine_kernel(const A* pm, const A* pm2, A* mu, A* rs, int64_t rows, int64_t n,
                                      int64_t nc, A eps) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;            // a whole warp: the shuffles below involve no exited lane
  const int lane = threadIdx.x & 31;
  const A* m = pm + row * nc;
  const A* m2 = pm2 + row * nc;
  auto count = [&](int64_t k) { return A(min(kMomentChunk, n - k * kMomentChunk)); };
  A s = 0;
  for (int64_t k = lane; k < nc; k += 32) s += count(k) * m[k];
  const A mean = warp_sum<A>(s) / A(n);
  A q = 0;
  for (int64_t k = lane; k < nc; k += 32) {
    const A d = m[k] - mean;
    q += m2[k] + count(k) * d * d;
  }
  q = warp_sum<A>(q);
  if (lane != 0) return;
  mu[row] = mean;
  rs[row] = A(1) / sqrt(q / A(n) + eps);
}

cudaError_t launch_norm_stats(const void* x, DType xt, void* out, DType ot, void* work, int64_t R,
                              int64_t C, int64_t I, int mode, int64_t groups, double eps, bool center,
                              const void* mean, const void* var, DType mt, bool channels_last, void* partials,
                              cudaStream_t s) {
  if (R == 0 || C == 0 || I == 0) return cudaSuccess;
  AF_DISPATCH_ACC(ot, A, AF_DISPATCH_IN(xt, T, {
    const T* xp = static_cast<const T*>(x);
    A* o = static_cast<A*>(out);
    A* w = static_cast<A*>(work);
    A* part = static_cast<A*>(partials);
    if (mode == 0) {
      A* mu = w; A* rs = w + C;
      const unsigned g = (unsigned)std::min<int64_t>(cdiv(C, 256), 1024);
      if (mean == nullptr) {
        cudaMemsetAsync(w, 0, 2 * C * sizeof(A), s);
        const A inv_n = A(1) / A(R * I);
        launch_reduce<T, A>(xp, mu, R, C, I, false, A(1), NoAffine{}, part, s);
        channel_coeffs_kernel<A, A><<<g, 256, 0, s>>>(nullptr, nullptr, mu, rs, C, inv_n, A(eps), 0);
        launch_reduce<T, A>(xp, rs, R, C, I, true, A(1), Affine{3, mu, nullptr, 1}, part, s);
        channel_coeffs_kernel<A, A><<<g, 256, 0, s>>>(mu, nullptr, o, rs, C, inv_n, A(eps), 1);
      } else {
        AF_DISPATCH_ACC(mt, M,
          channel_coeffs_kernel<A, M><<<g, 256, 0, s>>>(static_cast<const M*>(mean), static_cast<const M*>(var),
                                                         mu, rs, C, A(1), A(eps), 2));
        launch_reduce<T, A>(xp, o, R, C, I, true, A(1), Affine{1, mu, rs, 1}, part, s);
      }
    } else {
      if (groups <= 0 || C % groups != 0) return cudaErrorInvalidValue;
      const int64_t rows = R * groups, n = (C / groups) * I, nc = cdiv(n, kMomentChunk);
      A* mu = w; A* rs = w + rows; A* pm = rs + rows; A* pm2 = pm + rows * nc;   // norm_stats_work_size
      const int64_t runs = channels_last ? C / groups : 0;
      if (n <= kWarpRow)                // NOTE: [row warps]
        sample_coeffs_warp_kernel<T, A><<<(unsigned)cdiv(rows, 8), 256, 0, s>>>(xp, mu, rs, rows, n, A(eps), center,
                                                                               groups, C, runs);
      else
        sample_coeffs_kernel<T, A><<<(unsigned)(rows * nc), 256, 0, s>>>(xp, mu, rs, pm, pm2, n, nc, A(eps), center,
                                                                        groups, C, runs);
      if (nc > 1)
        sample_combine_kernel<A><<<(unsigned)cdiv(rows, 8), 256, 0, s>>>(pm, pm2, mu, rs, rows, n, nc, A(eps));
      if (channels_last)
        launch_reduce<T, A>(xp, o, R * I, C, 1, true, A(1), Affine{2, mu, rs, groups, I}, part, s);
      else
        launch_reduce<T, A>(xp, o, R, C, I, true, A(1), Affine{2, mu, rs, groups}, part, s);
    }
  }));
  return cudaGetLastError();
}

}  // namespace adafisher
