// oiv2::linear_int4_gemv: y[m, n] = sum_k x[m, k] * (q[n, k] - zeros[n, g]) * scales[n, g], g = k / G,
// for M = 1..4 rows: the matrix-vector product of a decode step with 4-bit weights in the layout of
// oiv2::linear_int4 (int4-grouphalves-v2: in each group of G features, byte j holds feature j in its
// low nibble and feature G/2 + j in its high nibble).
//
// Bytes: N * K / 2 weight bytes stream once; x stays in L1. One warp per output row; each lane loads
// 16 weight bytes (32 weights) per step with a non-allocating 128-bit load, kUnroll steps in flight
// before any math. G/2 is a multiple of 16 (G = 32, 64 or 128), so a lane's 16 bytes lie in one group:
// their low nibbles are 16 consecutive features and their high nibbles the 16 features G/2 further
// on, two contiguous runs of x. A nibble becomes a float without I2F: masked to a byte (0..15), put in
// the mantissa of 2^23 (one PRMT) and offset by 2^23 + zero (one FADD, exact), so each weight costs
// a PRMT, a FADD and an FMA; the group's scale multiplies the lane's partial sum once.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemv_common.cuh"

namespace {

using namespace oiv2_gemv;

constexpr int kWarps = 4;
constexpr int kUnroll = 4;
constexpr int kChunk = 16;  // weight bytes of one lane's load

template <typename T, int M>
__global__ void __launch_bounds__(32 * kWarps) gemv_int4_kernel(const T* __restrict__ x,
                                                                const uint8_t* __restrict__ w,
                                                                const T* __restrict__ scales,
                                                                const T* __restrict__ zeros,
                                                                T* __restrict__ y, int N, int K,
                                                                int group) {
  const int n = blockIdx.x * kWarps + threadIdx.y;
  if (n >= N) return;
  const int lane = threadIdx.x;
  const int row_bytes = K / 2;
  const int half = group / 2;  // bytes of one group
  const int groups = K / group;
  const uint8_t* row = w + static_cast<size_t>(n) * row_bytes;
  const T* row_scales = scales + static_cast<size_t>(n) * groups;
  const T* row_zeros = zeros + static_cast<size_t>(n) * groups;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  for (int base = lane * kChunk; base < row_bytes; base += kWarpStep * kUnroll) {
    int4 wv[kUnroll];
    load_row<kUnroll>(row, base, row_bytes, wv);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int b = base + u * kWarpStep;
      if (b >= row_bytes) break;
      const int g = b / half;
      const int first = g * group + (b - g * half);  // feature of the first byte's low nibble
      const float scale = to_float(row_scales[g]);
      const float offset = k2p23 + to_float(row_zeros[g]);
      const uint32_t words[4] = {static_cast<uint32_t>(wv[u].x), static_cast<uint32_t>(wv[u].y),
                                 static_cast<uint32_t>(wv[u].z), static_cast<uint32_t>(wv[u].w)};
      float lo[16], hi[16];  // q - zero of the low and the high nibbles
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t lo_bytes = words[i] & 0x0F0F0F0Fu;
        const uint32_t hi_bytes = (words[i] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          lo[4 * i + j] = byte_plus_2p23(lo_bytes, 0x7440 + j) - offset;
          hi[4 * i + j] = byte_plus_2p23(hi_bytes, 0x7440 + j) - offset;
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4* x_lo = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + first);
        const uint4* x_hi = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + first + half);
        float xf[16];
        float part = 0.0f;
        to_float8<T>(__ldg(x_lo), xf);
        to_float8<T>(__ldg(x_lo + 1), xf + 8);
#pragma unroll
        for (int j = 0; j < 16; ++j) part = fmaf(xf[j], lo[j], part);
        to_float8<T>(__ldg(x_hi), xf);
        to_float8<T>(__ldg(x_hi + 1), xf + 8);
#pragma unroll
        for (int j = 0; j < 16; ++j) part = fmaf(xf[j], hi[j], part);
        acc[m] = fmaf(part, scale, acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) y[static_cast<size_t>(m) * N + n] = from_float<T>(acc[m]);
  }
}

template <typename T, int M>
void launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, at::Tensor& y,
            int group) {
  const int N = w.size(0), K = x.size(1);
  dim3 block(32, kWarps);
  dim3 grid((N + kWarps - 1) / kWarps);
  gemv_int4_kernel<T, M><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), w.data_ptr<uint8_t>(), reinterpret_cast<const T*>(s.data_ptr()),
      reinterpret_cast<const T*>(z.data_ptr()), reinterpret_cast<T*>(y.data_ptr()), N, K, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, at::Tensor& y,
                   int group) {
  switch (x.size(0)) {
    case 1: return launch<T, 1>(x, w, s, z, y, group);
    case 2: return launch<T, 2>(x, w, s, z, y, group);
    case 3: return launch<T, 3>(x, w, s, z, y, group);
    case 4: return launch<T, 4>(x, w, s, z, y, group);
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// x [M, K] (M <= 4, bf16 or fp16), packed [N, K/2] uint8, scales and zeros [N, K/G] in x's dtype.
at::Tensor linear_int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            const at::Tensor& zeros) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4, "linear_int4_gemv takes 1 to 4 rows");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "packed must be [N, K/2] uint8");
  TORCH_CHECK(x.size(1) == 2 * packed.size(1), "packed must hold K/2 bytes a row");
  TORCH_CHECK(scales.dim() == 2 && scales.sizes() == zeros.sizes() && scales.size(0) == packed.size(0),
              "scales and zeros must be [N, K/G]");
  const int64_t K = x.size(1);
  TORCH_CHECK(scales.size(1) > 0 && K % scales.size(1) == 0, "K must be a whole number of groups");
  const int64_t group = K / scales.size(1);
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "the group size must be 32, 64 or 128");
  TORCH_CHECK(x.scalar_type() == scales.scalar_type() && x.scalar_type() == zeros.scalar_type(),
              "scales and zeros must have x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous(), wc = packed.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  TORCH_CHECK(aligned16(xc) && aligned16(wc), "x and packed must start on 16-byte boundaries");
  at::Tensor y = at::empty({x.size(0), packed.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    dispatch_rows<__nv_bfloat16>(xc, wc, sc, zc, y, static_cast<int>(group));
  } else {
    dispatch_rows<__half>(xc, wc, sc, zc, y, static_cast<int>(group));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) { m.impl("linear_int4_gemv", &linear_int4_gemv); }
