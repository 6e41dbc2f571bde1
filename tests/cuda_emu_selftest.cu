// Self-test of the CUDA emulator (csrc/emu/, NOTE: [CUDA emulator]); tests/test_cuda_emu.py builds it
// with g++ after the same launch rewrite as csrc/ and checks what it prints.  Plain CUDA: the same
// file would run on a device.
#include <cstdio>
#include <cuda_runtime.h>

// warp shuffles + shared memory + __syncthreads: every thread gets the block's sum of (tid + 1)
__global__ void block_sum_kernel(int* out) {
  __shared__ int warp_sums[32];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int n = blockDim.x * blockDim.y;
  int v = tid + 1;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((tid & 31) == 0) warp_sums[tid >> 5] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < (n + 31) / 32; ++w) total += warp_sums[w];
  out[blockIdx.x * n + tid] = total;
}

// every (block, thread) of a 3-d grid of 2-d blocks counts itself once
__global__ void coverage_kernel(int* hits) {
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * threadIdx.y;
  atomicAdd(hits + b * blockDim.x * blockDim.y + t, 1);
}

// half of the warp at __syncthreads, the other half at a shuffle: a deadlock on the device
__global__ void mixed_barrier_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) {
    __syncthreads();
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 16);
}

// __syncthreads_or, called again and again: round r is true only where thread r % 70 says so
// (rounds 70 and up: none), so a result left over from an earlier round shows
__global__ void sync_or_kernel(int* out) {
  int agree = 1;
  for (int r = 0; r < 80; ++r) {
    const int any = __syncthreads_or(r < 70 && (int)threadIdx.x == r % 70);
    agree = agree && any == (r < 70 && r % 70 < (int)blockDim.x);
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = agree;
}

// the same after thread 0 has exited (it takes no part), then a later launch: nothing left over
__global__ void sync_or_exited_kernel(int* out) {
  if (threadIdx.x == 0) return;
  const int a = __syncthreads_or(threadIdx.x == 5);
  const int b = __syncthreads_or(0);
  if (threadIdx.x == 1) out[blockIdx.x] = a * 10 + b;
}

// the two halves of the block at two different __syncthreads: undefined on the device
__global__ void two_barriers_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// every lane shuffles, but half of them at another call site
__global__ void shuffle_sites_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// lanes 16-31 take part but the mask names only 0-15
__global__ void shuffle_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (int)threadIdx.x, 16);
}

// reads its shared variable before any thread of its block wrote it: garbage on the device
__global__ void shared_unwritten_kernel(int* out) {
  __shared__ int v, w[2];
  out[2 * blockIdx.x] = v;
  out[2 * blockIdx.x + 1] = w[1];
  __syncthreads();
  v = 7;
  w[1] = 8;
}

int main() {
  static int out[2 * 96], hits[2 * 3 * 2 * 6];
  block_sum_kernel<<<2, dim3(32, 3)>>>(out);
  cudaError_t e = cudaGetLastError();
  bool ok = e == cudaSuccess;
  for (int i = 0; i < 2 * 96; ++i) ok = ok && out[i] == 96 * 97 / 2;
  std::printf("block_sum %s\n", ok ? "ok" : "WRONG");

  coverage_kernel<<<dim3(2, 3, 2), dim3(3, 2)>>>(hits);
  ok = cudaGetLastError() == cudaSuccess;
  for (int h : hits) ok = ok && h == 1;
  std::printf("coverage %s\n", ok ? "ok" : "WRONG");

  mixed_barrier_kernel<<<1, 32>>>(out);
  e = cudaGetLastError();
  std::printf("mixed_barrier %d %s\n", (int)e, cudaGetErrorString(e));

  exited_lane_kernel<<<1, 32>>>(out);
  e = cudaGetLastError();
  std::printf("exited_lane %d %s\n", (int)e, cudaGetErrorString(e));

  sync_or_kernel<<<2, 64>>>(out);
  ok = cudaGetLastError() == cudaSuccess;
  for (int i = 0; i < 2 * 64; ++i) ok = ok && out[i] == 1;
  std::printf("sync_or %s\n", ok ? "ok" : "WRONG");
  sync_or_exited_kernel<<<2, 64>>>(out);
  ok = cudaGetLastError() == cudaSuccess && out[0] == 10 && out[1] == 10;
  sync_or_kernel<<<1, 64>>>(out);
  for (int i = 0; i < 64; ++i) ok = ok && out[i] == 1;
  std::printf("sync_or_exited %s\n", ok ? "ok" : "WRONG");

  two_barriers_kernel<<<1, 64>>>(out);
  e = cudaGetLastError();
  std::printf("two_barriers %d %s\n", (int)e, cudaGetErrorString(e));
  shuffle_sites_kernel<<<1, 32>>>(out);
  e = cudaGetLastError();
  std::printf("shuffle_sites %d %s\n", (int)e, cudaGetErrorString(e));
  shuffle_mask_kernel<<<1, 32>>>(out);
  e = cudaGetLastError();
  std::printf("shuffle_mask %d %s\n", (int)e, cudaGetErrorString(e));
  shared_unwritten_kernel<<<2, 1>>>(out);
  e = cudaGetLastError();
  std::printf("shared_unwritten %d %d %d %d %d\n", (int)e, out[0], out[1], out[2], out[3]);

  block_sum_kernel<<<1, 2048>>>(out);
  e = cudaGetLastError();
  std::printf("too_many_threads %d %s\n", (int)e, cudaGetErrorString(e));
  return 0;
}
