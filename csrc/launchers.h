// Thin launcher layer of the AdaFisher CUDA kernels: raw pointers, sizes and a cudaStream_t.
// No torch include here: csrc/bindings.cpp adapts torch tensors to these calls, and the CMake
// build (CMakeLists.txt) compiles the kernels + launchers alone as a static library.
// Every function returns the cudaError_t of its launch(es) (cudaGetLastError after launching).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cuda_runtime.h>

namespace adafisher {

// Element types crossing the launcher boundary (half/bfloat16 stay opaque void* here).
enum class DType : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3, I32 = 4, I64 = 5 };

// The column reduction behind linear/conv/norm_stats (NOTE: [column reduce] in reduce.cuh) splits
// (A, K, I) of elem-byte entries over reduce_split(A, K, I, elem) blocks per feature: about 2048
// blocks in all, to fill an H100 (132 SMs x ~8 blocks), each row slice >= 64 rows (I == 1) or >=
// 2048 elements (I > 1).  NOTE: [row tiles] With I == 1 a block covers reduce_tile(elem) columns,
// 32 threads x its widest load (16 bytes; one element for 8-byte types); the split counted 32, so
// float32 rows got a quarter of the blocks planned (ResNet-18's conv batch sums, 256 x 65536: 512
// blocks, one row split).  The widest load's tile whatever the load taken, so aligned and shifted
// rows split alike (the same bits under deterministic algorithms).
inline int64_t reduce_tile(int64_t elem) { return 32 * (elem < 8 ? 16 / elem : 1); }
inline int64_t reduce_split(int64_t A, int64_t K, int64_t I, int64_t elem) {
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t gy = I == 1 ? std::min(cdiv(A, 64), cdiv(2048, cdiv(K, reduce_tile(elem))))
                            : std::min(cdiv(A * I, 256 * 8), cdiv(2048, K));
  return std::max<int64_t>(1, std::min<int64_t>(gy, 65535));
}
// `partials` (the statistics launchers): nullptr, so that blocks add their sums atomically, or
// reduce_partials_size(K) entries of type ot for deterministic algorithms (NOTE: [ordered
// partials]), K being the features of the op's reduction: linear_stats' K, C * prod(spatial) for
// conv_stats, C for norm_stats.  Covers every split: I == 1 at most cdiv(2048, cdiv(K, tile)) * K
// <= 2048 * tile + K entries (tile <= 256, 2-byte entries), I > 1 at most cdiv(2048, K) * K.
inline int64_t reduce_partials_size(int64_t K) { return 2048 * 256 + K + 32; }

// linear_stats: x viewed as contiguous (A, K, I); out[k] += scale * sum_{a,i} f(x[a,k,i]),
// f = square or identity.  out is float32 or float64 (acc). reference.linear_stats.
cudaError_t launch_linear_stats(const void* x, DType xt, void* out, DType ot, int64_t A, int64_t K,
                                int64_t I, bool square, double scale, void* partials, cudaStream_t s);

// conv_stats (SPEC 4.2, im2col-free): x (B, C, *spatial) with nd = 1..3 spatial dims, contiguous or
// channels_last (memory order B, *spatial, C).
// work: conv_work_rows(B, n, x's element size) rows of n = C * prod(spatial) entries of type ot, no
// initialisation needed: the batch-reduced map Q (laid out like one sample of x) as the stored
// partial sums of the row blocks the batch is split over, which the lattice kernel adds up; so Q
// needs no fill launch and its sums do not depend on the order the blocks run in.  At most
// 2048 * reduce_tile + n entries (reduce_split's bound), about 2 MB more than Q itself.
// out: (C * prod(kernel)) entries, layout (channel, *kernel) == (group, C/g, *kernel).
struct ConvGeom {
  int nd;
  int64_t size[3], kernel[3], stride[3], dilation[3], pad_lo[3], out_size[3];
  int mode;  // 0 zeros, 1 reflect, 2 replicate, 3 circular
  bool channels_last;
};
inline int64_t conv_work_rows(int64_t B, int64_t n, int64_t elem) { return reduce_split(B, n, 1, elem); }
// NOTE: [pointwise convs] (fisher_kernels/conv_stats.py) a 1x1 conv at stride 1 without padding: the
// per-channel sum of squares, the column reduce straight into out (one launch, `work` unused).
inline bool conv_pointwise(const ConvGeom& g) {
  for (int d = 0; d < g.nd; ++d)
    if (g.kernel[d] != 1 || g.stride[d] != 1 || g.pad_lo[d] != 0 || g.out_size[d] != g.size[d]) return false;
  return true;
}
cudaError_t launch_conv_stats(const void* x, DType xt, void* out, DType ot, void* work, int64_t B,
                              int64_t C, const ConvGeom& g, void* partials, cudaStream_t s);

// norm_stats: x contiguous (R, C, I), or with channels_last (mode 1 only) strides (C*I, 1, C).
// work: entries of type ot, 2 * C + 2 (mode 0) or norm_stats_work_size(R, C, I, groups) (mode 1).
constexpr int64_t kMomentChunk = 16384;   // entries of a sample row per block (NOTE: [moment chunks])
inline int64_t norm_stats_work_size(int64_t R, int64_t C, int64_t I, int64_t groups) {
  const int64_t rows = R * groups, nc = ((C / groups) * I + kMomentChunk - 1) / kMomentChunk;
  return 2 * std::max(C, rows) + (nc > 1 ? 2 * rows * nc : 0) + 2;
}
// mode 0 = "channel" (mean/var given or NULL -> batch statistics), 1 = "sample".
// mean/var (if given) have dtype mt and C entries.
cudaError_t launch_norm_stats(const void* x, DType xt, void* out, DType ot, void* work, int64_t R,
                              int64_t C, int64_t I, int mode, int64_t groups, double eps, bool center,
                              const void* mean, const void* var, DType mt, bool channels_last,
                              void* partials, cudaStream_t s);

// embedding_stats: out[idx[j]] += 1 for j < n; idx int32/int64, out-of-range indices are ignored.
cudaError_t launch_embedding_stats(const void* idx, DType it, int64_t n, void* out, DType ot,
                                   int64_t n_out, cudaStream_t s);

// layer_ema (reference.layer_ema): one block per layer.  Terms given as CSR by destination:
// term_ptr [n_raw + 1] into the term arrays sorted by dst.  All float arrays have type ot.
struct EmaArgs {
  const void* buf; int64_t n_acc;
  const int64_t* term_ptr; const int64_t* term_src; const void* term_pow; const void* term_coef;
  const void* term_q; const int64_t* term_factor;
  const int64_t* factor_start;
  const int64_t* layer_factors; const int64_t* layer_fstart; int64_t n_layers;  // factors by layer (CSR)
  void* state; void* fac; bool* initialized; int64_t* counters;
  void* raw_work;     // [n_raw] scratch
  void* minmax_work;  // [2 * n_factors] scratch
  const float* found_inf;  // nullptr, or one device float32 (GradScaler's): where non-zero, no change
  double decay, weight, decay_first, weight_first; bool normalise_raw, normalise_state;
};
cudaError_t launch_layer_ema(const EmaArgs& a, DType ot, cudaStream_t s);

// The columns of a StepTensor's meta row: NOTE: [param map]'s META_COLS (reference.py), in its
// order, then T (tests/test_fused_step.py checks that the names agree).
enum MetaCol : int {
  kRows, kCols, kSOff, kSR, kSC, kHOff, kHR, kHC, kHGr, kHGs, kHPh,
  kMapCols,                         // the width of a meta row as the binding receives it
  kT = kMapCols,
  kMetaCols
};
// fused_step: one launch over every parameter of one (param dtype, grad dtype) pair (multi-tensor
// apply, NOTE in fused_step.cu); momenta in the param dtype.  `tensors` and `chunks` live in
// device memory (built by the binding).
struct StepTensor {
  void* p; const void* g; void* m;
  float* step;       // device 0-dim float32 step, read (t = step + 1) and incremented by the launch;
                     // nullptr when the step lives on the host: then t_host is t and the binding
                     // increments the host tensor
  double t_host;
  int64_t numel;
  int64_t meta[kMetaCols];          // the parameter's row of NOTE: [param map] (reference.py), then
                                    // its layout T (NOTE: [row transpose]: 1 row-major, > 1 transposed)
  double lr, beta, wd, lam;         // doubles: rounded to float32 exactly where torch rounds them
  const float* lr_ptr;              // a device float32 lr tensor read at run time in place of lr, or
                                    // nullptr (NOTE: [tensor lr] in adafisher_fast/kernel_host.py)
};
struct StepChunk { int32_t tensor; int32_t chunk; };
// A launch's chunk: as many blocks of kStepBlockBytes of each parameter (a 16-byte word a thread)
// as make about kStepTargetPrograms chunks, at least one, at most kStepMaxChunkBlocks (NOTE: [step
// chunks]); the same policy and numbers as the Triton step's (fisher_kernels/fused_step.py,
// NOTE: [chunk size]; tests/test_fused_step.py checks that they agree).  The emulated build
// (tests/cuda_emu.py) sets a target of 2, so that its tests step chunks of several blocks.
#ifndef AF_STEP_TARGET_PROGRAMS
#define AF_STEP_TARGET_PROGRAMS 8192
#endif
constexpr int64_t kStepTargetPrograms = AF_STEP_TARGET_PROGRAMS;
constexpr int64_t kStepMaxChunkBlocks = 16;
constexpr int64_t kStepBlockBytes = 4096;
// done_counter: one zero-initialised unsigned int in device memory, left at zero by the launch; one
// per table (NOTE: [step tables] in bindings.cpp): launches that may run at once must not share it.
// found_inf: nullptr, or one device float32 (GradScaler's): where non-zero the launch changes nothing.
cudaError_t launch_fused_step(const StepTensor* tensors, int64_t n_tensors, const StepChunk* chunks,
                              int64_t n_chunks, int64_t chunk, DType pt, DType gt, const void* fac, DType ft,
                              bool decoupled, unsigned int* done_counter, const float* found_inf,
                              cudaStream_t s);

}  // namespace adafisher
