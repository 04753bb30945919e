// What the streamed GEMV kernels share (linear_int4_mma.cu; linear_int8_gemv.cu at one row): a producer
// warp copies the weights into a ring of shared-memory stages with the Hopper bulk-copy engine
// (cp.async.bulk, completion counted on an mbarrier), so the bytes in flight cost no registers, and consumer
// warps take the stages' products. A CTA takes a contiguous run of blocks of 16 weight rows. With one row of
// x the consumers first turn it into three int8 planes in shared memory, and the products run on the
// integer tensor cores. Each consumer warp keeps its sums of a block in its own place, and the epilogue adds
// them in warp order, so the outputs have the same bits every run.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <mutex>

#include "gemv_common.cuh"

namespace oiv2_gemv {

constexpr int kBlockRows = 16;        // weight rows of a block: the mma's M

// The low and high halves of a word of two bf16/fp16 values, as floats.
template <typename T>
__device__ __forceinline__ float low_half(uint32_t v);
template <typename T>
__device__ __forceinline__ float high_half(uint32_t v);
template <>
__device__ __forceinline__ float low_half<__nv_bfloat16>(uint32_t v) { return __uint_as_float(v << 16); }
template <>
__device__ __forceinline__ float high_half<__nv_bfloat16>(uint32_t v) { return __uint_as_float(v & 0xFFFF0000u); }
template <>
__device__ __forceinline__ float low_half<__half>(uint32_t v) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(v)));
}
template <>
__device__ __forceinline__ float high_half<__half>(uint32_t v) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(v >> 16)));
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count));
}

__device__ __forceinline__ void barrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(bar)) : "memory");
}

__device__ __forceinline__ void barrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_address(bar);
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  }
}

// bytes (a multiple of 16) from global src to shared dst; their arrival completes on bar.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_address(dst)),
      "l"(src), "r"(bytes), "r"(smem_address(bar)), "l"(policy)
      : "memory");
}

// The blocks of 16 rows CTA `cta` of `ctas` takes: an even split, contiguous (so its W is one range).
__device__ __forceinline__ void cta_blocks(int blocks, int cta, int ctas, int& first, int& end) {
  first = static_cast<int>(static_cast<int64_t>(blocks) * cta / ctas);
  end = static_cast<int>(static_cast<int64_t>(blocks) * (cta + 1) / ctas);
}

// The ring's barriers, set up by thread 0 (the CTA syncs after): full[i] completes when stage i's bytes
// have landed (one arrival, the producer's, with the bytes it expects), empty[i] when the `consumers` warps
// of a team have released the stage.
// Two consumer teams take a block's stages by turns. With an odd count of stages a block, the next block would
// hand a team a ring slot that the other team used last; that team may then wait on the slot's full barrier
// before the other team's copy has landed, the barrier is a phase behind, its parity matches the phase before,
// and the wait returns on old bytes (or the producer waits on the wrong phase of empty and hangs). Seen on an
// H200 at K = 5120 (five stages) with 2-4 blocks a CTA slot: wrong outputs in about one run of five and one
// hang. So each block takes an even count of ring stages, and the producer skips the last one of an odd count
// (skip_stage): every team then only ever waits on slots it used last itself.
__device__ __forceinline__ int even_stages(int stages) { return stages + (stages & 1); }

// The producer's turn on ring stage s without a copy: the slot freed, then its full barrier completed at once.
__device__ __forceinline__ void skip_stage(uint64_t* full, uint64_t* empty, int ring, int s, int lane) {
  const int slot = s % ring;
  if (s >= ring) barrier_wait(&empty[slot], ((s / ring) + 1) & 1);
  if (lane == 0) barrier_arrive(&full[slot]);
}

__device__ __forceinline__ void init_ring(uint64_t* full, uint64_t* empty, int stages, int consumers) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      barrier_init(&full[i], 1);
      barrier_init(&empty[i], consumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
}

// Whether a tensor's data starts on a 16-byte boundary (what the kernels' 16-byte loads and bulk copies need).
inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The blocks a CTA takes at most (cta_blocks) when `blocks` go over `ctas` CTAs.
constexpr int blocks_per_cta(int blocks, int ctas) { return (blocks + ctas - 1) / ctas; }

// Whether two CTAs of `bytes` of shared memory share an SM (the rings' depth was chosen for two).
inline bool two_per_sm(int bytes) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return 2 * (bytes + static_cast<int>(props->reservedSharedMemPerBlock)) <=
         static_cast<int>(props->sharedMemPerMultiprocessor);
}

// A streamed kernel's grid for `blocks` blocks, smem_bytes(b) being a CTA's shared memory when it takes b
// blocks: one CTA an SM slot (two an SM; every SM then streams an equal share, within a block), fewer where
// the blocks are fewer than the slots, more where a CTA would sum more than max_per_cta blocks, or more
// blocks than let two CTAs share an SM (the warps' sums of each block take shared memory). (Two at most:
// three, with the int4 kernel's stages sized for the group and 8 stages, were slower: 1798 against
// 1576-1497 us in the int4 chain, benchmarks/RESULTS.md.)
template <typename SmemBytes>
int streamed_grid(int blocks, int max_per_cta, SmemBytes smem_bytes) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int ctas = std::max(std::min(blocks, 2 * sms), (blocks + max_per_cta - 1) / max_per_cta);
  for (int per_cta = blocks_per_cta(blocks, ctas); per_cta > 1; --per_cta) {
    if (two_per_sm(smem_bytes(per_cta))) break;
    ctas = (blocks + per_cta - 2) / (per_cta - 1);
  }
  if (!two_per_sm(smem_bytes(blocks_per_cta(blocks, ctas)))) {  // one an SM
    ctas = std::max(std::min(blocks, sms), (blocks + max_per_cta - 1) / max_per_cta);
  }
  return ctas;
}

// Lets kKernel take `bytes` of dynamic shared memory (the largest size asked for so far).
template <auto kKernel>
void allow_dynamic_smem(int bytes) {
  static std::mutex mutex;
  static int limit = 0;
  const std::lock_guard<std::mutex> lock(mutex);
  if (bytes > limit) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    limit = bytes;
  }
}

// What a streamed kernel does after the product: nothing; the residual add; the RMSNorm's scalar of each
// row; that scalar and the gated activation (a block's rows 0-7 the gate rows and 8-15 the up rows of the
// same 8 outputs: the output has half as many columns).
enum class Epilogue { kPlain, kAddResidual, kRmsNorm, kRmsNormGatedAct };

// The sums of x over groups: [group][8] (a row of x each), [group] with planes (one row).
__host__ __device__ constexpr int group_stride(bool planes) { return planes ? 1 : 8; }

// x as three int8 planes (kPlanes): each 128-feature slice of the row gets a scale 2^s that puts its largest
// magnitude in [2^19, 2^20), and each feature the integer v = round(x * 2^s) = 65536 p2 + 256 p1 + p0 (p0, p1 in
// [-128, 127], p2 in [-16, 16]): a feature's error is at most 2^-20 of the slice's largest magnitude, and none
// where the feature is at least 2^-12 of it in bf16 (2^-9 in fp16). One FFMA makes v: x * 2^s + 1.5 * 2^23 +
// 0x8080 has 2^22 + 0x8080 + v in its mantissa, whose bytes 0 and 1 are p0 + 128 and p1 + 128 and whose byte 2 is
// 64 + p2. A chunk of 64 features takes 192 bytes: plane p at 64 p, then lane t's 16 bytes at 16 t: its 8
// features of each 32-feature half (t * 8..) in the order the nibbles of a word come out of w & 0x0F0F0F0F
// (features 0, 2, 1, 3, then 4, 6, 5, 7), so one 16-byte load gives a lane its B fragments of a chunk's two
// integer k-steps; with kNatural (int8 weights, whose bytes come in the row's order) in the order 0..7; with
// kContiguous (int8-tiles16x1024-v2, whose lanes hold 16 features of a row) a chunk's 64 features of a plane in
// their order, so lane t's 16 bytes are features 16 t.. of the chunk.
constexpr float kIntMagicValue = 12582912.0f;           // 1.5 * 2^23
constexpr float kPlanesMagic = kIntMagicValue + 0x8080;  // 12615808
constexpr int kPlanesChunkBytes = 3 * 64;

// One lane's features f..f+7 (xf) into the planes; every lane of the warp calls it (lanes 0-15 hold one
// slice, 16-31 another: their largest magnitude is a shuffle), and only lanes with f < K store.
template <bool kNatural = false, bool kContiguous = false>
__device__ __forceinline__ void store_planes(const float (&xf)[8], int f, int K, int lane, unsigned char* planes,
                                             float* x_scale) {
  constexpr int i1 = kNatural || kContiguous ? 1 : 2, i2 = kNatural || kContiguous ? 2 : 1;  // the features of bytes 1 and 2 of a word
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(xf[i]));
#pragma unroll
  for (int off = 1; off < 16; off <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  // m in [2^(e - 127), 2^(e - 126)): 2^(146 - e) and its inverse (e at least 21: both normal floats).
  const int e = max(static_cast<int>(__float_as_uint(m) >> 23), 21);
  const float scale = __uint_as_float(static_cast<uint32_t>(273 - e) << 23);
  uint32_t r[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) r[i] = __float_as_uint(fmaf(xf[i], scale, kPlanesMagic));
  uint32_t p[3][2];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint32_t* v = r + 4 * q;
    const uint32_t low_a = __byte_perm(v[0], v[i1], 0x5140), low_b = __byte_perm(v[i2], v[3], 0x5140);
    p[0][q] = __byte_perm(low_a, low_b, 0x5410) ^ 0x80808080u;
    p[1][q] = __byte_perm(low_a, low_b, 0x7632) ^ 0x80808080u;
    const uint32_t b2 = __byte_perm(__byte_perm(v[0], v[i1], 0x0062), __byte_perm(v[i2], v[3], 0x0062), 0x5410);
    p[2][q] = (b2 & 0x3F3F3F3Fu) | ((~b2 & 0x40404040u) * 3u);  // 64 + p2 -> p2 in two's complement
  }
  if (f < K) {
    unsigned char* at = planes + (f >> 6) * kPlanesChunkBytes +
                        (kContiguous ? (f & 63) : ((f >> 3) & 3) * 16 + ((f >> 5) & 1) * 8);
#pragma unroll
    for (int q = 0; q < 3; ++q) *reinterpret_cast<uint2*>(at + 64 * q) = make_uint2(p[q][0], p[q][1]);
    if ((lane & 15) == 0) x_scale[f >> 7] = __uint_as_float(static_cast<uint32_t>(e - 19) << 23);
  }
}

// The consumer warp's pass over its own features of x: warp w multiplies the chunks of 128-feature slices w, w +
// 8, w + 16, ... (chunks 2w and 2w + 1 of every stage), so it sums x over the groups of those slices only, into
// group_sums[group * 8 + m] (group_sums[group] with planes), and needs no other warp's sums (no barrier between
// the consumers). Lanes 0-15 take 8 features each of one of the warp's slices, lanes 16-31 of the next one
// (16-byte loads); kPairs pairs of slices are loaded before any is summed, and a warp's pairs that start
// past K are skipped, not converted as zeros (half the pass at K = 4096: 1256.5 against 1265.2 us a step
// in the int4 chain, H200, benchmarks/RESULTS.md). With the norm, the warp's share of each row's sum of
// squares goes into row_sumsq[warp * 8 + m] (added in warp order after the CTA's last barrier). With one
// row kept in shared memory as planes (kPlanes) the warp also stores its features of x there as planes,
// where its products read them. kWarps: the consumer warps (slices w, w + kWarps, ... are warp w's); without
// zero points (int8 weights, kGroupShift 0) there are no group sums; kNatural, kContiguous: store_planes' order.
template <typename T, int kGroupShift, bool kNorm, bool kPlanes, int kWarps, bool kNatural = false,
          bool kContiguous = false>
__device__ __forceinline__ void sum_x(const T* x, int M, int K, float* group_sums, float* row_sumsq,
                                      unsigned char* planes, float* x_scale) {
  constexpr int kLanesPerGroup = kGroupShift > 0 ? (1 << kGroupShift) / 8 : 1;
  constexpr int kPairs = 4;
  constexpr int kSliceStride = 128 * kWarps;  // from one of the warp's slices to its next
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int lane_feature = (lane >> 4) * kSliceStride + (lane & 15) * 8;
  for (int m = 0; m < M; ++m) {
    const T* xm = x + static_cast<size_t>(m) * K;
    float sq = 0.0f;
    for (int s0 = warp * 128; s0 < K; s0 += 2 * kSliceStride * kPairs) {
      uint4 v[kPairs];
#pragma unroll
      for (int b = 0; b < kPairs; ++b) {
        const int f = s0 + 2 * b * kSliceStride + lane_feature;
        v[b] = f < K ? __ldg(reinterpret_cast<const uint4*>(xm + f)) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int b = 0; b < kPairs; ++b) {
        if (s0 + 2 * b * kSliceStride >= K) break;  // the warp's pairs past K (the same for all its lanes)
        const int f = s0 + 2 * b * kSliceStride + lane_feature;
        const uint32_t words[4] = {v[b].x, v[b].y, v[b].z, v[b].w};
        float xf[8];
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float lo = low_half<T>(words[i]), hi = high_half<T>(words[i]);
          xf[2 * i] = lo;
          xf[2 * i + 1] = hi;
          part += lo + hi;
          if constexpr (kNorm) sq = fmaf(lo, lo, fmaf(hi, hi, sq));
        }
        if constexpr (kPlanes) store_planes<kNatural, kContiguous>(xf, f, K, lane, planes, x_scale);
        if constexpr (kGroupShift > 0) {
#pragma unroll
          for (int off = 1; off < kLanesPerGroup; off <<= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
          if (f < K && (lane & (kLanesPerGroup - 1)) == 0) {
            group_sums[(f >> kGroupShift) * group_stride(kPlanes) + m] = part;
          }
        }
      }
    }
    if constexpr (kNorm) {
      sq = warp_sum(sq);
      if (lane == 0) row_sumsq[warp * 8 + m] = sq;
    }
  }
  __syncwarp();
}

// A group ends (streamed kernel): acc += scale * dot - scale * (magic + zero) * sum x, for rows g and
// g + 8 (pair_g, pair_g8) and x rows 2t, 2t + 1 (gs: their sums over the group); dot in two chains. In

// One integer k-step, m16n8k32: A the 16 rows' levels (u8 for int4 weights, s8 for int8), B the planes of
// x (s8), into int sums.
template <bool kSignedA>
__device__ __forceinline__ void imma(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kSignedA) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

constexpr uint32_t kIntMagic = 0x4B400000u;  // the bits of kIntMagicValue: + n, as a float, is it + n

// The consumer warps' values at first[w * stride], w = 0..kWarps-1, added in warp order: the same bits
// every run.
template <int kWarps>
__device__ __forceinline__ float warps_sum(const float* first, int stride) {
  float sum = first[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) sum += first[w * stride];
  return sum;
}


// With planes, a lane's sums of its columns 2t and 2t + 1 (acc[e]: row g + 8 (e >> 1), column 2t + (e & 1);
// column n holds plane n, n < 3) weighed (1, 256, 65536) and added: lanes t = 0 get their rows' sums in
// acc[0] and acc[2].
__device__ __forceinline__ void add_planes(float (&acc)[4], float column_weight0, float column_weight1) {
  const float row_g = acc[0] * column_weight0 + acc[1] * column_weight1;
  const float row_g8 = acc[2] * column_weight0 + acc[3] * column_weight1;
  acc[0] = row_g + __shfl_down_sync(0xffffffffu, row_g, 1);
  acc[2] = row_g8 + __shfl_down_sync(0xffffffffu, row_g8, 1);
}

// A streamed kernel's outputs, after its last barrier: the kWarps consumer warps' sums of the CTA's blocks
// [first, end) (sums [block][warp][x row][16]) added in warp order, and each row's norm from the warps'
// shares of its sum of squares (row_sumsq [warp][8]), rounded as the model rounds (the product, then the
// sum with the residual; gated: gate and up to x's dtype, the activation too, then their product). With
// kRowScales (int8 weights) each weight row's sum is multiplied by its scale, and outputs past the last row
// (a block cut short) are not stored; the gated block of outputs 8b.. has its gate rows at 8b.. and its up
// rows at width + 8b.. of the scales. With pair_width (int8 weights in paired tiles, not gated) block b holds
// rows 8b.. and pair_width + 8b...
template <typename T, Epilogue kMode, int kWarps, bool kRowScales>
__device__ __forceinline__ void store_outputs(const float* sums, const float* row_sumsq, const T* row_scales,
                                              const T* residual, T* y, int first, int end, int M, int N, int K,
                                              float eps, int activation, int pair_width = 0) {
  const int sums_stride = M * kBlockRows;  // from one warp's sums of a block to the next warp's
  if constexpr (kMode == Epilogue::kRmsNormGatedAct) {
    // Output (first + bl) * 8 + r of x row m: gate (row r of the block) and up (row r + 8).
    const int width = N / 2;
    for (int i = threadIdx.x; i < (end - first) * M * 8; i += blockDim.x) {
      const int bl = i / (M * 8), m = (i / 8) % M, r = i % 8;
      const int out = (first + bl) * 8 + r;
      if (kRowScales && out >= width) continue;
      const float norm = rsqrtf(warps_sum<kWarps>(row_sumsq + m, 8) / K + eps);
      const float* row_sums = sums + (bl * kWarps * M + m) * kBlockRows;  // warp 0's
      float gate = warps_sum<kWarps>(row_sums + r, sums_stride) * norm;
      float up = warps_sum<kWarps>(row_sums + r + 8, sums_stride) * norm;
      if constexpr (kRowScales) {
        gate *= to_float(row_scales[out]);
        up *= to_float(row_scales[width + out]);
      }
      gate = to_float(from_float<T>(gate));
      up = to_float(from_float<T>(up));
      const float act = to_float(from_float<T>(activate(gate, activation)));
      y[static_cast<size_t>(m) * width + out] = from_float<T>(act * up);
    }
    return;
  }
  for (int i = threadIdx.x; i < (end - first) * M * kBlockRows; i += blockDim.x) {
    const int bl = i / (M * kBlockRows), m = (i / kBlockRows) % M, row = i % kBlockRows;
    const int out = pair_width > 0 ? 8 * (first + bl) + (row & 7) + (row < 8 ? 0 : pair_width)
                                   : (first + bl) * kBlockRows + row;
    if (kRowScales && out >= N) continue;
    float sum = warps_sum<kWarps>(sums + (bl * kWarps * M + m) * kBlockRows + row, sums_stride);
    if constexpr (kMode == Epilogue::kRmsNorm) sum *= rsqrtf(warps_sum<kWarps>(row_sumsq + m, 8) / K + eps);
    if constexpr (kRowScales) sum *= to_float(row_scales[out]);
    const size_t at = static_cast<size_t>(m) * N + out;
    if constexpr (kMode == Epilogue::kAddResidual) {
      y[at] = from_float<T>(to_float(from_float<T>(sum)) + to_float(residual[at]));
    } else {
      y[at] = from_float<T>(sum);
    }
  }
}

}  // namespace oiv2_gemv
