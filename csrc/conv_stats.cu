// conv_stats (reference.conv_stats, SPEC 4.2): conv patch sums of squares WITHOUT im2col.
//   out[c * K + kofs] += sum_{b, l} xpad[b, c, l * stride + kofs * dilation]^2
// x: (B, C, *spatial) contiguous or channels_last, nd = 1..3, fp16/bf16/fp32/fp64; out/work: float32 or
// float64.
// NOTE: [conv lattice sums] Two launches (one for a pointwise conv: NOTE: [pointwise convs]):
//  1. Q[c, pos] = sum_b x[b, c, pos]^2 (the column reduce of reduce.cuh over B rows, one read of x,
//     in x's memory order: Q is (pos, c) for a channels_last x, NOTE: [memory order]), left as the
//     stored partial sums of its row blocks (`work`, launchers.h: no fill, no atomics);
//  2. one block per (channel, kernel offset) sums Q's rows over that offset's output lattice.
//     Padding commutes with the square and the batch sum (it only copies or zeroes positions), so it is
//     applied to Q's coordinates on the fly: zeros -> skipped, reflect/replicate/circular -> the
//     source position torch.nn.functional.pad would copy.  Nothing of the patch matrix's size exists.
#include <algorithm>
#include "reduce.cuh"

namespace adafisher {

__device__ __forceinline__ int64_t pad_source(int64_t j, int64_t n, int mode) {
  if (j >= 0 && j < n) return j;
  switch (mode) {
    case 1: return j < 0 ? -j : 2 * (n - 1) - j;           // reflect (pad < n, as torch requires)
    case 2: return j < 0 ? 0 : n - 1;                      // replicate
    case 3: return ((j % n) + n) % n;                      // circular
    default: return -1;                                    // zeros
  }
}

template <typename A>
__global__ void conv_lattice_kernel(const A* __restrict__ q, A* __restrict__ out, A* __restrict__ partials,
                                    ConvGeom g, int64_t kprod, int64_t L, int64_t q_rows, int64_t q_rstride,
                                    int64_t q_cstride, int64_t q_pstride) {
  __shared__ A sh[32];
  const int64_t c = blockIdx.x / kprod, kofs = blockIdx.x - c * kprod;
  int64_t off[3] = {0, 0, 0};
  int64_t rem = kofs;
  for (int d = g.nd - 1; d >= 0; --d) { off[d] = rem % g.kernel[d]; rem /= g.kernel[d]; }
  const A* qc = q + c * q_cstride;
  // NOTE: [lattice walk] the thread's positions l, l + step, ... in output coordinates, the next
  // one by adding step's digits (in the output's mixed radix) with carries, not by two 64-bit
  // divisions per dimension per position (each a long subroutine).  coord[0] runs past
  // out_size[0] only once l >= L.
  const int64_t step = (int64_t)gridDim.y * blockDim.x, l0 = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
  int64_t coord[3] = {0, 0, 0}, dstep[3] = {0, 0, 0};
  int64_t r0 = l0, s0 = step;
  for (int d = g.nd - 1; d > 0; --d) {
    coord[d] = r0 % g.out_size[d]; r0 /= g.out_size[d];
    dstep[d] = s0 % g.out_size[d]; s0 /= g.out_size[d];
  }
  coord[0] = r0;
  dstep[0] = s0;
  A acc = 0;
  // NOTE: [lattice split]: blockIdx.y takes every gridDim.y-th slice of blockDim.x positions
  for (int64_t l = l0; l < L; l += step) {
    int64_t src = 0, stride_src = 1;
    bool ok = true;
    for (int d = g.nd - 1; d >= 0; --d) {
      const int64_t j = pad_source(coord[d] * g.stride[d] + off[d] * g.dilation[d] - g.pad_lo[d], g.size[d], g.mode);
      ok = ok && j >= 0;
      src += j * stride_src;
      stride_src *= g.size[d];
    }
    if (ok)
      for (int64_t r = 0; r < q_rows; ++r) acc += qc[r * q_rstride + src * q_pstride];
    int64_t carry = 0;
    for (int d = g.nd - 1; d > 0; --d) {
      coord[d] += dstep[d] + carry;
      carry = coord[d] >= g.out_size[d];
      if (carry) coord[d] -= g.out_size[d];
    }
    coord[0] += dstep[0] + carry;
  }
  acc = block_sum<A>(acc, sh);
  if (threadIdx.x != 0) return;
  if (gridDim.y == 1) out[blockIdx.x] += acc;                       // one block per entry
  else if (partials != nullptr) partials[(int64_t)blockIdx.y * gridDim.x + blockIdx.x] = acc;
  else atomicAdd(out + blockIdx.x, acc);
}

cudaError_t launch_conv_stats(const void* x, DType xt, void* out, DType ot, void* work, int64_t B,
                              int64_t C, const ConvGeom& g, void* partials, cudaStream_t s) {
  int64_t plane = 1, kprod = 1, L = 1;
  for (int d = 0; d < g.nd; ++d) { plane *= g.size[d]; kprod *= g.kernel[d]; L *= g.out_size[d]; }
  if (B == 0 || C == 0 || plane == 0 || kprod == 0) return cudaSuccess;    // adds nothing
  if (conv_pointwise(g)) {  // NOTE: [pointwise convs]: x as (B, C, plane), channels_last (B * plane, C, 1)
    AF_DISPATCH_ACC(ot, A,
      AF_DISPATCH_IN(xt, T,
        launch_reduce<T, A>(static_cast<const T*>(x), static_cast<A*>(out), g.channels_last ? B * plane : B, C,
                            g.channels_last ? 1 : plane, true, A(1), NoAffine{},
                            static_cast<A*>(partials), s)));
    return cudaGetLastError();
  }
  int64_t rows = 1;     // conv_work_rows: `work`'s rows of Q
  AF_DISPATCH_ACC(ot, A,
    AF_DISPATCH_IN(xt, T,
      rows = conv_work_rows(B, C * plane, sizeof(T));
      launch_reduce_blocks<T, A>(static_cast<const T*>(x), nullptr, static_cast<A*>(work), B, C * plane, 1,
                                 rows, true, A(1), NoAffine{}, s));
    if (L > 0) {
      const int threads = L >= 256 ? 256 : (L >= 64 ? 64 : 32);
      // NOTE: [lattice split] a few (channel, offset) entries over a large lattice (a 1-channel
      // volume: 27 blocks for 512^3) are split over blockIdx.y, about 2048 blocks in all, each slice
      // >= 16 positions per thread; partial sums meet atomically, or in order (deterministic).
      // (At 64, ResNet-50's conv1, 147 entries over 112 x 112, ran 147 blocks of 49 positions a
      // thread, one after another; with the batch map: 69 us on an H200, where the copy floor of
      // its bytes is 18; now 588 blocks.)
      const int64_t ck = C * kprod;
      int64_t gy = std::max<int64_t>(1, std::min<int64_t>({cdiv(L, threads * 16), cdiv(2048, ck), 65535}));
      if (partials != nullptr) gy = std::max<int64_t>(1, std::min(gy, reduce_partials_size(C * plane) / ck));
      A* part = gy > 1 ? static_cast<A*>(partials) : nullptr;
      conv_lattice_kernel<A><<<dim3((unsigned)ck, (unsigned)gy), threads, 0, s>>>(
          static_cast<const A*>(work), static_cast<A*>(out), part, g, kprod, L, rows, C * plane,
          g.channels_last ? 1 : plane, g.channels_last ? C : 1);
      if (part != nullptr)
        launch_sum_partials<A>(part, static_cast<A*>(out), gy, ck, s);
    });
  return cudaGetLastError();
}

}  // namespace adafisher
