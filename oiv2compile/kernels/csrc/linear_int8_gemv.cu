// oiv2::linear_int8_gemv: y[m, n] = scales[n] * sum_k x[m, k] * qweight[n, k] for M = 1..4 rows,
// the matrix-vector product of a decode step with int8 weights (layout int8-rowmajor-v1).
// Two more ops of the same kernel carry a residual add and an RMSNorm between two such products (the
// norm's weight folded into the second one's weights at build time, passes/fold_norm_weights.py):
// oiv2::linear_int8_gemv_add: y = (x W^T) + residual, each rounded to x's dtype as the model rounds
// them: the product that ends a block (o, down) writes the new residual stream.
// oiv2::rms_norm_linear_int8_gemv: y[m] = rsqrt(mean(x[m]^2) + eps) * (x[m] W^T): every warp reads all
// of x anyway, so the sum of squares costs one FMA a feature and no pass over x.
// Doing the add here instead, in the kernel after it (x + residual read by every warp), cost more than
// the norm kernel it saved (H100, 32 llama-8b layers: 2972 us a step against 2783; benchmarks/RESULTS.md).
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

// What the kernel does around the product (see the top of the file).
enum class Epilogue { kPlain, kAddResidual, kRmsNorm };

// residual [M, N] with kAddResidual; eps with kRmsNorm.
template <typename T, int M, Epilogue kMode>
__global__ void __launch_bounds__(32 * kWarps) gemv_int8_kernel(const T* __restrict__ x,
                                                                const int8_t* __restrict__ w,
                                                                const T* __restrict__ scales,
                                                                const T* __restrict__ residual,
                                                                T* __restrict__ y, int N, int K, float eps) {
  constexpr bool kNorm = kMode == Epilogue::kRmsNorm;
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
        const uint4* xp = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + k);
        float xf[16];
        to_float8<T>(__ldg(xp), xf);
        to_float8<T>(__ldg(xp + 1), xf + 8);
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
    for (int m = 0; m < M; ++m) {
      const size_t at = static_cast<size_t>(m) * N + n;
      T out = from_float<T>(acc[m] * s);
      if constexpr (kMode == Epilogue::kAddResidual) out = from_float<T>(to_float(out) + to_float(residual[at]));
      y[at] = out;
    }
  }
}

// What a launch reads and writes; residual only with kAddResidual.
struct Operands {
  at::Tensor x, w, s, residual, y;
  double eps;
};

template <typename T, int M, Epilogue kMode>
void launch(const Operands& o) {
  const int N = o.w.size(0), K = o.w.size(1);
  dim3 block(32, kWarps);
  dim3 grid((N + kWarps - 1) / kWarps);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; };
  C10_CUDA_CHECK(launch_programmatic(gemv_int8_kernel<T, M, kMode>, grid, block, 0, at::cuda::getCurrentCUDAStream(),
                                     ptr(o.x), o.w.data_ptr<int8_t>(), ptr(o.s), ptr(o.residual), ptr(o.y), N, K,
                                     static_cast<float>(o.eps)));
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

// x [M, K] (M <= 4, bf16 or fp16), qweight [N, K] int8, scales [N] in x's dtype → y [M, N].
template <Epilogue kMode>
at::Tensor run(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& residual,
               double eps) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4, "linear_int8_gemv takes 1 to 4 rows");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "qweight must be [N, K] int8");
  TORCH_CHECK(x.size(1) == qweight.size(1) && x.size(1) % 16 == 0, "K must match and be a multiple of 16");
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), "scales must have x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  Operands o{x.contiguous(), qweight.contiguous(), scales.contiguous(), at::Tensor(), y, eps};
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

}  // namespace

TORCH_LIBRARY_IMPL(oiv2, CUDA, m) {
  m.impl("linear_int8_gemv", &linear_int8_gemv);
  m.impl("linear_int8_gemv_add", &linear_int8_gemv_add);
  m.impl("rms_norm_linear_int8_gemv", &rms_norm_linear_int8_gemv);
}
