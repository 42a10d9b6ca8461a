// ring_race_probe: does compute-sanitizer racecheck model the weight ring's hand-off?
//
// The megakernel's ring (compiler/codegen/amk.cuh): a producer warp fills shared-memory slots
// with bulk copies (cp.async.bulk, completing on a "full" mbarrier), consumer warps read a slot
// and arrive on its "empty" mbarrier, and the producer waits for "empty" before the next bulk
// copy into the slot. This probe is that protocol and nothing else, in one CTA, every producer
// lane copying one segment of a slot:
//   ./probe 0   lane 0 arrives on "full" with the byte count (arrive.expect_tx) before the lanes
//               issue their copies: the kernel's hand-off up to commit 048c013 (correct)
//   ./probe 1   as 0, but the consumer frees each slot before it reads it (a real race)
//   ./probe 2   lane 0 announces the bytes (expect_tx), the lanes issue their copies, and lane 0
//               arrives after a __syncwarp: the kernel's hand-off since (correct)
//   ./probe 3   the lanes copy with their own loads and stores, lane 0 arrives after a
//               __syncwarp (correct)
//   ./probe 4   as 3, but the consumer frees each slot before it reads it (a real race)
//   ./probe 5   the lanes copy with their own loads and stores, and the hand-off goes through
//               named barriers, bar.arrive on one side and bar.sync on the other (correct)
//   ./probe 6   the lanes copy with their own loads and stores, in lockstep: both sides meet at
//               named barrier 1 (full) and 2 (empty) with bar.sync: the kernel's hand-off with
//               --option ring_copy=threads (correct)
//   ./probe 7   as 6, one slot, and the consumer meets at "empty" before it reads (a real race)
// Run each under `compute-sanitizer --tool racecheck` (device_check.sh check does). Seen on an
// H200 (driver 580.159.04, CUDA 13.0, 2026-11-30): every mode prints the right sum; racecheck
// reports hazards for modes 0-5 alike (1, 1, 1, 4, 4, 1), correct or not, and none for mode 6
// while it catches mode 7 (4). So racecheck models neither the mbarrier hand-off (async copies or
// the lanes' own stores) nor a named barrier's bar.arrive, only barriers every side syncs on:
// the megakernel's default ring cannot be judged by it, the ring_copy=threads build can.
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

__device__ void bar_sync(int id) { asm volatile("bar.sync %0, 64;" ::"r"(id) : "memory"); }
__device__ void bar_arrive(int id) { asm volatile("bar.arrive %0, 64;" ::"r"(id) : "memory"); }

__global__ void ring(const float* src, float* out, int mode) {
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
  if (threadIdx.x < 32) {  // producer warp: every lane copies one segment of the slot
    const int lane = threadIdx.x, seg = SLOT_BYTES / 32;
    for (int c = 0; c < CHUNKS; ++c) {
      const int s = c % SLOTS;
      if (mode == 5) {  // thread copies, named barriers, arrive / sync
        if (c >= SLOTS) bar_sync(1 + SLOTS + s);
        for (int i = lane * seg / 4; i < (lane + 1) * seg / 4; ++i) slot[s][i] = src[c * N + i];
        bar_arrive(1 + s);
        continue;
      }
      if (mode >= 6) {  // thread copies in lockstep (mode 7: always slot 0)
        for (int i = lane * seg / 4; i < (lane + 1) * seg / 4; ++i) slot[mode == 7 ? 0 : s][i] = src[c * N + i];
        bar_sync(1);
        bar_sync(2);
        continue;
      }
      wait(empty + s, (c / SLOTS & 1) ^ 1);
      if (mode >= 3) {  // thread copies
        for (int i = lane * seg / 4; i < (lane + 1) * seg / 4; ++i) slot[s][i] = src[c * N + i];
        __syncwarp();
        if (lane == 0) release(full + s);
        continue;
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      if (lane == 0 && mode != 2)  // announce the bytes and arrive before the copies are issued
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(addr(full + s)), "r"(SLOT_BYTES) : "memory");
      if (lane == 0 && mode == 2)  // announce the bytes only; arrive once every copy is issued
        asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(addr(full + s)), "r"(SLOT_BYTES) : "memory");
      __syncwarp();
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(addr(slot[s]) + lane * seg), "l"(src + c * N + lane * seg / 4), "r"(seg), "r"(addr(full + s)) : "memory");
      __syncwarp();
      if (lane == 0 && mode == 2) release(full + s);
    }
    if (mode == 5)
      for (int s = 0; s < SLOTS; ++s) bar_sync(1 + SLOTS + s);  // the last arrivals on empty
    return;
  }
  float sum = 0.f;  // consumer warp
  for (int c = 0; c < CHUNKS; ++c) {
    const int s = c % SLOTS;
    if (mode == 5) {
      bar_sync(1 + s);
      for (int i = threadIdx.x - 32; i < N; i += 32) sum += slot[s][i];
      bar_arrive(1 + SLOTS + s);
      continue;
    }
    if (mode >= 6) {
      bar_sync(1);
      if (mode == 7) bar_sync(2);
      for (int i = threadIdx.x - 32; i < N; i += 32) sum += slot[mode == 7 ? 0 : s][i];
      if (mode == 6) bar_sync(2);
      continue;
    }
    wait(full + s, c / SLOTS & 1);
    if ((mode == 1 || mode == 4) && threadIdx.x == 32) release(empty + s);
    for (int i = threadIdx.x - 32; i < N; i += 32) sum += slot[s][i];
    __syncwarp();
    if (mode != 1 && mode != 4 && threadIdx.x == 32) release(empty + s);
  }
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (threadIdx.x == 32) *out = sum;
}

int main(int argc, char** argv) {
  const int mode = argc > 1 ? atoi(argv[1]) : 0;
  float *src, *out, host[CHUNKS * N], got;
  for (int i = 0; i < CHUNKS * N; ++i) host[i] = static_cast<float>(i % 7);
  cudaMalloc(&src, sizeof host);
  cudaMalloc(&out, sizeof(float));
  cudaMemcpy(src, host, sizeof host, cudaMemcpyHostToDevice);
  ring<<<1, 64>>>(src, out, mode);
  cudaError_t e = cudaDeviceSynchronize();
  cudaMemcpy(&got, out, sizeof got, cudaMemcpyDeviceToHost);
  double want = 0;
  for (int i = 0; i < CHUNKS * N; ++i) want += host[i];
  printf("probe %d: %s, sum %.0f (want %.0f)\n", mode, cudaGetErrorString(e), got, want);
  return e != cudaSuccess;
}
