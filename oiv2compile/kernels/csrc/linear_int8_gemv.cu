// oiv2::linear_int8_gemv: y[m, n] = scales[n] * sum_k x[m, k] * qweight[n, k] for M = 1..4 rows,
// the matrix-vector product of a decode step with int8 weights (layout int8-rowmajor-v1).
//
// Bytes: N * K weight bytes stream once; x (M * K * 2 bytes) stays in L1. One warp per output row;
// each lane loads 16 weight bytes per step with a non-allocating 128-bit load, UNROLL steps in flight
// before any math. int8 -> float without I2F: byte b, biased to b ^ 0x80 in 0..255, sits in the
// mantissa of 2^23 (0x4B0000bb), and subtracting 2^23 + 128 gives b exactly (one PRMT, one FADD).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemv_common.cuh"

namespace {

using namespace oiv2_gemv;

constexpr int kWarps = 4;
constexpr int kUnroll = 4;

// int8 -> float: byte b, biased to b ^ 0x80 in 0..255, in the mantissa of 2^23, minus 2^23 + 128.
__device__ __forceinline__ float byte_to_float(uint32_t biased, uint32_t selector) {
  return byte_plus_2p23(biased, selector) - (k2p23 + 128.0f);
}

template <typename T, int M>
__global__ void __launch_bounds__(32 * kWarps) gemv_int8_kernel(const T* __restrict__ x,
                                                                const int8_t* __restrict__ w,
                                                                const T* __restrict__ scales,
                                                                T* __restrict__ y, int N, int K) {
  const int n = blockIdx.x * kWarps + threadIdx.y;
  if (n >= N) return;
  const int lane = threadIdx.x;
  const int8_t* row = w + static_cast<size_t>(n) * K;
  // Launched as a programmatic dependent: the CTAs are resident when the previous kernel ends, and read
  // x only after it has. Prefetching the row into L2 before the wait cost more than it hid (H100, 32
  // llama-8b layers of int8 linears in a CUDA graph: 3062 us per step with it, 2783 without, 2836 with
  // neither the prefetch nor the early launch; benchmarks/RESULTS.md): the resident CTAs' rows of the
  // fused gate/up matrix alone outgrow L2.
  wait_for_previous_grid();
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  for (int base = lane * 16; base < K; base += kWarpStep * kUnroll) {
    int4 wv[kUnroll];
    load_row<kUnroll>(reinterpret_cast<const uint8_t*>(row), base, K, wv);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = base + u * kWarpStep;
      if (k >= K) break;
      const uint32_t words[4] = {static_cast<uint32_t>(wv[u].x) ^ 0x80808080u,
                                 static_cast<uint32_t>(wv[u].y) ^ 0x80808080u,
                                 static_cast<uint32_t>(wv[u].z) ^ 0x80808080u,
                                 static_cast<uint32_t>(wv[u].w) ^ 0x80808080u};
      float wf[16];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wf[4 * i + 0] = byte_to_float(words[i], 0x7440);
        wf[4 * i + 1] = byte_to_float(words[i], 0x7441);
        wf[4 * i + 2] = byte_to_float(words[i], 0x7442);
        wf[4 * i + 3] = byte_to_float(words[i], 0x7443);
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + k);
        float xf[16];
        to_float8<T>(__ldg(xp), xf);
        to_float8<T>(__ldg(xp + 1), xf + 8);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[m] = fmaf(xf[j], wf[j], acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0) {
    const float s = to_float(scales[n]);
#pragma unroll
    for (int m = 0; m < M; ++m) y[static_cast<size_t>(m) * N + n] = from_float<T>(acc[m] * s);
  }
}

template <typename T, int M>
void launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, at::Tensor& y) {
  const int N = w.size(0), K = w.size(1);
  dim3 block(32, kWarps);
  dim3 grid((N + kWarps - 1) / kWarps);
  C10_CUDA_CHECK(launch_programmatic(gemv_int8_kernel<T, M>, grid, block, 0, at::cuda::getCurrentCUDAStream(),
                                     reinterpret_cast<const T*>(x.data_ptr()), w.data_ptr<int8_t>(),
                                     reinterpret_cast<const T*>(s.data_ptr()), reinterpret_cast<T*>(y.data_ptr()), N, K));
}

template <typename T>
void dispatch_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, at::Tensor& y) {
  switch (x.size(0)) {
    case 1: return launch<T, 1>(x, w, s, y);
    case 2: return launch<T, 2>(x, w, s, y);
    case 3: return launch<T, 3>(x, w, s, y);
    case 4: return launch<T, 4>(x, w, s, y);
  }
}

// x [M, K] (M <= 4, contiguous, bf16 or fp16), qweight [N, K] int8, scales [N] in x's dtype.
at::Tensor linear_int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4, "linear_int8_gemv takes 1 to 4 rows");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "qweight must be [N, K] int8");
  TORCH_CHECK(x.size(1) == qweight.size(1) && x.size(1) % 16 == 0, "K must match and be a multiple of 16");
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), "scales must have x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous(), wc = qweight.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    dispatch_rows<__nv_bfloat16>(xc, wc, sc, y);
  } else {
    dispatch_rows<__half>(xc, wc, sc, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) { m.impl("linear_int8_gemv", &linear_int8_gemv); }
