// layer_ema (reference.layer_ema, SPEC 2 and 3): one launch for every layer's statistics iteration.
// NOTE: [ema blocks] One block per layer (a layer's factors must agree on the non-finite guard); the
// block visits its own factors through the CSR by layer (kernel_host.layer_factors, as Triton's),
// walking each two or three times (each reduction rides on a walk made anyway: NOTE: [ema block]
// in fisher_kernels/layer_ema.py):
//  1. raw of each of its factors from the accumulators, raw[e] = sum over the terms with dst == e
//     (CSR by destination, built once per LayerTable by kernel_host.py) of
//     buf[src]^pow * coef / count[factor]^q (a thread per entry; an entry of more than kWideTerms
//     terms by the whole block: NOTE: [wide entries] in kernel_host.py), written to raw_work; its
//     finiteness and, when raw is normalised, its min and max (minmax_work) reduced on the way;
//     the layer is bad if a factor with a non-zero row count is not finite; counters[layer] +=
//     (took, bad);
//  2. every factor with statistics in a good layer: state = prior * decay + v * weight, prior = state
//     (or ones at the first iteration, with decay_first/weight_first), v = min-max(raw) or raw; the
//     new state's min and max reduced on the way, or, when the state is not normalised, fac written;
//  3. otherwise fac = min-max(state) or state where initialized, else 1.
// min-max = (v - min) / (max - min + 1e-6) after +inf -> 1 and -inf -> 0 (NOTE: [min-max epsilon]).
// All arithmetic in the buffer dtype (float32 or float64).  NaN in a *state* (not reachable through
// the guard) is ignored by the CUDA min/max where torch's amin/amax would propagate it.
#include <algorithm>
#include "common.cuh"

namespace adafisher {

// x^p for the powers terms take (pow 0, 1, 2; q 0 to 3: state.py checks them), by multiplication as
// Triton's kernel computes them
template <typename A> __device__ __forceinline__ A pw(A x, A p) {
  if (p == A(0)) return A(1);
  if (p == A(1)) return x;
  const A x2 = x * x;
  return p == A(2) ? x2 : x2 * x;
}
// a * b + c * d rounded after each operation, as torch computes the reference's EMA: nvcc would
// contract it into an FMA, and min-max normalisation magnifies that last bit (NOTE: [fp fusion] in
// fisher_kernels/__init__.py)
__device__ __forceinline__ float mul_add_rn(float a, float b, float c, float d) {
  return __fadd_rn(__fmul_rn(a, b), __fmul_rn(c, d));
}
__device__ __forceinline__ double mul_add_rn(double a, double b, double c, double d) {
  return __dadd_rn(__dmul_rn(a, b), __dmul_rn(c, d));
}
template <typename A> __device__ __forceinline__ A deinf(A v) {
  return isinf(v) ? (v > 0 ? A(1) : A(0)) : v;
}
constexpr double kMinMaxEps = 1e-6;  // reference.MINMAX_EPS
constexpr int64_t kWideTerms = 32;   // kernel_host.WIDE_TERMS (NOTE: [wide entries])
// A block's time grows with the trips through its layer's largest factor, blockDim entries a trip
// (latency-bound: one block per layer, few per SM), so a block takes the most threads it may:
// 1024 x at most 64 registers fits an SM's 64K (float uses 60-63 on sm_80/sm_90 with the wide-entry
// pass, no spills; double 64, spilling 8-24 bytes, nvcc 13.0; __launch_bounds__(1024) made ptxas
// squeeze float into 32 registers, with spills).
constexpr int kEmaThreads = 1024;
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1204)
#define AF_EMA_BOUNDS __maxnreg__(64)
#else  // __maxnreg__ came with CUDA 12.4
#define AF_EMA_BOUNDS __launch_bounds__(kEmaThreads)
#endif

// term t's value: buf[src]^pow * coef / count[factor]^q
template <typename A>
__device__ __forceinline__ A term_value(const EmaArgs& a, const A* buf, const A* counts, int64_t t) {
  const A* tpow = static_cast<const A*>(a.term_pow);
  const A* tcoef = static_cast<const A*>(a.term_coef);
  const A* tq = static_cast<const A*>(a.term_q);
  return pw<A>(buf[a.term_src[t]], tpow[t]) * tcoef[t] / pw<A>(counts[a.term_factor[t]], tq[t]);
}

template <typename A>
__global__ void AF_EMA_BOUNDS layer_ema_kernel(EmaArgs a) {
  __shared__ A sh[32];
  __shared__ int bad_sh;
  __shared__ int n_wide, wide_lane[kEmaThreads];     // NOTE: [wide entries] in kernel_host.py
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;   // every block: NOTE: [GradScaler]
  const int64_t layer = blockIdx.x;
  const A* buf = static_cast<const A*>(a.buf);
  const A* counts = buf + a.n_acc;
  A* raw = static_cast<A*>(a.raw_work);
  A* minmax = static_cast<A*>(a.minmax_work);
  A* state = static_cast<A*>(a.state);
  A* fac = static_cast<A*>(a.fac);
  const A inf = A(INFINITY);
  if (threadIdx.x == 0) bad_sh = 0;
  __syncthreads();
  // 1: raw values, the guard and raw's min and max
  const int64_t f0 = a.layer_fstart[layer], f1 = a.layer_fstart[layer + 1];
  for (int64_t fi = f0; fi < f1; ++fi) {
    const int64_t f = a.layer_factors[fi];
    const int64_t lo = a.factor_start[f], hi = a.factor_start[f + 1];
    A finite = 1, mn = inf, mx = -inf;
    for (int64_t base = lo; base < hi; base += blockDim.x) {   // the same trips for every thread
      const int64_t e = base + threadIdx.x;
      const int64_t t0 = e < hi ? a.term_ptr[e] : 0, t1 = e < hi ? a.term_ptr[e + 1] : 0;
      const bool wide = t1 - t0 > kWideTerms;
      A v = 0;
      if (!wide)
        for (int64_t t = t0; t < t1; ++t) v += term_value<A>(a, buf, counts, t);
      if (__syncthreads_or(wide)) {       // the block sums each wide entry's terms
        if (threadIdx.x == 0) n_wide = 0;
        __syncthreads();
        if (wide) wide_lane[atomicAdd(&n_wide, 1)] = threadIdx.x;   // any order: sums stay
        __syncthreads();
        for (int k = 0; k < n_wide; ++k) {
          const int64_t ew = base + wide_lane[k], w1 = a.term_ptr[ew + 1];
          A part = 0;
          for (int64_t t = a.term_ptr[ew] + threadIdx.x; t < w1; t += blockDim.x)
            part += term_value<A>(a, buf, counts, t);
          part = block_sum<A>(part, sh);
          if (threadIdx.x == wide_lane[k]) v = part;
        }
      }
      if (e < hi) {
        raw[e] = v;
        if (!isfinite(v)) finite = 0;
        if (a.normalise_raw) {
          const A c = deinf<A>(v); mn = fmin(mn, c); mx = fmax(mx, c);
        }
      }
    }
    finite = block_min<A>(finite, sh);
    if (threadIdx.x == 0 && counts[f] > 0 && finite == A(0)) bad_sh = 1;
    if (a.normalise_raw) {
      mn = block_min<A>(mn, sh); mx = block_max<A>(mx, sh);
      if (threadIdx.x == 0) { minmax[2 * f] = mn; minmax[2 * f + 1] = mx; }
    }
  }
  __syncthreads();
  const bool bad = bad_sh != 0;
  int took = 0;
  // 2-3: EMA and fac
  for (int64_t fi = f0; fi < f1; ++fi) {
    const int64_t f = a.layer_factors[fi];
    const int64_t lo = a.factor_start[f], hi = a.factor_start[f + 1];
    const bool upd = counts[f] > 0 && !bad;
    const bool init = a.initialized[f];
    A mn = inf, mx = -inf;
    if (upd) {
      took = 1;
      A rlo = 0, rden = 1;
      if (a.normalise_raw) { rlo = minmax[2 * f]; rden = minmax[2 * f + 1] - rlo + A(kMinMaxEps); }
      const A decay = init ? A(a.decay) : A(a.decay_first);
      const A weight = init ? A(a.weight) : A(a.weight_first);
      for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
        const A v = a.normalise_raw ? (deinf<A>(raw[e]) - rlo) / rden : raw[e];
        const A prior = init ? state[e] : A(1);
        const A s = mul_add_rn(prior, decay, v, weight);
        state[e] = s;
        if (a.normalise_state) {
          const A c = deinf<A>(s); mn = fmin(mn, c); mx = fmax(mx, c);
        } else {
          fac[e] = s;       // fac = state: no third walk
        }
      }
    } else if (a.normalise_state && init) {
      for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
        const A c = deinf<A>(state[e]); mn = fmin(mn, c); mx = fmax(mx, c);
      }
    }
    const bool now_init = init || upd;
    if (a.normalise_state && now_init) {
      const A slo = block_min<A>(mn, sh), sden = block_max<A>(mx, sh) - slo + A(kMinMaxEps);
      for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x)
        fac[e] = (deinf<A>(state[e]) - slo) / sden;
    } else if (!upd) {
      for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) fac[e] = now_init ? state[e] : A(1);
    }
    __syncthreads();
    if (threadIdx.x == 0 && upd) a.initialized[f] = true;
  }
  if (threadIdx.x == 0) {
    a.counters[2 * layer] += took;
    a.counters[2 * layer + 1] += bad ? 1 : 0;
  }
}

cudaError_t launch_layer_ema(const EmaArgs& a, DType ot, cudaStream_t s) {
  if (a.n_layers == 0) return cudaSuccess;
  AF_DISPATCH_ACC(ot, A, layer_ema_kernel<A><<<(unsigned)a.n_layers, kEmaThreads, 0, s>>>(a));
  return cudaGetLastError();
}

}  // namespace adafisher
