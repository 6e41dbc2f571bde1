// tests/test_cuda_emu.py builds this with cuda_emu.SANITIZE (NOTE: [emulated memcheck]): a kernel
// taking a 16-byte word through csrc/'s load_word at a 4-byte-aligned address, which a GPU stops
// with "misaligned address".  argv[1] is the word's offset in floats: 0 aligned, 1 not.
#include <cstdio>
#include <cstdlib>
#include "common.cuh"

__global__ void word_sum_kernel(const float* x, float* out) {
  const auto w = adafisher::load_word<float, 16>(x);
  out[threadIdx.x] = w.v[0] + w.v[1] + w.v[2] + w.v[3];
}

int main(int argc, char** argv) {
  alignas(16) static float x[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  float out[32];
  word_sum_kernel<<<1, 32>>>(x + atoi(argv[1]), out);
  printf("sum %g\n", out[31]);
  return 0;
}
