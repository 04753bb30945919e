// oiv2::linear_int8_gemv: y[m, n] = scales[n] * sum_k x[m, k] * qweight[n, k] for M = 1..4 rows,
// the matrix-vector product of a decode step with int8 weights (layout int8-rowmajor-v1).
// Two more ops of the same kernel carry a residual add and an RMSNorm between two such products (the
// norm's weight folded into the second one's weights at build time, passes/fold_norm_weights.py):
// oiv2::linear_int8_gemv_add: y = (x W^T) + residual, each rounded to x's dtype as the model rounds
// them: the product that ends a block (o, down) writes the new residual stream.
// oiv2::rms_norm_linear_int8_gemv: y[m] = rsqrt(mean(x[m]^2) + eps) * (x[m] W^T): every warp reads all
// of x anyway, so the sum of squares costs one FMA a feature (for both of its rows) and no pass over x.
// oiv2::rms_norm_linear_int8_gemv_gated_act: the same for the fused gate/up product of a gated MLP,
// with the activation after it: y[m, j] = act(gate[m, j]) * up[m, j], gate and up being the product's
// outputs j and I + j. Half of a CTA's warps take gate rows, half the up rows of the same outputs (two
// each), and they meet in shared memory: the [M, 2I] product is never written, and the activation
// kernel goes.
// The other modes compile as before this one came (no barrier, no early loads): the chain of a65309a,
// whose kernel had both in every mode, was 64 us a step slower (benchmarks/RESULTS.md).
// Doing the add here instead, in the kernel after it (x + residual read by every warp), cost more than
// the norm kernel it saved (H100, 32 llama-8b layers: 2972 us a step against 2783; benchmarks/RESULTS.md).
//
// Bytes: N * K weight bytes stream once; x (M * K * 2 bytes) stays in L1. Each warp takes kPerWarp (2)
// output rows; each lane loads 16 weight bytes of each row per step with a non-allocating 128-bit load,
// UNROLL steps of both rows loaded before any math in the source (ptxas moves six of the eight
// loads after the first step's math, below), and converts its 16 features of x to float once
// for both rows: 4.7 instructions a weight byte in the loop of the norm and gated form, against 5.9 with
// one row a warp (H200, 32 llama-8b layers: 2104 us a step against 2163; benchmarks/RESULTS.md). The
// loop streams 78-79% of the copy bandwidth on an H200, and forms with fewer instructions streamed less:
// the products on the tensor cores (16 rows a CTA, 3.0 instructions a byte) with each warp's loads
// covering 64 bytes of 16 rows (2314 us a step against 2131), staging 512-byte runs through shared
// memory (3090 us), and even reading 512-byte tiles laid out for the fragments (a timing what-if of a
// packed layout: 2156-2160 us against 2091-2093). int8 -> float without I2F: byte b, biased to
// b ^ 0x80 in 0..255, sits in the mantissa of 2^23 (0x4B0000bb), and subtracting 2^23 + 128 gives b
// exactly (one PRMT, one FADD). That register-streaming kernel takes 2 to 4 rows, and one row where K is
// not a multiple of 64.
//
// One row of x (every batch-1 decode step) goes through a streamed kernel instead (below, with the
// pieces it shares with the int4 kernel in streamed.cuh): a producer warp copies each block of 16 weight
// rows into a ring of shared-memory stages with the bulk-copy engine, one copy a row, and two teams of 8
// consumer warps multiply them on the integer tensor cores against x kept in shared memory as three int8
// planes. All four ops, the same roundings. H200, 32 llama-8b layers of int8 products with the norms and the
// activation inside: 2020-2022 us a step against 2062-2064 with the register-streaming kernel (the same
// run); each llama-8b shape alone at one row 80% (gate/up) and 82% (down) of the copy bandwidth, against
// 76-77% before (another run); llama-8b int8 decode 1.77x bf16, against 1.72x (benchmarks/RESULTS.md).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemv_common.cuh"
#include "streamed.cuh"

namespace {

using namespace oiv2_gemv;

// 8 warps a CTA: 2079 us a step of the chain against 2091 with 4 and 2096 with 2; 16 took 2195 (H200, 32
// llama-8b layers; benchmarks/RESULTS.md). Two rows and 4 steps a warp are the best of the shapes tried
// there: 3 or 4 rows, 2, 6, 8 or 12 steps, and one row with 8 or 12, all slower (2158-2654 against 2092).
// ptxas issues a step's first two loads (one a row) before the math, the other six after the first
// step's math. Asking for all eight first (__launch_bounds__(32 * kWarps, 1): 60-64 registers against
// 48-56) made the chain slower: 2142-2160 us against 2078. So did 3 steps an iteration (2176 against
// 2080), the weight loads marked evict-first in L2 (2160) and with 256-byte L2 fetches (2131).
constexpr int kWarps = 8;
constexpr int kUnroll = 4;
constexpr int kPerWarp = 2;  // output rows a warp takes: x converted once for both

// int8 -> float: byte b, biased to b ^ 0x80 in 0..255, in the mantissa of 2^23, minus 2^23 + 128.
__device__ __forceinline__ float byte_to_float(uint32_t biased, uint32_t selector) {
  return byte_plus_2p23(biased, selector) - (k2p23 + 128.0f);
}

// load_row for a row of tiled weights.
template <int kUnroll>
__device__ __forceinline__ void load_tiled_row(const uint8_t* w, int n, int base, int K, int pair_width,
                                               int4 (&out)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int b = base + u * kWarpStep;
    out[u] = b < K ? load_stream(reinterpret_cast<const int4*>(w + tiled_offset(n, b, K, pair_width))) : make_int4(0, 0, 0, 0);
  }
}

// residual [M, N] with kAddResidual; eps with the norm; activation with kRmsNormGatedAct, where N is the
// output width I and w has 2I rows. tiled: w in int8-tiles16x1024-v2 (paired: pair_width, gemv_common.cuh).
template <typename T, int M, Epilogue kMode>
__global__ void __launch_bounds__(32 * kWarps) gemv_int8_kernel(const T* __restrict__ x,
                                                                const int8_t* __restrict__ w,
                                                                const T* __restrict__ scales,
                                                                const T* __restrict__ residual,
                                                                T* __restrict__ y, int N, int K, float eps,
                                                                int activation, bool tiled, int pair_width) {
  constexpr bool kGated = kMode == Epilogue::kRmsNormGatedAct;
  constexpr bool kNorm = kMode == Epilogue::kRmsNorm || kGated;
  constexpr int kHalf = kWarps / 2;
  // Gated: warps kHalf.. take the up rows of warps 0..'s outputs, and every warp reaches the barrier
  // (a warp past the last output computes a row again and stores nothing).
  const int out0 = kPerWarp * (kGated ? blockIdx.x * kHalf + threadIdx.y % kHalf : blockIdx.x * kWarps + threadIdx.y);
  if (!kGated && out0 >= N) return;
  int ns[kPerWarp];  // the weight rows of outputs out0 + p (past N: the last one again, never stored)
  const int8_t* rows[kPerWarp];
#pragma unroll
  for (int p = 0; p < kPerWarp; ++p) {
    ns[p] = min(out0 + p, N - 1) + (kGated && threadIdx.y >= kHalf ? N : 0);
    rows[p] = w + static_cast<size_t>(ns[p]) * K;
  }
  const int lane = threadIdx.x;
  // Launched as a programmatic dependent: the CTAs are resident when the previous kernel ends, and read
  // x only after it has. Prefetching the row into L2 before the wait cost more than it hid (H100, 32
  // llama-8b layers of int8 linears in a CUDA graph: 3062 us per step with it, 2783 without, 2836 with
  // neither the prefetch nor the early launch; benchmarks/RESULTS.md): the resident CTAs' rows of the
  // fused gate/up matrix alone outgrow L2. Loading the first step's weights into registers before the
  // wait, in the forms without the norm (so that o's weights stream while attention runs), made llama-8b
  // int8 decode 5% slower end to end (H200: 374 against 394-396 tok/s; measured after bf16 in the same
  // bench process, which by itself cost about 2% in a later session, so the loss is 3-5%).
  wait_for_previous_grid();
  float accs[kPerWarp][M], sumsq[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    sumsq[m] = 0.0f;
#pragma unroll
    for (int p = 0; p < kPerWarp; ++p) accs[p][m] = 0.0f;
  }
  for (int base = lane * 16; base < K; base += kWarpStep * kUnroll) {
    int4 wv[kPerWarp][kUnroll];
#pragma unroll
    for (int p = 0; p < kPerWarp; ++p) {
      if (tiled) {
        load_tiled_row<kUnroll>(reinterpret_cast<const uint8_t*>(w), ns[p], base, K, pair_width, wv[p]);
      } else {
        load_row<kUnroll>(reinterpret_cast<const uint8_t*>(rows[p]), base, K, wv[p]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = base + u * kWarpStep;
      if (k >= K) break;
      float wf[kPerWarp][16];
#pragma unroll
      for (int p = 0; p < kPerWarp; ++p) {
        const uint32_t words[4] = {static_cast<uint32_t>(wv[p][u].x) ^ 0x80808080u,
                                   static_cast<uint32_t>(wv[p][u].y) ^ 0x80808080u,
                                   static_cast<uint32_t>(wv[p][u].z) ^ 0x80808080u,
                                   static_cast<uint32_t>(wv[p][u].w) ^ 0x80808080u};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          wf[p][4 * i + 0] = byte_to_float(words[i], 0x7440);
          wf[p][4 * i + 1] = byte_to_float(words[i], 0x7441);
          wf[p][4 * i + 2] = byte_to_float(words[i], 0x7442);
          wf[p][4 * i + 3] = byte_to_float(words[i], 0x7443);
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + k);
        float xf[16];
        to_float8<T>(__ldg(xp), xf);
        to_float8<T>(__ldg(xp + 1), xf + 8);
#pragma unroll
        for (int p = 0; p < kPerWarp; ++p) {
#pragma unroll
          for (int j = 0; j < 16; ++j) accs[p][m] = fmaf(xf[j], wf[p][j], accs[p][m]);
        }
        if constexpr (kNorm) {
#pragma unroll
          for (int j = 0; j < 16; ++j) sumsq[m] = fmaf(xf[j], xf[j], sumsq[m]);
        }
      }
    }
  }
  float inv[M];
#pragma unroll
  for (int m = 0; m < M; ++m) inv[m] = kNorm ? rsqrtf(warp_sum(sumsq[m]) / K + eps) : 1.0f;
  const int warp = threadIdx.y;
#pragma unroll
  for (int p = 0; p < kPerWarp; ++p) {
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(accs[p][m]) * inv[m];
    const float s = to_float(scales[ns[p]]);
    const int out = out0 + p;
    if constexpr (kGated) {
      // gate and up rounded to x's dtype, the activation too, then their product: as the model rounds.
      __shared__ float up_part[kHalf][kPerWarp][M];
      if (lane == 0 && warp >= kHalf) {
#pragma unroll
        for (int m = 0; m < M; ++m) up_part[warp - kHalf][p][m] = to_float(from_float<T>(acc[m] * s));
      }
      __syncthreads();
      if (lane == 0 && warp < kHalf && out < N) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float gate = to_float(from_float<T>(acc[m] * s));
          const float act = to_float(from_float<T>(activate(gate, activation)));
          y[static_cast<size_t>(m) * N + out] = from_float<T>(act * up_part[warp][p][m]);
        }
      }
    } else if (lane == 0 && out < N) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const size_t at = static_cast<size_t>(m) * N + out;
        T value = from_float<T>(acc[m] * s);
        if constexpr (kMode == Epilogue::kAddResidual) value = from_float<T>(to_float(value) + to_float(residual[at]));
        y[at] = value;
      }
    }
  }
}

// ---- One row of x (a batch-1 decode step) on the integer tensor cores, the weights streamed through
// shared memory (streamed.cuh): a CTA takes a contiguous run of blocks of 16 weight rows (gated: the gate
// rows of 8 outputs, then their up rows). The producer warp copies a stage, 1024 features of each of a
// block's 16 rows, as 16 row copies (cp.async.bulk, L2 evict-first) into a ring of 4 stages; the rows sit
// kStageRowBytes apart, 32 bytes more than they hold, so that the 8-byte loads of rows g and g + 4 fall
// on other banks. Weights in int8-tiles16x1024-v2 (kTiled; gated, its paired form, whose block b is the gate and
// up rows of outputs 8b..) hold a stage's 16 rows together in the fragments' order: one copy a stage, and a
// consumer warp's 128 features are four 16-byte loads a lane of 512 contiguous bytes each (rows g and g + 8,
// features 16 t.. of two k-steps), against the padded rows' eight 8-byte loads and 74-83 SASS instructions a
// stage's loop against 110-113 (129 with v1's swizzled rows). 32 llama-8b layers of int8 products with the norms
// and the activation inside (H200): 1850.5-1856.0 us a step against 1994.7-2010.1 row-major; each llama-8b
// shape at one row 88% (gate/up) and 84% (down) of the copy bandwidth against 78% and 80-81%; llama-8b int8
// decode 1.88-1.94x bf16 (benchmarks/RESULTS.md, thirty-second session).
// Two teams of 8 consumer warps take a block's stages by turns (team j % 2 takes stage
// j; an even count of ring stages a block, streamed.cuh even_stages), warp w of a team the features 128 w.. of it: one 128-feature slice of x, whose planes (store_planes
// in the row's order, sum_x) that warp wrote itself, so no barrier between the consumers. A lane's A
// fragment of a 32-feature k-step is two 8-byte loads, features 8t.. of rows g and g + 8 (tiled: half of a
// 16-byte load, features 16 t.. of the k-step pair; the planes in that order, store_planes kContiguous), and its B the
// planes' bytes of the same features: four m16n8k32 s8 steps a stage add into int sums (|sum| <= 128 *
// 128 * 128: a float by its bits from kIntMagic), scaled by the slice's 2^-s into the float sums. The
// epilogue (store_outputs) multiplies each row's sum by its scale.
constexpr int kStreamStages = 4;
constexpr int kStageFeatures = 1024;                // of each row, a stage
constexpr int kStageRowBytes = kStageFeatures + 32;  // from one row of a stage to the next
constexpr int kStreamStageBytes = kBlockRows * kStageRowBytes;
constexpr int kTeamWarps = 8, kTeams = 2, kStreamWarps = kTeamWarps * kTeams;

// Byte offsets of the streamed kernel's shared memory: the ring, the planes of x (K * 3 bytes) and their
// scales (one a 128-feature slice), the barriers (full and empty, a stage each), each warp's share of the
// sum of squares, and last each warp's sums of each of the CTA's blocks ([block][warp][16]).
struct Int8StreamedLayout {
  int x, x_scale, barriers, row_sumsq, sums, total;
};

__host__ __device__ inline Int8StreamedLayout int8_streamed_layout(int K, int blocks) {
  Int8StreamedLayout l{};
  int at = kStreamStages * kStreamStageBytes;
  l.x = at;
  at += K * 3;
  l.x_scale = at;
  at += (K + 127) / 128 * 4;
  at = (at + 15) / 16 * 16;
  l.barriers = at;
  at += 2 * kStreamStages * 8;
  l.row_sumsq = at;
  at += kStreamWarps * 8 * 4;
  l.sums = at;
  at += blocks * kStreamWarps * kBlockRows * 4;
  l.total = at;
  return l;
}

// The weight row of row r of block b: gated, the gate rows of outputs 8b.. (r < 8) and their up rows
// (width + 8b..); past the last row, the last row again (its sums are never stored).
template <bool kGated>
__device__ __forceinline__ int block_row(int b, int r, int N) {
  if constexpr (kGated) {
    const int width = N / 2;
    return min(8 * b + (r & 7), width - 1) + (r < 8 ? 0 : width);
  }
  return min(kBlockRows * b + r, N - 1);
}

template <typename T, Epilogue kMode, bool kTiled>
__global__ void __launch_bounds__(32 * (kStreamWarps + 1)) int8_streamed_kernel(
    const T* __restrict__ x, const int8_t* __restrict__ w, const T* __restrict__ scales,
    const T* __restrict__ residual, T* __restrict__ y, int N, int K, int blocks, float eps, int activation,
    int pair_width) {
  constexpr bool kGated = kMode == Epilogue::kRmsNormGatedAct;
  constexpr bool kNorm = kMode == Epilogue::kRmsNorm || kGated;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Int8StreamedLayout layout = int8_streamed_layout(K, 1);  // the offsets (sums is last)
  float* sums = reinterpret_cast<float*>(smem + layout.sums);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + layout.barriers);
  uint64_t* empty = full + kStreamStages;
  float* row_sumsq = reinterpret_cast<float*>(smem + layout.row_sumsq);
  int first, end;
  cta_blocks(blocks, blockIdx.x, gridDim.x, first, end);
  const int stages_per_block = (K + kStageFeatures - 1) / kStageFeatures;
  const int ring_stages = even_stages(stages_per_block);  // see even_stages
  init_ring(full, empty, kStreamStages, kTeamWarps);
  __syncthreads();

  if (warp == kStreamWarps) {  // the producer: lane r copies row r of each stage (tiled: one or two copies)
    // The next kernel may launch at once (its CTAs take an SM as this one's leave it), as the int4 kernel
    // does (linear_int4_mma.cu: 31 us a step of its chain). llama-8b int8 decode: 465.2-465.3 tok/s against
    // 465.4 after the last copy (H200, the same artifact; benchmarks/RESULTS.md, thirty-third session).
    if (lane == 0) allow_dependents_to_launch();
    int s = 0;
    for (int b = first; b < end; ++b) {
      const int8_t* row = kTiled ? w : w + static_cast<size_t>(block_row<kGated>(b, lane & 15, N)) * K;
      for (int f0 = 0; f0 < K; f0 += kStageFeatures, ++s) {
        const int slot = s % kStreamStages;
        if (s >= kStreamStages) barrier_wait(&empty[slot], ((s / kStreamStages) + 1) & 1);
        const int bytes = min(kStageFeatures, K - f0);
        if (lane == 0) barrier_expect_bytes(&full[slot], kBlockRows * bytes);
        __syncwarp();
        unsigned char* stage = smem + slot * kStreamStageBytes;
        if constexpr (kTiled) {
          // The stage is tile f0 / 1024 of block b (kTileFeatures = kStageFeatures; gated, the paired form's
          // block b holds the gate and up rows of outputs 8b..): one copy.
          if (lane == 0) bulk_copy(stage, w + static_cast<size_t>(b) * kBlockRows * K + kBlockRows * f0, kBlockRows * bytes, &full[slot]);
        } else if (lane < kBlockRows) {
          bulk_copy(stage + lane * kStageRowBytes, row + f0, bytes, &full[slot]);
        }
      }
      if (ring_stages > stages_per_block) skip_stage(full, empty, kStreamStages, s++, lane);
    }
  } else {  // a consumer
    wait_for_previous_grid();  // x is the previous kernel's output
    unsigned char* planes = smem + layout.x;
    float* x_scale = reinterpret_cast<float*>(smem + layout.x_scale);
    sum_x<T, 0, kNorm, true, kStreamWarps, true, kTiled>(x, 1, K, nullptr, row_sumsq, planes, x_scale);
    const int g = lane >> 2, t = lane & 3;
    // this lane's 16 bytes of plane g of a chunk of 64 features (columns 3-7 of the product are unused)
    const uint4* xl = reinterpret_cast<const uint4*>(planes + (g < 3 ? g : 0) * 64 + t * 16);
    const float column_weight0 = t == 0 ? 1.0f : t == 1 ? 65536.0f : 0.0f, column_weight1 = t == 0 ? 256.0f : 0.0f;
    const int team = warp / kTeamWarps, offset = (warp % kTeamWarps) * 128;  // the warp's features of a stage
    int block_stage = 0;
    for (int b = first; b < end; ++b, block_stage += ring_stages) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int s = block_stage + team, f0 = team * kStageFeatures; s < block_stage + ring_stages;
           s += kTeams, f0 += kTeams * kStageFeatures) {
        const int slot = static_cast<unsigned>(s) % kStreamStages;
        barrier_wait(&full[slot], (static_cast<unsigned>(s) / kStreamStages) & 1);
        const int f = f0 + offset;  // K is a multiple of 64: the warp has 4, 2 or no k-steps
        if (f < K) {
          int d[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) d[e] = static_cast<int>(kIntMagic);
          if constexpr (kTiled) {
            // The warp's slice of the tile is 2048 bytes from 2048 (warp % 8): for k-steps 2 h and 2 h + 1, rows
            // 0-7 at 1024 h, rows 8-15 512 further, lane (g, t)'s 16 bytes at 16 lane: features 64 h + 16 t..
            // of rows g and g + 8, whose planes of x the lane loads too (store_planes kContiguous).
            const uint4* wl = reinterpret_cast<const uint4*>(smem + slot * kStreamStageBytes + 16 * offset) + lane;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint4 wg = wl[64 * h], wg8 = wl[64 * h + 32];
              const uint4 xv = xl[(f / 64 + h) * (kPlanesChunkBytes / 16)];
              const uint32_t a0[4] = {wg.x, wg8.x, wg.y, wg8.y}, a1[4] = {wg.z, wg8.z, wg.w, wg8.w};
              imma<true>(d, a0, xv.x, xv.y);
              imma<true>(d, a1, xv.z, xv.w);
            }
          } else {
            // Row g's bytes 8t.. of k-step `step`.
            const unsigned char* rows = smem + slot * kStreamStageBytes + g * kStageRowBytes + offset + 8 * t;
            const int steps = min(4, (K - f) / 32);
            uint4 xv;
#pragma unroll
            for (int step = 0; step < 4; ++step) {
              if (step >= steps) break;
              const uint2 wg = *reinterpret_cast<const uint2*>(rows + 32 * step);
              const uint2 wg8 = *reinterpret_cast<const uint2*>(rows + 8 * kStageRowBytes + 32 * step);
              if ((step & 1) == 0) xv = xl[(f / 64 + step / 2) * (kPlanesChunkBytes / 16)];
              const uint32_t a[4] = {wg.x, wg8.x, wg.y, wg8.y};
              imma<true>(d, a, (step & 1) ? xv.z : xv.x, (step & 1) ? xv.w : xv.y);
            }
          }
          const float xs = x_scale[f >> 7];
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[e] = fmaf(xs, __int_as_float(d[e]) - kIntMagicValue, acc[e]);
        }
        __syncwarp();
        if (lane == 0) barrier_arrive(&empty[slot]);
      }
      add_planes(acc, column_weight0, column_weight1);
      if (t == 0) {
        float* block_sums = sums + ((b - first) * kStreamWarps + warp) * kBlockRows;
        block_sums[g] = acc[0];
        block_sums[g + 8] = acc[2];
      }
    }
  }
  wait_for_previous_grid();  // every thread that writes y (the consumers have waited already)
  __syncthreads();
  store_outputs<T, kMode, kStreamWarps, true>(sums, row_sumsq, scales, residual, y, first, end, 1, N, K, eps,
                                               activation, kGated ? 0 : pair_width);
}

// The streamed kernel's grid for one row of x, or 0 where it does not run (K not a multiple of 64, or planes
// that would not let two CTAs share an SM): the register-streaming kernel above takes those. A block's sums
// take 1 KB, so shared memory alone bounds the blocks a CTA sums: the output head of an 8B model (8016
// blocks) runs as one wave of 264 CTAs on an H200 rather than 501 CTAs of 16 blocks. That did not make the
// head faster: 0.60-0.61 of bf16 F.linear's time in its runs against 0.59 with 16 blocks and 0.53 through the
// register-streaming kernel, each in another run (benchmarks/RESULTS.md, thirtieth session); the same-run
// comparison is still to be made.
constexpr int kMaxStreamBlocksPerCta = 64;

int int8_streamed_ctas(int blocks, int K) {
  if (K % 64 != 0) return 0;
  const int ctas = streamed_grid(blocks, kMaxStreamBlocksPerCta,
                                 [&](int per_cta) { return int8_streamed_layout(K, per_cta).total; });
  return two_per_sm(int8_streamed_layout(K, blocks_per_cta(blocks, ctas)).total) ? ctas : 0;
}

// What a launch reads and writes; residual only with kAddResidual.
struct Operands {
  at::Tensor x, w, s, residual, y;
  double eps;
  int activation;
  Int8Weight layout;  // w's rows, K and layout (gemv_common.cuh int8_weight)
};

// The streamed kernel launched as a programmatic dependent.
template <auto kernel, typename T>
bool launch_streamed_kernel(const Operands& o, int ctas, int smem, int blocks) {
  const int rows = static_cast<int>(o.layout.rows), K = static_cast<int>(o.layout.K);
  allow_dynamic_smem<kernel>(smem);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; };
  C10_CUDA_CHECK(launch_programmatic(kernel, dim3(ctas), dim3(32 * (kStreamWarps + 1)), smem,
                                     at::cuda::getCurrentCUDAStream(), ptr(o.x), o.w.data_ptr<int8_t>(), ptr(o.s),
                                     ptr(o.residual), ptr(o.y), rows, K, blocks, static_cast<float>(o.eps),
                                     o.activation, o.layout.pair_width));
  return true;
}

// One row of x through the streamed kernel; false where it does not run (int8_streamed_ctas).
template <typename T, Epilogue kMode>
bool launch_streamed(const Operands& o) {
  const int rows = static_cast<int>(o.layout.rows), K = static_cast<int>(o.layout.K);
  const int blocks = (rows + kBlockRows - 1) / kBlockRows;  // gated: 8 outputs' gate and up rows a block
  const int ctas = aligned16(o.w) && aligned16(o.x) ? int8_streamed_ctas(blocks, K) : 0;
  if (ctas == 0) return false;
  const int smem = int8_streamed_layout(K, blocks_per_cta(blocks, ctas)).total;
  if (o.layout.tiled) {  // a block is a tile: the gated form takes the paired tiles (plain ones: the register kernel)
    if (o.layout.pair_width == 0 && kMode == Epilogue::kRmsNormGatedAct) return false;
    return launch_streamed_kernel<int8_streamed_kernel<T, kMode, true>, T>(o, ctas, smem, blocks);
  }
  return launch_streamed_kernel<int8_streamed_kernel<T, kMode, false>, T>(o, ctas, smem, blocks);
}

template <typename T, int M, Epilogue kMode>
void launch(const Operands& o) {
  if constexpr (M == 1) {
    if (launch_streamed<T, kMode>(o)) return;
  }
  const int N = o.y.size(1), K = static_cast<int>(o.layout.K);  // outputs: the weight's rows, or half of them gated
  const int outs_per_cta = kPerWarp * (kMode == Epilogue::kRmsNormGatedAct ? kWarps / 2 : kWarps);
  dim3 block(32, kWarps);
  dim3 grid((N + outs_per_cta - 1) / outs_per_cta);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; };
  C10_CUDA_CHECK(launch_programmatic(gemv_int8_kernel<T, M, kMode>, grid, block, 0, at::cuda::getCurrentCUDAStream(),
                                     ptr(o.x), o.w.data_ptr<int8_t>(), ptr(o.s), ptr(o.residual), ptr(o.y), N, K,
                                     static_cast<float>(o.eps), o.activation, o.layout.tiled, o.layout.pair_width));
}

template <typename T, Epilogue kMode>
void dispatch_rows(const Operands& o) {
  switch (o.x.size(0)) {
    case 1: return launch<T, 1, kMode>(o);
    case 2: return launch<T, 2, kMode>(o);
    case 3: return launch<T, 3, kMode>(o);
    case 4: return launch<T, 4, kMode>(o);
  }
}

// x [M, K] (M <= 4, bf16 or fp16), qweight [N, K] int8 (or int8-tiles16x1024-v2: gemv_common.cuh int8_weight), scales [N]
// in x's dtype → y [M, N] ([M, N / 2] gated).
template <Epilogue kMode>
at::Tensor run(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& residual,
               double eps, int activation = kSilu) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4, "linear_int8_gemv takes 1 to 4 rows");
  const Int8Weight layout = int8_weight(qweight);
  const int64_t K = layout.K;
  TORCH_CHECK(x.size(1) == K, "qweight's K must match x's");
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), "scales must have x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t rows = layout.rows;
  int64_t width = rows;
  if constexpr (kMode == Epilogue::kRmsNormGatedAct) {
    TORCH_CHECK(width % 2 == 0, "a gate/up qweight has an even number of rows");
    width /= 2;
  }
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == rows, "scales must be [N]");
  at::Tensor y = at::empty({x.size(0), width}, x.options());
  Operands o{x.contiguous(), qweight.contiguous(), scales.contiguous(), at::Tensor(), y, eps, activation, layout};
  if constexpr (kMode == Epilogue::kAddResidual) {
    TORCH_CHECK(residual.sizes() == y.sizes() && residual.scalar_type() == x.scalar_type(),
                "residual must be [M, N] in x's dtype");
    o.residual = residual.contiguous();
  }
  if (x.scalar_type() == at::kBFloat16) {
    dispatch_rows<__nv_bfloat16, kMode>(o);
  } else {
    dispatch_rows<__half, kMode>(o);
  }
  return y;
}

at::Tensor linear_int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  return run<Epilogue::kPlain>(x, qweight, scales, at::Tensor(), 0.0);
}

at::Tensor linear_int8_gemv_add(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& residual) {
  return run<Epilogue::kAddResidual>(x, qweight, scales, residual, 0.0);
}

at::Tensor rms_norm_linear_int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                     double eps) {
  return run<Epilogue::kRmsNorm>(x, qweight, scales, at::Tensor(), eps);
}

at::Tensor rms_norm_linear_int8_gemv_gated_act(const at::Tensor& x, const at::Tensor& qweight,
                                               const at::Tensor& scales, double eps, int64_t activation) {
  TORCH_CHECK(activation >= kSilu && activation <= kGeluTanh, "activation must be 0 (silu), 1 (gelu) or 2 (gelu_tanh)");
  return run<Epilogue::kRmsNormGatedAct>(x, qweight, scales, at::Tensor(), eps, static_cast<int>(activation));
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) {
  m.impl("linear_int8_gemv", &linear_int8_gemv);
  m.impl("linear_int8_gemv_add", &linear_int8_gemv_add);
  m.impl("rms_norm_linear_int8_gemv", &rms_norm_linear_int8_gemv);
  m.impl("rms_norm_linear_int8_gemv_gated_act", &rms_norm_linear_int8_gemv_gated_act);
}
