// NOTE: [CUDA emulator] csrc/'s kernels, launchers and bindings.cpp, compiled unchanged as C++ and
// run on the CPU, so that CPU CI executes the CUDA backend's code against the torch reference
// (tests/cuda_emu.py builds it; tests/test_cuda_backend.py uses it where no GPU is present).
//  * Every CUDA thread of a block is a fiber (its own stack, started with makecontext, switched with
//    the compiler's __builtin_setjmp/__builtin_longjmp: jump() says why) on one host thread.  Blocks
//    run one at a time, in reverse order (a kernel may not depend on block order); a block's fibers
//    run in thread order until each finishes or waits at a barrier.
//  * __syncthreads releases when every unfinished thread of the block waits there, at the same
//    call site; a warp shuffle is two warp barriers around an exchange slot, every unfinished
//    lane of the warp at the same call site, its own lane and its partner's in the mask.  Threads
//    that wait at different barriers (a __syncthreads under a divergent branch, or two of them on
//    either side of one; a shuffle with missing lanes) stop the kernel with
//    cudaErrorLaunchFailure and a message naming the sites, which the binding's check_launch raises.
//  * ADAFISHER_EMU_THREAD_ORDER=reverse runs a block's threads in reverse order between barriers:
//    a kernel without shared-memory races gives bitwise the same results either way (a
//    racecheck-lite; test_cuda_emu.py compares whole training runs).
//  * ADAFISHER_EMU_BLOCK_ORDER=shuffle:SEED runs the blocks of each launch in a random order drawn
//    from SEED and the launch's number since the setting changed: partial sums meeting through
//    atomicAdd are then added in another order, as on a GPU where blocks finish when they finish
//    (how test_deterministic.py checks NOTE: [ordered partials]).
//  * ADAFISHER_EMU_DRY=1 checks and logs each launch's configuration and runs none of its blocks:
//    the launchers' grids at GPU-size shapes, which no CPU could compute (test_cuda_emu.py).
//  * Built with -ftrivial-auto-var-init=pattern: an uninitialised local reads as 0xFE bytes
//    (-1.7e38 as a float), so a kernel that uses one produces garbage the tests see.
//  * tests/cuda_emu.py runs each op with the CPU memory it allocates filled with 0xFF bytes (NaN):
//    a kernel that reads scratch no block wrote shows (NOTE: [poisoned allocations] in
//    tests/poison.cpp).
//  * NOTE: [poisoned shared memory] A __shared__ variable is a function-local static (one block
//    runs at a time), which would hold the previous block's values (zeros in the first).  So
//    tests/cuda_emu.py follows each __shared__ declaration with af_emu::shared(&v, sizeof v), and
//    the first thread of each block to pass it fills v with 0xFF bytes (NaN, -1): a kernel that
//    reads shared memory no thread of its block wrote shows, as on a GPU, where it reads garbage.
// Not modelled: races between blocks and warp-synchronous timing (racecheck on the GPU),
// out-of-bounds accesses except past a whole allocation under the ASan build (NOTE: [emulated
// memcheck] in tests/cuda_emu.py).
#include "cuda_runtime.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <random>
#include <string>
#include <ucontext.h>
#include <unordered_map>
#include <vector>

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace af_emu {
namespace {

enum class State { kReady, kAtSync, kAtWarp, kDone };
constexpr size_t kStack = 256 * 1024;   // per thread; pages are committed only where touched
constexpr unsigned kMaxThreads = 1024;

struct Site {        // where a thread waits: a barrier's or shuffle's source file and line
  const char* file;
  int line;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  std::string str() const { return std::string(file) + ":" + std::to_string(line); }
};

// GCC's (and clang's) five-word setjmp buffer: frame pointer, resume address, stack pointer.
using Context = void* [5];

struct Fiber {
  Context jb;
  ucontext_t uc;
  dim3 tid;
  State state;
  bool started;
  Site site;
};

std::mutex launch_mutex;
uint64_t launch_count = 0;   // varies the block shuffle between the launches of one run
std::string shuffle_spec;    // the ADAFISHER_EMU_BLOCK_ORDER that launch_count counts from
std::vector<Fiber> fibers;
std::unique_ptr<char[]> stacks;
unsigned n_threads = 0, cur = 0;
bool reverse_threads = false;
Context scheduler;
Thunk body = nullptr;
void* body_ctx = nullptr;
uint64_t slots[kMaxThreads];            // warp exchange values
uint64_t block_serial = 0;              // counts the blocks run, for the shared-memory poison
std::unordered_map<void*, uint64_t> poisoned_in;   // __shared__ address -> the block that filled it
cudaError_t last_error = cudaSuccess;
std::string last_message;

// Fiber switches use the compiler's builtins, not libc's _setjmp/_longjmp, and the functions that
// switch are left out of ASan's instrumentation (SWITCH): ASan unpoisons the whole stack before
// each _longjmp and each call of a noreturn function (a sigaltstack syscall and a memset of the
// stack's shadow), which took half the sanitized op tests' time; with asan-stack=0 no fiber stack
// holds poison to clear.  A function may not hold both builtins, so the jump is one of its own.
#define SWITCH __attribute__((no_sanitize_address))
[[noreturn]] SWITCH __attribute__((noinline)) void jump(Context& to) { __builtin_longjmp(to, 1); }

SWITCH void wait(State s, Site site) {
  Fiber& f = fibers[cur];
  f.state = s;
  f.site = site;
  if (!__builtin_setjmp(f.jb)) jump(scheduler);
}

SWITCH void entry() {
  body(body_ctx);
  fibers[cur].state = State::kDone;
  jump(scheduler);
}

SWITCH void resume(unsigned t) {
  Fiber& f = fibers[t];
  cur = t;
  threadIdx = f.tid;
  if (__builtin_setjmp(scheduler)) return;
  if (f.started) jump(f.jb);
  f.started = true;
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stacks.get() + static_cast<size_t>(t) * kStack;
  f.uc.uc_stack.ss_size = kStack;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, entry, 0);
  setcontext(&f.uc);
}

bool fail(const std::string& msg, cudaError_t e = cudaErrorLaunchFailure) {
  if (last_error == cudaSuccess) {     // the first error is the one reported
    last_error = e;
    last_message = "CUDA emulator: " + msg;
  }
  return false;
}

std::string block_name() {
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ")";
}

// The first waiting thread of [lo, hi) whose site differs from the first's, as "a and b", or "".
std::string sites_apart(unsigned lo, unsigned hi, State s) {
  const Fiber* first = nullptr;
  for (unsigned t = lo; t < hi; ++t) {
    if (fibers[t].state != s) continue;
    if (first == nullptr) first = &fibers[t];
    else if (!(fibers[t].site == first->site)) return first->site.str() + " and " + fibers[t].site.str();
  }
  return "";
}

// Release the threads waiting at a barrier every unfinished member of their group reached, at one
// site (run_block calls this only while some thread is unfinished).
bool release() {
  bool all_sync = true;
  for (unsigned t = 0; t < n_threads; ++t)
    all_sync = all_sync && (fibers[t].state == State::kDone || fibers[t].state == State::kAtSync);
  if (all_sync) {
    const std::string apart = sites_apart(0, n_threads, State::kAtSync);
    if (!apart.empty()) return fail(block_name() + ": threads wait at different __syncthreads (" + apart + ")");
    for (unsigned t = 0; t < n_threads; ++t)
      if (fibers[t].state == State::kAtSync) fibers[t].state = State::kReady;
    return true;
  }
  bool released = false;
  for (unsigned w = 0; w < n_threads; w += 32) {
    const unsigned hi = std::min(n_threads, w + 32);
    bool all_warp = true, some = false;
    for (unsigned t = w; t < hi; ++t) {
      if (fibers[t].state == State::kDone) continue;
      some = true;
      all_warp = all_warp && fibers[t].state == State::kAtWarp;
    }
    if (some && all_warp) {
      const std::string apart = sites_apart(w, hi, State::kAtWarp);
      if (!apart.empty())
        return fail(block_name() + ": lanes of warp " + std::to_string(w / 32) + " shuffle at different sites (" +
                    apart + ")");
      for (unsigned t = w; t < hi; ++t)
        if (fibers[t].state == State::kAtWarp) fibers[t].state = State::kReady;
      released = true;
    }
  }
  return released;
}

bool run_block() {
  ++block_serial;
  for (unsigned t = 0; t < n_threads; ++t) {
    fibers[t].tid = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
    fibers[t].state = State::kReady;
    fibers[t].started = false;
  }
  for (;;) {
    for (unsigned i = 0; i < n_threads && last_error == cudaSuccess; ++i) {
      const unsigned t = reverse_threads ? n_threads - 1 - i : i;
      if (fibers[t].state == State::kReady) resume(t);
    }
    if (last_error != cudaSuccess) return false;
    bool done = true;
    for (unsigned t = 0; t < n_threads; ++t) done = done && fibers[t].state == State::kDone;
    if (done) return true;
    if (!release())   // (the first error stands: release()'s, where it names the sites apart)
      return fail(block_name() + ": threads wait at different barriers (__syncthreads in divergent "
                  "code, or a warp shuffle some lanes of the warp never reach)");
  }
}

}  // namespace

void syncthreads(const char* file, int line) { wait(State::kAtSync, Site{file, line}); }

void shared(void* p, size_t bytes) {      // NOTE: [poisoned shared memory]
  uint64_t& filled = poisoned_in[p];
  if (filled != block_serial) {
    std::memset(p, 0xFF, bytes);
    filled = block_serial;
  }
}

// a barrier that also ORs a predicate over the block: every thread adds, all read, then every
// thread resets (any of them may have exited, as on a GPU, where exited threads take no part),
// behind a third barrier, so that no thread's next call adds before the reset whatever the order
// the threads run in (blocks run one at a time: one accumulator serves them all)
int syncthreads_or(int predicate, const char* file, int line) {
  static int any = 0;
  if (predicate) any = 1;
  syncthreads(file, line);
  const int result = any;
  syncthreads(file, line);
  any = 0;
  syncthreads(file, line);
  return result;
}

void warp_exchange(void* value, size_t bytes, unsigned mask, int lane_mask, const char* file, int line) {
  std::memcpy(&slots[cur], value, bytes);
  wait(State::kAtWarp, Site{file, line});
  const unsigned src = cur ^ static_cast<unsigned>(lane_mask);
  if (lane_mask < 0 || lane_mask > 31 || src >= n_threads || fibers[src].state == State::kDone) {
    fail("warp shuffle from lane " + std::to_string(src) + ", which is outside the block or has exited");
    jump(scheduler);
  }
  if (!(mask >> (cur % 32) & 1u) || !(mask >> (src % 32) & 1u)) {   // undefined on the device
    fail("warp shuffle of lane " + std::to_string(cur % 32) + " from lane " + std::to_string(src % 32) +
         " with mask " + std::to_string(mask) + ", which leaves one of them out (" + Site{file, line}.str() + ")");
    jump(scheduler);
  }
  std::memcpy(value, &slots[src], bytes);
  wait(State::kAtWarp, Site{file, line});
}

cudaError_t run_grid(dim3 grid, dim3 block, Thunk b, void* ctx, const void* kernel) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const uint64_t n = static_cast<uint64_t>(block.x) * block.y * block.z;
  const uint64_t nb = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (n == 0 || n > kMaxThreads || nb == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    fail("invalid launch configuration: grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
             "," + std::to_string(grid.z) + "), block of " + std::to_string(n) + " threads",
         cudaErrorInvalidConfiguration);
    return last_error;
  }
  if (n > fibers.size()) {
    fibers.resize(n);
    stacks.reset(new char[n * kStack]);
  }
  n_threads = static_cast<unsigned>(n);
  if (const char* log = std::getenv("ADAFISHER_EMU_LAUNCH_LOG")) {   // audit aid: grid of each launch
    if (FILE* f = std::fopen(log, "a")) {
      Dl_info info{};      // the kernel's (mangled) symbol, which a test can look for
      const char* name = kernel != nullptr && dladdr(kernel, &info) && info.dli_sname ? info.dli_sname : "?";
      std::fprintf(f, "grid %u %u %u block %u %s\n", grid.x, grid.y, grid.z, static_cast<unsigned>(n), name);
      std::fclose(f);
    }
  }
  if (const char* dry = std::getenv("ADAFISHER_EMU_DRY"); dry != nullptr && std::strcmp(dry, "1") == 0)
    return last_error;
  const char* order = std::getenv("ADAFISHER_EMU_THREAD_ORDER");
  reverse_threads = order != nullptr && std::strcmp(order, "reverse") == 0;
  body = b;
  body_ctx = ctx;
  gridDim = grid;
  blockDim = block;
  std::vector<uint64_t> blocks(nb);
  std::iota(blocks.rbegin(), blocks.rend(), uint64_t(0));
  const char* border = std::getenv("ADAFISHER_EMU_BLOCK_ORDER");
  if (border != nullptr && std::strncmp(border, "shuffle:", 8) == 0) {
    // counted from the setting, not from the process's first launch: a seed gives the same
    // orders whatever ran before it in the process (which other tests of a pytest worker did)
    if (shuffle_spec != border) {
      shuffle_spec = border;
      launch_count = 0;
    }
    std::mt19937_64 rng(std::strtoull(border + 8, nullptr, 10) + launch_count);
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  ++launch_count;
  for (const uint64_t i : blocks) {
    blockIdx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                    static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y)));
    if (!run_block()) break;
  }
  return last_error;
}

}  // namespace af_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = af_emu::last_error;
  af_emu::last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : af_emu::last_message.c_str();
}
