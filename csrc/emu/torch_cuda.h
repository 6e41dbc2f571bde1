// What bindings.cpp takes from c10/cuda, for its CPU build under the CUDA emulator (NOTE: [CUDA
// emulator] in emu.cpp): the ops are registered for CPU tensors and the kernels run on the host.
#pragma once
#include <ATen/ATen.h>
#include <cstdlib>

#include "cuda_runtime.h"

#define AF_DEVICE_KEY CPU

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10

namespace adafisher {
constexpr at::DeviceType kDeviceType = at::kCPU;
constexpr const char* kDeviceName = "CPU (CUDA emulator)";
// Every tensor is a CPU tensor here, so where fused_step keeps the step cannot follow the device:
// ADAFISHER_EMU_DEVICE_STEPS=1 emulates steps on the device (the capturable path), unset the host.
inline bool host_step(const at::Tensor&) { return std::getenv("ADAFISHER_EMU_DEVICE_STEPS") == nullptr; }
// ADAFISHER_EMU_CAPTURING=1 emulates a stream capturing a CUDA graph (NOTE: [captured tables])
inline bool stream_capturing(cudaStream_t) { return std::getenv("ADAFISHER_EMU_CAPTURING") != nullptr; }
}  // namespace adafisher
