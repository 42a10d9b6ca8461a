// ---------------------------------------------------------------------------------------------
// amk.cuh: the primitives every amk-farm megakernel is built from. codegen pastes this file into
// kernel.cu after the model's constexpr dims (B, THREADS, NWARPS, KC, ...), so it is generic over
// them and holds nothing model-specific. Conventions:
//   * weights and the KV cache are bf16, activations and accumulators fp32;
//   * data another CTA wrote during this launch (activations, KV cache, tokens) is read with
//     L1-bypassing loads (ld.global.cg); weights, which nothing writes, with __ldg;
//   * every reduction has one fixed order (per-thread index order, xor butterflies, then warps
//     0..NWARPS-1 in order through shared memory), so results are bitwise reproducible;
//   * no floating-point atomics: the only atomics are the integer task counters;
//   * a CTA is THREADS consumer threads (warps 0..NWARPS-1: wait, compute, signal) plus one
//     producer warp that streams the weights of the CTA's matvec tasks into a shared-memory ring
//     ahead of the consumers (weights depend on nothing, so it never waits on a counter); the
//     consumers synchronize among themselves with named barrier 1, never with __syncthreads.
// ---------------------------------------------------------------------------------------------

using bf16 = __nv_bfloat16;
using bf16x8 = uint4;  // 8 bf16 = one 16-byte load
using u64 = unsigned long long;
using i64 = long long;
using counter_ref = cuda::atomic_ref<u64, cuda::thread_scope_device>;
// @profile-defs

static_assert(THREADS % 32 == 0 && NWARPS == THREADS / 32, "whole warps");
constexpr int BLOCK_THREADS = THREADS + 32;  // the consumers, then the producer warp

__device__ __forceinline__ int warp_id() { return threadIdx.x / 32; }
__device__ __forceinline__ int lane_id() { return threadIdx.x % 32; }

// barrier of the THREADS consumer threads (named barrier 1; the producer warp never joins it)
__device__ __forceinline__ void cta_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(THREADS) : "memory");
}

// ---- loads -----------------------------------------------------------------------------------

// 8 weights (read-only for the whole launch: the non-coherent path is safe)
__device__ __forceinline__ bf16x8 ld_weight8(const bf16* p) {
  return __ldg(reinterpret_cast<const bf16x8*>(p));
}
// 8 KV-cache elements, written by other CTAs during this launch: bypass L1
__device__ __forceinline__ bf16x8 ld_cache8(const bf16* p) {
  return __ldcg(reinterpret_cast<const bf16x8*>(p));
}
// 4 activations, written by other CTAs during this launch: bypass L1
__device__ __forceinline__ float4 ld_act4(const float* p) {
  return __ldcg(reinterpret_cast<const float4*>(p));
}
__device__ __forceinline__ float ld_act(const float* p) { return __ldcg(p); }

// bf16 -> fp32 is exact: a bf16 is the high half of an fp32. Element 0 is the low half.
__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// f[0..8) = the 8 bf16 of w, in memory order
__device__ __forceinline__ void unpack8(const bf16x8 w, float (&f)[8]) {
  f[0] = bf16_lo(w.x); f[1] = bf16_hi(w.x); f[2] = bf16_lo(w.y); f[3] = bf16_hi(w.y);
  f[4] = bf16_lo(w.z); f[5] = bf16_hi(w.z); f[6] = bf16_lo(w.w); f[7] = bf16_hi(w.w);
}

// acc + sum_i w[i] * x[i] over 8 elements, in index order; x[0..4) at lo, x[4..8) at hi
// (16-byte aligned shared memory)
__device__ __forceinline__ float dot8(const bf16x8 w, const float* lo, const float* hi, float acc) {
  const float4 x0 = *reinterpret_cast<const float4*>(lo);
  const float4 x1 = *reinterpret_cast<const float4*>(hi);
  acc = fmaf(bf16_lo(w.x), x0.x, acc); acc = fmaf(bf16_hi(w.x), x0.y, acc);
  acc = fmaf(bf16_lo(w.y), x0.z, acc); acc = fmaf(bf16_hi(w.y), x0.w, acc);
  acc = fmaf(bf16_lo(w.z), x1.x, acc); acc = fmaf(bf16_hi(w.z), x1.y, acc);
  acc = fmaf(bf16_lo(w.w), x1.z, acc); acc = fmaf(bf16_hi(w.w), x1.w, acc);
  return acc;
}
__device__ __forceinline__ float dot8(const bf16x8 w, const float* x, float acc) {
  return dot8(w, x, x + 4, acc);
}

// ---- fixed-order reductions ------------------------------------------------------------------

// sum over the N-lane groups of a warp (N a power of two <= 32) by an xor butterfly; a + b is
// commutative in IEEE arithmetic, so every lane of a group ends with the same bits
template <int N = 32>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = N / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// sum over the CTA: warp butterflies, then warps 0..NWARPS-1 in order (scratch: NWARPS floats);
// every thread returns the same value
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = group_sum(v);
  if (lane_id() == 0) scratch[warp_id()] = v;
  cta_sync();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < NWARPS; ++w) s += scratch[w];
  cta_sync();
  return s;
}

// (value, index) maximum with the first index on ties; NaN is never a maximum
struct ArgMax {
  float val;
  i64 idx;
};
__device__ __forceinline__ ArgMax argmax_pick(ArgMax a, ArgMax b) {
  return (b.val > a.val || (b.val == a.val && b.idx < a.idx)) ? b : a;
}
__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    ArgMax b{__shfl_xor_sync(0xffffffffu, a.val, o), __shfl_xor_sync(0xffffffffu, a.idx, o)};
    a = argmax_pick(a, b);
  }
  return a;
}

// ---- online softmax state of one query head over some keys: (running max m, sum l, o[8]) ----

// fold key score s with value slice v into (m, l, o): the rescale exponent m - m' is <= 0
__device__ __forceinline__ void softmax_push(float& m, float& l, float (&o)[8], float s,
                                             const float (&v)[8]) {
  const float mn = fmaxf(m, s);
  const float a = expf(m - mn);  // 0 while m is -inf
  const float e = expf(s - mn);
  l = l * a + e;
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = o[i] * a + e * v[i];
  m = mn;
}

// merge (m2, l2, o2) into (m, l, o); two empty states (m = -inf) stay empty
__device__ __forceinline__ void softmax_merge(float& m, float& l, float (&o)[8], float m2, float l2,
                                              const float (&o2)[8]) {
  const float mn = fmaxf(m, m2);
  const bool empty = mn == -INFINITY;
  const float a = empty ? 0.f : expf(m - mn);
  const float a2 = empty ? 0.f : expf(m2 - mn);
  l = l * a + l2 * a2;
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = o[i] * a + o2[i] * a2;
  m = mn;
}

// ---- counters: acquire before a task, release after it ---------------------------------------

struct Task {
  unsigned short op;  // instruction kind (OP_*)
  short layer;        // decoder layer, -1 outside the layers
  unsigned short a, b, c;  // kind-specific params (schedule.py)
  unsigned short nw;       // number of waits: WAITS[w0 .. w0 + nw)
  int w0, signal;          // first wait; the counter this task increments when done
};
// counters[counter] >= (step + step_offset) * PER_STEP[counter] + count
struct Wait {
  int counter, count, step_offset;
};

// consumer thread 0 spins with acquire loads (short nanosleep backoff) until every wait of the
// task holds at global step `step`, then the consumers go on; targets <= 0 (step_offset -1 at
// step 0) hold at once
__device__ __forceinline__ void wait_task(u64* counters, const Task& t, const Wait* waits,
                                          const int* per_step, i64 step) {
  if (threadIdx.x == 0) {
    for (int i = t.w0; i < t.w0 + t.nw; ++i) {
      const Wait w = waits[i];
      const i64 target = (step + w.step_offset) * per_step[w.counter] + w.count;
      counter_ref c(counters[w.counter]);
      for (unsigned ns = 32; static_cast<i64>(c.load(cuda::memory_order_acquire)) < target;
           ns = ns < 128 ? 2 * ns : 128)
        __nanosleep(ns);
    }
  }
  cta_sync();
}

// all consumer threads' writes are done (barrier), then thread 0 publishes them with a release
// increment
__device__ __forceinline__ void signal_task(u64* counters, const Task& t) {
  cta_sync();
  if (threadIdx.x == 0) counter_ref(counters[t.signal]).fetch_add(1, cuda::memory_order_release);
}

// ---- shared memory: the weight ring, its barriers, the consumers' work area ------------------
// Dynamic shared memory, SMEM_BYTES: STAGES slots of SLOT_BYTES (weights in flight), a full and
// an empty mbarrier per slot, then SMEM_FLOATS floats of work area (staged matvec inputs and
// outputs, attention state). A slot holds weight row segments: NWARPS of WC bf16 columns (fma)
// or MRB of MWC columns, MPITCH bytes apart (mma); see the matvec section.

constexpr int WC = SLOT_BYTES / 2 / NWARPS;  // columns of one row segment in a slot
constexpr int SMEM_BYTES = STAGES * SLOT_BYTES + 16 * STAGES + 4 * SMEM_FLOATS;
static_assert(WC % 8 == 0 && SLOT_BYTES % 16 == 0, "16-byte row segments");

struct Smem {
  unsigned char* ring;  // STAGES x SLOT_BYTES
  u64* full;            // full[s]: slot s holds its chunk (the copy's bytes have landed)
  u64* empty;           // empty[s]: every consumer warp is done reading slot s
  float* f;             // SMEM_FLOATS of work area
};
// a position in the ring: the slot, and the parity of the slot's barrier phase to wait for
struct Ring {
  int slot = 0;
  unsigned phase = 0;
  __device__ __forceinline__ void advance() {
    if (++slot == STAGES) slot = 0, phase ^= 1u;
  }
};

// With THREAD_COPIES (a build for compute-sanitizer racecheck) the slots go round in lockstep:
// the producer copies a slot, then the whole CTA meets at named barrier 2 (full) and, once the
// consumers have read the slot, at named barrier 3 (empty). Racecheck models such barriers, not
// mbarriers, nor a named barrier's bar.arrive (probes/ring_race_probe.cu); nothing overlaps.
__device__ __forceinline__ void ring_sync(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(BLOCK_THREADS) : "memory");
}

__device__ __forceinline__ unsigned smem_addr(const void* ptr) {
  return static_cast<unsigned>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ unsigned dynamic_smem_size() {
  unsigned n;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
  return n;
}
__device__ __forceinline__ void mbar_init(u64* bar, unsigned count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared.b64 st, [%0];\n}" ::"r"(smem_addr(bar))
               : "memory");
}
// wait until the phase of `bar` with parity `parity` has completed
__device__ __forceinline__ void mbar_wait(u64* bar, unsigned parity) {
  unsigned done = 0;
  while (!done) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
#else
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
#endif
  }
}

__device__ __forceinline__ Smem smem_plan(unsigned char* base) {
  Smem sm;
  sm.ring = base;
  sm.full = reinterpret_cast<u64*>(base + STAGES * SLOT_BYTES);
  sm.empty = sm.full + STAGES;
  sm.f = reinterpret_cast<float*>(sm.empty + STAGES);
  return sm;
}
// thread 0, before the CTA splits into roles (a __syncthreads follows)
__device__ __forceinline__ void ring_init(const Smem& sm) {
  for (int i = 0; i < STAGES; ++i) {
#if __CUDA_ARCH__ >= 900
    mbar_init(sm.full + i, 1);  // lane 0's arrive after the copies; the bytes complete the phase
#else
    mbar_init(sm.full + i, 32);  // one cp.async arrive per producer lane
#endif
    mbar_init(sm.empty + i, NWARPS);  // one arrive per consumer warp
  }
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// producer warp: copy `rows` weight row segments of `width` columns, row(v0 + i) + col, into the
// next slot (segment i at byte i * pitch), once the consumers have freed it. sm_90: one bulk copy
// per segment (the copy engine; lane 0 announces the bytes, the lanes issue the copies),
// completing on full[slot] by byte count; sm_80: 16-byte cp.async by all lanes, each lane
// arriving on full[slot] when its copies have landed. With THREAD_COPIES (Options.ring_copy =
// threads, for compute-sanitizer racecheck, which does not see the async copies' hand-off) the
// lanes load and store the segments themselves, in lockstep with the consumers (ring_sync). With
// WEIGHT_EVICT_FIRST the async copies carry an L2 evict-first policy: weights are read once a
// step, so they should not push the activations and the KV cache out of L2.
__device__ __forceinline__ u64 weight_policy() {
  u64 policy = 0;
  if constexpr (WEIGHT_EVICT_FIRST)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

template <class Row>
__device__ __forceinline__ void produce(const Smem& sm, Ring& r, Row row, int v0, int rows,
                                        int col, int width, int pitch) {
  u64* full = sm.full + r.slot;
  unsigned char* dst = sm.ring + r.slot * SLOT_BYTES;
  if constexpr (THREAD_COPIES) {  // 16-byte loads and stores by the lanes, in lockstep
    const int n8 = width / 8;
    for (int i = lane_id(); i < rows * n8; i += 32) {
      const int4 v = __ldg(reinterpret_cast<const int4*>(row(v0 + i / n8) + col + 8 * (i % n8)));
      *reinterpret_cast<int4*>(dst + (i / n8) * pitch + 16 * (i % n8)) = v;
    }
    ring_sync(2);  // full: the consumers take the slot
    ring_sync(3);  // empty: they are done with it
    r.advance();
    return;
  }
  mbar_wait(sm.empty + r.slot, r.phase ^ 1u);  // a fresh slot's previous phase counts as done
#if __CUDA_ARCH__ >= 900
  // the consumers' reads of the slot (generic proxy), acquired through empty[slot], come before
  // the copy engine's writes (async proxy)
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  // lane 0 announces the bytes, the lanes issue the copies, then lane 0 arrives: the arrive
  // comes after every issue, which is how compute-sanitizer's racecheck sees the copies'
  // writes ordered before the consumers' reads (probes/ring_race_probe.cu, mode 2)
  if (lane_id() == 0)
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;"
                 ::"r"(smem_addr(full)), "r"(rows * width * 2) : "memory");
  __syncwarp();
  const u64 policy = weight_policy();
  for (int i = lane_id(); i < rows; i += 32) {
    const unsigned d = smem_addr(dst + i * pitch), bytes = width * 2, bar = smem_addr(full);
    const bf16* src = row(v0 + i) + col;
    if constexpr (WEIGHT_EVICT_FIRST)
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
          "[%0], [%1], %2, [%3], %4;" ::"r"(d), "l"(src), "r"(bytes), "r"(bar), "l"(policy)
          : "memory");
    else
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
          ::"r"(d), "l"(src), "r"(bytes), "r"(bar) : "memory");
  }
  __syncwarp();
  if (lane_id() == 0) mbar_arrive(full);
#else
  const int n8 = width / 8;
  const u64 policy = weight_policy();
  for (int i = lane_id(); i < rows * n8; i += 32) {
    const unsigned d = smem_addr(dst + (i / n8) * pitch + 16 * (i % n8));
    const bf16* src = row(v0 + i / n8) + col + 8 * (i % n8);
    if constexpr (WEIGHT_EVICT_FIRST)
      asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;"
                   ::"r"(d), "l"(src), "l"(policy) : "memory");
    else
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
  }
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" ::"r"(smem_addr(full)) : "memory");
#endif
  r.advance();
}

// consumer warp: the next slot, once its copies have landed
__device__ __forceinline__ const unsigned char* consume(const Smem& sm, const Ring& r) {
  if constexpr (THREAD_COPIES)
    ring_sync(2);  // full
  else
    mbar_wait(sm.full + r.slot, r.phase);
  return sm.ring + r.slot * SLOT_BYTES;
}
// consumer warp: done reading the slot
__device__ __forceinline__ void release(const Smem& sm, Ring& r) {
  if constexpr (THREAD_COPIES) {
    ring_sync(3);  // empty
  } else {
    __syncwarp();
    if (lane_id() == 0) mbar_arrive(sm.empty + r.slot);
  }
  r.advance();
}


// ---- matvec: part[v][b] = W_v . xin[b] over K columns ----------------------------------------
// xin = src, or RMSNorm(src) * norm_w when norm_w is given. The weights come through the ring;
// producer (load_matvec) and consumers (matvec) walk the same slots in the same order. Two
// consumers, chosen by the MMA constexpr (Options.matvec):
//
// fma (CUDA cores, fp32 x): a slot holds NWARPS rows x WC columns; warp w takes row v0 + w.
//   for each input chunk [k0, k0 + n) of at most KC columns (staged whole in xs, fp32):
//     for each block of NWARPS output rows v0 ..:
//       for each column slice [j, j + WC) of the input chunk: one slot
//
// mma (tensor cores, mma.m16n8k16 bf16 -> fp32): a slot holds MRB = MMA_ROWS rows (RG groups
//   of 16) x MWC columns, rows MPITCH bytes apart (padded: ldmatrix without bank conflicts);
//   warp w takes the 16 rows 16 (w % RG) .. and the (w / RG)-th of the slice's 16-column steps
//   (fewer rows a slot: longer row segments, so fewer and larger copies, but a cross-warp sum
//   for every 16 rows). x enters as two bf16 terms,
//   x = big + small (|x - big - small| <= 2^-17 |x|), each multiplied into the fp32 accumulators,
//   so the products carry about fp32 accuracy. The accumulators live across the whole K, so the
//   summation order does not depend on KC (nor on B: each batch row is its own mma column).
//   for each input chunk [k0, k0 + n) of at most KC columns (staged in xs as bf16 pairs):
//     for each block of MRB output rows v0 ..:
//       for each column slice [j, j + MWC) of the input chunk: one slot
//
// Work area: xs [B][KC] (4 bytes an element either way) | part [MAX_VROWS][B] outputs |
// scratch [NWARPS] | rstd [B] | red (mma: the per-warp accumulators of a row block).

constexpr int XS_FLOATS = B * KC;
constexpr int PART_FLOATS = MAX_VROWS * B;
static_assert(KC % 8 == 0, "staged chunks hold whole 8-element groups");

constexpr int MRB = MMA_ROWS;                                 // mma: rows of a slot
constexpr int RG = MRB / 16;                                  // mma: 16-row groups of a slot
constexpr int MWC = ((SLOT_BYTES / MRB - 16) / 2) / 16 * 16;  // mma: columns of a slice
constexpr int MPITCH = 2 * MWC + 16;                          // mma: bytes from row to row
static_assert(!MMA || (MRB % 16 == 0 && NWARPS % RG == 0 && MWC >= 16 && KC % 16 == 0),
              "mma tiles");

// rstd[b] = rsqrt(mean(src[b]^2) + eps) over the whole row of K, in a fixed order
template <int K>
__device__ __forceinline__ void rms_rstd(const float* src, float* rstd, float* scratch) {
  static_assert(K % 4 == 0, "float4 rows");
  for (int b = 0; b < B; ++b) {
    float s = 0.f;
    for (int k = threadIdx.x * 4; k < K; k += THREADS * 4) {
      const float4 v = ld_act4(src + static_cast<size_t>(b) * K + k);
      s = fmaf(v.x, v.x, s); s = fmaf(v.y, v.y, s); s = fmaf(v.z, v.z, s); s = fmaf(v.w, v.w, s);
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) rstd[b] = rsqrtf(s / K + EPS);
  }
  cta_sync();
}

// fma: xs[b] = xin[b][k0:k0+n] (src rows of stride ld), in the split layout: of the 8 columns of
// group g, the first 4 go to xs[b][4g..4g+4) and the last 4 to xs[b][ldx/2 + 4g ..], so the
// lanes of a warp, taking consecutive groups, read consecutive 16 bytes (no bank conflicts)
__device__ __forceinline__ void stage(float* xs, int ldx, const float* src, int ld, int k0, int n,
                                      const float* rstd, const bf16* norm_w) {
  const int n4 = n / 4;
  for (int i = threadIdx.x; i < B * n4; i += THREADS) {
    const int b = i / n4, k = 4 * (i % n4);
    float4 v = ld_act4(src + static_cast<size_t>(b) * ld + k0 + k);
    if (norm_w != nullptr) {
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(norm_w + k0 + k));
      const float r = rstd[b];
      v.x = v.x * r * bf16_lo(w.x); v.y = v.y * r * bf16_hi(w.x);
      v.z = v.z * r * bf16_lo(w.y); v.w = v.w * r * bf16_hi(w.y);
    }
    *reinterpret_cast<float4*>(xs + b * ldx + (k & 4) * (ldx / 8) + k / 8 * 4) = v;
  }
}

// a pair of fp32 as (big, small) bf16x2 words: big = bf16(x), small = bf16(x - big)
__device__ __forceinline__ uint2 split2(float x0, float x1) {
  const __nv_bfloat162 big = __floats2bfloat162_rn(x0, x1);
  const float2 fb = __bfloat1622float2(big);
  const __nv_bfloat162 small = __floats2bfloat162_rn(x0 - fb.x, x1 - fb.y);
  return make_uint2(*reinterpret_cast<const unsigned*>(&big),
                    *reinterpret_cast<const unsigned*>(&small));
}

// mma: xs4[(s * B + b) * 4 + t] = the B-operand words of lane (b % 8, t) at 16-column step s of
// [k0, k0 + n): {big(x[k], x[k+1]), big(x[k+8], x[k+9]), small(..), small(..)}, k = k0 + 16 s + 2t
__device__ __forceinline__ void stage_mma(uint4* xs4, const float* src, int ld, int k0, int n,
                                          const float* rstd, const bf16* norm_w) {
  for (int i = threadIdx.x; i < n / 16 * B * 4; i += THREADS) {
    const int t = i % 4, b = i / 4 % B, s = i / (4 * B);
    const int k = k0 + 16 * s + 2 * t;
    const float* xr = src + static_cast<size_t>(b) * ld + k;
    float2 p0 = __ldcg(reinterpret_cast<const float2*>(xr));
    float2 p8 = __ldcg(reinterpret_cast<const float2*>(xr + 8));
    if (norm_w != nullptr) {
      const unsigned w0 = __ldg(reinterpret_cast<const unsigned*>(norm_w + k));
      const unsigned w8 = __ldg(reinterpret_cast<const unsigned*>(norm_w + k + 8));
      const float r = rstd[b];
      p0.x = p0.x * r * bf16_lo(w0); p0.y = p0.y * r * bf16_hi(w0);
      p8.x = p8.x * r * bf16_lo(w8); p8.y = p8.y * r * bf16_hi(w8);
    }
    const uint2 a = split2(p0.x, p0.y), c = split2(p8.x, p8.y);
    xs4[(s * B + b) * 4 + t] = make_uint4(a.x, c.x, a.y, c.y);
  }
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// producer side of `matvec`: stream the slots of row(v)[0:K], v < nrows, through the ring
template <int K, class Row>
__device__ __forceinline__ void load_matvec(Row row, int nrows, const Smem& sm, Ring& r) {
  constexpr int CHUNK = K < KC ? K : KC;
  if constexpr (MMA) {
    for (int k0 = 0; k0 < K; k0 += CHUNK) {
      const int n = K - k0 < CHUNK ? K - k0 : CHUNK;
      for (int v0 = 0; v0 < nrows; v0 += MRB) {
        const int rows = nrows - v0 < MRB ? nrows - v0 : MRB;
        for (int j = 0; j < n; j += MWC)
          produce(sm, r, row, v0, rows, k0 + j, n - j < MWC ? n - j : MWC, MPITCH);
      }
    }
  } else {
    for (int k0 = 0; k0 < K; k0 += CHUNK) {
      const int n = K - k0 < CHUNK ? K - k0 : CHUNK;
      for (int v0 = 0; v0 < nrows; v0 += NWARPS) {
        const int rows = nrows - v0 < NWARPS ? nrows - v0 : NWARPS;
        for (int j = 0; j < n; j += WC)
          produce(sm, r, row, v0, rows, k0 + j, n - j < WC ? n - j : WC, 2 * WC);
      }
    }
  }
}

// fma consumer (see above)
template <int K>
__device__ __forceinline__ void matvec_fma(int nrows, const float* src, int ld,
                                           const bf16* norm_w, float* rstd, const Smem& sm,
                                           Ring& r) {
  constexpr int CHUNK = K < KC ? K : KC;
  float* xs = sm.f;
  float* part = xs + XS_FLOATS;
  for (int k0 = 0; k0 < K; k0 += CHUNK) {
    const int n = K - k0 < CHUNK ? K - k0 : CHUNK;
    stage(xs, CHUNK, src, ld, k0, n, rstd, norm_w);
    cta_sync();
    // @mark 1
    for (int v0 = 0; v0 < nrows; v0 += NWARPS) {
      const int v = v0 + warp_id();  // warp-uniform
      float acc[B];
#pragma unroll
      for (int b = 0; b < B; ++b) acc[b] = 0.f;
      for (int j = 0; j < n; j += WC) {
        const int width = n - j < WC ? n - j : WC;
        const bf16* seg = reinterpret_cast<const bf16*>(consume(sm, r)) + warp_id() * WC;
        if (v < nrows) {
#pragma unroll 4
          for (int k = lane_id() * 8; k < width; k += 32 * 8) {
            const bf16x8 w8 = *reinterpret_cast<const bf16x8*>(seg + k);
            const float* x = xs + (j + k) / 2;  // group (j + k) / 8, 4 floats a group
#pragma unroll
            for (int b = 0; b < B; ++b) acc[b] = dot8(w8, x + b * CHUNK, x + b * CHUNK + CHUNK / 2, acc[b]);
          }
        }
        release(sm, r);
      }
      if (v < nrows) {
#pragma unroll
        for (int b = 0; b < B; ++b) {
          const float s = group_sum(acc[b]);
          if (lane_id() == 0) part[v * B + b] = k0 > 0 ? part[v * B + b] + s : s;
        }
      }
    }
    cta_sync();
  }
  // @mark 2
}

// mma consumer (see above); red: NWARPS * NB * 128 floats. The accumulators of every row block
// of the task stay in registers across the input chunks (the inputs are staged once per chunk,
// not once per row block), then each block is summed over the warps in order.
template <int K>
__device__ __forceinline__ void matvec_mma(int nrows, const float* src, int ld,
                                           const bf16* norm_w, float* rstd, float* red,
                                           const Smem& sm, Ring& r) {
  constexpr int CHUNK = K < KC ? K : KC;
  constexpr int MKW = NWARPS / RG;                      // warps across a slice
  constexpr int NB = (B + 7) / 8;                       // 8-column batch tiles
  constexpr int NRB = (MAX_VROWS + MRB - 1) / MRB;      // row blocks of the widest task
  uint4* xs4 = reinterpret_cast<uint4*>(sm.f);
  float* part = sm.f + XS_FLOATS;
  const int rg = warp_id() % RG, kq = warp_id() / RG, g = lane_id() / 4, t = lane_id() % 4;
  // ldmatrix.x4 row address of this lane: matrix lane / 8 = (rows +0/+8) x (columns +0/+8)
  const int a_off = (rg * 16 + lane_id() % 8 + (lane_id() / 8) % 2 * 8) * MPITCH + lane_id() / 16 * 16;
  const int blocks = (nrows + MRB - 1) / MRB;  // warp-uniform
  float acc[NRB][NB][4];
#pragma unroll
  for (int rb = 0; rb < NRB; ++rb)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) acc[rb][nb][0] = acc[rb][nb][1] = acc[rb][nb][2] = acc[rb][nb][3] = 0.f;
  for (int k0 = 0; k0 < K; k0 += CHUNK) {
    const int n = K - k0 < CHUNK ? K - k0 : CHUNK;
    if (k0 > 0) cta_sync();  // every warp is done with the previous chunk's inputs
    stage_mma(xs4, src, ld, k0, n, rstd, norm_w);
    cta_sync();
    // @mark 1
#pragma unroll
    for (int rb = 0; rb < NRB; ++rb) {
      if (rb >= blocks) break;
      for (int j = 0; j < n; j += MWC) {
        const int steps = (n - j < MWC ? n - j : MWC) / 16, per = (steps + MKW - 1) / MKW;
        const int s1 = (kq + 1) * per < steps ? (kq + 1) * per : steps;
        const unsigned slot = smem_addr(consume(sm, r)) + a_off;
        for (int s = kq * per; s < s1; ++s) {
          unsigned a[4];
          asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                       : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(slot + 32 * s));
          const int step = (j / 16 + s) * B;  // 16-column step within the input chunk, times B
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            const int b = nb * 8 + g;
            const uint4 x = b < B ? xs4[(step + b) * 4 + t] : make_uint4(0, 0, 0, 0);
            mma_bf16(acc[rb][nb], a, x.x, x.y);  // big
            mma_bf16(acc[rb][nb], a, x.z, x.w);  // small
          }
        }
        release(sm, r);
      }
    }
  }
  // @mark 2
  // each row block's accumulators, warp by warp; then y[v][b] = the warps' parts in order
#pragma unroll
  for (int rb = 0; rb < NRB; ++rb) {
    if (rb >= blocks) break;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[((warp_id() * NB + nb) * 4 + e) * 32 + lane_id()] = acc[rb][nb][e];
    cta_sync();
    const int v0 = rb * MRB, rows = nrows - v0 < MRB ? nrows - v0 : MRB;
    for (int i = threadIdx.x; i < rows * B; i += THREADS) {
      const int v = i / B, b = i % B, m = v % 16, c = b % 8;
      const int e = m / 8 * 2 + c % 2, lane = m % 8 * 4 + c / 2;
      float y = 0.f;
      for (int q = 0; q < MKW; ++q) y += red[(((q * RG + v / 16) * NB + b / 8) * 4 + e) * 32 + lane];
      part[(v0 + v) * B + b] = y;
    }
    cta_sync();
  }
  // @mark 3
}

// part[v][b] = row(v)[0:K] . xin[b][0:K] for v < nrows (row: for the producer; the consumers
// read the ring); returns with part complete and visible to every consumer thread
template <int K>
__device__ __forceinline__ void matvec(int nrows, const float* src, int ld, const bf16* norm_w,
                                       const Smem& sm, Ring& r) {
  static_assert(K % 8 == 0 && (!MMA || K % 16 == 0), "rows of whole 16-byte groups (mma: 32)");
  float* scratch = sm.f + XS_FLOATS + PART_FLOATS;
  float* rstd = scratch + NWARPS;
  float* red = rstd + B;
  if (norm_w != nullptr) rms_rstd<K>(src, rstd, scratch);
  // @mark 0
  if constexpr (MMA)
    matvec_mma<K>(nrows, src, ld, norm_w, rstd, red, sm, r);
  else
    matvec_fma<K>(nrows, src, ld, norm_w, rstd, sm, r);
}

// ---- split-KV attention of one KV-head group over a key range ---------------------------------
// A key is held by LPK = D/8 lanes (8 elements each: one 16-byte load of K and of V), so a warp
// takes KPW = 32/LPK keys per step; every key slot keeps an online-softmax state per query head.

constexpr int LPK = D / 8;     // lanes per key
constexpr int KPW = 32 / LPK;  // keys per warp step
static_assert(D % 8 == 0 && LPK <= 32 && 32 % LPK == 0, "a key spans a power-of-two lane group");

// fold keys j in [j0, j1) (slot `lane / LPK` of warp w takes j0 + w*KPW + slot, then every
// NWARPS*KPW) into (m, l, o) of the G heads in qs [G][D]; kc, vc: [S][D] rows of one KV head
__device__ __forceinline__ void attn_keys(const float* qs, const bf16* kc, const bf16* vc, int j0,
                                          int j1, float (&m)[G], float (&l)[G], float (&o)[G][8]) {
  const int slot = lane_id() / LPK, e0 = (lane_id() % LPK) * 8;
  const bf16x8 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = -INFINITY, l[h] = 0.f;
#pragma unroll
    for (int x = 0; x < 8; ++x) o[h][x] = 0.f;
  }
  // the loop is warp-uniform (the butterflies need every lane); a slot past j1 is masked
  int j = j0 + warp_id() * KPW + slot;
  bf16x8 kn = j < j1 ? ld_cache8(kc + static_cast<size_t>(j) * D + e0) : zero;
  bf16x8 vn = j < j1 ? ld_cache8(vc + static_cast<size_t>(j) * D + e0) : zero;
  for (int jb = j0 + warp_id() * KPW; jb < j1; jb += NWARPS * KPW) {
    const bool live = jb + slot < j1;
    const bf16x8 k = kn;
    float v[8];
    unpack8(vn, v);
    j = jb + NWARPS * KPW + slot;  // prefetch the next step's key and value
    kn = j < j1 ? ld_cache8(kc + static_cast<size_t>(j) * D + e0) : zero;
    vn = j < j1 ? ld_cache8(vc + static_cast<size_t>(j) * D + e0) : zero;
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float s = group_sum<LPK>(dot8(k, qs + h * D + e0, 0.f)) * SM_SCALE;  // q.k / sqrt(D)
      if (live) softmax_push(m[h], l[h], o[h], s, v);
    }
  }
  // @mark 1
}

// merge the KPW key slots of the warp (xor over the slot bits of the lane); slot 0 keeps the result
__device__ __forceinline__ void attn_merge_slots(float (&m)[G], float (&l)[G], float (&o)[G][8]) {
#pragma unroll
  for (int h = 0; h < G; ++h) {
#pragma unroll
    for (int off = LPK; off < 32; off *= 2) {
      float o2[8];
#pragma unroll
      for (int x = 0; x < 8; ++x) o2[x] = __shfl_xor_sync(0xffffffffu, o[h][x], off);
      const float m2 = __shfl_xor_sync(0xffffffffu, m[h], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[h], off);
      softmax_merge(m[h], l[h], o[h], m2, l2, o2);
    }
  }
  // @mark 2
}

// merge one head's per-warp states (slot 0 of each warp) over warps 0..NWARPS-1 in order and store
// o [D], m, l; ws: NWARPS * (D + 2) floats of shared memory
__device__ __forceinline__ void attn_merge_warps(float* ws, float m, float l, const float (&o)[8],
                                                 float* o_out, float* m_out, float* l_out) {
  float* mine = ws + warp_id() * (D + 2);
  if (lane_id() < LPK) {
#pragma unroll
    for (int x = 0; x < 8; ++x) mine[lane_id() * 8 + x] = o[x];
    if (lane_id() == 0) mine[D] = m, mine[D + 1] = l;
  }
  cta_sync();
  for (int el = threadIdx.x; el < D; el += THREADS) {
    float mx = -INFINITY, od = 0.f, ld = 0.f;
    for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, ws[w * (D + 2) + D]);
    if (mx != -INFINITY) {  // else no key at all: (m, l, o) = (-inf, 0, 0)
      for (int w = 0; w < NWARPS; ++w) {
        const float a = expf(ws[w * (D + 2) + D] - mx);
        od += a * ws[w * (D + 2) + el];
        ld += a * ws[w * (D + 2) + D + 1];
      }
    }
    o_out[el] = od;
    if (el == 0) *m_out = mx, *l_out = ld;
  }
  cta_sync();
  // @mark 3
}
