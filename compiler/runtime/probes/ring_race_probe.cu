// ring_race_probe: does compute-sanitizer racecheck model the weight ring's hand-off?
//
// The megakernel's ring (compiler/codegen/amk.cuh): a producer warp fills shared-memory slots
// with bulk copies (cp.async.bulk, completing on a "full" mbarrier), consumer warps read a slot
// and arrive on its "empty" mbarrier, and the producer waits for "empty" before the next bulk
// copy into the slot. This probe is that protocol and nothing else, in one CTA:
//   ./probe 0   the protocol as the kernel uses it (correct: prints the right sum)
//   ./probe 1   the consumer frees each slot before it reads it (a real race)
// Run both under `compute-sanitizer --tool racecheck`. Seen on an H200 (driver 580.159.04,
// CUDA 13.0, 2026-11-30): `./probe 0` prints the right sum and racecheck still reports 14
// hazards (consumer read vs bulk-copy write of a slot), the same kind of pair it reports on the
// megakernel's ring: racecheck does not model the mbarrier hand-off of a bulk copy. (An
// earlier control that let the producer skip its wait broke the barrier protocol and hung
// racecheck; the early-free control above has not been run yet.)
// Build: nvcc -gencode=arch=compute_90a,code=sm_90a -o probe ring_race_probe.cu
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

constexpr int SLOTS = 2, SLOT_BYTES = 4096, CHUNKS = 16, N = SLOT_BYTES / 4;

__device__ unsigned addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ void wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(addr(bar)), "r"(parity) : "memory");
}

__device__ void release(unsigned long long* bar) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared.b64 st, [%0];\n}" ::"r"(addr(bar)) : "memory");
}

__global__ void ring(const float* src, float* out, int free_early) {
  __shared__ __align__(128) float slot[SLOTS][N];
  __shared__ __align__(8) unsigned long long full[SLOTS], empty[SLOTS];
  if (threadIdx.x == 0) {
    for (int i = 0; i < SLOTS; ++i) {
      asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(addr(full + i)));
      asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(addr(empty + i)));  // one consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // producer warp: lane 0 copies
    if (threadIdx.x != 0) return;
    for (int c = 0; c < CHUNKS; ++c) {
      const int s = c % SLOTS;
      wait(empty + s, (c / SLOTS & 1) ^ 1);
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(addr(full + s)), "r"(SLOT_BYTES) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(addr(slot[s])), "l"(src + c * N), "r"(SLOT_BYTES), "r"(addr(full + s)) : "memory");
    }
    return;
  }
  float sum = 0.f;  // consumer warp
  for (int c = 0; c < CHUNKS; ++c) {
    const int s = c % SLOTS;
    wait(full + s, c / SLOTS & 1);
    if (free_early && threadIdx.x == 32) release(empty + s);
    for (int i = threadIdx.x - 32; i < N; i += 32) sum += slot[s][i];
    __syncwarp();
    if (!free_early && threadIdx.x == 32) release(empty + s);
  }
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (threadIdx.x == 32) *out = sum;
}

int main(int argc, char** argv) {
  const int racy = argc > 1 ? atoi(argv[1]) : 0;
  float *src, *out, host[CHUNKS * N], got;
  for (int i = 0; i < CHUNKS * N; ++i) host[i] = static_cast<float>(i % 7);
  cudaMalloc(&src, sizeof host);
  cudaMalloc(&out, sizeof(float));
  cudaMemcpy(src, host, sizeof host, cudaMemcpyHostToDevice);
  ring<<<1, 64>>>(src, out, racy);
  cudaError_t e = cudaDeviceSynchronize();
  cudaMemcpy(&got, out, sizeof got, cudaMemcpyDeviceToHost);
  double want = 0;
  for (int i = 0; i < CHUNKS * N; ++i) want += host[i];
  printf("probe %s: %s, sum %.0f (want %.0f)\n", racy ? "racy" : "ring", cudaGetErrorString(e), got, want);
  return e != cudaSuccess;
}
