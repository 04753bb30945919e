// oiv2::linear_int4_mma: y[m, n] = sum_k x[m, k] * (q[n, k] - zeros[n, g]) * scales[n, g], g = k / G,
// for x [..., K] in bf16 or fp16 and W in the layout int4-mma16x64-v1 (kernels/linear_int4_mma.py).
//
// Up to 32 rows of x (every decode step): tensor cores with W as the 16-row operand. A block of 16
// weight rows is one CTA; its warps split K into 64-feature chunks (chunk c to warp c % kWarps). In a
// chunk each lane loads 16 bytes with one non-allocating 128-bit load: four 32-bit words, each exactly
// the lane's A fragment of one m16n8k16 step (the layout is packed at build time so that it is), and
// x comes as B (8 rows of x per mma; rows past M are zeros). A word's 8 nibbles become bf16/fp16 pairs
// with integer operations alone: (word >> 4r) & 0x000F000F | MAGIC is MAGIC_VALUE + q in each half,
// and one packed subtraction of MAGIC_VALUE + zero leaves q - zero exactly. The products accumulate in
// float per group (one group is 32 features or a whole chunk), and the group's scale multiplies the
// float sums, so no rounded weight is ever formed. The warps' partial sums meet in shared memory.
//
// More rows (prefill): 16-row blocks of W are dequantized into a bf16/fp16 buffer (kept small enough
// for L2) and multiplied by cuBLAS.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemv_common.cuh"

namespace {

using namespace oiv2_gemv;

constexpr int kRows = 16;   // weight rows of one CTA: the mma's M
constexpr int kChunk = 64;  // features of one lane's 16-byte load: four k-steps of 16
constexpr int kWarps = 8;
constexpr int kUnroll = 4;
constexpr int kMaxTiles = 4;  // rows of x through the tensor cores: 8 per tile
constexpr int64_t kDequantBytes = 16 << 20;  // the prefill path's buffer of dequantized rows

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0 in both halves
  static constexpr float kMagicValue = 128.0f;
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static uint32_t pair(float v) {
    __nv_bfloat162 r = __float2bfloat162_rn(v);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static float low(uint32_t v) { return __uint_as_float(v << 16); }
  __device__ static float high(uint32_t v) { return __uint_as_float(v & 0xFFFF0000u); }
};

template <>
struct Mma<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0 in both halves
  static constexpr float kMagicValue = 1024.0f;
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static uint32_t pair(float v) {
    __half2 r = __float2half2_rn(v);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static float low(uint32_t v) { return __half2float(__ushort_as_half(static_cast<unsigned short>(v))); }
  __device__ static float high(uint32_t v) { return __half2float(__ushort_as_half(static_cast<unsigned short>(v >> 16))); }
};

// One row's (scale, zero) of a group: the scale as float, MAGIC_VALUE + zero in both halves.
template <typename T>
__device__ __forceinline__ void scale_and_offset(uint32_t pair, float& scale, uint32_t& offset) {
  scale = Mma<T>::low(pair);
  offset = Mma<T>::pair(Mma<T>::kMagicValue + Mma<T>::high(pair));
}

// The A fragment of one k-step: nibbles r and r + 4 of the word (r = 0..3) are the pair a[r], of row g
// (r even) or g + 8 (r odd), each minus its row's MAGIC_VALUE + zero.
template <typename T>
__device__ __forceinline__ void dequant(uint32_t word, uint32_t offset_g, uint32_t offset_g8, uint32_t (&a)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const uint32_t v = ((word >> (4 * r)) & 0x000F000Fu) | Mma<T>::kMagic;
    a[r] = Mma<T>::sub2(v, (r & 1) ? offset_g8 : offset_g);
  }
}

// One CTA: rows 16 * blockIdx.x .. + 16 of W against rows 0..M-1 (M <= 8 * kTiles) of x.
template <typename T, int kTiles, bool kGroup32>
__global__ void __launch_bounds__(32 * kWarps) int4_mma_kernel(const T* __restrict__ x, const int4* __restrict__ w,
                                                             const uint32_t* __restrict__ scale_zero,
                                                             T* __restrict__ y, int M, int N, int K, int group) {
  const int block = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int chunks = K / kChunk;
  const int groups = K / group;
  const int4* wp = w + static_cast<size_t>(block) * chunks * 32 + lane;
  const uint32_t* szp = scale_zero + static_cast<size_t>(block) * groups * kRows;
  float acc[kTiles][4];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

  for (int c0 = warp; c0 < chunks; c0 += kWarps * kUnroll) {
    int4 wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarps;
      wv[u] = c < chunks ? load_stream(wp + static_cast<size_t>(c) * 32) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarps;
      if (c >= chunks) break;
      const uint32_t words[4] = {static_cast<uint32_t>(wv[u].x), static_cast<uint32_t>(wv[u].y),
                                 static_cast<uint32_t>(wv[u].z), static_cast<uint32_t>(wv[u].w)};
      float tmp[kTiles][4];
      float scale_g = 0.0f, scale_g8 = 0.0f;
      uint32_t offset_g = 0, offset_g8 = 0;
      uint4 xv[kTiles];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int half = j >> 1;
        if (j == 0 || (kGroup32 && j == 2)) {  // a group starts: its scales and zeros, sums from zero
          const int grp = (c * kChunk + half * 32) / group;
          scale_and_offset<T>(__ldg(szp + grp * kRows + g), scale_g, offset_g);
          scale_and_offset<T>(__ldg(szp + grp * kRows + g + 8), scale_g8, offset_g8);
#pragma unroll
          for (int i = 0; i < kTiles; ++i) tmp[i][0] = tmp[i][1] = tmp[i][2] = tmp[i][3] = 0.0f;
        }
        if ((j & 1) == 0) {  // x: features c*64 + half*32 + t*8 .. +8 of row g + 8 * tile
#pragma unroll
          for (int i = 0; i < kTiles; ++i) {
            const int m = g + 8 * i;
            xv[i] = m < M ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + c * kChunk +
                                                                 half * 32 + t * 8))
                          : make_uint4(0, 0, 0, 0);
          }
        }
        uint32_t a[4];
        dequant<T>(words[j], offset_g, offset_g8, a);
#pragma unroll
        for (int i = 0; i < kTiles; ++i) {
          Mma<T>::run(tmp[i], a, (j & 1) ? xv[i].z : xv[i].x, (j & 1) ? xv[i].w : xv[i].y);
        }
        if (j == 3 || (kGroup32 && j == 1)) {  // a group ends: its scale on the float sums
#pragma unroll
          for (int i = 0; i < kTiles; ++i) {
            acc[i][0] = fmaf(scale_g, tmp[i][0], acc[i][0]);
            acc[i][1] = fmaf(scale_g, tmp[i][1], acc[i][1]);
            acc[i][2] = fmaf(scale_g8, tmp[i][2], acc[i][2]);
            acc[i][3] = fmaf(scale_g8, tmp[i][3], acc[i][3]);
          }
        }
      }
    }
  }

  // acc[i][e]: row g + 8 * (e >> 1) of the block, row 8 * i + 2 * t + (e & 1) of x.
  __shared__ float partial[kWarps][kTiles * 4][32];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp][i * 4 + e][lane] = acc[i][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTiles * 4 * 32; idx += 32 * kWarps) {
    const int l = idx & 31, ie = idx >> 5;
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += partial[v][ie][l];
    const int m = 8 * (ie >> 2) + 2 * (l & 3) + (ie & 1);
    const int n = block * kRows + (l >> 2) + 8 * ((ie >> 1) & 1);
    if (m < M) y[static_cast<size_t>(m) * N + n] = from_float<T>(sum);
  }
}

// W rows [16 * first_block, + 16 * blocks) dequantized into out [16 * blocks, K]: one thread per word.
template <typename T>
__global__ void int4_mma_dequant_kernel(const uint32_t* __restrict__ w, const uint32_t* __restrict__ scale_zero,
                                        T* __restrict__ out, int first_block, int blocks, int K, int group) {
  const int chunks = K / kChunk;
  const int64_t words = static_cast<int64_t>(blocks) * chunks * 128;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= words) return;
  const int j = i & 3, lane = (i >> 2) & 31;
  const int64_t bc = i >> 7;
  const int c = bc % chunks, block = bc / chunks;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t word = w[static_cast<int64_t>(first_block) * chunks * 128 + i];
  const int feature = c * kChunk + (j >> 1) * 32 + t * 8 + (j & 1) * 4;  // + 2h + e for nibble (e, h)
  const int grp = feature / group;
  const uint32_t* szp = scale_zero + (static_cast<int64_t>(first_block + block) * (K / group) + grp) * kRows;
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {  // row g, then row g + 8
    const uint32_t sz = szp[g + 8 * hi];
    const float scale = Mma<T>::low(sz), zero = Mma<T>::high(sz);
    T vals[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // feature + k = feature + 2h + e: nibble 4e + 2h + hi
      const int p = 4 * (k & 1) + 2 * (k >> 1) + hi;
      vals[k] = from_float<T>((static_cast<float>((word >> (4 * p)) & 0xF) - zero) * scale);
    }
    T* dst = out + (static_cast<int64_t>(block) * kRows + g + 8 * hi) * K + feature;
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(vals);
  }
}

template <typename T, int kTiles>
void launch_mma(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, at::Tensor& y, int group) {
  const int M = x.size(0), K = x.size(1), N = w.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const int4*>(w.data_ptr());
  const auto* sp = reinterpret_cast<const uint32_t*>(sz.data_ptr());
  auto* yp = reinterpret_cast<T*>(y.data_ptr());
  if (group == 32) {
    int4_mma_kernel<T, kTiles, true><<<N / kRows, 32 * kWarps, 0, stream>>>(xp, wp, sp, yp, M, N, K, group);
  } else {
    int4_mma_kernel<T, kTiles, false><<<N / kRows, 32 * kWarps, 0, stream>>>(xp, wp, sp, yp, M, N, K, group);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_mma(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, at::Tensor& y, int group) {
  switch ((x.size(0) + 7) / 8) {
    case 1: return launch_mma<T, 1>(x, w, sz, y, group);
    case 2: return launch_mma<T, 2>(x, w, sz, y, group);
    case 3: return launch_mma<T, 3>(x, w, sz, y, group);
    default: return launch_mma<T, 4>(x, w, sz, y, group);
  }
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
    const int64_t words = rows * K / 8;
    const int threads = 256;
    int4_mma_dequant_kernel<T><<<(words + threads - 1) / threads, threads, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(w.data_ptr()), reinterpret_cast<const uint32_t*>(sz.data_ptr()),
        reinterpret_cast<T*>(buffer.data_ptr()), row / kRows, rows / kRows, K, group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor out = y.narrow(1, row, rows);
    at::mm_out(out, x, buffer.narrow(0, 0, rows).t());
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// x [..., K] (bf16 or fp16), packed [N, K/2] uint8 in int4-mma16x64-v1, scale_zero [N/16, K/G, 16, 2]
// in x's dtype → y [..., N].
at::Tensor linear_int4_mma(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero) {
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
  const at::cuda::OptionalCUDAGuard guard(x.device());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  if (!aligned16(x2)) x2 = x2.clone();
  at::Tensor wc = packed.contiguous(), sc = scale_zero.contiguous();
  TORCH_CHECK(aligned16(wc) && aligned16(sc), "packed and scale_zero must start on 16-byte boundaries");
  at::Tensor y = at::empty({x2.size(0), N}, x.options());
  if (x2.size(0) == 0) return y.view(out_sizes);
  const bool mma = x2.size(0) <= 8 * kMaxTiles;
  if (x.scalar_type() == at::kBFloat16) {
    mma ? run_mma<__nv_bfloat16>(x2, wc, sc, y, group) : run_dequant_gemm<__nv_bfloat16>(x2, wc, sc, y, group);
  } else {
    mma ? run_mma<__half>(x2, wc, sc, y, group) : run_dequant_gemm<__half>(x2, wc, sc, y, group);
  }
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) { m.impl("linear_int4_mma", &linear_int4_mma); }
