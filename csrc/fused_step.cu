// fused_step (reference.fused_step, SPEC 1): the AdaFisher / AdaFisherW update of every parameter of
// one (param dtype, grad dtype) pair in ONE launch, as the Triton twin launches (a bfloat16 model
// with float32 gradients: one launch).  Per element, arithmetic in float32 (state in the param dtype):
//   g = grad (+ wd * p unless decoupled);  m = beta * m + (1 - beta) * g
//   p -= lr * (m / (1 - beta^t) / F (+ wd * p if decoupled)),  F = S'[row] * H'[col] + Lambda
// with F's indices from the parameter's `meta` row (NOTE: [param map] in reference.py).
// NOTE: [step chunks] Multi-tensor apply as in ATen's MultiTensorApply.cuh: the binding lists every
// (tensor, chunk of `chunk` elements) pair; block b handles chunk b.  A chunk whose p/g/m are
// 16-byte aligned moves 16 bytes per load (4 fp32 or 8 bf16/fp16; a gradient of another width
// as many of its elements: 8 or 32 bytes), the rest (and the tail) goes element by element.  F's
// index map (the meta row) travels in the tensor table.  Each block reads its tensor's step t (the
// old value) and uses t + 1, then takes a ticket (an atomic add on done_counter, take_ticket); the
// last block to take one increments every step tensor after its chunk and re-arms the counter, so
// no block can see a half-updated step and the whole step stays one launch.  Steps kept on the
// host (torch.optim's default, 0-dim CPU tensors) are read and incremented by the binding.
// The chunk is sized per launch (launchers.h): a block's 256 threads step it a 16-byte word each at
// a time (1024 float32 elements, 2048 16-bit), and it is as many such blocks as make about 8192
// chunks, at least one, at most 16. ATen's fixed 65536 elements left ResNet-18's 11M parameters in
// 62 tensors about 200 chunks on an H200 (2026-12-04): 1.5 blocks of 256 threads per SM, 0.150 ms,
// 35% of the copy bandwidth, where Triton's 1024-element programs took 0.092 ms; now 11k chunks of
// 1024. On 124M and 1.1B parameters the 65536-element chunks moved 80-86%; chunks stay large there
// (14 and 16 blocks, 14-16k elements), so that a block's table reads, bias correction and ticket
// are paid per that many elements. The Triton step uses the same chunks (NOTE: [chunk size] in
// fused_step.py). The table grows by 8 bytes a chunk (540 KB for 1.1B parameters). A design
// argument until bench_fused_step times it.
// With `found_inf` (GradScaler's, on the device) non-zero every block returns at once: no tensor and
// no step changes, no ticket is taken (NOTE: [GradScaler] in adafisher_fast/optimizer.py).
// Python scalars are rounded to float32 where torch's reference rounds them (1 - beta and
// 1 - beta^t computed in double; m / bc as m * (1 / bc) like torch's CUDA division by a
// CPU scalar), and __fmul_rn/__fadd_rn keep the compiler from contracting the
// reference's separate multiply and add into FMAs, so fp32 results match the reference closely.
#include <algorithm>
#include "common.cuh"

namespace adafisher {

struct StepCoef { float lr, beta, omb, inv_bc, wd, lam; bool l2, dec; };

// ((r + h_ph) / h_gr) * h_gs, the H offset of row r's group: no division where there are no groups
// (h_gs = 0, every layer kind but grouped convs and the exposed attention's q/k/v).
__device__ __forceinline__ int64_t group_offset(const int64_t* mt, int64_t r) {
  return mt[kHGs] == 0 ? 0 : div_nonneg(r + mt[kHPh], mt[kHGr] > 1 ? mt[kHGr] : 1) * mt[kHGs];
}

// F of element e (NOTE: [param map] in reference.py): its row r = e / cols, its column c, for a
// row stored transposed (tr > 1, NOTE: [row transpose] in kernel_host.py) read through c's
// digits c / tr and c % tr, and its row group (r + h_ph) / h_gr.
template <typename F>
__device__ __forceinline__ float fisher_at(const F* fac, const int64_t* mt, int64_t e) {
  const int64_t cols = mt[kCols], tr = mt[kT];
  const int64_t r = div_nonneg(e, cols);          // cols >= 1 (the binding checks the meta rows)
  int64_t c = e - r * cols;
  if (tr > 1) {
    const int64_t q = div_nonneg(c, tr);
    c = (c - q * tr) * div_nonneg(cols, tr) + q;
  }
  return static_cast<float>(fac[mt[kSOff] + r * mt[kSR] + c * mt[kSC]]) *
         static_cast<float>(fac[mt[kHOff] + r * mt[kHR] + c * mt[kHC] + group_offset(mt, r)]);
}

// NOTE: [F word] F of the V consecutive elements of a word from e on.  Each element's F took its
// own divisions (fisher_at: up to four, a 32-bit one ~20 instructions, a 64-bit one a
// subroutine); a word that lies in one row, stored as it is, takes them once, for its first
// element, and steps its indices by S's and H's column strides.  Other words (across a row's end,
// or a transposed row) go element by element.
template <typename F, int V>
__device__ __forceinline__ void fisher_word(const F* fac, const int64_t* mt, int64_t e, float (&fd)[V]) {
  const int64_t cols = mt[kCols];
  const int64_t r = div_nonneg(e, cols), c = e - r * cols;
  if (mt[kT] > 1 || c + V > cols) {
#pragma unroll
    for (int j = 0; j < V; ++j) fd[j] = fisher_at<F>(fac, mt, e + j);
    return;
  }
  const int64_t sc = mt[kSC], hc = mt[kHC];
  const F* s = fac + mt[kSOff] + r * mt[kSR] + c * sc;
  const F* h = fac + mt[kHOff] + r * mt[kHR] + c * hc + group_offset(mt, r);
#pragma unroll
  for (int j = 0; j < V; ++j) fd[j] = static_cast<float>(s[j * sc]) * static_cast<float>(h[j * hc]);
}

__device__ __forceinline__ void step_elem(float& p, float g, float& m, float fd, const StepCoef& k) {
  if (k.l2) g = __fadd_rn(g, __fmul_rn(k.wd, p));
  m = __fadd_rn(__fmul_rn(m, k.beta), __fmul_rn(g, k.omb));
  float u = __fdiv_rn(__fmul_rn(m, k.inv_bc), __fadd_rn(fd, k.lam));
  if (k.dec) u = __fadd_rn(u, __fmul_rn(k.wd, p));
  p = __fadd_rn(p, -__fmul_rn(k.lr, u));
}

// V consecutive gradient elements as floats; src is aligned to min(16, V * sizeof(G)) bytes
template <typename G, int V>
__device__ __forceinline__ void load_grads(const G* src, float (&out)[V]) {
  constexpr int kBytes = V * static_cast<int>(sizeof(G)), kWord = kBytes < 16 ? kBytes : 16;
  constexpr int kPer = kWord / static_cast<int>(sizeof(G));
  static_assert(kBytes == 8 || kBytes % 16 == 0, "a vector of gradients is 8 bytes or whole 16-byte words");
#pragma unroll
  for (int i = 0; i < kBytes / kWord; ++i) {
    const Word<G, kWord> w = load_word<G, kWord>(src + i * kPer);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[i * kPer + j] = to_f<G>(w.v[j]);
  }
}

// The ticket (NOTE: [step chunks]), once every thread of the block has read its step t (the
// __syncthreads before it): a release add orders those reads before it, and the last block's
// fence acquires them all.  Taken before the update, not after it, so that no block waits for its
// stores to drain (NOTE: [step tickets] in fisher_kernels/fused_step.py); only warp 0 waits for
// the atomic.  Not __threadfence() and a relaxed add: that fence (fence.sc) also invalidated the
// SM's L1 (CCTL.IVALL in the sm_90 SASS, nvcc 13.0) once per block, 11k times a step on ResNet-18.
__device__ __forceinline__ void take_ticket(unsigned int* done, bool* last) {
  if (threadIdx.x == 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    unsigned int old;
    asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(done) : "memory");
#else       // the emulator (one host thread: always ordered), or a GPU before sm_70 (no atom.release)
    __threadfence();
    const unsigned int old = atomicAdd(done, 1u);
#endif
    *last = old == gridDim.x - 1;
  }
}

// NOTE: [step registers] 4 blocks of 256 threads an SM for float32 parameters (at most 64
// registers), 3 for 16-bit ones: without the bound ptxas gave the float32 kernels 63-66 registers
// as the index code changed (66: 3 blocks, a quarter fewer loads in flight), and 63 with an 8-byte
// spill; with it, 64 and no spill (nvcc 13.0, sm_80 and sm_90; the 16-bit ones 74, none).
template <typename T, typename G, typename F>
__global__ void __launch_bounds__(256, sizeof(T) == 4 ? 4 : 3) fused_step_kernel(const StepTensor* __restrict__ tensors, int64_t n_tensors,
                                                         const StepChunk* __restrict__ chunks, int64_t n_chunks,
                                                         int64_t chunk, const F* __restrict__ fac,
                                                         bool decoupled, unsigned int* done,
                                                         const float* __restrict__ found_inf) {
  __shared__ int64_t mt[kMetaCols];
  __shared__ bool last;
  if (found_inf != nullptr && *found_inf != 0.0f) return;   // the same for every block
  if (blockIdx.x < n_chunks) {
    const StepChunk ch = chunks[blockIdx.x];
    const StepTensor& ts = tensors[ch.tensor];
    if (threadIdx.x < kMetaCols) mt[threadIdx.x] = ts.meta[threadIdx.x];
    const double t = ts.step != nullptr ? static_cast<double>(*ts.step) + 1.0 : ts.t_host;
    StepCoef k;
    k.lr = ts.lr_ptr != nullptr ? *ts.lr_ptr : (float)ts.lr; k.beta = (float)ts.beta; k.omb = (float)(1.0 - ts.beta);
    k.inv_bc = __fdiv_rn(1.0f, (float)(1.0 - pow(ts.beta, t)));  // as torch's CUDA div by a scalar
    k.wd = (float)ts.wd; k.lam = (float)ts.lam;
    k.l2 = ts.wd != 0.0 && !decoupled; k.dec = ts.wd != 0.0 && decoupled;
    __syncthreads();                    // mt is in shared memory, and every thread has read t
    take_ticket(done, &last);
    T* p = static_cast<T*>(ts.p);
    const G* g = static_cast<const G*>(ts.g);
    T* m = static_cast<T*>(ts.m);
    const int64_t lo = (int64_t)ch.chunk * chunk;
    const int64_t hi = min(ts.numel, lo + chunk);
    constexpr int V = 16 / sizeof(T);
    const bool aligned = ((reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) |
                           reinterpret_cast<uintptr_t>(m)) & 15) == 0;
    int64_t e0 = lo;
    if (aligned) {
      const int64_t nv = (hi - lo) / V;
      for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
        const int64_t e = lo + v * V;
        Word<T, 16> pu, mu;
        float gf[V];
        pu.u = *reinterpret_cast<const uint4*>(p + e);
        load_grads<G, V>(g + e, gf);
        mu.u = *reinterpret_cast<const uint4*>(m + e);
        float fd[V];
        fisher_word<F, V>(fac, mt, e, fd);     // NOTE: [F word]
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float pf = to_f<T>(pu.v[j]), mf = to_f<T>(mu.v[j]);
          step_elem(pf, gf[j], mf, fd[j], k);
          pu.v[j] = from_f<T>(pf); mu.v[j] = from_f<T>(mf);
        }
        *reinterpret_cast<uint4*>(p + e) = pu.u;
        *reinterpret_cast<uint4*>(m + e) = mu.u;
      }
      e0 = lo + nv * V;
    }
    for (int64_t e = e0 + threadIdx.x; e < hi; e += blockDim.x) {
      float pf = to_f<T>(p[e]), mf = to_f<T>(m[e]);
      step_elem(pf, to_f<G>(g[e]), mf, fisher_at<F>(fac, mt, e), k);
      p[e] = from_f<T>(pf); m[e] = from_f<T>(mf);
    }
  } else {
    take_ticket(done, &last);           // a block with no chunk (n_chunks = 0: a grid of 1)
  }
  __syncthreads();                      // last, as thread 0 set it
  if (last) {                           // the last block to take a ticket increments every step
    __threadfence();
    for (int64_t i = threadIdx.x; i < n_tensors; i += blockDim.x)
      if (tensors[i].step != nullptr) *tensors[i].step += 1.0f;
    if (threadIdx.x == 0) *done = 0u;
  }
}

// the kernel's dtypes: float64 parameters go through the torch reference (cuda_backend.py)
#define AF_DISPATCH_STEP(dt, T, ...)                                            \
  switch (dt) {                                                                 \
    case DType::F32: { using T = float; __VA_ARGS__; break; }                   \
    case DType::F16: { using T = __half; __VA_ARGS__; break; }                  \
    case DType::BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; }          \
    default: return cudaErrorInvalidValue;                                      \
  }

cudaError_t launch_fused_step(const StepTensor* tensors, int64_t n_tensors, const StepChunk* chunks,
                              int64_t n_chunks, int64_t chunk, DType pt, DType gt, const void* fac, DType ft,
                              bool decoupled, unsigned int* done_counter, const float* found_inf,
                              cudaStream_t s) {
  if (n_tensors == 0) return cudaSuccess;
  const unsigned grid = (unsigned)std::max<int64_t>(n_chunks, 1);
  AF_DISPATCH_ACC(ft, F, AF_DISPATCH_STEP(pt, T, AF_DISPATCH_STEP(gt, G,
    fused_step_kernel<T, G, F><<<grid, 256, 0, s>>>(tensors, n_tensors, chunks, n_chunks, chunk,
        static_cast<const F*>(fac), decoupled, done_counter, found_inf))));
  return cudaGetLastError();
}

}  // namespace adafisher
