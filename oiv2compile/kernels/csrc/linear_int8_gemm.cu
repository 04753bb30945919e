// oiv2::linear_int8_gemm: y[m, n] = scales[n] * sum_k x[m, k] * qweight[n, k] for x [..., K] in bf16 or
// fp16 and W in the int8 layout of oiv2::linear_int8 (int8-rowmajor-v1: qweight [N, K] int8, one scale an
// output row): the product of a prefill, whose row count is only known when it runs.
//
// 1 to 256 rows on Hopper: the mixed-input GEMM of wgmma_gemm.cuh, which reads W once per 128 rows of x.
// A stage holds the chunk's 64 bytes of each of the CTA's 128 rows, copied as they lie in memory. Lane
// (g, t) of a warp needs, of its rows g and g + 8, bytes 32 h + 8 t .. + 7 for k-steps 2 h and 2 h + 1
// (the mma's k order that x_in_mma_order gives x): one 8-byte shared load a row and half chunk, its low
// word for step 2 h, its high word for step 2 h + 1, bytes 0-1 and 2-3 of a word the fragment's two
// pairs. The 16-byte units of row r sit at unit ^ 2 ((r >> 1) & 1), so that the 16 lanes of a half warp
// (rows g = 0..3 or 4..7) read 128 distinct bytes of the banks. The products run in fp16, where a byte
// becomes a level exactly as 1024 + biased byte (one PRMT a pair) minus 1152 (one HSUB2); a bf16 x is
// first taken into fp16 a row at a time by a power of two (x_in_mma_order_fp16_kernel, undone on the
// row's sums; longer rows than that pass holds take the dequantize path below). bf16 levels through
// float (2^23 + biased byte, a PRMT and an FADD a byte, the high halves of two floats a PRMT) took
// llama-8b's four products of a layer at 128 rows 1.26-1.32x bf16 F.linear's time, the fp16 products
// with bf16 x 1.19x, and llama-8b int8's time to first token went from 8.4-8.7 ms to 7.4 (bf16 7.2;
// H200, benchmarks/RESULTS.md). The row's scale multiplies the float sum at the end, so the weights are never
// rounded (the reference rounds q * scale to x's dtype before its product: a difference of one rounding
// of each weight).
//
// More rows, or another card: slices of W are dequantized, q * scale rounded to x's dtype as the
// reference does, into a buffer that L2 holds and multiplied by cuBLAS.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemv_common.cuh"
#include "wgmma_gemm.cuh"

namespace {

using namespace oiv2_gemv;

// The slice of W dequantized at a time above that: 64 MB, as for int4 (linear_int4_mma.cu), in whole
// multiples of kSliceRows rows. Each slice's product writes a column slice of y, which starts 2 * (its first
// row) bytes into each row of y: at llama-8b's down (K = 14336) 64 MB was 2340 rows, whose second slice
// started 8 bytes off a 16-byte boundary, and cuBLAS took 500 us for the two slices at 1024 rows of x against
// 149 for the whole product (H200, thirty-third session, benchmarks/RESULTS.md).
constexpr int64_t kDequantBytes = int64_t{64} << 20;
constexpr int64_t kSliceRows = 128;

// The fp16 pairs (bytes 0 and 1, bytes 2 and 3) of a word of four int8 weights, exactly.
__device__ __forceinline__ void int8_half_pairs(uint32_t word, uint32_t& low, uint32_t& high) {
  const uint32_t biased = word ^ 0x80808080u;
  const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));  // 1152
  uint32_t l = __byte_perm(biased, 0x64646464u, 0x4140), h = __byte_perm(biased, 0x64646464u, 0x4342);
  const __half2 lf = __hsub2(*reinterpret_cast<const __half2*>(&l), bias);
  const __half2 hf = __hsub2(*reinterpret_cast<const __half2*>(&h), bias);
  low = *reinterpret_cast<const uint32_t*>(&lf);
  high = *reinterpret_cast<const uint32_t*>(&hf);
}

// The products run in fp16 (a bf16 x is taken into fp16 first); TScale is the scales' dtype, x's.
template <typename TScale>
struct Int8Weights {
  struct Params {
    const int8_t* w;
    const TScale* scales;
    int K;
    bool tiled;      // w in int8-tiles16x1024-v2
    int pair_width;  // tiled: its paired form (gemv_common.cuh tiled_offset)
  };
  static constexpr int kRowBytes = oiv2_wgmma::kChunk;  // a row's bytes of a chunk
  static constexpr int kStageBytes = oiv2_wgmma::kCtaBlocks * oiv2_wgmma::kBlockRows * kRowBytes;

  __device__ static int unit_at(int r, int unit) { return (unit ^ (((r >> 1) & 1) << 1)) << 4; }

  // A thread's copies of a chunk: 16-byte units of kCopies rows, kThreads / 4 rows apart.
  struct Copier {
    static constexpr int kCopies = oiv2_wgmma::kCtaBlocks * oiv2_wgmma::kBlockRows * 4 / oiv2_wgmma::kThreads;
    static constexpr int kRowStep = oiv2_wgmma::kThreads / 4;  // a multiple of 8: the same swizzle each copy
    const int8_t* src[kCopies];  // row-major: the copy's row and unit; tiled: the weights
    int rows[kCopies];           // tiled: the copy's row
    uint32_t valid = 0;
    int dst, unit, K, pair_width;
    bool tiled;

    __device__ Copier(const Params& p, int block0, int blocks) {
      const int r = threadIdx.x >> 2, N = blocks * oiv2_wgmma::kBlockRows;
      unit = threadIdx.x & 3;
      K = p.K;
      tiled = p.tiled;
      pair_width = p.pair_width;
      dst = r * kRowBytes + unit_at(r, unit);
#pragma unroll
      for (int j = 0; j < kCopies; ++j) {
        const int n = block0 * oiv2_wgmma::kBlockRows + r + j * kRowStep;
        rows[j] = min(n, N - 1);
        src[j] = tiled ? p.w : p.w + static_cast<size_t>(rows[j]) * p.K + 16 * unit;
        valid |= static_cast<uint32_t>(n < N) << j;
      }
    }
    __device__ void copy(uint8_t* stage, int c) const {
#pragma unroll
      for (int j = 0; j < kCopies; ++j) {
        const int8_t* from = tiled ? src[j] + tiled_offset(rows[j], c * kRowBytes + 16 * unit, K, pair_width) : src[j] + c * kRowBytes;
        oiv2_wgmma::copy_async16(stage + dst + j * kRowStep * kRowBytes, from, (valid >> j) & 1);
      }
    }
  };

  __device__ static void fragments(const uint8_t* stage, const Params&, uint32_t (&a)[4][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int r = warp * oiv2_wgmma::kBlockRows + g + 8 * hi;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint2 v =
            *reinterpret_cast<const uint2*>(stage + r * kRowBytes + unit_at(r, 2 * h + (t >> 1)) + 8 * (t & 1));
        int8_half_pairs(v.x, a[2 * h][hi], a[2 * h][2 + hi]);
        int8_half_pairs(v.y, a[2 * h + 1][hi], a[2 * h + 1][2 + hi]);
      }
    }
  }

  __device__ static float row_scale(const Params& p, int n) { return to_float(p.scales[n]); }
};

// W rows [first, first + rows) dequantized into out [rows, K], q * scale rounded to T: 16 weights a thread.
template <typename T>
__global__ void int8_dequant_kernel(const int4* __restrict__ w, const T* __restrict__ scales, T* __restrict__ out,
                                    int64_t first, int64_t units, int K, bool tiled,
                                    int pair_width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= units) return;
  const int64_t row = first + i * 16 / K;
  const float s = to_float(scales[row]);
  const int4 v = tiled ? w[tiled_offset(static_cast<int>(row), static_cast<int>(i * 16 % K), K, pair_width) / 16] : w[first * K / 16 + i];
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
  T values[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const float q = byte_plus_2p23(words[j / 4] ^ 0x80808080u, 0x7440 | (j % 4)) - (k2p23 + 128.0f);
    values[j] = from_float<T>(q * s);
  }
  uint4* dst = reinterpret_cast<uint4*>(out) + 2 * i;
  dst[0] = *reinterpret_cast<const uint4*>(values);
  dst[1] = *reinterpret_cast<const uint4*>(values + 8);
}

template <typename T>
void run_dequant_gemm(const at::Tensor& x, const at::Tensor& w, const Int8Weight& layout, const at::Tensor& scales,
                      at::Tensor& y) {
  const int64_t N = scales.size(0), K = x.size(1);
  const int64_t slice_rows = std::min<int64_t>(N, std::max<int64_t>(kSliceRows, kDequantBytes / (K * 2) / kSliceRows * kSliceRows));
  at::Tensor buffer = at::empty({slice_rows, K}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t row = 0; row < N; row += slice_rows) {
    const int64_t rows = std::min<int64_t>(slice_rows, N - row), units = rows * K / 16;
    int8_dequant_kernel<T><<<(units + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<const int4*>(w.data_ptr()), reinterpret_cast<const T*>(scales.data_ptr()),
        reinterpret_cast<T*>(buffer.data_ptr()), row, units, K, layout.tiled, layout.pair_width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor out = y.narrow(1, row, rows);
    at::mm_out(out, x, buffer.narrow(0, 0, rows).t());
  }
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& w, const Int8Weight& layout, const at::Tensor& scales, at::Tensor& y) {
  const int64_t N = scales.size(0);
  if (N % oiv2_wgmma::kBlockRows == 0 && x.size(1) % oiv2_wgmma::kChunk == 0 &&
      (std::is_same_v<T, __half> || x.size(1) <= oiv2_wgmma::kMaxFp16RowK) && oiv2_wgmma::takes(x.size(0))) {
    using Weights = Int8Weights<T>;  // products in fp16 (see the top of the file)
    const typename Weights::Params p{w.data_ptr<int8_t>(), reinterpret_cast<const T*>(scales.data_ptr()),
                                     static_cast<int>(x.size(1)), layout.tiled, layout.pair_width};
    return oiv2_wgmma::run_wgmma_gemm<__half, Weights, T>(x, p, N, y);
  }
  run_dequant_gemm<T>(x, w, layout, scales, y);
}

// x [..., K] → y [..., N]; qweight [N, K], or int8-tiles16x1024-v2 (gemv_common.cuh int8_weight).
at::Tensor linear_int8_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() >= 1, "x must have a feature dimension");
  const Int8Weight layout = int8_weight(qweight);
  const int64_t K = x.size(-1), N = layout.rows;
  TORCH_CHECK(layout.K == K, "qweight's K must match x's");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N, "scales must be [N]");
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), "scales must have x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0) x2 = x2.clone();
  at::Tensor w = qweight.contiguous(), s = scales.contiguous();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, "qweight must start on a 16-byte boundary");
  at::Tensor y = at::empty({x2.size(0), N}, x.options());
  if (y.numel() == 0) return y.view(out_sizes);
  x.scalar_type() == at::kBFloat16 ? run<__nv_bfloat16>(x2, w, layout, s, y) : run<__half>(x2, w, layout, s, y);
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) { m.impl("linear_int8_gemm", &linear_int8_gemm); }
