// torch binding of the AdaFisher CUDA kernels: registers the six ops as torch custom ops in the
// `adafisher` namespace (CUDA implementations here; fake implementations for torch.compile are
// registered from Python in adafisher_fast/cuda_backend.py).  Every op mutates its outputs in place
// and returns nothing; the mutated arguments are marked (a!) in the schemas.  This file only checks
// and adapts tensors: the kernels live in csrc/<op>.cu behind csrc/launchers.h.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>
#ifdef ADAFISHER_EMULATE  // the CPU build of NOTE: [CUDA emulator]: this file over CPU tensors
#include "emu/torch_cuda.h"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define AF_DEVICE_KEY CUDA
namespace adafisher {
constexpr at::DeviceType kDeviceType = at::kCUDA;
constexpr const char* kDeviceName = "CUDA";
inline bool host_step(const at::Tensor& t) { return t.is_cpu(); }
inline bool stream_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(s, &status);
  TORCH_CHECK(err == cudaSuccess, "adafisher: cudaStreamIsCapturing: ", cudaGetErrorString(err));
  return status != cudaStreamCaptureStatusNone;
}
}  // namespace adafisher
#endif

#include <algorithm>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <list>
#include <numeric>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "launchers.h"

namespace adafisher {
namespace {

DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    default: TORCH_CHECK(false, "adafisher::", op, ": ", name, " must be float16/bfloat16/float32/float64, got ",
                         t.scalar_type());
  }
  return DType::F32;
}

DType acc_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "adafisher::", op, ": ", name,
              " must be float32 or float64 (the statistics buffer dtype), got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? DType::F32 : DType::F64;
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == kDeviceType, "adafisher::", op, ": ", name, " must be a ", kDeviceName,
              " tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "adafisher::", op, ": ", name, " is on ", t.device(),
              " but the other tensors are on ", ref.device());
}

void check_out(const at::Tensor& out, const at::Tensor& ref, const char* op, int64_t n) {
  check_cuda(out, ref, op, "out");
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous(), "adafisher::", op, ": out must be a contiguous 1-D view");
  TORCH_CHECK(out.numel() == n, "adafisher::", op, ": out has ", out.numel(), " entries, expected ", n);
}

// GradScaler's found_inf, which the kernel reads (no host read, NOTE: [GradScaler]): nullptr when
// absent, else its address after checking it is one float32 element beside `ref`.
const float* found_inf_ptr(const std::optional<at::Tensor>& found_inf, const at::Tensor& ref, const char* op) {
  if (!found_inf.has_value()) return nullptr;
  check_cuda(*found_inf, ref, op, "found_inf");
  TORCH_CHECK(found_inf->scalar_type() == at::kFloat && found_inf->numel() == 1, "adafisher::", op,
              ": found_inf must be one float32 element");
  return found_inf->data_ptr<float>();
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "adafisher::", op, ": kernel launch failed: ", cudaGetErrorString(e));
}

// Under torch.use_deterministic_algorithms(True), a scratch for the column reduction's partial sums
// over K features (NOTE: [ordered partials]); an undefined tensor (atomic adds) otherwise.
at::Tensor partials(const at::Tensor& out, int64_t K) {
  if (!at::globalContext().deterministicAlgorithms()) return at::Tensor();
  return at::empty({reduce_partials_size(K)}, out.options());
}
void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// NOTE: [memory order] (fisher_kernels/host.py): a channels_last activation or gradient is read where
// it lies.  x's dims from outermost to innermost when x is dense in that order, else empty.
std::vector<int64_t> memory_order(const at::Tensor& x) {
  std::vector<int64_t> order(x.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  if (!x.permute(order).is_contiguous()) order.clear();
  return order;
}

// x as contiguous (A, K, I), K = x.size(dim), whose sums over A and I are x's over every other dim:
// a view of x's memory when x is dense in some dim order, else of a contiguous copy.
at::Tensor columns_view(const at::Tensor& x, int64_t dim) {
  at::Tensor xc = x;
  if (!x.is_contiguous()) {
    const std::vector<int64_t> order = memory_order(x);
    if (order.empty()) {
      xc = x.contiguous();
    } else {
      xc = x.permute(order);
      dim = std::find(order.begin(), order.end(), dim) - order.begin();
    }
  }
  int64_t A = 1, I = 1;
  for (int64_t i = 0; i < dim; ++i) A *= xc.size(i);
  for (int64_t i = dim + 1; i < xc.dim(); ++i) I *= xc.size(i);
  return xc.reshape({A, xc.size(dim), I});
}

void linear_stats(const at::Tensor& x, const at::Tensor& out, int64_t dim, bool square, double scale) {
  TORCH_CHECK(x.dim() >= 1, "adafisher::linear_stats: x must have at least one dimension");
  const int64_t nd = x.dim();
  TORCH_CHECK(dim >= -nd && dim < nd, "adafisher::linear_stats: dim ", dim, " out of range for ", nd, "-d x");
  dim = (dim + nd) % nd;
  check_cuda(x, x, "linear_stats", "x");
  check_out(out, x, "linear_stats", x.size(dim));
  const DType xt = float_dtype(x, "linear_stats", "x"), ot = acc_dtype(out, "linear_stats", "out");
  if (x.numel() == 0) return;
  const at::Tensor x3 = columns_view(x, dim);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor part = partials(out, x3.size(1));
  check_launch(launch_linear_stats(x3.data_ptr(), xt, out.data_ptr(), ot, x3.size(0), x3.size(1), x3.size(2), square,
                                   scale, ptr_or_null(part), c10::cuda::getCurrentCUDAStream()), "linear_stats");
}

// padding: flattened (lo, hi) pairs, one per spatial dim; padding_mode 0 zeros, 1 reflect,
// 2 replicate, 3 circular.
void conv_stats(const at::Tensor& x, const at::Tensor& out, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t padding_mode) {
  const int64_t nd = static_cast<int64_t>(kernel_size.size());
  TORCH_CHECK(nd >= 1 && nd <= 3, "adafisher::conv_stats: 1 to 3 spatial dims supported, got ", nd);
  TORCH_CHECK(x.dim() == nd + 2, "adafisher::conv_stats: x must be (B, C, *spatial) with ", nd,
              " spatial dims, got shape ", x.sizes());
  TORCH_CHECK((int64_t)stride.size() == nd && (int64_t)dilation.size() == nd && (int64_t)padding.size() == 2 * nd,
              "adafisher::conv_stats: stride/dilation need ", nd, " entries and padding ", 2 * nd);
  TORCH_CHECK(padding_mode >= 0 && padding_mode <= 3, "adafisher::conv_stats: bad padding_mode ", padding_mode);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "adafisher::conv_stats: groups ", groups,
              " must divide the channel count ", x.size(1));
  check_cuda(x, x, "conv_stats", "x");
  ConvGeom g{};
  g.nd = static_cast<int>(nd);
  g.mode = static_cast<int>(padding_mode);
  int64_t kprod = 1, plane = 1;
  for (int64_t d = 0; d < nd; ++d) {
    g.size[d] = x.size(2 + d); g.kernel[d] = kernel_size[d]; g.stride[d] = stride[d];
    g.dilation[d] = dilation[d]; g.pad_lo[d] = padding[2 * d];
    TORCH_CHECK(g.kernel[d] >= 1 && g.stride[d] >= 1 && g.dilation[d] >= 1,
                "adafisher::conv_stats: kernel_size, stride and dilation must be positive");
    if (padding_mode == 1)
      TORCH_CHECK(padding[2 * d] < g.size[d] && padding[2 * d + 1] < g.size[d],
                  "adafisher::conv_stats: reflect padding must be smaller than the input size");
    if (padding_mode == 3)  // pad_source wraps once: as torch's circular pad, refuse more
      TORCH_CHECK(padding[2 * d] <= g.size[d] && padding[2 * d + 1] <= g.size[d],
                  "adafisher::conv_stats: circular padding must not exceed the input size "
                  "(it would wrap around more than once)");
    g.out_size[d] = (g.size[d] + padding[2 * d] + padding[2 * d + 1] - g.dilation[d] * (g.kernel[d] - 1) - 1) /
                        g.stride[d] + 1;
    TORCH_CHECK(g.out_size[d] >= 1, "adafisher::conv_stats: empty output along spatial dim ", d);
    kprod *= g.kernel[d]; plane *= g.size[d];
  }
  check_out(out, x, "conv_stats", x.size(1) * kprod);
  const DType xt = float_dtype(x, "conv_stats", "x"), ot = acc_dtype(out, "conv_stats", "out");
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  // a channels_last x (memory order B, *spatial, C) is read where it lies and Q is (*spatial, C)
  std::vector<int64_t> cl(nd + 2);
  cl[0] = 0; cl[nd + 1] = 1;
  std::iota(cl.begin() + 1, cl.end() - 1, 2);
  g.channels_last = !x.is_contiguous() && memory_order(x) == cl;
  const at::Tensor xc = g.channels_last ? x : x.contiguous();
  const int64_t n = x.size(1) * plane;
  at::Tensor work = at::empty({conv_pointwise(g) ? 0 : conv_work_rows(x.size(0), n, x.element_size()) * n},
                              out.options());
  const at::Tensor part = partials(out, n);
  check_launch(launch_conv_stats(xc.data_ptr(), xt, out.data_ptr(), ot, work.data_ptr(), x.size(0), x.size(1), g,
                                 ptr_or_null(part), c10::cuda::getCurrentCUDAStream()), "conv_stats");
}

// mode 0 = "channel", 1 = "sample"
void norm_stats(const at::Tensor& x, const at::Tensor& out, int64_t mode, int64_t groups, double eps, bool center,
                const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var) {
  TORCH_CHECK(x.dim() == 3, "adafisher::norm_stats: x must be an (R, C, I) view, got shape ", x.sizes());
  TORCH_CHECK(mode == 0 || mode == 1, "adafisher::norm_stats: mode must be 0 (channel) or 1 (sample)");
  check_cuda(x, x, "norm_stats", "x");
  check_out(out, x, "norm_stats", x.size(1));
  const DType xt = float_dtype(x, "norm_stats", "x"), ot = acc_dtype(out, "norm_stats", "out");
  const int64_t R = x.size(0), C = x.size(1), I = x.size(2);
  TORCH_CHECK(mode == 0 || (groups >= 1 && C % groups == 0), "adafisher::norm_stats: groups ", groups,
              " must divide C = ", C);
  TORCH_CHECK(mean.has_value() == var.has_value(), "adafisher::norm_stats: give both mean and var or neither");
  at::Tensor m, v;
  DType mt = DType::F32;
  if (mean.has_value()) {
    TORCH_CHECK(mode == 0, "adafisher::norm_stats: running mean/var only apply to mode channel");
    m = mean->contiguous(); v = var->to(m.scalar_type()).contiguous();
    check_cuda(m, x, "norm_stats", "mean"); check_cuda(v, x, "norm_stats", "var");
    TORCH_CHECK(m.numel() == C && v.numel() == C, "adafisher::norm_stats: mean/var need C = ", C, " entries");
    mt = acc_dtype(m, "norm_stats", "mean");
  }
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  // read where it lies (NOTE: [memory order]): channel statistics take any (A, C, I) view, sample
  // ones a contiguous or channels_last (strides (C*I, 1, C)) x
  const bool cl = mode == 1 && I > 1 && C > 1 && !x.is_contiguous() && x.stride(0) == C * I &&
                  x.stride(1) == 1 && x.stride(2) == C;
  const at::Tensor xc = mode == 0 ? columns_view(x, 1) : (cl ? x : x.contiguous());
  at::Tensor work = at::empty({mode == 1 ? norm_stats_work_size(R, C, I, groups) : 2 * C + 2}, out.options());
  const at::Tensor part = partials(out, C);
  check_launch(launch_norm_stats(xc.data_ptr(), xt, out.data_ptr(), ot, work.data_ptr(), xc.size(0), C, xc.size(2),
                                 static_cast<int>(mode), groups, eps, center,
                                 ptr_or_null(m), ptr_or_null(v), mt,
                                 cl, ptr_or_null(part), c10::cuda::getCurrentCUDAStream()), "norm_stats");
}

void embedding_stats(const at::Tensor& idx, const at::Tensor& out) {
  check_cuda(idx, idx, "embedding_stats", "idx");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
              "adafisher::embedding_stats: idx must be int64 or int32, got ", idx.scalar_type());
  check_cuda(out, idx, "embedding_stats", "out");
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous(), "adafisher::embedding_stats: out must be a contiguous 1-D view");
  const DType ot = acc_dtype(out, "embedding_stats", "out");
  if (idx.numel() == 0) return;
  c10::cuda::CUDAGuard guard(idx.device());
  const at::Tensor ic = idx.contiguous();
  check_launch(launch_embedding_stats(ic.data_ptr(), idx.scalar_type() == at::kLong ? DType::I64 : DType::I32,
                                      ic.numel(), out.data_ptr(), ot, out.numel(), c10::cuda::getCurrentCUDAStream()),
               "embedding_stats");
}

void layer_ema(const at::Tensor& buf, int64_t n_acc, const at::Tensor& term_ptr, const at::Tensor& term_src,
               const at::Tensor& term_pow, const at::Tensor& term_coef, const at::Tensor& term_q,
               const at::Tensor& term_factor, const at::Tensor& factor_start, const at::Tensor& layer_factors,
               const at::Tensor& layer_fstart, const at::Tensor& state, const at::Tensor& fac, const at::Tensor& initialized,
               const at::Tensor& counters, double decay, double weight, double decay_first, double weight_first,
               bool normalise_raw, bool normalise_state, const std::optional<at::Tensor>& found_inf) {
  const char* op = "layer_ema";
  check_cuda(buf, buf, op, "buf");
  const DType ot = acc_dtype(buf, op, "buf");
  const int64_t nf = layer_factors.numel(), n_raw = state.numel(), n_layers = layer_fstart.numel() - 1;
  for (const auto* t : {&term_ptr, &term_src, &term_pow, &term_coef, &term_q, &term_factor, &factor_start,
                        &layer_factors, &layer_fstart, &state, &fac, &initialized, &counters}) {
    check_cuda(*t, buf, op, "table/state tensor");
    TORCH_CHECK(t->is_contiguous(), "adafisher::layer_ema: table and state tensors must be contiguous");
  }
  for (const auto* t : {&term_ptr, &term_src, &term_factor, &factor_start, &layer_factors, &layer_fstart, &counters})
    TORCH_CHECK(t->scalar_type() == at::kLong, "adafisher::layer_ema: index tensors and counters must be int64");
  for (const auto* t : {&term_pow, &term_coef, &term_q, &state, &fac})
    TORCH_CHECK(t->scalar_type() == buf.scalar_type(), "adafisher::layer_ema: term_pow/coef/q, state and fac must "
                "have the buffer dtype ", buf.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(initialized.scalar_type() == at::kBool && initialized.numel() == nf,
              "adafisher::layer_ema: initialized must be bool [n_factors]");
  TORCH_CHECK(buf.numel() == n_acc + nf, "adafisher::layer_ema: buf has ", buf.numel(), " entries, expected n_acc + ",
              "n_factors = ", n_acc + nf);
  TORCH_CHECK(factor_start.numel() == nf + 1 && fac.numel() == n_raw + 1 && term_ptr.numel() == n_raw + 1,
              "adafisher::layer_ema: factor_start [n_factors+1], fac [n_raw+1] and term_ptr [n_raw+1] expected");
  TORCH_CHECK(counters.dim() == 2 && counters.size(0) == n_layers && counters.size(1) == 2,
              "adafisher::layer_ema: counters must be int64 [n_layers, 2]");
  const float* skip = found_inf_ptr(found_inf, buf, op);
  c10::cuda::CUDAGuard guard(buf.device());
  at::Tensor raw = at::empty({std::max<int64_t>(n_raw, 1)}, buf.options());
  at::Tensor minmax = at::empty({std::max<int64_t>(2 * nf, 1)}, buf.options());
  EmaArgs a{};
  a.buf = buf.data_ptr(); a.n_acc = n_acc;
  a.term_ptr = term_ptr.data_ptr<int64_t>(); a.term_src = term_src.data_ptr<int64_t>();
  a.term_pow = term_pow.data_ptr(); a.term_coef = term_coef.data_ptr(); a.term_q = term_q.data_ptr();
  a.term_factor = term_factor.data_ptr<int64_t>(); a.factor_start = factor_start.data_ptr<int64_t>();
  a.layer_factors = layer_factors.data_ptr<int64_t>();
  a.layer_fstart = layer_fstart.data_ptr<int64_t>(); a.n_layers = n_layers;
  a.state = state.data_ptr(); a.fac = fac.data_ptr(); a.initialized = initialized.data_ptr<bool>();
  a.counters = counters.data_ptr<int64_t>(); a.raw_work = raw.data_ptr();
  a.minmax_work = minmax.data_ptr();
  a.found_inf = skip;
  a.decay = decay; a.weight = weight; a.decay_first = decay_first; a.weight_first = weight_first;
  a.normalise_raw = normalise_raw; a.normalise_state = normalise_state;
  check_launch(launch_layer_ema(a, ot, c10::cuda::getCurrentCUDAStream()), op);
}

// NOTE: [step tables] The fused_step tables (StepTensor + StepChunk bytes) are uploaded once and
// kept on the device, keyed by their bytes: a training loop with device steps (capturable) builds
// the same bytes every step, so it makes no host-to-device copy after the first, and a CUDA graph
// captured after a warm-up step replays a table that stays alive.  (Host steps put t in the bytes,
// so they upload every step, as before.)  The table ends with its launch's ticket counter (NOTE:
// [step chunks]), uploaded as zero and left at zero by the kernel: a counter per table, not per
// device, so that two optimizers stepping at once on two streams cannot take each other's tickets
// (as the Triton twin's counter is cached with its tables, NOTE: [step tickets]).  A table used
// while the stream is capturing moves to a list that is never evicted, since the graph replays
// its address (NOTE: [captured tables] in adafisher_fast/kernel_host.py); one the capture would
// have to upload is refused, as the Triton twin's (the graph would replay a freed host copy).
// The key is the table's tensor part and its chunk size, which determine the chunk list: only a
// miss builds the list (`table()`: 88 KB for ResNet-18's 11k chunks, NOTE: [step chunks]).
at::Tensor device_table(std::string key, const at::Device& dev, bool capturing,
                        const std::function<std::string()>& table) {
  static std::mutex mu;
  static std::list<std::pair<std::string, at::Tensor>> cache;      // most recent first, at most 8
  static std::list<std::pair<std::string, at::Tensor>> captured;   // kept for good
  key.push_back(static_cast<char>(dev.index()));
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& entry : captured)
    if (entry.first == key) return entry.second;
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->first == key) {
      auto& to = capturing ? captured : cache;
      to.splice(to.begin(), cache, it);
      return to.front().second;
    }
  }
  TORCH_CHECK(!capturing, "adafisher::fused_step: a table would be uploaded inside this CUDA-graph "
              "capture, and the graph would replay a freed host copy: step counts kept on the host "
              "(capturable=False), or parameters, gradients or hyper-parameters that no eager step "
              "before the capture used; capture with capturable=True after an eager step with the "
              "same tensors and settings (NOTE: [capturable])");
  const std::string bytes = table();
  at::Tensor host = at::empty({static_cast<int64_t>(bytes.size())},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(kDeviceType == at::kCUDA));
  std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  cache.emplace_front(std::move(key), host.to(dev, /*non_blocking=*/true));
  if (cache.size() > 8) cache.pop_back();
  return cache.front().second;
}

// Whether off + the sum of k * s over ``terms`` is below limit, for off, k, s >= 0, in int64 without
// wrapping (an absurd stride's product would wrap below it).
bool index_below(int64_t off, std::initializer_list<std::pair<int64_t, int64_t>> terms, int64_t limit) {
  int64_t left = limit - 1 - off;
  for (const auto& [k, s] : terms) {
    if (left < 0 || (k != 0 && s > left / k)) return false;
    left -= k * s;
  }
  return left >= 0;
}

// reference.check_meta of one row: the kernel trusts it (a wrong one reads past fac, or divides by 0)
void check_meta_row(const int64_t* row, int64_t numel, int64_t fac_numel, size_t i) {
  bool ok = row[kCols] >= 1 && numel % row[kCols] == 0 && row[kRows] == numel / row[kCols] &&
            row[kHPh] >= 0 && row[kHPh] < row[kHGr];
  for (int j = kSOff; j <= kHGs; ++j) ok = ok && row[j] >= 0;
  if (ok && row[kRows] > 0) {       // the indices are affine and non-decreasing: the last is the largest
    const int64_t r = row[kRows] - 1, c = row[kCols] - 1;
    const int64_t g = static_cast<int64_t>((static_cast<uint64_t>(r) + row[kHPh]) / row[kHGr]);  // r's group
    ok = index_below(row[kSOff], {{r, row[kSR]}, {c, row[kSC]}}, fac_numel) &&
         index_below(row[kHOff], {{r, row[kHR]}, {c, row[kHC]}, {g, row[kHGs]}}, fac_numel);
  }
  TORCH_CHECK_VALUE(ok, "fused_step: meta row ", i, " does not map parameter ", i, " (", numel,
                    " elements) into fac (", fac_numel, " entries): expected rows * cols = numel, cols >= 1, ",
                    "0 <= h_ph < h_gr, offsets and strides >= 0 and every S and H index below fac.numel() ",
                    "(NOTE: [param map])");
}

// kernel_host.row_transpose: how the kernel walks p, g, m in memory order (NOTE: [row transpose]):
// 1 row-major (or any dense layout for a factor-free row), T > 1 rows stored transposed, 0 neither
int64_t row_transpose(const int64_t* row, const at::Tensor& p, const at::Tensor& g, const at::Tensor& m) {
  if (p.is_contiguous() && g.is_contiguous() && m.is_contiguous()) return 1;
  if (g.strides() != p.strides() || m.strides() != p.strides()) return 0;
  if (row[kSR] == 0 && row[kSC] == 0 && row[kHR] == 0 && row[kHC] == 0 && row[kHGs] == 0)
    return p.is_non_overlapping_and_dense() ? 1 : 0;
  const int64_t n = p.dim();
  // (rows * cols = numel: check_meta_row ran first)
  if (n < 3 || p.size(1) <= 1 || row[kRows] != p.size(0)) return 0;
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < n; ++d) perm.push_back(d);
  perm.push_back(1);
  return p.permute(perm).is_contiguous() ? p.size(1) : 0;
}

void fused_step(at::TensorList params, at::TensorList grads, at::TensorList moms, at::TensorList steps,
                const at::Tensor& fac, const at::Tensor& meta, at::ArrayRef<double> lr, at::ArrayRef<double> beta,
                at::ArrayRef<double> wd, at::ArrayRef<double> lam, bool decoupled,
                const c10::List<std::optional<at::Tensor>>& lr_tensor, const std::optional<at::Tensor>& found_inf) {
  const char* op = "fused_step";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && moms.size() == n && steps.size() == n && lr.size() == n && beta.size() == n &&
              wd.size() == n && lam.size() == n && lr_tensor.size() == n,
              "adafisher::fused_step: params, grads, moms, steps and the ",
              "hyper-parameter lists must have the same length");
  if (n == 0) return;
  check_cuda(fac, params[0], op, "fac");
  const DType ft = acc_dtype(fac, op, "fac");
  // the kernel indexes fac as a dense vector (NOTE: [param map]); a strided view is read through a
  // contiguous copy, as the reference and the Triton twin read it (fac is only read here, like meta)
  const at::Tensor fac_c = fac.contiguous();
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.dim() == 2 && meta.size(0) == (int64_t)n && meta.size(1) == kMapCols,
              "adafisher::fused_step: meta must be int64 [P, ", int(kMapCols), "]");
  // the meta rows travel inside the tensor table (one H2D copy); a CUDA meta costs a sync here
  const at::Tensor meta_h = meta.to(at::kCPU).contiguous();
  const int64_t* mrows = meta_h.data_ptr<int64_t>();
  std::vector<at::Tensor> host_steps;
  // one launch per (param dtype, grad dtype) pair: kernel_dtype(p) * 3 + kernel_dtype(g)
  std::vector<std::vector<StepTensor>> by_type(9);
  const auto kernel_dtype = [](const at::Tensor& u) {
    return u.scalar_type() == at::kFloat ? 0 : (u.scalar_type() == at::kHalf ? 1 : 2);
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = moms[i], &t = steps[i];
    for (const at::Tensor* u : {&p, &g, &m}) check_cuda(*u, params[0], op, "params/grads/moms");
    TORCH_CHECK(t.is_cpu() || t.device() == p.device(), "adafisher::fused_step: step ", i,
                " must be on the CPU or on the parameter's device");
    for (const at::Tensor* u : {&p, &g})
      TORCH_CHECK(u->scalar_type() == at::kFloat || u->scalar_type() == at::kHalf ||
                  u->scalar_type() == at::kBFloat16,
                  "adafisher::fused_step: params and grads must be float32/bfloat16/float16 (float64 goes "
                  "through the torch reference in cuda_backend.py), got ", u->scalar_type(), " for parameter ", i);
    TORCH_CHECK(m.scalar_type() == p.scalar_type(), "adafisher::fused_step: the momentum of parameter ", i,
                " must have the param dtype ", p.scalar_type());
    TORCH_CHECK(g.sizes() == p.sizes() && m.sizes() == p.sizes(), "adafisher::fused_step: parameter ", i,
                " has grad/momentum shapes that differ from ", p.sizes());
    check_meta_row(mrows + i * kMapCols, p.numel(), fac_c.numel(), i);
    const int64_t tr = row_transpose(mrows + i * kMapCols, p, g, m);
    TORCH_CHECK(tr > 0, "adafisher::fused_step: parameter ", i, " and its grad/momentum must be contiguous ",
                "or share channels_last strides (NOTE: [row transpose])");
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1, "adafisher::fused_step: steps must be 0-dim float32");
    TORCH_CHECK(p.numel() / (kStepBlockBytes / 4) < (int64_t)INT32_MAX, "adafisher::fused_step: parameter too large");
    StepTensor s;
    std::memset(&s, 0, sizeof(s));     // padding too: the bytes are a cache key (NOTE: [step tables])
    s.p = p.data_ptr(); s.g = g.data_ptr(); s.m = m.data_ptr();
    if (host_step(t)) {
      s.step = nullptr; s.t_host = static_cast<double>(*t.data_ptr<float>()) + 1.0;
      host_steps.push_back(t);
    } else {
      s.step = t.data_ptr<float>(); s.t_host = 0.0;
    }
    s.numel = p.numel();
    std::copy_n(mrows + i * kMapCols, kMapCols, s.meta);
    s.meta[kT] = tr;
    s.lr = lr[i]; s.beta = beta[i]; s.wd = wd[i]; s.lam = lam[i];
    const std::optional<at::Tensor> lr_t = lr_tensor[i];
    if (lr_t.has_value()) {        // read by the kernel (NOTE: [tensor lr] in kernel_host.py)
      TORCH_CHECK(lr_t->device() == p.device() && lr_t->scalar_type() == at::kFloat && lr_t->numel() == 1,
                  "adafisher::fused_step: lr_tensor ", i, " must be a one-element float32 tensor on the "
                  "parameter's device");
      s.lr_ptr = lr_t->data_ptr<float>();
    }
    by_type[kernel_dtype(p) * 3 + kernel_dtype(g)].push_back(s);
  }
  const float* skip = found_inf_ptr(found_inf, params[0], op);
  TORCH_CHECK(skip == nullptr || host_steps.empty(), "adafisher::fused_step: found_inf needs the step counts "
              "on the device, where the skip is decided (NOTE: [GradScaler])");
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DType types[3] = {DType::F32, DType::F16, DType::BF16};
  for (int k = 0; k < 9; ++k) {
    const auto& ts = by_type[k];
    if (ts.empty()) continue;
    // NOTE: [step chunks]: blocks of a 16-byte word a thread, about kStepTargetPrograms chunks
    const int64_t block = kStepBlockBytes / (types[k / 3] == DType::F32 ? 4 : 2);
    int64_t n_blocks = 0;
    for (const StepTensor& t : ts) n_blocks += (t.numel + block - 1) / block;
    const int64_t chunk = block * std::max<int64_t>(1, std::min(kStepMaxChunkBlocks, n_blocks / kStepTargetPrograms));
    int64_t n_chunks = 0;
    for (const StepTensor& t : ts) n_chunks += (t.numel + chunk - 1) / chunk;
    // one block on the device: [StepTensor x n][StepChunk x n_chunks][ticket counter, 8 bytes]
    // (NOTE: [step tables]); both sizes are multiples of 8, so the counter is aligned
    const size_t tb = ts.size() * sizeof(StepTensor), cb = n_chunks * sizeof(StepChunk);
    static_assert(sizeof(StepTensor) % 8 == 0 && sizeof(StepChunk) % 8 == 0, "table alignment");
    std::string key(tb + sizeof(chunk), '\0');
    std::memcpy(&key[0], ts.data(), tb);
    std::memcpy(&key[tb], &chunk, sizeof(chunk));
    const at::Tensor dev = device_table(std::move(key), params[0].device(), stream_capturing(stream),
                                        [&] {
      std::string bytes(tb + cb + 8, '\0');
      std::memcpy(&bytes[0], ts.data(), tb);
      auto* out = reinterpret_cast<StepChunk*>(&bytes[tb]);
      for (size_t i = 0; i < ts.size(); ++i)
        for (int64_t c = 0; c * chunk < ts[i].numel; ++c)
          *out++ = StepChunk{static_cast<int32_t>(i), static_cast<int32_t>(c)};
      return bytes;
    });
    uint8_t* d = dev.data_ptr<uint8_t>();
    check_launch(launch_fused_step(reinterpret_cast<const StepTensor*>(d), (int64_t)ts.size(),
                                   reinterpret_cast<const StepChunk*>(d + tb), n_chunks, chunk,
                                   types[k / 3], types[k % 3], fac_c.data_ptr(), ft, decoupled,
                                   reinterpret_cast<unsigned int*>(d + tb + cb), skip, stream),
                 op);
  }
  for (const at::Tensor& t : host_steps) *t.data_ptr<float>() += 1.0f;   // as the reference's t += 1
}

}  // namespace
}  // namespace adafisher

TORCH_LIBRARY(adafisher, m) {
  // the fake (torch.compile) implementations live in this Python module; torch imports it on demand
  m.set_python_module("adafisher_fast.cuda_backend");
  m.def("linear_stats(Tensor x, Tensor(a!) out, int dim, bool square, float scale) -> ()");
  m.def("conv_stats(Tensor x, Tensor(a!) out, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "int groups, int padding_mode) -> ()");
  m.def("norm_stats(Tensor x, Tensor(a!) out, int mode, int groups, float eps, bool center, Tensor? mean, "
        "Tensor? var) -> ()");
  m.def("embedding_stats(Tensor idx, Tensor(a!) out) -> ()");
  m.def("layer_ema(Tensor buf, int n_acc, Tensor term_ptr, Tensor term_src, Tensor term_pow, Tensor term_coef, "
        "Tensor term_q, Tensor term_factor, Tensor factor_start, Tensor layer_factors, Tensor layer_fstart, "
        "Tensor(a!) state, Tensor(b!) fac, Tensor(c!) initialized, Tensor(d!) counters, float decay, float weight, "
        "float decay_first, float weight_first, bool normalise_raw, bool normalise_state, Tensor? found_inf=None) -> ()");
  m.def("fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] moms, Tensor(c!)[] steps, Tensor fac, "
        "Tensor meta, float[] lr, float[] beta, float[] wd, float[] lam, bool decoupled, Tensor?[] lr_tensor, Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(adafisher, AF_DEVICE_KEY, m) {
  m.impl("linear_stats", &adafisher::linear_stats);
  m.impl("conv_stats", &adafisher::conv_stats);
  m.impl("norm_stats", &adafisher::norm_stats);
  m.impl("embedding_stats", &adafisher::embedding_stats);
  m.impl("layer_ema", &adafisher::layer_ema);
  m.impl("fused_step", &adafisher::fused_step);
}

// `import adafisher_fast._C` (cuda_backend.py) loads this library, which runs the registrations
// above.  The module itself is empty: the ops are reached through torch.ops.adafisher, so there
// is no pybind11 here, only the init function that Python's import requires.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
