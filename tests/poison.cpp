// NOTE: [poisoned allocations] built and used by tests/poison.py: while af_poison's count is above
// zero, every CPU allocation is filled with 0xFF bytes first (NaN in float32, float16, bfloat16
// and float64, -1 in the integer types).  An allocator in front of torch's CPU allocator, which
// it calls for the memory: below Python, so torch.compile, fake and meta tensors and the
// torch.device context see torch's own functions.
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstring>

namespace {

std::atomic<int> poison_count{0};

struct PoisonAllocator final : c10::Allocator {
  explicit PoisonAllocator(c10::Allocator* base) : base(base) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base->allocate(n);
    if (n != 0 && poison_count.load() > 0) std::memset(p.get(), 0xFF, n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base->copy_data(dest, src, count);
  }

  c10::Allocator* base;
};

}  // namespace

// on != 0: one more poisoned scope (the first call puts the allocator in front of torch's CPU
// allocator, which it calls for the memory); on == 0: one fewer
extern "C" void af_poison(int on) {
  static PoisonAllocator allocator(c10::GetCPUAllocator());
  static const bool installed = (c10::SetCPUAllocator(&allocator, /*priority=*/1), true);
  (void)installed;
  poison_count += on ? 1 : -1;
}
