// oiv2::linear_int8_gemv: y[m, n] = scales[n] * sum_k x[m, k] * qweight[n, k] for M = 1..4 rows,
// the matrix-vector product of a decode step with int8 weights (layout int8-rowmajor-v1).
// oiv2::add_rms_norm_linear_int8_gemv: the same kernel reading h = x + residual (rounded to x's dtype,
// as the residual add rounds it) and scaling row m of the product by rsqrt(mean(h[m]^2) + eps): the
// residual add and RMSNorm before a linear whose weights hold the norm's weight (folded in at build
// time). Every warp reads all of h anyway, so its sum of squares costs one FMA a feature and no pass;
// the first warp of the grid also writes h, the new residual stream.
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

// Eight sums a + b of x's dtype, each rounded to it (16 bytes each).
__device__ __forceinline__ uint4 add8(const uint4& a, const uint4& b, __nv_bfloat16) {
  uint4 r;
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
  __nv_bfloat162* pr = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) pr[i] = __hadd2(pa[i], pb[i]);
  return r;
}

__device__ __forceinline__ uint4 add8(const uint4& a, const uint4& b, __half) {
  uint4 r;
  const __half2* pa = reinterpret_cast<const __half2*>(&a);
  const __half2* pb = reinterpret_cast<const __half2*>(&b);
  __half2* pr = reinterpret_cast<__half2*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) pr[i] = __hadd2(pa[i], pb[i]);
  return r;
}

// kNorm: x is h = x + residual, normalized (see the top of the file); hidden receives h.
template <typename T, int M, bool kNorm>
__global__ void __launch_bounds__(32 * kWarps) gemv_int8_kernel(const T* __restrict__ x,
                                                                const T* __restrict__ residual,
                                                                const int8_t* __restrict__ w,
                                                                const T* __restrict__ scales,
                                                                T* __restrict__ y, T* __restrict__ hidden,
                                                                int N, int K, float eps) {
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
  float acc[M], sumsq[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = sumsq[m] = 0.0f;
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
        const size_t at = static_cast<size_t>(m) * K + k;
        const uint4* xp = reinterpret_cast<const uint4*>(x + at);
        uint4 xv[2] = {__ldg(xp), __ldg(xp + 1)};
        if constexpr (kNorm) {
          const uint4* rp = reinterpret_cast<const uint4*>(residual + at);
          xv[0] = add8(xv[0], __ldg(rp), T());
          xv[1] = add8(xv[1], __ldg(rp + 1), T());
          if (n == 0) {
            uint4* hp = reinterpret_cast<uint4*>(hidden + at);
            hp[0] = xv[0];
            hp[1] = xv[1];
          }
        }
        float xf[16];
        to_float8<T>(xv[0], xf);
        to_float8<T>(xv[1], xf + 8);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[m] = fmaf(xf[j], wf[j], acc[m]);
        if constexpr (kNorm) {
#pragma unroll
          for (int j = 0; j < 16; ++j) sumsq[m] = fmaf(xf[j], xf[j], sumsq[m]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[m] = warp_sum(acc[m]);
    if constexpr (kNorm) acc[m] *= rsqrtf(warp_sum(sumsq[m]) / K + eps);
  }
  if (lane == 0) {
    const float s = to_float(scales[n]);
#pragma unroll
    for (int m = 0; m < M; ++m) y[static_cast<size_t>(m) * N + n] = from_float<T>(acc[m] * s);
  }
}

// What a launch reads and writes; residual and hidden only with the norm.
struct Operands {
  at::Tensor x, residual, w, s, y, hidden;
  double eps;
};

template <typename T, int M, bool kNorm>
void launch(const Operands& o) {
  const int N = o.w.size(0), K = o.w.size(1);
  dim3 block(32, kWarps);
  dim3 grid((N + kWarps - 1) / kWarps);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; };
  C10_CUDA_CHECK(launch_programmatic(gemv_int8_kernel<T, M, kNorm>, grid, block, 0, at::cuda::getCurrentCUDAStream(),
                                     ptr(o.x), ptr(o.residual), o.w.data_ptr<int8_t>(), ptr(o.s), ptr(o.y),
                                     ptr(o.hidden), N, K, static_cast<float>(o.eps)));
}

template <typename T, bool kNorm>
void dispatch_rows(const Operands& o) {
  switch (o.x.size(0)) {
    case 1: return launch<T, 1, kNorm>(o);
    case 2: return launch<T, 2, kNorm>(o);
    case 3: return launch<T, 3, kNorm>(o);
    case 4: return launch<T, 4, kNorm>(o);
  }
}

template <bool kNorm>
void dispatch(const Operands& o) {
  if (o.x.scalar_type() == at::kBFloat16) return dispatch_rows<__nv_bfloat16, kNorm>(o);
  return dispatch_rows<__half, kNorm>(o);
}

void check(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4, "linear_int8_gemv takes 1 to 4 rows");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "qweight must be [N, K] int8");
  TORCH_CHECK(x.size(1) == qweight.size(1) && x.size(1) % 16 == 0, "K must match and be a multiple of 16");
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), "scales must have x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
}

// x [M, K] (M <= 4, bf16 or fp16), qweight [N, K] int8, scales [N] in x's dtype → y [M, N].
at::Tensor linear_int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check(x, qweight, scales);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  Operands o{x.contiguous(), at::Tensor(), qweight.contiguous(), scales.contiguous(),
             at::empty({x.size(0), qweight.size(0)}, x.options()), at::Tensor(), 0.0};
  dispatch<false>(o);
  return o.y;
}

// x and residual [M, K] → (y [M, N], hidden = x + residual [M, K]); see the top of the file.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_int8_gemv(const at::Tensor& x, const at::Tensor& residual,
                                                                const at::Tensor& qweight, const at::Tensor& scales,
                                                                double eps) {
  check(x, qweight, scales);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must have x's shape and dtype");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  Operands o{x.contiguous(), residual.contiguous(), qweight.contiguous(), scales.contiguous(),
             at::empty({x.size(0), qweight.size(0)}, x.options()), at::empty_like(x, at::MemoryFormat::Contiguous),
             eps};
  dispatch<true>(o);
  return {o.y, o.hidden};
}

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) {
  m.impl("linear_int8_gemv", &linear_int8_gemv);
  m.impl("add_rms_norm_linear_int8_gemv", &add_rms_norm_linear_int8_gemv);
}
