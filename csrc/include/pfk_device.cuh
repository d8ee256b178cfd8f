// Device helpers shared by the .cu files: element conversions, 8-wide loads, and the dropout RNG.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pfk_common.h"

namespace personafuse {

// fn(T{}) with T the 16-bit element type of dtype (__half or __nv_bfloat16); other dtypes are invalid here.
template <typename Fn>
cudaError_t dispatch_16bit(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16:
      return fn(__half{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The value rounded to T and back: what a tensor of dtype T holds.
template <typename T>
__host__ __device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// 8 consecutive 16-bit elements as floats: one 16-byte load when VEC (p 16-byte aligned), else 8 loads.
template <typename T, bool VEC>
__device__ __forceinline__ void load8(const T* p, float out[8]) {
  if constexpr (VEC) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_float(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_float(p[i]);
  }
}

// Uniform float in [0, 1) for (seed, offset): Philox-4x32-10 as personafuse_kernels/ops/dropout.py and
// Triton's tl.rand compute it, bit for bit, so every backend draws the same dropout mask.
__host__ __device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint64_t prod_b = static_cast<uint64_t>(c2) * 0xCD9E8D57u;
    const uint64_t prod_a = static_cast<uint64_t>(c0) * 0xD2511F53u;
    c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const int32_t s = static_cast<int32_t>(c0);
  const int32_t u = s < 0 ? ~s : s;  // -s - 1 for negative s, without overflow
  return static_cast<float>(u) * 4.6566127342e-10f;
}

}  // namespace personafuse
