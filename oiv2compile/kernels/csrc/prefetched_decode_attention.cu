// oiv2::prefetched_decode_attention: oiv2::rope_kv_write_attention (a decode step's rotary embedding of the new
// token, its key and value written into the caches, and its attention over the sequence's filled positions) as
// one CUDA C++ kernel that copies the cached keys and values into shared memory before the previous kernel ends.
//
// Why: in a decode step the attention sits between the q/k/v product and the o product, and every layer waits
// for it. The Triton kernel starts after the q/k/v product has ended (AOTInductor launches Triton kernels
// without programmatic launch), then walks the filled positions 64 at a time, a memory latency a step: 4.6 us
// at 128 filled positions and 6.4 at 256 alone, 6.6 a call in llama-8b int4 decode (H200). The cached positions
// do not depend on the q/k/v product. This kernel is launched as a programmatic dependent: the q/k/v products
// (our C++ kernels) let it launch as they start, and it issues the copies of the cached rows (bulk copies, one a
// row, into rows padded by 16 bytes so that ldmatrix reads them without bank conflicts) before it waits for the
// product. After the wait it reads the new token's q, k and v from the product's row, rotates them, writes k
// and v into the caches, and computes the scores and the weighted sum of V on the tensor cores (mma.sync
// m16n8k16: the group's query heads are the 16 rows, at most 8 of them used) from shared memory.
//
// Grid: one CTA per (sequence, kv head), 8 warps; warp w takes the 16-position tiles w, w + 8, ... of the filled
// positions with an online softmax, and the warps' parts (and the new token's, from registers) are combined at
// the end. Caches of at most kMaxCache positions (longer ones keep the Triton split path).
//
// Safety of the early copies: positions before the new token's were written by earlier decode steps or the
// prefill, whose kernels have all ended: between two decode steps' attention of a layer there are kernels
// launched without programmatic launch (Inductor's and the greedy pick's), each of which starts only after
// everything before it has ended. slots, positions and position_ids are the step's inputs, written before it.
//
// Numerics: q and k rotated in float32 and rounded once to the activations' dtype (as oiv2::rope_kv_write
// rounds them), scores in float32 from the rounded q and cached k, probabilities rounded to the activations'
// dtype before their product with V (as the Triton kernel's tl.dot), sums in float32, the output rounded once.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemv_common.cuh"
#include "streamed.cuh"

namespace {

using namespace oiv2_gemv;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 16;       // positions a warp takes at a time: the mma's K (and two n8 tiles of scores)
constexpr int kMaxGroup = 8;    // query heads per kv head: the mma's rows 0-7 (rows 8-15 stay zero)
constexpr int kMaxCache = 256;  // the longest cache this kernel reads in one pass
constexpr int kPad = 8;         // elements added to each row in shared memory (16 bytes)

// Byte offsets of shared memory for a cache of T positions (rounded up to a tile) and head size D.
struct Layout {
  int k, v, part, q, knew, vnew, stats, bar, total;
};

__host__ __device__ inline Layout layout_of(int T, int D) {
  const int rows = (T + kTile - 1) / kTile * kTile, row_bytes = (D + kPad) * 2;
  Layout s;
  s.k = 0;
  s.v = s.k + rows * row_bytes;
  s.part = s.v + rows * row_bytes;                 // the warps' un-normalized outputs [warp][group][D], float
  s.q = s.part + kWarps * kMaxGroup * D * 4;       // the rotated q [group][D], activations' dtype
  s.knew = s.q + kMaxGroup * D * 2;                // the new key, rotated and rounded [D]
  s.vnew = s.knew + D * 2;                         // the new value [D]
  s.stats = s.vnew + D * 2;  // m and l of each warp and head [2][warp][group], the new token's scores [group]
  s.bar = (s.stats + (2 * kWarps + 1) * kMaxGroup * 4 + 7) / 8 * 8;  // two mbarriers: keys, values
  s.total = s.bar + 16;
  return s;
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};
template <>
struct Mma<__half> {
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// One cache row (bytes, a multiple of 16) into shared memory, its arrival counted on bar.
__device__ __forceinline__ void copy_row(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_address(dst)),
               "l"(src), "r"(bytes), "r"(smem_address(bar))
               : "memory");
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

struct Args {
  const void* qkv;
  int64_t qkv_stride_b;
  const void* cos_table;  // [L, D/2], float32 or the activations' dtype (tables_float)
  const void* sin_table;
  int table_len;
  bool tables_float;
  const int64_t* position_ids;  // [B, 1], or null: the cache positions
  int64_t position_ids_stride_b;
  void* k_cache;
  void* v_cache;
  const int64_t* slots;
  const int64_t* positions;
  void* out;  // [B, Hq, 1, D]
  int num_heads, num_kv_heads, cache_len;
  float qk_scale;  // scale * log2(e)
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefetched_decode_attention_kernel(const Args args) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int kRow = D + kPad, kHalf = D / 2;
  const Layout lay = layout_of(args.cache_len, D);
  T* ks = reinterpret_cast<T*>(smem + lay.k);
  T* vs = reinterpret_cast<T*>(smem + lay.v);
  float* part = reinterpret_cast<float*>(smem + lay.part);
  T* qs = reinterpret_cast<T*>(smem + lay.q);
  T* knew = reinterpret_cast<T*>(smem + lay.knew);
  T* vnew = reinterpret_cast<T*>(smem + lay.vnew);
  float* m_part = reinterpret_cast<float*>(smem + lay.stats);
  float* l_part = m_part + kWarps * kMaxGroup;
  float* s_new = l_part + kWarps * kMaxGroup;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + lay.bar);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int Hkv = args.num_kv_heads, group = args.num_heads / Hkv, T_len = args.cache_len;
  const int b = blockIdx.x / Hkv, kvh = blockIdx.x % Hkv;

  allow_dependents_to_launch();  // the o product streams its weights meanwhile
  const int64_t slot = args.slots[b], start = args.positions[b];
  const int filled = static_cast<int>(start < T_len ? start : T_len);  // cached positions before the new token
  const int tiles = (filled + kTile - 1) / kTile;
  const size_t head0 = (static_cast<size_t>(slot) * Hkv + kvh) * T_len;  // the (slot, kv head) row of the caches
  const T* k_rows = reinterpret_cast<const T*>(args.k_cache) + head0 * D;
  const T* v_rows = reinterpret_cast<const T*>(args.v_cache) + head0 * D;
  if (tid == 0) {
    barrier_init(&bars[0], 1);
    barrier_init(&bars[1], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    barrier_expect_bytes(&bars[0], filled * D * 2);
    barrier_expect_bytes(&bars[1], filled * D * 2);
  }
  // The last tile's rows past the filled ones: zero in V (a zero probability times stale bits could be NaN).
  for (int i = tid; i < (tiles * kTile - filled) * kRow; i += kThreads) vs[filled * kRow + i] = from_float<T>(0.0f);
  __syncthreads();
  for (int r = tid; r < filled; r += kThreads) {
    copy_row(ks + r * kRow, k_rows + static_cast<size_t>(r) * D, D * 2, &bars[0]);
    copy_row(vs + r * kRow, v_rows + static_cast<size_t>(r) * D, D * 2, &bars[1]);
  }
  // This thread's rotary angle (pairs d, d + D/2 with d = tid % (D/2)), also independent of the product.
  int64_t rotary = args.position_ids != nullptr ? args.position_ids[b * args.position_ids_stride_b] : start;
  rotary = rotary < 0 ? 0 : (rotary >= args.table_len ? args.table_len - 1 : rotary);
  const int pair = tid % kHalf;
  const int64_t angle = rotary * kHalf + pair;
  const float c = args.tables_float ? static_cast<const float*>(args.cos_table)[angle]
                                    : to_float(static_cast<const T*>(args.cos_table)[angle]);
  const float s = args.tables_float ? static_cast<const float*>(args.sin_table)[angle]
                                    : to_float(static_cast<const T*>(args.sin_table)[angle]);

  wait_for_previous_grid();  // the new token's row is the q/k/v product's output
  const T* row = reinterpret_cast<const T*>(args.qkv) + b * args.qkv_stride_b;
  // q of the group's heads rotated and rounded; then the new key (rotated) and value, into the caches.
  for (int i = tid; i < group * kHalf; i += kThreads) {  // i % kHalf == pair: kThreads is a multiple of kHalf
    const int h = i / kHalf;
    const T* x = row + (kvh * group + h) * D;
    const float lo = to_float(x[pair]), hi = to_float(x[pair + kHalf]);
    qs[h * D + pair] = from_float<T>(fmaf(hi, -s, lo * c));
    qs[h * D + pair + kHalf] = from_float<T>(fmaf(lo, s, hi * c));
  }
  const bool has_new = start < T_len;
  if (tid < kHalf) {
    const T* x = row + (args.num_heads + kvh) * D;
    const float lo = to_float(x[pair]), hi = to_float(x[pair + kHalf]);
    knew[pair] = from_float<T>(fmaf(hi, -s, lo * c));
    knew[pair + kHalf] = from_float<T>(fmaf(lo, s, hi * c));
  } else if (tid < kHalf + D / 2) {
    const T* x = row + (args.num_heads + Hkv + kvh) * D;
    const int d = 2 * (tid - kHalf);
    *reinterpret_cast<uint32_t*>(vnew + d) = *reinterpret_cast<const uint32_t*>(x + d);
  }
  __syncthreads();
  if (has_new && tid < D / 8) {  // 16 bytes a thread
    T* k_dst = reinterpret_cast<T*>(args.k_cache) + (head0 + start) * D;
    T* v_dst = reinterpret_cast<T*>(args.v_cache) + (head0 + start) * D;
    reinterpret_cast<uint4*>(k_dst)[tid] = reinterpret_cast<const uint4*>(knew)[tid];
    reinterpret_cast<uint4*>(v_dst)[tid] = reinterpret_cast<const uint4*>(vnew)[tid];
  }

  // q as the scores' A fragments: rows g (head g, zero past the group) and g + 8 (zero).
  uint32_t qa[D / 16][2];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t* qrow = reinterpret_cast<const uint32_t*>(qs + g * D + kk * 16);
    qa[kk][0] = g < group ? qrow[t] : 0u;
    qa[kk][1] = g < group ? qrow[t + 4] : 0u;
  }
  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float m = -INFINITY, l = 0.0f;  // row g's running max and this lane's part of its sum
  if (warp < tiles) {
    barrier_wait(&bars[0], 0);
    barrier_wait(&bars[1], 0);
  }
  for (int tile = warp; tile < tiles; tile += kWarps) {
    const int p0 = tile * kTile;
    // Scores S[g][p0 + n] for n in two n8 tiles: K rows as B (k = features, n = positions).
    float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int kk = 0; kk < D / 16; kk += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, ks + (p0 + nt * 8 + (lane & 7)) * kRow + kk * 16 + 8 * (lane >> 3));
        const uint32_t a0[4] = {qa[kk][0], 0u, qa[kk][1], 0u};
        const uint32_t a1[4] = {qa[kk + 1][0], 0u, qa[kk + 1][1], 0u};
        Mma<T>::run(sc[nt], a0, r[0], r[1]);
        Mma<T>::run(sc[nt], a1, r[2], r[3]);
      }
    }
    // Row g's values of this tile: positions p0 + 8 nt + 2t + e.
    float tile_max = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool valid = p0 + nt * 8 + 2 * t + e < filled;
        sc[nt][e] = valid ? sc[nt][e] * args.qk_scale : -INFINITY;
        tile_max = fmaxf(tile_max, sc[nt][e]);
      }
    }
    const float m_new = fmaxf(m, quad_max(tile_max));  // finite: the tile's first position is filled
    const float alpha = exp2f(m - m_new);
    m = m_new;
    uint32_t pa[4];
    float tile_sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const float p0v = exp2f(sc[nt][0] - m_new), p1v = exp2f(sc[nt][1] - m_new);
      tile_sum += p0v + p1v;
      pa[2 * nt] = Mma<T>::pack(p0v, p1v);  // A's columns 2t.. (nt 0) and 2t + 8.. (nt 1) of row g
      pa[2 * nt + 1] = 0u;                  // row g + 8
    }
    const uint32_t a[4] = {pa[0], pa[1], pa[2], pa[3]};
    l = l * alpha + tile_sum;
    // acc[g][d] += P[g][p0..p0 + 15] V[p0..p0 + 15][d]: V rows as B (k = positions, n = features), transposed.
#pragma unroll
    for (int j = 0; j < D / 8; j += 2) {
      acc[j][0] *= alpha;
      acc[j][1] *= alpha;
      acc[j + 1][0] *= alpha;
      acc[j + 1][1] *= alpha;
      uint32_t r[4];
      const int mat = lane >> 3;
      ldmatrix_x4_trans(r, vs + (p0 + (mat & 1) * 8 + (lane & 7)) * kRow + j * 8 + (mat >> 1) * 8);
      Mma<T>::run(acc[j], a, r[0], r[1]);
      Mma<T>::run(acc[j + 1], a, r[2], r[3]);
    }
  }
  // This warp's part of each head: m, l (summed over the quad) and the un-normalized output.
  l = quad_sum(l);
  if (g < group) {
    if (t == 0) {
      m_part[warp * kMaxGroup + g] = m;
      l_part[warp * kMaxGroup + g] = l;
    }
    float* dst = part + (warp * kMaxGroup + g) * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) *reinterpret_cast<float2*>(dst + j * 8 + 2 * t) = make_float2(acc[j][0], acc[j][1]);
  }
  if (warp < group) {  // the new token's score of head `warp`, from the rounded q and key
    float dot = 0.0f;
    for (int e = lane; e < D; e += 32) dot = fmaf(to_float(qs[warp * D + e]), to_float(knew[e]), dot);
    dot = warp_sum(dot);
    if (lane == 0) s_new[warp] = has_new ? dot * args.qk_scale : -INFINITY;
  }
  __syncthreads();

  // The parts combined with the new token's own score and value.
  const int used = tiles < kWarps ? tiles : kWarps;
  T* out = reinterpret_cast<T*>(args.out) + (static_cast<size_t>(b) * args.num_heads + kvh * group) * D;
  for (int i = tid; i < group * D; i += kThreads) {
    const int h = i / D, d = i % D;
    float mx = s_new[h];
    for (int w = 0; w < used; ++w) mx = fmaxf(mx, m_part[w * kMaxGroup + h]);
    float sum = 0.0f, o = 0.0f;
    if (has_new) {
      const float p = exp2f(s_new[h] - mx);
      sum = p;
      o = to_float(from_float<T>(p)) * to_float(vnew[d]);
    }
    for (int w = 0; w < used; ++w) {
      const float scale = exp2f(m_part[w * kMaxGroup + h] - mx);
      sum = fmaf(scale, l_part[w * kMaxGroup + h], sum);
      o = fmaf(scale, part[(w * kMaxGroup + h) * D + d], o);
    }
    out[h * D + d] = from_float<T>(sum > 0.0f ? o / sum : 0.0f);
  }
}

template <typename T, int D>
void launch(const Args& args, int ctas) {
  constexpr auto kernel = prefetched_decode_attention_kernel<T, D>;
  const int smem = layout_of(args.cache_len, D).total;
  allow_dynamic_smem<kernel>(smem);
  C10_CUDA_CHECK(launch_programmatic(kernel, dim3(ctas), dim3(kThreads), smem, at::cuda::getCurrentCUDAStream(), args));
}

at::Tensor prefetched_decode_attention(const at::Tensor& qkv, const at::Tensor& cos_table, const at::Tensor& sin_table,
                                       const std::optional<at::Tensor>& position_ids, at::Tensor& k_cache,
                                       at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& positions,
                                       int64_t num_heads, int64_t num_kv_heads, double scale) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == 1, "prefetched_decode_attention takes one new token a sequence");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "prefetched_decode_attention: contiguous caches [N, Hkv, T, D] of one shape");
  const int64_t B = qkv.size(0), Hkv = k_cache.size(1), T_len = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(num_kv_heads == Hkv && num_heads % Hkv == 0 && num_heads / Hkv <= kMaxGroup,
              "prefetched_decode_attention: at most ", kMaxGroup, " query heads a kv head");
  TORCH_CHECK(qkv.size(2) == (num_heads + 2 * Hkv) * D && qkv.stride(2) == 1 && qkv.stride(0) % 8 == 0,
              "prefetched_decode_attention: qkv [B, 1, (Hq + 2 Hkv) * D], rows on 16-byte boundaries");
  TORCH_CHECK(T_len <= kMaxCache && (D == 64 || D == 128), "prefetched_decode_attention: caches of at most ",
              kMaxCache, " positions, head size 64 or 128");
  TORCH_CHECK(qkv.scalar_type() == k_cache.scalar_type() && qkv.scalar_type() == v_cache.scalar_type() &&
                  (qkv.scalar_type() == at::kBFloat16 || qkv.scalar_type() == at::kHalf),
              "prefetched_decode_attention: bf16 or fp16 activations and caches");
  TORCH_CHECK((cos_table.scalar_type() == at::kFloat || cos_table.scalar_type() == qkv.scalar_type()) &&
                  sin_table.scalar_type() == cos_table.scalar_type() && cos_table.dim() == 2 &&
                  cos_table.sizes() == sin_table.sizes() && cos_table.is_contiguous() && sin_table.is_contiguous() &&
                  cos_table.size(1) == D / 2,
              "prefetched_decode_attention: rotary tables [L, D/2] in float32 or the activations' dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.is_contiguous() &&
                  positions.is_contiguous(),
              "prefetched_decode_attention: int64 slots and positions");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qkv.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0,
              "prefetched_decode_attention: qkv and the caches on 16-byte boundaries");
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto out = at::empty({B, num_heads, 1, D}, qkv.options());
  if (B == 0) return out;
  Args args{};
  args.qkv = qkv.data_ptr();
  args.qkv_stride_b = qkv.stride(0);
  args.cos_table = cos_table.data_ptr();
  args.sin_table = sin_table.data_ptr();
  args.table_len = static_cast<int>(cos_table.size(0));
  args.tables_float = cos_table.scalar_type() == at::kFloat;
  if (position_ids.has_value()) {
    TORCH_CHECK(position_ids->scalar_type() == at::kLong, "prefetched_decode_attention: int64 position ids");
    args.position_ids = position_ids->data_ptr<int64_t>();
    args.position_ids_stride_b = position_ids->stride(0);
  }
  args.k_cache = k_cache.data_ptr();
  args.v_cache = v_cache.data_ptr();
  args.slots = slots.data_ptr<int64_t>();
  args.positions = positions.data_ptr<int64_t>();
  args.out = out.data_ptr();
  args.num_heads = static_cast<int>(num_heads);
  args.num_kv_heads = static_cast<int>(Hkv);
  args.cache_len = static_cast<int>(T_len);
  args.qk_scale = static_cast<float>(scale) * 1.4426950408889634f;
  const int ctas = static_cast<int>(B * Hkv);
  if (qkv.scalar_type() == at::kBFloat16) {
    if (D == 128) launch<__nv_bfloat16, 128>(args, ctas);
    else launch<__nv_bfloat16, 64>(args, ctas);
  } else {
    if (D == 128) launch<__half, 128>(args, ctas);
    else launch<__half, 64>(args, ctas);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) { m.impl("prefetched_decode_attention", &prefetched_decode_attention); }
