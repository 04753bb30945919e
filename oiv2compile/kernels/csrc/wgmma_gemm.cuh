// A mixed-input GEMM on Hopper's warpgroup tensor cores (sm_90a), y [M, N] = x [M, K] @ W^T, for the
// prefill of a short prompt (33 to 256 rows): W stays in its quantized layout in memory and is turned
// into bf16/fp16 in registers, where it is wgmma's A operand; x is B, from shared memory. What the
// quantized formats differ in (how a chunk of W is copied into shared memory and turned into A
// fragments, and a scale per output row) is a Weights class that each op's file defines
// (linear_int4_mma.cu, linear_int8_gemm.cu):
//
//   struct Weights {
//     struct Params;                      // what the kernel reads besides x (pointers, K)
//     static constexpr int kStageBytes;   // shared memory of one chunk of W's 128 rows (16-byte multiple)
//     struct Copier {                     // a thread's share of the copies, worked out once
//       __device__ Copier(const Params&, int block0, int blocks);
//       __device__ void copy(uint8_t* stage, int c) const;  // cp.async chunk c (64 features) of the
//     };                                  // CTA's blocks block0.. into `stage`
//     __device__ static void fragments(const uint8_t* stage, const Params&, uint32_t (&a)[4][4]);
//         // this warp's A fragments of the chunk's four k-steps (warp w: rows 16 w.. of the CTA's 128)
//     __device__ static float row_scale(const Params&, int n);  // what row n's sum is multiplied by
//   };
//
// wgmma.m64n128k16: a warp's fragment of the 64 rows is the m16n8k16 fragment, and wgmma reads B's 16
// features of a k-step in the mma's own k order. The layouts read a lane's features contiguously, so
// each half chunk of 32 features is permuted against that order: x is first rewritten into it
// (x_in_mma_order_kernel, one pass over x), with the 128-byte swizzle. A CTA multiplies 128 rows of W
// (two warpgroups, warp w: block w) by 128 rows of x; the copies run kStages - 1 chunks ahead of the
// multiplies, and each chunk's four wgmma run while the next chunk's weights are turned into bf16/fp16
// (two register sets by turns). With the next chunk's fragments written while a batch was open, ptxas
// serialized the wgmma (C7513) and the int4 GEMM ran at ~300 TFLOPS, as an mma.sync form did; written
// before the fence, 400-430 (H200). Two warpgroups and a ring of 4 stages (two CTAs an SM) won or tied
// against 1 warpgroup and 6 stages on every llama-8b shape at 128, 512 and 2048 rows (int4, H200,
// benchmarks/RESULTS.md). K is split over CTAs where they would not fill the resident slots once, and
// one kernel sums the splits.
// The GEMM is bound by the instructions its warps issue, not by memory (Nsight Compute, int8 gate/up at
// 128 rows: L2 at 32% of its peak, DRAM 20%, 225 instructions a warp a chunk). Each thread's copy
// addresses are therefore worked out once (XCopier, Weights::Copier) rather than a chunk at a time: the
// four llama-8b products of a layer at 128 rows went from 203 to 181 us (int8) and 182 to 153 us (int4),
// bf16 cuBLAS 137 (H200, benchmarks/RESULTS.md). Shared memory is read with LDS, not generic loads (the
// 1024-byte-aligned base is an offset into the array, not a cast address), and the descriptors come from
// one base: int4 154 -> 141 us a layer (bf16 134), int8 unchanged. Tried and not kept, all on an H200 at 128 and 256 rows:
// one wgmma batch kept in flight across chunks (wait_group 1; same times), CTAs of four warpgroups
// (256 rows of W, one CTA an SM; faster on gate/up, slower on qkv and o), a ring of 6 stages (same), and
// int8 weights read in x's own order (no reordering pass, two 4-byte loads and a PRMT a row and step:
// 1-16% slower a layer).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <mutex>
#include <type_traits>

#include "gemv_common.cuh"

namespace oiv2_wgmma {

using oiv2_gemv::from_float;
using oiv2_gemv::launch_programmatic;
using oiv2_gemv::wait_for_previous_grid;

constexpr int kBlockRows = 16;                    // W's rows a warp multiplies: a block
constexpr int kChunk = 64;                        // features of a stage: four k-steps of 16
constexpr int kXRows = 128;                       // x's rows a CTA multiplies: wgmma's N
constexpr int kCtaBlocks = 8;                     // W's blocks a CTA multiplies: two warpgroups of 64 rows
constexpr int kThreads = 128 * kCtaBlocks / 4;    // two warpgroups
constexpr int kStages = 4;                        // shared-memory slots in the ring
constexpr int kAhead = kStages - 1;               // chunks the copies run ahead of the multiplies
constexpr int kXBytes = kXRows * kChunk * 2;      // a slot's x tile: 128 rows of 128 bytes
// Rows up to which the ops take this GEMM. Against dequantize-then-cuBLAS on an H200 (llama-8b shapes, int4,
// benchmarks/RESULTS.md): 0.52-0.75x its time at 64 and 128 rows, 0.85-1.22x at 256 (qkv loses), 1.18-1.6x
// at 512. int8, the GEMM's first form in the same call as the op's dequantize-then-cuBLAS path: 0.39-0.80x at
// 128 rows, 0.48-1.28x at 256 (qkv and o lost; the GEMM has since become 10-20% faster).
constexpr int64_t kMaxRows = 256;

// Whether this GEMM takes a product of `rows` rows on the current card (Hopper: wgmma).
inline bool takes(int64_t rows) {
  return rows <= kMaxRows && at::cuda::getCurrentDeviceProperties()->major == 9;
}

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define OIV2_HAS_WGMMA 1
#endif

// cp.async: 16-byte copies from global into shared memory (zero-filled where `valid` is false).
__device__ __forceinline__ void copy_async16(void* dst, const void* src, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// Shared memory: the x slots first (each on a 1024-byte boundary, the swizzle's period), then W's.
template <typename Weights>
struct Layout {
  static constexpr int kW = kStages * kXBytes;
  static constexpr int kBytes = kW + kStages * Weights::kStageBytes + 1024;  // + room to align the base
};

// wgmma.m64n128k16 into the 64 float accumulators d, A from registers a, B by descriptor (scale-d `accumulate`).
#define OIV2_WGMMA_M64N128K16(TYPE)                                                           \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n"                                   \
               " wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                   \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                  \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "        \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "        \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"          \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}"                                        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))

template <typename T>
struct Wgmma;

template <>
struct Wgmma<__nv_bfloat16> {
  __device__ static void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
#ifdef OIV2_HAS_WGMMA
    OIV2_WGMMA_M64N128K16("bf16");
#endif
  }
};

template <>
struct Wgmma<__half> {
  __device__ static void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
#ifdef OIV2_HAS_WGMMA
    OIV2_WGMMA_M64N128K16("f16");
#endif
  }
};

// The shared-memory descriptor of a K-major tile of 128-byte rows in the 128-byte swizzle (8-row atoms
// 1024 bytes apart), starting at p.
__device__ __forceinline__ uint64_t sw128_descriptor(const void* p) {
  const uint64_t address = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return ((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// Keeps values in their registers up to this point (the asynchronous wgmma still reads or writes them).
__device__ __forceinline__ void hold(float (&v)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(v[i])::"memory");
}

// x [M, K] rewritten so that each k-step's 16 features of a chunk sit in the order of the mma's k index:
// position 16 s + kappa of chunk c holds feature 64 c + 32 (s >> 1) + 4 (s & 1) + 8 ((kappa >> 1) & 3) +
// (kappa & 1) + 2 (kappa >> 3). So a lane's A fragment of k-steps 2h and 2h + 1 (h = 0, 1) is features
// 64 c + 32 h + 8 t .. + 7 of its rows (t = lane % 4): four in step 2h, four in step 2h + 1. One thread a
// 16-byte unit of the output: four 4-byte pairs of x.
//
// The 16-byte unit `unit` of a row in that order holds the row's 4-byte words w, w + 4, w + 8 and w + 12,
// w = mma_order_word(unit).
__device__ __forceinline__ int mma_order_word(int unit) {
  return 32 * (unit >> 3) + 16 * ((unit >> 2) & 1) + (unit & 3);
}

__global__ void x_in_mma_order_kernel(const uint32_t* __restrict__ x, uint4* __restrict__ out, int64_t units, int K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= units) return;
  const int per_row = K / 8;
  const int64_t row = i / per_row;
  const uint32_t* src = x + row * (K / 2) + mma_order_word(static_cast<int>(i % per_row));
  out[i] = make_uint4(__ldg(src), __ldg(src + 4), __ldg(src + 8), __ldg(src + 12));
}

// The same order for bf16 x taken into fp16 (the int8 GEMM's bf16 products run in fp16, where a pair of
// bytes becomes levels by one PRMT instead of going through float): one CTA a row of x finds the row's
// largest magnitude and multiplies the row by the power of two 2^-e that puts it in [2^14, 2^15) (fp16
// holds up to 65504) before rounding it to fp16; factor[row] = 2^e multiplies the row's sums at the end.
// fp16 has three more mantissa bits than bf16, so every value down to about 2^-28 of the row's largest
// is exact. The row is read once, coalesced, into shared memory, and reordered from there: 2.1-3.9 us
// at 128 rows (llama-8b's K of 4096 and 14336, H200) against 1.8-3.1 for x_in_mma_order_kernel; 2.9-6.7
// with a thread a chunk of 64 features in registers (8 loads of a 128-byte stride across a warp), and
// 5-17 us more a product as first written (a thread a 16-byte unit, 4-byte loads, x read twice).
constexpr int kMaxFp16RowK = 49152;  // the longest row of x this pass takes: 96 KB of shared memory

__device__ __forceinline__ float bf16_pair_largest(uint32_t v) {
  return fmaxf(fabsf(__uint_as_float(v << 16)), fabsf(__uint_as_float(v & 0xFFFF0000u)));
}

__device__ __forceinline__ uint32_t bf16_pair_to_fp16(uint32_t v, float down) {
  const __half2 pair = __floats2half2_rn(__uint_as_float(v << 16) * down, __uint_as_float(v & 0xFFFF0000u) * down);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

__global__ void x_in_mma_order_fp16_kernel(const uint4* __restrict__ x, uint4* __restrict__ out,
                                           float* __restrict__ factor, int K) {
  extern __shared__ uint4 x_row[];  // [K / 8]
  const int units = K / 8;
  const int64_t row = blockIdx.x;
  const uint4* in = x + row * units;
  float largest = 0.0f;
  for (int i = threadIdx.x; i < units; i += blockDim.x) {
    const uint4 v = __ldg(in + i);
    x_row[i] = v;
    largest = fmaxf(fmaxf(largest, fmaxf(bf16_pair_largest(v.x), bf16_pair_largest(v.y))),
                    fmaxf(bf16_pair_largest(v.z), bf16_pair_largest(v.w)));
  }
  __shared__ float warp_largest[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, off));
  if ((threadIdx.x & 31) == 0) warp_largest[threadIdx.x >> 5] = largest;
  __syncthreads();
  largest = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) largest = fmaxf(largest, warp_largest[w]);
  // An all-zero row, or one holding inf or NaN (which the products carry on), keeps e = 0. e <= 113 for a
  // finite largest, and at least -100: 2^-e and 2^e stay normal floats (the kernels flush subnormals).
  const int exponent = static_cast<int>((__float_as_uint(largest) >> 23) & 0xFF) - 127;
  const int e = largest > 0.0f && isfinite(largest) ? max(exponent - 14, -100) : 0;
  if (threadIdx.x == 0) factor[row] = exp2f(static_cast<float>(e));
  const float down = exp2f(static_cast<float>(-e));
  const uint32_t* words = reinterpret_cast<const uint32_t*>(x_row);
  for (int unit = threadIdx.x; unit < units; unit += blockDim.x) {
    const uint32_t* src = words + mma_order_word(unit);
    out[row * units + unit] = make_uint4(bf16_pair_to_fp16(src[0], down), bf16_pair_to_fp16(src[4], down),
                                         bf16_pair_to_fp16(src[8], down), bf16_pair_to_fp16(src[12], down));
  }
}

// The copies of x's chunks one thread makes: its share of a chunk's 128 rows x 8 16-byte units, into an x
// slot in the 128-byte swizzle (rows past M read row M - 1 and are never stored). The row pointers and the
// shared-memory offset are worked out once, so a chunk's copies cost an add and a cp.async each.
template <typename T>
struct XCopier {
  static constexpr int kCopies = kXRows * 8 / kThreads;
  static constexpr int kRowStep = kThreads / 8;  // rows between a thread's copies (a multiple of 8)
  const T* src[kCopies];
  uint32_t valid = 0;  // bit j: copy j's row is in x
  int dst;

  __device__ XCopier(const T* x, int M, int K, int m0) {
    const int r = threadIdx.x >> 3, u = threadIdx.x & 7;
    dst = r * 128 + ((u ^ (r & 7)) << 4);
#pragma unroll
    for (int j = 0; j < kCopies; ++j) {
      const int m = m0 + r + j * kRowStep;
      src[j] = x + static_cast<size_t>(min(m, M - 1)) * K + u * 8;
      valid |= static_cast<uint32_t>(m < M) << j;
    }
  }
  __device__ void copy(uint8_t* slot, int c) const {
#pragma unroll
    for (int j = 0; j < kCopies; ++j) {
      copy_async16(slot + dst + j * kRowStep * 128, src[j] + c * kChunk, (valid >> j) & 1);
    }
  }
};

template <typename T, typename Weights>
__device__ __forceinline__ void copy_chunk(uint8_t* base, int slot, const XCopier<T>& xc,
                                           const typename Weights::Copier& wc, int c) {
  xc.copy(base + slot * kXBytes, c);
  wc.copy(base + Layout<Weights>::kW + slot * Weights::kStageBytes, c);
}

// Chunk s of a CTA's run: start its four wgmma on the fragments `a`; while they run, wait for chunk
// s + 1's copies, start the copies kAhead chunks ahead (into the slot of chunk s - 1, done) and turn
// chunk s + 1's weights into `next`; then wait for the wgmma. All of a wgmma's register inputs are set
// before the fence that opens its batch, so ptxas keeps the batch asynchronous.
template <typename T, typename Weights>
__device__ __forceinline__ void wgmma_chunk(uint8_t* base, int s, int steps, const XCopier<T>& xc,
                                            const typename Weights::Copier& wc, const typename Weights::Params& p,
                                            int c0, uint64_t desc0, float (&acc)[64], uint32_t (&a)[4][4],
                                            uint32_t (&next)[4][4]) {
  // The descriptor's address field counts 16 bytes: slot s % kStages is kXBytes / 16 on, a k-step 2 on.
  const uint64_t desc = desc0 + (s % kStages) * (kXBytes >> 4);
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
  for (int q = 0; q < 4; ++q) Wgmma<T>::run(acc, a[q], desc + 2 * q, 1);
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  if (s + 1 < steps) {
    copy_async_wait<kAhead - 2>();
    __syncthreads();  // chunk s + 1 is in; every warpgroup is done with chunk s - 1, whose slot the copy takes
    if (s + kAhead < steps) {
      copy_chunk<T, Weights>(base, (s + kAhead) % kStages, xc, wc, c0 + s + kAhead);
    }
    copy_async_commit();
    Weights::fragments(base + Layout<Weights>::kW + ((s + 1) % kStages) * Weights::kStageBytes, p, next);
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}

// Grid (row tiles of x, CTAs of W's rows, splits of K); each split takes chunks_per_split chunks. With one
// split the CTA writes y; with more, partial [splits, M, N] in float. x in the mma's order
// (x_in_mma_order_kernel).
template <typename T, typename Weights, typename TOut>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_gemm_kernel(const T* __restrict__ x, const typename Weights::Params p, TOut* __restrict__ y,
                      float* __restrict__ partial, const float* __restrict__ x_factor, int M, int N, int K,
                      int chunks_per_split) {
#ifdef OIV2_HAS_WGMMA
  extern __shared__ uint8_t wgmma_smem[];
  // Aligned by an offset into the array (not by casting an address): the compiler then knows every pointer
  // below is in shared memory and loads with LDS, not with generic loads.
  uint8_t* base = static_cast<uint8_t*>(__builtin_assume_aligned(
      wgmma_smem + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(wgmma_smem)) & 1023)) & 1023), 1024));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * kXRows, block0 = blockIdx.y * kCtaBlocks, blocks = N / kBlockRows;
  const int c0 = blockIdx.z * chunks_per_split;
  const int steps = min(K / kChunk - c0, chunks_per_split);

  const uint64_t desc0 = sw128_descriptor(base);  // slot 0's x tile
  const XCopier<T> xc(x, M, K, m0);
  const typename Weights::Copier wc(p, block0, blocks);
  wait_for_previous_grid();
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < steps) copy_chunk<T, Weights>(base, s, xc, wc, c0 + s);
    copy_async_commit();
  }
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  uint32_t a0[4][4], a1[4][4];  // the A fragments of a chunk's four k-steps, two sets by turns
  if (steps > 0) {
    copy_async_wait<kAhead - 1>();
    __syncthreads();
    Weights::fragments(base + Layout<Weights>::kW, p, a0);
  }
  for (int s = 0; s < steps; s += 2) {
    wgmma_chunk<T, Weights>(base, s, steps, xc, wc, p, c0, desc0, acc, a0, a1);
    if (s + 1 < steps) wgmma_chunk<T, Weights>(base, s + 1, steps, xc, wc, p, c0, desc0, acc, a1, a0);
  }
  hold(acc);
  copy_async_wait<0>();

  // acc[i]: row 16 (block0 + warp) + g + 8 ((i >> 1) & 1) of W, row m0 + 8 (i >> 2) + 2 t + (i & 1) of x.
  if (x_factor != nullptr) {  // all the loads before any store
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] *= __ldg(x_factor + min(m0 + 8 * (i >> 2) + 2 * t + (i & 1), M - 1));
  }
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int n = (block0 + warp) * kBlockRows + g + 8 * hi;
    if (n >= N) continue;
    const float scale = Weights::row_scale(p, n);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int i = 4 * (j >> 1) + 2 * hi + (j & 1);
      const int m = m0 + 8 * (i >> 2) + 2 * t + (i & 1);
      if (m >= M) continue;
      const float v = acc[i] * scale;
      if (partial == nullptr) {
        y[static_cast<size_t>(m) * N + n] = from_float<TOut>(v);
      } else {
        partial[(static_cast<size_t>(blockIdx.z) * M + m) * N + n] = v;
      }
    }
  }
#else
  __trap();
#endif
}

// Splits of K for an [M, N] product in CTAs of 128 rows of x by kCtaBlocks blocks of W, `slots` CTAs
// resident on the card at once: as many as fill the slots once, each split at least 8 chunks.
inline int gemm_splits(int64_t M, int64_t N, int64_t K, int64_t slots) {
  const int64_t ctas = ((M + kXRows - 1) / kXRows) * ((N / kBlockRows + kCtaBlocks - 1) / kCtaBlocks);
  const int64_t most = std::max<int64_t>(1, K / kChunk / 8);
  return static_cast<int>(std::clamp<int64_t>(slots / ctas, 1, most));
}

// y = the sum of partial [splits, M * N] over the splits, in float, rounded once; four outputs a thread.
template <typename T>
__global__ void sum_splits_kernel(const float4* __restrict__ partial, T* __restrict__ y, int splits, int64_t quads) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= quads) return;
  float4 total = partial[i];
  for (int z = 1; z < splits; ++z) {
    const float4 v = partial[z * quads + i];
    total.x += v.x, total.y += v.y, total.z += v.z, total.w += v.w;
  }
  y[4 * i] = from_float<T>(total.x), y[4 * i + 1] = from_float<T>(total.y);
  y[4 * i + 2] = from_float<T>(total.z), y[4 * i + 3] = from_float<T>(total.w);
}

// y [M, N] = x [M, K] @ W^T on a Hopper card, x contiguous and 16-byte aligned, N a multiple of 16, K of
// 64. `splits` <= 0: as gemm_splits says. T is the products' dtype, TOut x's and y's: T = fp16 with TOut
// = bf16 takes x into fp16 a row at a time (x_in_mma_order_fp16_kernel).
template <typename T, typename Weights, typename TOut = T>
void run_wgmma_gemm(const at::Tensor& x, const typename Weights::Params& p, int64_t N, at::Tensor& y,
                    int splits = 0) {
  static_assert(std::is_same_v<T, TOut> || (std::is_same_v<T, __half> && std::is_same_v<TOut, __nv_bfloat16>),
                "products in x's dtype, or bf16 x in fp16");
  auto kernel = wgmma_gemm_kernel<T, Weights, TOut>;
  constexpr int kBytes = Layout<Weights>::kBytes;
  static std::once_flag configured;
  static int per_sm = 1;  // CTAs an SM holds at once
  std::call_once(configured, [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kBytes));
    per_sm = std::max(per_sm, 1);
  });
  auto stream = at::cuda::getCurrentCUDAStream();
  const int M = x.size(0), K = x.size(1);
  const int64_t units = x.numel() / 8;
  at::Tensor ordered = at::empty_like(x);  // fp16 or bf16: the same bytes
  at::Tensor x_factor;
  if constexpr (std::is_same_v<T, TOut>) {
    x_in_mma_order_kernel<<<(units + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(x.data_ptr()), reinterpret_cast<uint4*>(ordered.data_ptr()), units, K);
  } else {
    x_factor = at::empty({M}, x.options().dtype(at::kFloat));
    TORCH_CHECK(K <= kMaxFp16RowK, "rows of x longer than ", kMaxFp16RowK, " features take another product");
    static std::once_flag row_configured;
    std::call_once(row_configured, [] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(x_in_mma_order_fp16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          kMaxFp16RowK * 2));
    });
    const int threads = std::min(1024, (K / 8 + 31) / 32 * 32);
    x_in_mma_order_fp16_kernel<<<M, threads, K * 2, stream>>>(
        reinterpret_cast<const uint4*>(x.data_ptr()), reinterpret_cast<uint4*>(ordered.data_ptr()),
        x_factor.data_ptr<float>(), K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t slots = static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (splits <= 0) splits = gemm_splits(M, N, K, slots);
  const int chunks = K / kChunk;
  const int per_split = (chunks + splits - 1) / splits;
  splits = (chunks + per_split - 1) / per_split;  // no split left empty
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  const dim3 grid((M + kXRows - 1) / kXRows, (N / kBlockRows + kCtaBlocks - 1) / kCtaBlocks, splits);
  C10_CUDA_CHECK(launch_programmatic(kernel, grid, dim3(kThreads), kBytes, stream,
                                     reinterpret_cast<const T*>(ordered.data_ptr()), p,
                                     reinterpret_cast<TOut*>(y.data_ptr()),
                                     splits > 1 ? partial.data_ptr<float>() : nullptr,
                                     x_factor.defined() ? x_factor.data_ptr<float>() : nullptr, M,
                                     static_cast<int>(N), K, per_split));
  if (splits > 1) {
    const int64_t quads = static_cast<int64_t>(M) * N / 4;  // N is a multiple of 16
    sum_splits_kernel<TOut><<<(quads + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<const float4*>(partial.data_ptr<float>()), reinterpret_cast<TOut*>(y.data_ptr()), splits,
        quads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace oiv2_wgmma
