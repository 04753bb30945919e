// What the hand-written GEMV kernels (linear_int8_gemv.cu, linear_int4_mma.cu) share: programmatic
// launches, the gated MLP's activations, streaming 128-bit loads, activations to float, a byte to float
// without the I2F unit, a warp's sum.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace oiv2_gemv {

// Programmatic dependent launch (sm_90 and later): the kernels here are launched so that they may start
// while the previous kernel in the stream still runs (once it lets them: our Triton norm, activation and
// attention kernels do at their start, kernels/_triton.py). Before a kernel reads what the previous one
// writes (x), or writes anything, it waits for that grid to end; the weights it may stream before.
__device__ __forceinline__ void wait_for_previous_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// The kernel after this one (launched as a programmatic dependent) may start once every CTA of this grid
// has called this or ended; it still waits for this grid to end before it reads what this grid writes.
__device__ __forceinline__ void allow_dependents_to_launch() { asm volatile("griddepcontrol.launch_dependents;"); }

// The gated MLP's activations, numbered as in oiv2::gated_act's ACTIVATIONS.
enum Activation { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

__device__ __forceinline__ float activate(float g, int activation) {
  if (activation == kSilu) return g / (1.0f + expf(-g));
  if (activation == kGelu) return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
  const float z = 0.7978845608028654f * (g + 0.044715f * g * g * g);  // tanh(z) = 2 * sigmoid(2z) - 1
  return g / (1.0f + expf(-2.0f * z));
}

template <typename... Params, typename... Args>
cudaError_t launch_programmatic(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

// A weight row is read once: a non-allocating load keeps it out of L1, where x stays.
__device__ __forceinline__ int4 load_stream(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The bytes of one row that a warp reads per load: 16 per lane.
constexpr int kWarpStep = 32 * 16;

// kUnroll loads of a lane's 16 bytes, kWarpStep apart from byte `base` of `row`, all written before any
// is used (ptxas may still issue the later ones after the first use: linear_int8_gemv.cu); past the
// row's end, zeros.
template <int kUnroll>
__device__ __forceinline__ void load_row(const uint8_t* row, int base, int row_bytes, int4 (&out)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int b = base + u * kWarpStep;
    out[u] = b < row_bytes ? load_stream(reinterpret_cast<const int4*>(row + b)) : make_int4(0, 0, 0, 0);
  }
}

constexpr int kTileFeatures = 1024;  // int8-tiles16x1024-v2

// Weights in int8-tiles16x1024-v2 (kernels/linear_int8.py): row n's 16 bytes from feature k (a multiple of 16).
// Block b holds rows 16b.. (pair_width 0) or, paired, rows 8b.. and pair_width + 8b.. (a gated MLP's gate and
// up rows); tile row r of a block, 16-byte unit u = (k % 1024) / 16 of tile k / 1024 (16 w bytes from 16 K b +
// 16 (k - k % 1024)) sits at (u / 8) 2048 + ((u / 4) % 2) 1024 + (r / 8) 512 + (4 (r % 8) + u % 4) 16 of it.
__device__ __forceinline__ size_t tiled_offset(int n, int k, int K, int pair_width) {
  int block, r;
  if (pair_width > 0) {
    const int up = n >= pair_width, m = n - (up ? pair_width : 0);
    block = m >> 3;
    r = (up << 3) | (m & 7);
  } else {
    block = n >> 4;
    r = n & 15;
  }
  const int u = (k & (kTileFeatures - 1)) >> 4;
  return static_cast<size_t>(block) * 16 * K + 16 * (k & ~(kTileFeatures - 1)) + (u >> 3) * 2048 +
         ((u >> 2) & 1) * 1024 + (r >> 3) * 512 + (((r & 7) << 2) | (u & 3)) * 16;
}

// An int8 qweight's layout, from its shape: [N, K] int8-rowmajor-v1, [N / 16, 16, K] int8-tiles16x1024-v2,
// [N / 16, 2, 8, K] its paired form (pair_width N / 2).
struct Int8Weight {
  int64_t rows, K;
  bool tiled;
  int pair_width;
};

inline Int8Weight int8_weight(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kChar &&
                  (q.dim() == 2 || (q.dim() == 3 && q.size(1) == 16) || (q.dim() == 4 && q.size(1) == 2 && q.size(2) == 8)),
              "qweight must be int8 [N, K], or int8-tiles16x1024-v2 [N / 16, 16, K] or [N / 16, 2, 8, K] (paired)");
  const bool tiled = q.dim() > 2;
  const int64_t rows = tiled ? q.size(0) * 16 : q.size(0), K = q.size(-1);
  TORCH_CHECK(K % (tiled ? 128 : 16) == 0, "K must be a multiple of 16 (128 in tiles)");
  return {rows, K, tiled, q.dim() == 4 ? static_cast<int>(rows / 2) : 0};
}

// Byte `selector & 3` of `word` placed in the mantissa of 2^23: the float 2^23 + byte (one PRMT).
// Subtracting 2^23 (plus any bias) gives the byte back exactly.
__device__ __forceinline__ float byte_plus_2p23(uint32_t word, uint32_t selector) {
  return __uint_as_float(__byte_perm(word, 0x4B000000u, selector));
}
constexpr float k2p23 = 8388608.0f;

// Eight activations (16 bytes) to float.
template <typename T>
__device__ __forceinline__ void to_float8(const uint4& v, float* out);

template <>
__device__ __forceinline__ void to_float8<__nv_bfloat16>(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

template <>
__device__ __forceinline__ void to_float8<__half>(const uint4& v, float* out) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace oiv2_gemv
