// oiv2::decode_attention: oiv2::attention for one new token per sequence (a decode step) over a cache of
// at most kSplits * kMaxChunk positions, in one launch of a cluster of kSplits CTAs per (sequence, kv head).
//
// Why: at batch 1 the Triton single pass is 8 programs (one a kv head of an 8-kv-head model), each walking
// the filled positions 64 at a time, a memory latency a step: 4.3 / 5.5 / 6.4 us at filled 128 / 192 /
// 256 on an H200, 32 times a llama-8b step. The split path pays a second kernel to combine the chunks.
// Here the kSplits CTAs of a cluster take a share of the filled positions each (ceil(filled / kSplits),
// so the work follows the filled length), copy their K and V rows into shared memory with the bulk-copy
// engine (two copies, one wait), compute their part of the softmax (m, l and the un-normalized output
// of each of the group's query heads) and combine the parts through distributed shared memory: CTA r
// writes features [r * D / kSplits, (r + 1) * D / kSplits) of every head. No partials in global memory,
// no second kernel, no counters to reset between calls (CUDA graphs replay it as it is).
//
// Numerics: q times scale * log2(e) in float32, the dot products, the softmax and the weighted sum of V
// in float32 (the probabilities are not rounded to bf16 before the sum, as the Triton kernel's tl.dot
// does), the output rounded once to q's dtype.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include "gemv_common.cuh"

namespace {

namespace cg = cooperative_groups;
using namespace oiv2_gemv;

constexpr int kSplits = 8;     // CTAs of a cluster: the largest portable cluster
constexpr int kThreads = 128;  // four warps
constexpr int kMaxGroup = 8;   // query heads per kv head
constexpr int kMaxChunk = 128;  // positions one CTA reads: caches of up to 1024 positions

// Byte offsets of shared memory for CTAs of at most `chunk` positions and head size D (elements of
// `elem` bytes): K rows, V rows, q (float, scaled), the scores then probabilities [group][chunk], the
// un-normalized output [group][D], m and l of each head, the copies' barrier.
struct Layout {
  int k, v, q, p, acc, m, l, bar, total;
};

__host__ __device__ inline Layout layout_of(int chunk, int D, int elem) {
  Layout s;
  s.k = 0;
  s.v = s.k + chunk * D * elem;
  s.q = s.v + chunk * D * elem;
  s.p = s.q + kMaxGroup * D * 4;
  s.acc = s.p + kMaxGroup * chunk * 4;
  s.m = s.acc + kMaxGroup * D * 4;
  s.l = s.m + kMaxGroup * 4;
  s.bar = (s.l + kMaxGroup * 4 + 7) & ~7;
  s.total = s.bar + 8;
  return s;
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// rows of a cache (bytes, a multiple of 16) into shared memory, completing on bar; kept in L2 (the next
// step reads them again).
__device__ __forceinline__ void copy_rows(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_address(dst)),
      "l"(src), "r"(bytes), "r"(smem_address(bar))
      : "memory");
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Grid (kSplits, B * Hkv), clusters of (kSplits, 1, 1): CTA r of the cluster of (b, kv head h) takes
// positions [r * per, (r + 1) * per) of the filled min(positions[b] + 1, T), per = ceil(filled / kSplits).
template <typename T, int D>
__global__ void __cluster_dims__(kSplits, 1, 1) __launch_bounds__(kThreads)
    decode_attention_kernel(const T* __restrict__ q, int64_t q_stride_b, int64_t q_stride_h,
                            const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            const int64_t* __restrict__ slots, const int64_t* __restrict__ positions,
                            T* __restrict__ out, int num_heads, int num_kv_heads, int cache_len, int chunk,
                            float qk_scale) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay = layout_of(chunk, D, sizeof(T));
  T* ks = reinterpret_cast<T*>(smem + lay.k);
  T* vs = reinterpret_cast<T*>(smem + lay.v);
  float* qs = reinterpret_cast<float*>(smem + lay.q);
  float* ps = reinterpret_cast<float*>(smem + lay.p);
  float* accs = reinterpret_cast<float*>(smem + lay.acc);
  float* ms = reinterpret_cast<float*>(smem + lay.m);
  float* ls = reinterpret_cast<float*>(smem + lay.l);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + lay.bar);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int b = blockIdx.y / num_kv_heads, kvh = blockIdx.y % num_kv_heads;
  const int group = num_heads / num_kv_heads;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  allow_dependents_to_launch();  // the o projection streams its weights meanwhile
  if (tid == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(bar)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  for (int i = tid; i < kMaxGroup * D; i += kThreads) accs[i] = 0.0f;
  __syncthreads();
  wait_for_previous_grid();  // q and the new token's K and V are the previous kernels' output
  const int64_t slot = slots[b];
  const int64_t last = positions[b];
  const int filled = last + 1 < cache_len ? static_cast<int>(last + 1) : cache_len;
  const int per = (filled + kSplits - 1) / kSplits;
  const int lo = min(rank * per, filled), rows = min(lo + per, filled) - lo;
  if (tid == 0 && rows > 0) {
    const size_t first = ((static_cast<size_t>(slot) * num_kv_heads + kvh) * cache_len + lo) * D;
    const uint32_t bytes = rows * D * sizeof(T);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(2 * bytes)
                 : "memory");
    copy_rows(ks, k_cache + first, bytes, bar);
    copy_rows(vs, v_cache + first, bytes, bar);
  }
  const T* qb = q + b * q_stride_b + static_cast<int64_t>(kvh) * group * q_stride_h;
  for (int i = tid; i < group * D; i += kThreads) qs[i] = to_float(qb[(i / D) * q_stride_h + i % D]) * qk_scale;
  if (rows > 0) {
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}"
          : "=r"(done)
          : "r"(smem_address(bar))
          : "memory");
    }
  }
  __syncthreads();

  // Scores: four threads a position, D / 4 features each, summed over the four by shuffles.
  constexpr int kPart = D / 4;
  for (int n0 = 0; n0 < rows; n0 += kThreads / 4) {
    const int n = n0 + tid / 4, part = tid & 3;
    float dot[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) dot[g] = 0.0f;
    if (n < rows) {
#pragma unroll
      for (int j = 0; j < kPart; j += 8) {
        float kf[8];
        to_float8<T>(*reinterpret_cast<const uint4*>(ks + n * D + part * kPart + j), kf);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
          if (g < group) {
            const float* qg = qs + g * D + part * kPart + j;
#pragma unroll
            for (int e = 0; e < 8; ++e) dot[g] = fmaf(qg[e], kf[e], dot[g]);
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], 1);
      dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], 2);
    }
    if (n < rows && part == 0) {
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < group) ps[g * chunk + n] = dot[g];
      }
    }
  }
  __syncthreads();

  // This CTA's softmax part: a warp a head (the scores' max m, the probabilities 2^(s - m), their sum l).
  for (int g = warp; g < group; g += kThreads / 32) {
    float m = -INFINITY;
    for (int n = lane; n < rows; n += 32) m = fmaxf(m, ps[g * chunk + n]);
    m = warp_max(m);
    float l = 0.0f;
    for (int n = lane; n < rows; n += 32) {
      const float p = exp2f(ps[g * chunk + n] - m);
      ps[g * chunk + n] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      ms[g] = m;
      ls[g] = l;
    }
  }
  __syncthreads();

  // The probabilities times V: a thread two features and every kWays-th position, added in shared memory.
  constexpr int kPairs = D / 2, kWays = kThreads / kPairs;
  {
    const int pair = tid % kPairs, way = tid / kPairs;
    float a0[kMaxGroup], a1[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) a0[g] = a1[g] = 0.0f;
    for (int n = way; n < rows; n += kWays) {
      const uint32_t vv = reinterpret_cast<const uint32_t*>(vs + n * D)[pair];
      T pairv[2];
      memcpy(pairv, &vv, 4);
      const float v0 = to_float(pairv[0]), v1 = to_float(pairv[1]);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < group) {
          const float p = ps[g * chunk + n];
          a0[g] = fmaf(p, v0, a0[g]);
          a1[g] = fmaf(p, v1, a1[g]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g < group && rows > way) {
        atomicAdd(&accs[g * D + 2 * pair], a0[g]);
        atomicAdd(&accs[g * D + 2 * pair + 1], a1[g]);
      }
    }
  }
  cluster.sync();  // every CTA's m, l and output part written

  // The parts combined: CTA r writes features [r * kPer, (r + 1) * kPer) of each of the group's heads.
  constexpr int kPer = D / kSplits;
  if (tid < group * kPer) {
    const int g = tid / kPer, d = rank * kPer + tid % kPer;
    float m_r[kSplits], l_r[kSplits], a_r[kSplits];
#pragma unroll
    for (int r = 0; r < kSplits; ++r) {
      m_r[r] = *cluster.map_shared_rank(ms + g, r);
      l_r[r] = *cluster.map_shared_rank(ls + g, r);
      a_r[r] = *cluster.map_shared_rank(accs + g * D + d, r);
    }
    float m = -INFINITY;
#pragma unroll
    for (int r = 0; r < kSplits; ++r) m = fmaxf(m, m_r[r]);
    float l = 0.0f, a = 0.0f;
#pragma unroll
    for (int r = 0; r < kSplits; ++r) {
      const float w = m_r[r] == -INFINITY ? 0.0f : exp2f(m_r[r] - m);
      l = fmaf(w, l_r[r], l);
      a = fmaf(w, a_r[r], a);
    }
    out[(static_cast<int64_t>(b) * num_heads + kvh * group + g) * D + d] = from_float<T>(l > 0.0f ? a / l : 0.0f);
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
}

template <typename T, int D>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
            const at::Tensor& positions, at::Tensor& out, double scale) {
  const int B = q.size(0), Hq = q.size(1), Hkv = k_cache.size(1), cache_len = k_cache.size(2);
  const int chunk = (cache_len + kSplits - 1) / kSplits;
  const int smem = layout_of(chunk, D, sizeof(T)).total;
  auto kernel = decode_attention_kernel<T, D>;
  static int limit = 0;  // the largest size asked for so far (per instantiation)
  if (smem > limit) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    limit = smem;
  }
  const float qk_scale = static_cast<float>(scale) * 1.4426950408889634f;
  C10_CUDA_CHECK(launch_programmatic(kernel, dim3(kSplits, B * Hkv), dim3(kThreads), smem,
                                     at::cuda::getCurrentCUDAStream(), reinterpret_cast<const T*>(q.data_ptr()),
                                     q.stride(0), q.stride(1), reinterpret_cast<const T*>(k_cache.data_ptr()),
                                     reinterpret_cast<const T*>(v_cache.data_ptr()), slots.data_ptr<int64_t>(),
                                     positions.data_ptr<int64_t>(), reinterpret_cast<T*>(out.data_ptr()), Hq, Hkv,
                                     cache_len, chunk, qk_scale));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention takes one new token per sequence: q [B, Hq, 1, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "decode_attention: caches [N, Hkv, T, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: contiguous caches");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "decode_attention: q and the caches of one dtype");
  const int Hq = q.size(1), Hkv = k_cache.size(1), D = q.size(3);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, "decode_attention: at most ", kMaxGroup,
              " query heads per kv head");
  TORCH_CHECK(k_cache.size(2) <= kSplits * kMaxChunk, "decode_attention: caches of at most ", kSplits * kMaxChunk,
              " positions");
  TORCH_CHECK(k_cache.size(3) == D && (D == 64 || D == 128), "decode_attention: head size 64 or 128");
  TORCH_CHECK(q.stride(3) == 1, "decode_attention: q's features contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
              "decode_attention: int64 slots and positions");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({q.size(0), Hq, 1, D}, q.options());
  const at::Tensor slots_c = slots.contiguous(), positions_c = positions.contiguous();
  if (q.scalar_type() == at::kBFloat16) {
    if (D == 128) launch<__nv_bfloat16, 128>(q, k_cache, v_cache, slots_c, positions_c, out, scale);
    else launch<__nv_bfloat16, 64>(q, k_cache, v_cache, slots_c, positions_c, out, scale);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kHalf, "decode_attention: bf16 or fp16");
    if (D == 128) launch<__half, 128>(q, k_cache, v_cache, slots_c, positions_c, out, scale);
    else launch<__half, 64>(q, k_cache, v_cache, slots_c, positions_c, out, scale);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) { m.impl("decode_attention", &decode_attention); }
