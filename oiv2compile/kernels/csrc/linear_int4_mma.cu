// oiv2::linear_int4_mma: y[m, n] = sum_k x[m, k] * (q[n, k] - zeros[n, g]) * scales[n, g], g = k / G,
// for x [..., K] in bf16 or fp16 and W in the layout int4-mma16x64-v1 (kernels/linear_int4_mma.py).
//
// Up to 32 rows of x (every decode step): tensor cores with W as the 16-row operand and x as B (8 rows of
// x per mma; rows past M read row M - 1 and are never stored). The layout is packed at build time so
// that a lane's 16 bytes of a 64-feature chunk are exactly its A fragments of four m16n8k16 steps. A
// word's 8 nibbles become bf16/fp16 pairs MAGIC_VALUE + q with one shift and one lop3 a pair. The zero
// points need no subtraction per pair: each group ends with
//     acc += scale * sum x * (MAGIC_VALUE + q) - scale * (MAGIC_VALUE + zero) * sum x
// on float sums (exact products, float accumulation), so no rounded weight is ever formed. The streamed
// kernel (below) sums x over each group once, before its products; the tiled kernel gets sum x from a
// second mma with an all-ones A.
//
// In fp16 the streamed kernel turns a word into A fragments with one shift and four lop3 (half_levels:
// fp16's 10 mantissa bits take a nibble at bits 4-7 as well), bf16 needs three shifts and four lop3.
// The kernel is bound by its consumer warps; in 32 llama-8b layers of int4 products (H200, us a step,
// benchmarks/RESULTS.md) the fp16 form's instructions on bf16 bits took 1373-1393 against 1476-1482.
// bf16 x converted to fp16 by the consumers (into shared memory, as they sum x) lost that and more:
// 1491-1497 (commit 231124b). One row of x kept in shared memory as it is (the consumers store what
// their pass over x loads, and the products read it with LDS instead of L1 loads): 1402-1405 against
// 1452-1453; the pass's 16-byte loads before that: 1445-1455 against 1470-1480.
// One row of x (a batch-1 decode step) now goes through the integer tensor cores instead, where it fits
// shared memory as planes (every llama-8b shape in groups of 128): the consumers' pass over x writes it
// there as three int8 planes with a power-of-two scale a 128-feature slice (store_planes), and a word's
// nibbles are u8 A fragments of m16n8k32 (one lop3, or a shift and a lop3, for four weights; two words
// a step) against the planes as B, one plane a column (run_product_planes). In the chain above: 1304
// against 1403 us with x in shared memory as it is (the same call; 1314 with down still so), and
// llama-8b int4 decode 586 tok/s, 2.55x bf16 (557 and 2.40x before, in another run).
// Up to 8 rows, the streamed kernel (its pieces shared with the int8 kernel at one row: streamed.cuh):
// each CTA takes a contiguous run of 16-row blocks (one CTA per SM slot, so every SM streams an equal
// share). A producer warp copies W and the scales each stage needs into a ring of 8 shared-memory stages
// (80 KB: two CTAs an SM) with the Hopper bulk-copy engine (cp.async.bulk, L2 evict-first, completion
// counted on an mbarrier), so the bytes in flight do not cost registers; 8 consumer warps each take two
// consecutive chunks of a stage (the group size is a template argument, so a group of 128 gets its scales
// once; at one row two teams of 8 take a block's stages by turns: 1247 against 1257 us a step in the
// chain) and store their sums of a block in shared memory,
// each warp in its own place, when the block ends; the epilogue adds the warps' sums in warp order, so the
// outputs have the same bits every run (adding them with shared-memory atomics, in whatever order the
// warps got there, changed the last bits from run to run, and an int4 artifact's greedy tokens with them
// where two logits nearly tie). It is launched as a programmatic dependent: the copies start while the
// previous kernel drains, and the consumers read x only after griddepcontrol.wait.
// Consumer warp w multiplies the same 128 features of every stage, so it first sums x over the groups of
// those features alone (and, for the norm below, their squares), with its loads batched and no barrier
// with the other warps, then takes the k-steps of a group in two accumulators by turns, one mma a step. In
// 32 llama-8b layers of int4 products with the norms inside (H200, benchmarks/RESULTS.md): 1702 us a step
// with 4 stages and a pass over all of x by every warp, 1574 with 8 stages, 1788 with 4 stages and each
// warp's own sums, 1497 with both; 6 stages (three CTAs an SM) 1760, 12 and 16 stages (one CTA an SM) 1834
// and 1860, stages sized for group 128 (8.7 KB) 1798 at 8 stages (three an SM) and 1576 at 12 (two an SM).
// The form before the group sums (a second mma a step for sum x, one accumulator) was bound by the
// consumers, not by the memory: it took 1864 us a step, 1070 with the math left out and 1651 with the
// copies left out. The producer copying x into shared memory (after griddepcontrol.wait, the consumers
// waiting for it) was slower (1733 against 1705); the consumers' own copy of their features, in their pass
// over x, is what the kernel does now at one row (above). The producer lets the next kernel launch, so a
// product right after this one (the norm inside both, below) starts its own copies as this one's CTAs leave
// their SMs: 32 llama-8b layers of int4 products with the norms inside took 1868 us a step with that, 2041
// without (H100). It does so as it starts, not once it has issued its last copy (when the slowest CTA's
// producer got there, near the end): 1221.7-1222.3 us a step against 1252.5-1255.4 (H200, two rounds of the
// same chain); llama-8b decode end to end did not change (652.0-652.2 tok/s either way, the same artifact). A
// ring of 6 stages, which lets one CTA of the next product in beside two of this one at K = 4096, gained
// nothing more (1230.6-1231.0), one of 4 lost (1284.4) (thirty-third session, benchmarks/RESULTS.md).
// Two more ops run in the streamed kernel, with an epilogue (1 to 8 rows): oiv2::linear_int4_mma_add
// (y = (x W^T) + residual, each rounded as the model rounds them: o and down write the new residual
// stream) and oiv2::rms_norm_linear_int4_mma (y = rsqrt(mean(x^2) + eps) * (x W^T), W holding the
// norm's weight: the consumers sum the squares of x in the same pass as the groups), and
// oiv2::rms_norm_linear_int4_mma_gated_act (the norm, the fused gate/up product and the gated activation
// after it: W's rows interleaved by 8, so that rows r and r + 8 of each block of 16 are the gate and up
// rows of the same output, which one lane's accumulators already hold side by side; the [M, 2I] product
// is never written; 32 llama-8b layers of int4 products on an H200: 1469-1487 us a step against
// 1504-1510 with the activation kernel). An earlier gated form (a CTA streaming the gate blocks of its
// outputs, then their up blocks: CTAs took whole pairs of blocks) was slower than the activation kernel
// (1899 against 1868 us in the chain, four stages of ring).
// 9 to 32 rows, the tiled kernel: a CTA per block, its warps splitting K, each lane with kUnroll
// chunks in flight in registers (it beats the streamed kernel there: more accumulators a warp).
//
// Where they stood before the group sums (benchmarks/RESULTS.md, llama-8b shapes at one row, calls back
// to back): 61-67% of the copy bandwidth on 14336x4096 and 4096x14336 and 96% on the output head on an
// H100; 46-56% and 74% on an H200.
//
// 33 to 256 rows on Hopper (a prefill of a short prompt, a large decode batch): a mixed-input GEMM on the
// warpgroup tensor cores (wgmma, below). More rows, or another card: slices of W are dequantized into a
// bf16/fp16 buffer and multiplied by cuBLAS, which wins from 512 rows on (cuBLAS's bf16 GEMM runs near
// the tensor cores' peak there; the wgmma GEMM at 400-430 TFLOPS).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "gemv_common.cuh"
#include "streamed.cuh"
#include "wgmma_gemm.cuh"

namespace {

using namespace oiv2_gemv;

constexpr int kRows = kBlockRows;  // weight rows of one CTA: the mma's M
constexpr int kChunk = 64;  // features of one lane's 16-byte load: four k-steps of 16
constexpr int kMaxTiles = 4;  // rows of x through the tensor cores: 8 per tile
// The prefill path's buffer of dequantized rows: 64 MB took 0.6-0.8x the time of 16 MB (and 8 MB)
// at 64 to 2048 rows on an H200 (llama-8b shapes, 2026-11-27, benchmarks/RESULTS.md).
constexpr int64_t kDequantBytes = int64_t{64} << 20;

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0 in both halves
  static constexpr uint32_t kOnes = 0x3F803F80u;   // bf16 1.0 in both halves
  static constexpr float kMagicValue = 128.0f;
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pair(float v) {  // v in both halves
    const __nv_bfloat162 r = __float2bfloat162_rn(v);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static float low(uint32_t v) { return low_half<__nv_bfloat16>(v); }
  __device__ static float high(uint32_t v) { return high_half<__nv_bfloat16>(v); }
};

template <>
struct Mma<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0 in both halves
  static constexpr uint32_t kOnes = 0x3C003C00u;   // fp16 1.0 in both halves
  static constexpr float kMagicValue = 1024.0f;
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pair(float v) {  // v in both halves
    const __half2 r = __float2half2_rn(v);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static float low(uint32_t v) { return low_half<__half>(v); }
  __device__ static float high(uint32_t v) { return high_half<__half>(v); }
};

// A 32-bit constant the compiler must keep in a register (it cannot see through the asm): lop3 takes
// one immediate, so a mask and a magic number both as immediates would cost two instructions.
__device__ __forceinline__ uint32_t in_register(uint32_t v) {
  uint32_t r;
  asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(v));
  return r;
}

// A pointer the compiler must keep in registers rather than recompute from the thread and block
// indices at every use (which it otherwise does, at a dozen instructions a chunk).
template <typename P>
__device__ __forceinline__ const P* kept(const P* p) {
  uint64_t r;
  asm volatile("mov.b64 %0, %1;" : "=l"(r) : "l"(reinterpret_cast<uint64_t>(p)));
  return reinterpret_cast<const P*>(r);
}

// The A fragment of one k-step, MAGIC_VALUE + q: nibbles r and r + 4 of the word (r = 0..3) are the
// pair a[r] (of row g for even r, g + 8 for odd r): (word >> 4r) & mask | magic in one lop3 each,
// three shifts and four lop3 for eight weights.
__device__ __forceinline__ void magic_levels(uint32_t word, uint32_t mask, uint32_t magic, uint32_t (&a)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(a[r]) : "r"(word >> (4 * r)), "r"(mask), "r"(magic));
  }
}

// The streamed kernel's A fragments in fp16, one shift for eight weights: fp16 has 10 mantissa bits, so
// nibbles 0 and 4 of the word become 1024 + q under the magic 1024.0 (the mantissa's unit steps), and
// nibbles 1 and 5 become 64 + q under 64.0 (their bits 4-7 on its 1/16 steps); word >> 8 gives nibbles
// 2, 6 and 3, 7 the same way. The pairs are the magic_levels pairs: a[0], a[2] (row g) hold 1024 + q,
// a[1], a[3] (row g + 8) 64 + q. One shift and four lop3 against magic_levels' three and four.
constexpr float kHalfMagicLow = 1024.0f, kHalfMagicHigh = 64.0f;

struct HalfConstants {
  uint32_t mask, mask_high, magic_low, magic_high;
};

__device__ __forceinline__ HalfConstants half_constants() {
  return HalfConstants{in_register(0x000F000Fu), in_register(0x00F000F0u), in_register(0x64006400u),
                       in_register(0x54005400u)};
}

__device__ __forceinline__ void half_levels(uint32_t word, const HalfConstants& k, uint32_t (&a)[4]) {
  const uint32_t high = word >> 8;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(a[0]) : "r"(word), "r"(k.mask), "r"(k.magic_low));
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(a[1]) : "r"(word), "r"(k.mask_high), "r"(k.magic_high));
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(a[2]) : "r"(high), "r"(k.mask), "r"(k.magic_low));
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(a[3]) : "r"(high), "r"(k.mask_high), "r"(k.magic_high));
}

// A group's (scale, zero) for one row, whose levels were magic + q: y += scale * (sum x * (magic + q)) -
// correction * sum x.
template <typename T>
__device__ __forceinline__ void scale_and_correction(uint32_t pair, float magic, float& scale, float& correction) {
  scale = Mma<T>::low(pair);
  correction = scale * (magic + Mma<T>::high(pair));
}

constexpr int kUnroll = 4;  // chunks a lane loads before it computes

// kUnroll chunks of a warp, kWarps apart from chunk `first`, 16 bytes a lane; past the end, zeros.
template <int kWarps>
__device__ __forceinline__ void load_chunks(const int4* wp, int first, int chunks, int4 (&out)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int c = first + u * kWarps;
    out[u] = c < chunks ? load_stream(wp + static_cast<size_t>(c) * 32) : make_int4(0, 0, 0, 0);
  }
}

// Registers a lane keeps for the whole kernel: the lop3 mask and magic number, the all-ones A fragment.
struct Constants {
  uint32_t mask, magic;
  uint32_t ones[4];
};

// Where a lane reads x: features t*8.. of the row it feeds to tile r, in 16-byte units (rows past M
// read row M - 1: their columns of the product are never stored).
template <typename T, int kTiles>
__device__ __forceinline__ void x_pointers(const T* x, int M, int K, int g, int t, const uint4* (&xp)[kTiles]) {
#pragma unroll
  for (int r = 0; r < kTiles; ++r) {
    const int m = min(g + 8 * r, M - 1);
    xp[r] = kept(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + t * 8));
  }
}

template <typename T>
__device__ __forceinline__ Constants constants() {
  Constants k;
  k.mask = in_register(0x000F000Fu);
  k.magic = in_register(Mma<T>::kMagic);
#pragma unroll
  for (int i = 0; i < 4; ++i) k.ones[i] = in_register(Mma<T>::kOnes);
  return k;
}

// One k-step: word j (0..3) of a chunk as A against x's fragments (j & 1 picks their halves), into the
// group's sums.
template <typename T, int kTiles>
__device__ __forceinline__ void step_product(uint32_t word, int j, const uint4 (&xv)[kTiles], const Constants& k,
                                             float (&dot)[kTiles][4], float (&sum)[kTiles][4]) {
  uint32_t a[4];
  magic_levels(word, k.mask, k.magic, a);
#pragma unroll
  for (int r = 0; r < kTiles; ++r) {
    const uint32_t b0 = (j & 1) ? xv[r].z : xv[r].x, b1 = (j & 1) ? xv[r].w : xv[r].y;
    Mma<T>::run(dot[r], a, b0, b1);
    Mma<T>::run(sum[r], k.ones, b0, b1);
  }
}

// A group ends: its scales and zero points (rows g and g + 8: pair_g, pair_g8) on the float sums.
template <typename T, int kTiles>
__device__ __forceinline__ void end_group(uint32_t pair_g, uint32_t pair_g8, const float (&dot)[kTiles][4],
                                          const float (&sum)[kTiles][4], float (&acc)[kTiles][4]) {
  float scale_g, scale_g8, corr_g, corr_g8;
  scale_and_correction<T>(pair_g, Mma<T>::kMagicValue, scale_g, corr_g);
  scale_and_correction<T>(pair_g8, Mma<T>::kMagicValue, scale_g8, corr_g8);
#pragma unroll
  for (int r = 0; r < kTiles; ++r) {
    acc[r][0] = fmaf(scale_g, dot[r][0], fmaf(-corr_g, sum[r][0], acc[r][0]));
    acc[r][1] = fmaf(scale_g, dot[r][1], fmaf(-corr_g, sum[r][1], acc[r][1]));
    acc[r][2] = fmaf(scale_g8, dot[r][2], fmaf(-corr_g8, sum[r][2], acc[r][2]));
    acc[r][3] = fmaf(scale_g8, dot[r][3], fmaf(-corr_g8, sum[r][3], acc[r][3]));
  }
}

// One chunk of 64 features against 8 * kTiles rows of x, into acc (see the kernel). xp[r] points at
// features t*8.. of the row this lane feeds to tile r, in 16-byte units (rows past M read row M - 1:
// their columns of the product are never stored). szg points at row g's (scale, zero) pair of group 0.
template <typename T, int kTiles>
__device__ __forceinline__ void chunk_product(const int4& wv, int c, const uint4* const (&xp)[kTiles],
                                              const uint32_t* __restrict__ szg, int group_shift,
                                              const Constants& k, float (&acc)[kTiles][4]) {
  const bool group32 = group_shift == 5;
  const uint32_t words[4] = {static_cast<uint32_t>(wv.x), static_cast<uint32_t>(wv.y),
                             static_cast<uint32_t>(wv.z), static_cast<uint32_t>(wv.w)};
  float dot[kTiles][4], sum[kTiles][4];  // per group: sum x * (MAGIC_VALUE + q), and sum x
  uint4 xv[kTiles];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int half = j >> 1;
    if (j == 0 || (group32 && j == 2)) {  // a group starts
#pragma unroll
      for (int r = 0; r < kTiles; ++r) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dot[r][e] = sum[r][e] = 0.0f;
      }
    }
    if ((j & 1) == 0) {  // x: features c*64 + half*32 + t*8 .. +8
#pragma unroll
      for (int r = 0; r < kTiles; ++r) xv[r] = __ldg(xp[r] + c * 8 + half * 4);
    }
    step_product<T, kTiles>(words[j], j, xv, k, dot, sum);
    if (j == 3 || (group32 && j == 1)) {  // a group ends: its scales and zero points on the float sums
      const uint32_t* pairs = szg + (((c * kChunk + half * 32) >> group_shift) << 4);
      end_group<T, kTiles>(__ldg(pairs), __ldg(pairs + 8), dot, sum, acc);
    }
  }
}

// One CTA: rows 16 * blockIdx.x .. + 16 of W against rows 0..M-1 (M <= 8 * kTiles) of x. Warp w takes
// chunks w, w + kWarps, ..., kUnroll of them loaded (non-allocating 128-bit loads) before any math.
template <typename T, int kTiles, int kWarps>
__global__ void __launch_bounds__(32 * kWarps) int4_mma_kernel(const T* __restrict__ x, const int4* __restrict__ w,
                                                             const uint32_t* __restrict__ scale_zero,
                                                             T* __restrict__ y, int M, int N, int K, int group_shift) {
  constexpr int kStride = kWarps * kUnroll;
  const int block = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int chunks = K / kChunk;
  const int4* wp = w + static_cast<size_t>(block) * chunks * 32 + lane;
  const uint32_t* szg = kept(scale_zero + (static_cast<size_t>(block) * (K >> group_shift)) * kRows + g);
  const uint4* xp[kTiles];
  x_pointers<T, kTiles>(x, M, K, g, t, xp);
  const Constants k = constants<T>();
  float acc[kTiles][4];
#pragma unroll
  for (int r = 0; r < kTiles; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.0f;

  for (int c0 = warp; c0 < chunks; c0 += kStride) {
    int4 cur[kUnroll];
    load_chunks<kWarps>(wp, c0, chunks, cur);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarps;
      if (c >= chunks) break;
      chunk_product<T, kTiles>(cur[u], c, xp, szg, group_shift, k, acc);
    }
  }

  // acc[r][e]: row g + 8 * (e >> 1) of the block, row 8 * r + 2 * t + (e & 1) of x.
  __shared__ float partial[kWarps][kTiles * 4][32];
#pragma unroll
  for (int r = 0; r < kTiles; ++r) {
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp][r * 4 + e][lane] = acc[r][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTiles * 4 * 32; idx += 32 * kWarps) {
    const int l = idx & 31, re = idx >> 5;
    float total = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) total += partial[v][re][l];
    const int m = 8 * (re >> 2) + 2 * (l & 3) + (re & 1);
    const int n = block * kRows + (l >> 2) + 8 * ((re >> 1) & 1);
    if (m < M) y[static_cast<size_t>(m) * N + n] = from_float<T>(total);
  }
}

// ---- The streamed kernel: a producer warp copies W and its scales into a ring of shared-memory
// stages with the Hopper bulk-copy engine (cp.async.bulk, completion on an mbarrier), so the bytes in
// flight do not depend on registers; kConsumers warps take the chunks of each stage from shared memory.

constexpr int kConsumers = 8;                         // consumer warps that share a stage (one team)
constexpr int kStageChunks = 2 * kConsumers;          // chunks of one stage: two a consumer (512 B each)
// Teams of kConsumers warps: with one row of x as planes two teams take a block's stages by turns (team
// j % 2 takes stage j of each block), so that a warp has half the stages of a block, and half the slices
// of x to turn into planes, after x is ready; more rows keep one team (their forms need more registers).
__host__ __device__ constexpr int teams(bool planes) { return planes ? 2 : 1; }
__host__ __device__ constexpr int consumer_warps(bool planes) { return kConsumers * teams(planes); }
constexpr int kStages = 8;                            // stages in the ring
constexpr int kMaxStageGroups = kStageChunks * kChunk / 32;  // groups a stage can touch (group 32)
constexpr int kStageWeightBytes = kStageChunks * 32 * 16;
constexpr int kStageBytes = kStageWeightBytes + kMaxStageGroups * kRows * 4;
constexpr int kMaxBlocksPerCta = 16;  // blocks of 16 rows one CTA sums, at most

// Byte offsets of the streamed kernel's shared memory: the ring of stages, with planes (one row of x
// kept in shared memory as three int8 planes, see the kernel) x (K * 3 bytes) and its scale a 128-feature
// slice, the barriers (full and empty, a stage each), each warp's share of the sum of squares of each
// row of x (the norm's, [warp][x row]), the sum of x over each group ([group][8]: the zero points' term;
// [group] with planes, whose one row is row 0), and last each consumer warp's sums of each of the CTA's
// blocks ([block][warp][x row][16], blocks: the most a CTA of the grid takes; last, so that the kernel
// finds every other offset without knowing the blocks a CTA takes). With planes a stage holds the scales of
// groups of its own size rather than of group 32 (1.5 KB less a stage in groups of 128), so that planes
// fit for K = 14336 in groups of 128.
struct StreamedLayout {
  int stage_bytes, x, x_scale, sums, barriers, row_sumsq, group_sums, total;
};

__host__ __device__ inline StreamedLayout streamed_layout(int M, int K, int group_shift, bool planes, int blocks) {
  StreamedLayout l{};
  const int groups = K >> group_shift;
  l.stage_bytes = planes ? kStageWeightBytes + (kStageChunks * kChunk >> group_shift) * kRows * 4 : kStageBytes;
  int at = kStages * l.stage_bytes;
  l.x = at;
  at += planes ? K * 3 : 0;
  l.x_scale = at;
  at += planes ? (K + 127) / 128 * 4 : 0;
  at = (at + 15) / 16 * 16;
  l.barriers = at;
  at += 2 * kStages * 8;
  l.row_sumsq = at;
  at += consumer_warps(planes) * 8 * 4;
  l.group_sums = at;
  at += groups * group_stride(planes) * 4;
  at = (at + 15) / 16 * 16;
  l.sums = at;  // last: the offsets before it do not depend on the blocks
  at += blocks * consumer_warps(planes) * M * kRows * 4;
  l.total = at;
  return l;
}

// The streamed kernel's grid for N / 16 blocks (streamed_grid). Up to 8 rows of x, the warps' sums take
// 4 KB a block.
inline int streamed_ctas(int M, int N, int K, int group_shift, bool planes) {
  return streamed_grid(N / kRows, kMaxBlocksPerCta,
                       [&](int per_cta) { return streamed_layout(M, K, group_shift, planes, per_cta).total; });
}

// The streamed kernel's grid with its row of x kept in shared memory as planes (see the kernel), or 0
// where x is not kept so: planes take one row, and only where they still let two CTAs share an SM; more
// rows, or a longer one, are read from global memory.
inline int planes_ctas(int M, int N, int K, int group_shift) {
  if (M != 1) return 0;
  const int ctas = streamed_ctas(M, N, K, group_shift, true);
  return two_per_sm(streamed_layout(M, K, group_shift, true, blocks_per_cta(N / kRows, ctas)).total) ? ctas : 0;
}

// A group ends (streamed kernel): acc += scale * dot - scale * (magic + zero) * sum x, for rows g and
// g + 8 (pair_g, pair_g8) and x rows 2t, 2t + 1 (gs: their sums over the group); dot in two chains. In
// fp16 the two rows' magic numbers differ (half_levels).
template <typename T>
__device__ __forceinline__ void end_group_sums(uint32_t pair_g, uint32_t pair_g8, const float (&dot)[2][4], float2 gs,
                                               float (&acc)[4]) {
  constexpr bool kHalf = std::is_same_v<T, __half>;
  float scale_g, scale_g8, corr_g, corr_g8;
  scale_and_correction<T>(pair_g, kHalf ? kHalfMagicLow : Mma<T>::kMagicValue, scale_g, corr_g);
  scale_and_correction<T>(pair_g8, kHalf ? kHalfMagicHigh : Mma<T>::kMagicValue, scale_g8, corr_g8);
  acc[0] = fmaf(scale_g, dot[0][0] + dot[1][0], fmaf(-corr_g, gs.x, acc[0]));
  acc[1] = fmaf(scale_g, dot[0][1] + dot[1][1], fmaf(-corr_g, gs.y, acc[1]));
  acc[2] = fmaf(scale_g8, dot[0][2] + dot[1][2], fmaf(-corr_g8, gs.x, acc[2]));
  acc[3] = fmaf(scale_g8, dot[0][3] + dot[1][3], fmaf(-corr_g8, gs.y, acc[3]));
}

// kN consecutive chunks of 64 features, from chunk c of the block, against up to 8 rows of x, into acc.
// ws: the lane's 16 bytes of the first chunk (the next 512 bytes on); xl: features t*8.. of the row the
// lane feeds to the mma, in 16-byte units (in global memory); szg: row g's (scale, zero) pair of group
// g0. The k-steps
// alternate between two accumulators, so that consecutive mma do not wait for each other. The group size
// is a template argument, so a group that spans both chunks gets its scales once. Consts: Constants for
// bf16 (magic_levels), HalfConstants for fp16 (half_levels).
template <typename T, int kGroupShift, int kN, typename Consts>
__device__ __forceinline__ void run_product(const int4* ws, int c, int g0, const uint4* xl, const uint32_t* szg,
                                            const float* group_sums, int t, const Consts& k, float (&acc)[4]) {
  constexpr int kStepsPerGroup = (1 << kGroupShift) / 16;  // k-steps (two words a 32-feature half)
  int4 wv[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) wv[n] = ws[n * 32];
  float dot[2][4];  // per group: sum x * (MAGIC_VALUE + q), even and odd k-steps
  uint4 xv;
#pragma unroll
  for (int step = 0; step < 4 * kN; ++step) {
    const int n = step >> 2, j = step & 3;
    if (step % kStepsPerGroup == 0) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dot[0][e] = dot[1][e] = 0.0f;
    }
    if ((j & 1) == 0) {  // features (c+n)*64 + (j/2)*32 ..
      xv = __ldg(xl + (c + n) * 8 + (j >> 1) * 4);
    }
    const uint32_t word = j == 0 ? wv[n].x : j == 1 ? wv[n].y : j == 2 ? wv[n].z : wv[n].w;
    uint32_t a[4];
    if constexpr (std::is_same_v<T, __half>) {
      half_levels(word, k, a);
    } else {
      magic_levels(word, k.mask, k.magic, a);
    }
    Mma<T>::run(dot[step & 1], a, (j & 1) ? xv.z : xv.x, (j & 1) ? xv.w : xv.y);
    if ((step + 1) % kStepsPerGroup == 0) {  // a group ends: its scales and zero points on the float sums
      const int group = ((c + n) * kChunk + (j >> 1) * 32) >> kGroupShift;
      const uint32_t* pairs = szg + ((group - g0) << 4);
      const float2 gs = *reinterpret_cast<const float2*>(group_sums + group * 8 + 2 * t);
      end_group_sums<T>(pairs[0], pairs[8], dot, gs, acc);
    }
  }
}

// run_product on the integer tensor cores (one row of x as planes, kPlanes): kN consecutive chunks
// of one 128-feature slice. A word's nibbles 0, 2, 4, 6 (w & 0x0F0F0F0F) are row g's levels q of features
// 0, 2, 1, 3 of the lane's 8 (t * 8..) of a 32-feature half, nibbles 1, 3, 5, 7 (w >> 4) row g + 8's; the
// half's two words are the A fragment of one m16n8k32 step (k 4t.. from the first, 16 + 4t.. from the
// second), whose B the planes' bytes in the same order are: column n of the product is plane n (the
// lanes of g < 3 read plane g; the other columns are never used). Per group the int sums (one chain
// started at kIntMagic, so that it is a float by its bits: |sum| <= 15 * 128 * 128 < 2^22) are scaled by
// the group's scale times the slice's 2^-s into acc[e], column 2t + (e & 1), row g + 8 (e >> 1); the zero
// points' term only on t = 0 (corr_on). The columns are weighed (1, 256, 65536) and added when a block
// ends. One chain of mma a group rather than two by turns gives the same sums (they are exact) in fewer
// adds: 1286 against 1305 us a step in the int4 chain (H200, benchmarks/RESULTS.md).
template <typename T, int kGroupShift, int kN>
__device__ __forceinline__ void run_product_planes(const int4* ws, int c, int g0, const uint4* xl,
                                                   const uint32_t* szg, const float* group_sums,
                                                   const float* x_scale, float corr_on, float (&acc)[4]) {
  constexpr int kStepsPerGroup = (1 << kGroupShift) / 32;
  int4 wv[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) wv[n] = ws[n * 32];
  const float xs = x_scale[(c * kChunk) >> 7];
  int d[4];
  uint4 xv;
#pragma unroll
  for (int step = 0; step < 2 * kN; ++step) {
    const int n = step >> 1, h = step & 1;
    if (step % kStepsPerGroup == 0) {
#pragma unroll
      for (int e = 0; e < 4; ++e) d[e] = static_cast<int>(kIntMagic);
    }
    if (h == 0) xv = xl[(c + n) * (kPlanesChunkBytes / 16)];
    const uint32_t w0 = h ? wv[n].z : wv[n].x, w1 = h ? wv[n].w : wv[n].y;
    const uint32_t a[4] = {w0 & 0x0F0F0F0Fu, (w0 >> 4) & 0x0F0F0F0Fu, w1 & 0x0F0F0F0Fu, (w1 >> 4) & 0x0F0F0F0Fu};
    imma<false>(d, a, h ? xv.z : xv.x, h ? xv.w : xv.y);
    if ((step + 1) % kStepsPerGroup == 0) {  // a group ends
      const int group = ((c + n) * kChunk + h * 32) >> kGroupShift;
      const uint32_t* pairs = szg + ((group - g0) << 4);
      const float scale_g = Mma<T>::low(pairs[0]), scale_g8 = Mma<T>::low(pairs[8]);
      const float corr_g = scale_g * Mma<T>::high(pairs[0]), corr_g8 = scale_g8 * Mma<T>::high(pairs[8]);
      const float gs = group_sums[group] * corr_on;
      float sums[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) sums[e] = __int_as_float(d[e]) - kIntMagicValue;
      const float sg = scale_g * xs, sg8 = scale_g8 * xs;
      acc[0] = fmaf(sg, sums[0], fmaf(-corr_g, gs, acc[0]));
      acc[1] = fmaf(sg, sums[1], acc[1]);
      acc[2] = fmaf(sg8, sums[2], fmaf(-corr_g8, gs, acc[2]));
      acc[3] = fmaf(sg8, sums[3], acc[3]);
    }
  }
}

// One CTA: the blocks [first, end) of 16 rows of W against rows 0..M-1 (M <= 8) of x. Stage s is chunks
// [c0, c0 + 16) of one block and the groups they touch; consumer warp w of a team takes the
// kStageChunks / kConsumers consecutive chunks from (w % kConsumers) * that, and stores its sums in its own
// place in shared memory when its block ends; the epilogue adds the warps' sums in warp order (warps_sum).
// The producer lets the next kernel launch as it starts (that kernel's CTAs take an SM as this one's
// leave it, and start their own copies). The consumers first sum x over each group (and
// its squares, for the norm); with one row of x (kPlanes) that pass also writes x into shared memory as
// planes, which the products read.
// Registers: with 2-8 rows the bounds ask for one CTA an SM at least, so ptxas gives those forms 60-75
// registers (without it, 56 and spills); two CTAs an SM still fit. The one-row forms (544 threads) are left
// to ptxas's own choice (0), which keeps them at 47-56, two CTAs an SM.
template <typename T, int kGroupShift, Epilogue kMode, bool kPlanes>
__global__ void __launch_bounds__(32 * (consumer_warps(kPlanes) + 1), kPlanes ? 0 : 1) int4_mma_streamed_kernel(
    const T* __restrict__ x, const int4* __restrict__ w, const uint32_t* __restrict__ scale_zero,
    const T* __restrict__ residual, T* __restrict__ y, int M, int N, int K, float eps, int activation) {
  constexpr bool kNorm = kMode == Epilogue::kRmsNorm || kMode == Epilogue::kRmsNormGatedAct;
  constexpr int group_shift = kGroupShift;
  constexpr int kWarps = consumer_warps(kPlanes), kTeams = teams(kPlanes);
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunks = K / kChunk, groups = K >> group_shift;
  const StreamedLayout layout = streamed_layout(M, K, group_shift, kPlanes, 1);  // the offsets (sums is last)
  float* sums = reinterpret_cast<float*>(smem + layout.sums);  // [block][warp][x row][16], kWarps warps
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + layout.barriers);
  uint64_t* empty = full + kStages;
  float* row_sumsq = reinterpret_cast<float*>(smem + layout.row_sumsq);    // [warp][x row], kWarps warps
  float* group_sums = reinterpret_cast<float*>(smem + layout.group_sums);  // [group][8]
  int first, end;
  cta_blocks(N / kRows, blockIdx.x, gridDim.x, first, end);
  // x rows past M stay 0 (every consumer warp stores its sums and its share of the squares of every row and
  // block: those need no zeros)
  for (int i = threadIdx.x; i < groups * group_stride(kPlanes); i += blockDim.x) group_sums[i] = 0.0f;
  // Stage s of the ring is stage s - block_stage of the CTA's current block; a consumer team takes that block's
  // stages team, team + kTeams, ... (two teams: an even count a block, see even_stages).
  const int stages_per_block = (chunks + kStageChunks - 1) / kStageChunks;
  const int ring_stages = kTeams == 2 ? even_stages(stages_per_block) : stages_per_block;
  init_ring(full, empty, kStages, kConsumers);
  __syncthreads();

  if (warp == kWarps) {  // the producer
    if (lane == 0) {
      allow_dependents_to_launch();  // at once: see the top of the file
      int s = 0;
      for (int b = first; b < end; ++b) {
        for (int c0 = 0; c0 < chunks; c0 += kStageChunks, ++s) {
          const int slot = s % kStages;
          if (s >= kStages) barrier_wait(&empty[slot], ((s / kStages) + 1) & 1);
          const int n = min(kStageChunks, chunks - c0);
          const int g0 = (c0 * kChunk) >> group_shift, g1 = (((c0 + n) * kChunk - 1) >> group_shift) + 1;
          const uint32_t wbytes = n * 512, sbytes = (g1 - g0) * kRows * 4;
          unsigned char* dst = smem + slot * layout.stage_bytes;
          barrier_expect_bytes(&full[slot], wbytes + sbytes);
          bulk_copy(dst, w + (static_cast<size_t>(b) * chunks + c0) * 32, wbytes, &full[slot]);
          bulk_copy(dst + kStageWeightBytes, scale_zero + (static_cast<size_t>(b) * groups + g0) * kRows, sbytes,
                    &full[slot]);
        }
        if (kTeams == 2 && ring_stages > stages_per_block) skip_stage(full, empty, kStages, s++, 0);
      }
    }
  } else {  // a consumer
    wait_for_previous_grid();  // x is the previous kernel's output
    unsigned char* planes = smem + layout.x;
    float* x_scale = reinterpret_cast<float*>(smem + layout.x_scale);
    sum_x<T, kGroupShift, kNorm, kPlanes, kWarps>(x, M, K, group_sums, row_sumsq, planes, x_scale);
    const int g = lane >> 2, t = lane & 3;
    // Features t*8.. of the row of x this lane feeds to the mma (rows past M read row M - 1: their columns
    // of the product are never stored), in 16-byte units; with planes, its 16 bytes of plane g of a chunk.
    const uint4* xl;
    if constexpr (kPlanes) {
      xl = reinterpret_cast<const uint4*>(planes + in_register((g < 3 ? g : 0) * 64 + t * 16));  // not remade a stage
    } else {
      xl = kept(reinterpret_cast<const uint4*>(x + static_cast<size_t>(min(g, M - 1)) * K + t * 8));
    }
    std::conditional_t<std::is_same_v<T, __half>, HalfConstants, Constants> k;
    if constexpr (std::is_same_v<T, __half>) {
      k = half_constants();
    } else {
      k = constants<T>();
    }
    // With planes: the weights of this lane's columns 2t and 2t + 1 (planes 0, 1, 2; the rest unused),
    // and whether it adds the zero points' term (column 0 only).
    const float column_weight0 = t == 0 ? 1.0f : t == 1 ? 65536.0f : 0.0f, column_weight1 = t == 0 ? 256.0f : 0.0f;
    const float corr_on = t == 0 ? 1.0f : 0.0f;
    const int team = warp / kConsumers;
    int block_stage = 0;
    for (int b = first; b < end; ++b, block_stage += ring_stages) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int s = block_stage + team, c0 = team * kStageChunks; s < block_stage + ring_stages;
           s += kTeams, c0 += kTeams * kStageChunks) {
        const int slot = static_cast<unsigned>(s) % kStages;
        barrier_wait(&full[slot], (static_cast<unsigned>(s) / kStages) & 1);
        const int n = min(kStageChunks, chunks - c0);
        const unsigned char* stage = smem + slot * layout.stage_bytes;
        const int4* ws = reinterpret_cast<const int4*>(stage) + lane;
        const uint32_t* szg = reinterpret_cast<const uint32_t*>(stage + kStageWeightBytes) + g;
        const int g0 = (c0 * kChunk) >> group_shift;
        constexpr int kPerWarp = kStageChunks / kConsumers;
        const int i = (warp % kConsumers) * kPerWarp;
        // kN chunks of this stage from its chunk c, on the integer or the bf16/fp16 tensor cores.
        const auto product = [&](auto chunks_n, int c) {
          constexpr int kN = decltype(chunks_n)::value;
          if constexpr (kPlanes) {
            run_product_planes<T, kGroupShift, kN>(ws + c * 32, c0 + c, g0, xl, szg, group_sums, x_scale, corr_on,
                                                   acc);
          } else {
            run_product<T, kGroupShift, kN>(ws + c * 32, c0 + c, g0, xl, szg, group_sums, t, k, acc);
          }
        };
        if (i + kPerWarp <= n) {
          product(std::integral_constant<int, kPerWarp>{}, i);
        } else {  // the block's last stage, cut short: one chunk at a time (a group of 128 never ends here)
          for (int c = i; c < n; ++c) product(std::integral_constant<int, 1>{}, c);
        }
        __syncwarp();
        if (lane == 0) barrier_arrive(&empty[slot]);
      }
      if constexpr (kPlanes) add_planes(acc, column_weight0, column_weight1);
      // acc[e]: row g + 8 * (e >> 1) of the block, row 2 * t + (e & 1) of x.
      float* block_sums = sums + ((b - first) * kWarps + warp) * M * kRows;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 2 * t + (e & 1);
        if (m < M) block_sums[m * kRows + g + 8 * (e >> 1)] = acc[e];
      }
    }
  }
  wait_for_previous_grid();  // every thread that writes y (the consumers have waited already)
  __syncthreads();
  store_outputs<T, kMode, kWarps, false>(sums, row_sumsq, nullptr, residual, y, first, end, M, N, K, eps, activation);
}

// (q - zero) * scale for a pair of levels (MAGIC_VALUE + q in each half), rounded once, as the
// reference rounds it: the subtraction is exact, the product rounds to bf16/fp16.
template <typename T>
__device__ __forceinline__ uint32_t scaled_pair(uint32_t magic_q, uint32_t offset2, uint32_t scale2);

template <>
__device__ __forceinline__ uint32_t scaled_pair<__nv_bfloat16>(uint32_t magic_q, uint32_t offset2, uint32_t scale2) {
  const __nv_bfloat162 r = __hmul2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&magic_q),
                                           *reinterpret_cast<const __nv_bfloat162*>(&offset2)),
                                   *reinterpret_cast<const __nv_bfloat162*>(&scale2));
  return *reinterpret_cast<const uint32_t*>(&r);
}

template <>
__device__ __forceinline__ uint32_t scaled_pair<__half>(uint32_t magic_q, uint32_t offset2, uint32_t scale2) {
  const __half2 r = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&magic_q), *reinterpret_cast<const __half2*>(&offset2)),
                            *reinterpret_cast<const __half2*>(&scale2));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// W rows [16 * first_block, + 16 * blocks) dequantized into out [16 * blocks, K]: one thread per lane
// load (16 bytes, 32 weights), on packed pairs: per pair a shift, a lop3, a subtraction and a product;
// per row and half chunk one 16-byte store.
template <typename T>
__global__ void int4_mma_dequant_kernel(const int4* __restrict__ w, const uint32_t* __restrict__ scale_zero,
                                        T* __restrict__ out, int first_block, int blocks, int K, int group_shift) {
  const int chunks = K / kChunk;
  const int64_t loads = static_cast<int64_t>(blocks) * chunks * 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= loads) return;
  const int lane = i & 31;
  const int64_t bc = i >> 5;
  const int c = bc % chunks, block = bc / chunks;
  const int g = lane >> 2, t = lane & 3;
  const int4 v = w[static_cast<int64_t>(first_block) * chunks * 32 + i];
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
  const uint32_t* szp = scale_zero + static_cast<int64_t>(first_block + block) * (K >> group_shift) * kRows + g;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int feature = c * kChunk + half * 32 + t * 8;  // words 2 half, 2 half + 1: features +0..3, +4..7
    const uint32_t* pairs = szp + ((feature >> group_shift) << 4);
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {  // row g, then row g + 8: nibble pairs r = hi and r = 2 + hi
      const uint32_t pair = __ldg(pairs + 8 * hi);
      const uint32_t scale2 = __byte_perm(pair, pair, 0x1010);
      const uint32_t offset2 = Mma<T>::pair(Mma<T>::kMagicValue + Mma<T>::high(pair));
      uint4 vals;  // features +0,1 | +2,3 (word 2 half) | +4,5 | +6,7 (word 2 half + 1)
      uint32_t* out4 = reinterpret_cast<uint32_t*>(&vals);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const uint32_t word = words[2 * half + jj];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = 2 * h + hi;
          const uint32_t magic_q = ((word >> (4 * r)) & 0x000F000Fu) | Mma<T>::kMagic;
          out4[2 * jj + h] = scaled_pair<T>(magic_q, offset2, scale2);
        }
      }
      T* dst = out + (static_cast<int64_t>(block) * kRows + g + 8 * hi) * K + feature;
      *reinterpret_cast<uint4*>(dst) = vals;
    }
  }
}

// What a launch reads and writes: residual with kAddResidual, eps with the norm, activation with the
// gated epilogue.
struct Operands {
  at::Tensor x, w, sz, residual, y;
  double eps;
  int activation = kSilu;
};

template <typename T, int kGroupShift, Epilogue kMode, bool kPlanes>
void launch_streamed_as(const Operands& o, int ctas) {
  const int M = o.x.size(0), K = o.x.size(1), N = o.w.size(0);
  const int smem = streamed_layout(M, K, kGroupShift, kPlanes, blocks_per_cta(N / kRows, ctas)).total;
  TORCH_CHECK(smem <= static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin),
              "linear_int4_mma: K = ", K, " in groups of ", 1 << kGroupShift,
              " needs more shared memory for its group sums than a CTA of this card has");
  constexpr auto kernel = int4_mma_streamed_kernel<T, kGroupShift, kMode, kPlanes>;
  allow_dynamic_smem<kernel>(smem);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; };
  C10_CUDA_CHECK(launch_programmatic(kernel, dim3(ctas), dim3(32 * (consumer_warps(kPlanes) + 1)), smem,
                                     at::cuda::getCurrentCUDAStream(), ptr(o.x),
                                     reinterpret_cast<const int4*>(o.w.data_ptr()),
                                     reinterpret_cast<const uint32_t*>(o.sz.data_ptr()), ptr(o.residual), ptr(o.y),
                                     M, N, K, static_cast<float>(o.eps), o.activation));
}

template <typename T, int kGroupShift, Epilogue kMode>
void launch_streamed(const Operands& o) {
  const int M = o.x.size(0), K = o.x.size(1), N = o.w.size(0);
  if (const int ctas = planes_ctas(M, N, K, kGroupShift)) {
    return launch_streamed_as<T, kGroupShift, kMode, true>(o, ctas);
  }
  launch_streamed_as<T, kGroupShift, kMode, false>(o, streamed_ctas(M, N, K, kGroupShift, false));
}

template <typename T, Epilogue kMode = Epilogue::kPlain>
void launch_streamed_group(const Operands& o, int group) {
  if (group == 32) return launch_streamed<T, 5, kMode>(o);
  if (group == 64) return launch_streamed<T, 6, kMode>(o);
  return launch_streamed<T, 7, kMode>(o);
}

template <typename T, int kTiles, int kWarps>
void launch_mma(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, at::Tensor& y, int group) {
  const int M = x.size(0), K = x.size(1), N = w.size(0);
  const int group_shift = __builtin_ctz(group);
  int4_mma_kernel<T, kTiles, kWarps><<<N / kRows, 32 * kWarps, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const int4*>(w.data_ptr()),
      reinterpret_cast<const uint32_t*>(sz.data_ptr()), reinterpret_cast<T*>(y.data_ptr()), M, N, K, group_shift);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Warps a CTA splits K over: 8, or 16 where the blocks of 16 rows are too few to give every SM 16
// warps at 8 a block (the down projection of an 8B model: 256 blocks of 224 chunks). Measured on an
// H200 (scratch sweep of 4, 8 and 16 warps, 4 and 8 chunks in flight a lane, with and without loading
// the next round ahead): these won or tied on llama-8b's shapes.
int warps_for(int64_t blocks) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return blocks * 8 >= 16 * sms ? 8 : 16;
}

template <typename T, int kTiles>
void launch_tiles(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, at::Tensor& y, int group) {
  if (warps_for(w.size(0) / kRows) == 8) return launch_mma<T, kTiles, 8>(x, w, sz, y, group);
  return launch_mma<T, kTiles, 16>(x, w, sz, y, group);
}

template <typename T>
void run_mma(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, at::Tensor& y, int group) {
  const int64_t rows = x.size(0);
  if (rows <= 8) return launch_streamed_group<T>(Operands{x, w, sz, at::Tensor(), y, 0.0}, group);
  if (rows <= 16) return launch_tiles<T, 2>(x, w, sz, y, group);
  return launch_tiles<T, 4>(x, w, sz, y, group);
}

// ---- 33 to 256 rows on Hopper: the mixed-input wgmma GEMM of wgmma_gemm.cuh with W in int4-mma16x64-v1. A
// warp's 16 bytes of a chunk are already its A fragments of the four k-steps (the layout packs a block's
// chunk as the m16n8k16 fragments); a stage holds the chunk's words of the CTA's 8 blocks and the (scale,
// zero) of the groups it touches, and the fragments are (q - zero) * scale, rounded as the reference
// rounds it.
template <typename T, int kGroupShift>
struct Int4Weights {
  struct Params {
    const int4* w;
    const uint32_t* scale_zero;
    int K;
  };
  static constexpr int kGroups = kGroupShift == 5 ? 2 : 1;  // groups a chunk touches
  static constexpr int kWBytes = oiv2_wgmma::kCtaBlocks * 32 * 16;
  static constexpr int kStageBytes = kWBytes + oiv2_wgmma::kCtaBlocks * kGroups * kRows * 4;

  // A thread's copies of a chunk: 16 bytes of one block's words, and (the first kCtaBlocks * 4 * kGroups
  // threads) 16 bytes of a block's (scale, zero) pairs.
  struct Copier {
    const int4* w;
    const uint32_t* scale_zero;
    bool w_valid, sz_valid, copies_sz;

    __device__ Copier(const Params& p, int block0, int blocks) {
      static_assert(oiv2_wgmma::kCtaBlocks * 32 == oiv2_wgmma::kThreads, "one 16-byte copy of W a thread");
      constexpr int kUnits = kGroups * 4;
      const int b = block0 + (threadIdx.x >> 5), bs = block0 + threadIdx.x / kUnits;
      w = p.w + static_cast<size_t>(min(b, blocks - 1)) * (p.K / kChunk) * 32 + (threadIdx.x & 31);
      w_valid = b < blocks;
      copies_sz = threadIdx.x < oiv2_wgmma::kCtaBlocks * kUnits;
      scale_zero = p.scale_zero + static_cast<size_t>(min(bs, blocks - 1)) * (p.K >> kGroupShift) * kRows +
                   (threadIdx.x % kUnits) * 4;
      sz_valid = bs < blocks;
    }
    __device__ void copy(uint8_t* stage, int c) const {
      oiv2_wgmma::copy_async16(stage + threadIdx.x * 16, w + c * 32, w_valid);
      if (copies_sz) {
        oiv2_wgmma::copy_async16(stage + kWBytes + threadIdx.x * 16, scale_zero + ((c * kChunk) >> kGroupShift) * kRows,
                                 sz_valid);
      }
    }
  };

  __device__ static void fragments(const uint8_t* stage, const Params&, uint32_t (&a)[4][4]) {
    const uint32_t mask = in_register(0x000F000Fu), magic = in_register(Mma<T>::kMagic);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int4 v = reinterpret_cast<const int4*>(stage)[warp * 32 + lane];
    const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                               static_cast<uint32_t>(v.w)};
    const uint32_t* szs = reinterpret_cast<const uint32_t*>(stage + kWBytes) + warp * kGroups * kRows + g;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int gl = half * (kGroups - 1);
      uint32_t scale2[2], offset2[2];
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const uint32_t pair = szs[gl * kRows + 8 * hi];
        scale2[hi] = __byte_perm(pair, pair, 0x1010);
        offset2[hi] = Mma<T>::pair(Mma<T>::kMagicValue + Mma<T>::high(pair));
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t levels[4];
        magic_levels(words[2 * half + j], mask, magic, levels);
#pragma unroll
        for (int r = 0; r < 4; ++r) a[2 * half + j][r] = scaled_pair<T>(levels[r], offset2[r & 1], scale2[r & 1]);
      }
    }
  }

  __device__ static float row_scale(const Params&, int) { return 1.0f; }
};

template <typename T, int kGroupShift>
void launch_wgmma_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, at::Tensor& y) {
  const typename Int4Weights<T, kGroupShift>::Params p{reinterpret_cast<const int4*>(w.data_ptr()),
                                                       reinterpret_cast<const uint32_t*>(sz.data_ptr()),
                                                       static_cast<int>(x.size(1))};
  oiv2_wgmma::run_wgmma_gemm<T, Int4Weights<T, kGroupShift>>(x, p, w.size(0), y);
}

template <typename T>
void run_wgmma_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, at::Tensor& y, int group) {
  if (group == 32) return launch_wgmma_gemm<T, 5>(x, w, sz, y);
  if (group == 64) return launch_wgmma_gemm<T, 6>(x, w, sz, y);
  return launch_wgmma_gemm<T, 7>(x, w, sz, y);
}

// y [M, N] = x @ W^T by slices of W dequantized into a buffer that L2 holds, each through cuBLAS.
template <typename T>
void run_dequant_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, at::Tensor& y, int group) {
  const int64_t N = w.size(0), K = x.size(1);
  const int64_t blocks_per_slice = std::max<int64_t>(1, kDequantBytes / (kRows * K * 2));
  const int64_t slice_rows = std::min<int64_t>(N, blocks_per_slice * kRows);
  at::Tensor buffer = at::empty({slice_rows, K}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t row = 0; row < N; row += slice_rows) {
    const int64_t rows = std::min<int64_t>(slice_rows, N - row);
    const int64_t loads = rows * K / 32;  // 16 bytes (32 weights) a thread
    const int threads = 256;
    int4_mma_dequant_kernel<T><<<(loads + threads - 1) / threads, threads, 0, stream>>>(
        reinterpret_cast<const int4*>(w.data_ptr()), reinterpret_cast<const uint32_t*>(sz.data_ptr()),
        reinterpret_cast<T*>(buffer.data_ptr()), row / kRows, rows / kRows, K, __builtin_ctz(group));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor out = y.narrow(1, row, rows);
    at::mm_out(out, x, buffer.narrow(0, 0, rows).t());
  }
}

// The operands every op here takes, checked: x [..., K] (bf16 or fp16), packed [N, K/2] uint8 in
// int4-mma16x64-v1, scale_zero [N/16, K/G, 16, 2] in x's dtype. Returns the group size.
int64_t check_operands(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero) {
  TORCH_CHECK(x.dim() >= 1, "x must have a feature dimension");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "packed must be [N, K/2] uint8");
  const int64_t K = x.size(-1), N = packed.size(0);
  TORCH_CHECK(K == 2 * packed.size(1), "packed must hold K/2 bytes a row");
  TORCH_CHECK(N % kRows == 0 && K % kChunk == 0, "linear_int4_mma needs N a multiple of 16 and K of 64");
  TORCH_CHECK(scale_zero.dim() == 4 && scale_zero.size(0) == N / kRows && scale_zero.size(2) == kRows &&
                  scale_zero.size(3) == 2 && scale_zero.size(1) > 0 && K % scale_zero.size(1) == 0,
              "scale_zero must be [N/16, K/G, 16, 2]");
  const int64_t group = K / scale_zero.size(1);
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "the group size must be 32, 64 or 128");
  TORCH_CHECK(x.scalar_type() == scale_zero.scalar_type(), "scale_zero must have x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  return group;
}

// x as [rows, K], contiguous and on a 16-byte boundary.
at::Tensor rows_of(const at::Tensor& x) {
  at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  return aligned16(x2) ? x2 : x2.clone();
}

// x [..., K] → y [..., N].
at::Tensor linear_int4_mma(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero) {
  const int64_t group = check_operands(x, packed, scale_zero);
  const int64_t N = packed.size(0);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  at::Tensor x2 = rows_of(x);
  at::Tensor wc = packed.contiguous(), sc = scale_zero.contiguous();
  TORCH_CHECK(aligned16(wc) && aligned16(sc), "packed and scale_zero must start on 16-byte boundaries");
  at::Tensor y = at::empty({x2.size(0), N}, x.options());
  if (y.numel() == 0) return y.view(out_sizes);
  const int64_t rows = x2.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (rows <= 8 * kMaxTiles) {
    bf16 ? run_mma<__nv_bfloat16>(x2, wc, sc, y, group) : run_mma<__half>(x2, wc, sc, y, group);
  } else if (oiv2_wgmma::takes(rows)) {
    bf16 ? run_wgmma_gemm<__nv_bfloat16>(x2, wc, sc, y, group) : run_wgmma_gemm<__half>(x2, wc, sc, y, group);
  } else {
    bf16 ? run_dequant_gemm<__nv_bfloat16>(x2, wc, sc, y, group) : run_dequant_gemm<__half>(x2, wc, sc, y, group);
  }
  return y.view(out_sizes);
}

// The ops with an epilogue (decode steps of 1 to 8 rows, the streamed kernel alone): x [..., K] →
// y [..., N] (N / 2 with the gated activation); residual [..., N] in x's dtype with kAddResidual.
template <Epilogue kMode>
at::Tensor run_epilogue(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero,
                        const at::Tensor& residual, double eps, int activation = kSilu) {
  const int64_t group = check_operands(x, packed, scale_zero);
  const int64_t N = packed.size(0);
  const int64_t width = kMode == Epilogue::kRmsNormGatedAct ? N / 2 : N;
  const at::cuda::OptionalCUDAGuard guard(x.device());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = width;
  Operands o{rows_of(x), packed.contiguous(), scale_zero.contiguous(), at::Tensor(), at::Tensor(), eps, activation};
  TORCH_CHECK(o.x.size(0) >= 1 && o.x.size(0) <= 8, "the int4 products with an epilogue take 1 to 8 rows");
  TORCH_CHECK(aligned16(o.w) && aligned16(o.sz), "packed and scale_zero must start on 16-byte boundaries");
  o.y = at::empty({o.x.size(0), width}, x.options());
  if constexpr (kMode == Epilogue::kAddResidual) {
    TORCH_CHECK(residual.scalar_type() == x.scalar_type() && residual.sizes() == at::IntArrayRef(out_sizes),
                "residual must have the product's shape and x's dtype");
    o.residual = residual.reshape({-1, N}).contiguous();
  }
  if (x.scalar_type() == at::kBFloat16) {
    launch_streamed_group<__nv_bfloat16, kMode>(o, group);
  } else {
    launch_streamed_group<__half, kMode>(o, group);
  }
  return o.y.view(out_sizes);
}

at::Tensor linear_int4_mma_add(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero,
                               const at::Tensor& residual) {
  return run_epilogue<Epilogue::kAddResidual>(x, packed, scale_zero, residual, 0.0);
}

at::Tensor rms_norm_linear_int4_mma(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero,
                                    double eps) {
  return run_epilogue<Epilogue::kRmsNorm>(x, packed, scale_zero, at::Tensor(), eps);
}

// packed holds the fused gate/up weight [2I, K] with its rows interleaved by 8 (gate rows 8j..8j+7, then
// up rows 8j..8j+7, in block j of 16): y [..., I] = act(gate) * up.
at::Tensor rms_norm_linear_int4_mma_gated_act(const at::Tensor& x, const at::Tensor& packed,
                                              const at::Tensor& scale_zero, double eps, int64_t activation) {
  TORCH_CHECK(activation >= kSilu && activation <= kGeluTanh, "activation must be 0 (silu), 1 (gelu) or 2 (gelu_tanh)");
  return run_epilogue<Epilogue::kRmsNormGatedAct>(x, packed, scale_zero, at::Tensor(), eps,
                                                  static_cast<int>(activation));
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) {
  m.impl("linear_int4_mma", &linear_int4_mma);
  m.impl("linear_int4_mma_add", &linear_int4_mma_add);
  m.impl("rms_norm_linear_int4_mma", &rms_norm_linear_int4_mma);
  m.impl("rms_norm_linear_int4_mma_gated_act", &rms_norm_linear_int4_mma_gated_act);
}
