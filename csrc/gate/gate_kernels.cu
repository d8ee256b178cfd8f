// Gate step of the routed LoRA forward and backward (docs/design.md, "The math every backend implements"):
//   forward:  Hg = H * (s_e * g[t, e])                  elementwise over [T, E*r]
//   backward: dH = dHg * (s_e * g[t, e]),  dg[t, e] = s_e * sum_j dHg[t, e, j] * H[t, e, j]
// Per-sequence gates (g[t] = g_seq[t / seq_len]) are expanded on the fly, never materialized as [T, E].
// Only cuda_runtime and the fp16/bf16 headers are included: this file compiles in seconds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "pfk_device.cuh"
#include "pfk_gate.h"
#include "pfk_launch.cuh"

namespace personafuse {
namespace {

constexpr int kThreads = 256;

// One thread per element of H; consecutive threads touch consecutive columns (coalesced).
template <typename T>
__global__ void gate_forward_kernel(const T* __restrict__ H, const float* __restrict__ gates,
                                    const float* __restrict__ scaling, T* __restrict__ Hg, int64_t T_, int64_t E,
                                    int64_t r, int64_t seq_len) {
  using A = float;
  const int64_t width = E * r;
  const int64_t total = T_ * width;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / width;
    const int64_t e = (i - t * width) / r;
    const A g = static_cast<A>(gates[(t / seq_len) * E + e]) * static_cast<A>(scaling[e]);
    Hg[i] = from_float<T>(to_float(H[i]) * g);
  }
}

// One thread per (t, e): the r-long dot product for dg and the r scaled values of dH.
template <typename T>
__global__ void gate_backward_kernel(const T* __restrict__ dHg, const T* __restrict__ H,
                                     const float* __restrict__ gates, const float* __restrict__ scaling,
                                     T* __restrict__ dH, float* __restrict__ dg_tok, int64_t T_, int64_t E, int64_t r,
                                     int64_t seq_len) {
  using A = float;
  const int64_t total = T_ * E;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / E;
    const int64_t e = i - t * E;
    const A s = static_cast<A>(scaling[e]);
    const A g = static_cast<A>(gates[(t / seq_len) * E + e]) * s;
    const int64_t base = i * r;  // == t * E * r + e * r
    A acc = 0;
    for (int64_t j = 0; j < r; ++j) {
      const A d = to_float(dHg[base + j]);
      acc += d * to_float(H[base + j]);
      dH[base + j] = from_float<T>(d * g);
    }
    dg_tok[i] = static_cast<float>(acc * s);
  }
}

// One block per (sequence, expert): a fixed-order sum of dg_tok over the sequence's tokens, so the result
// does not depend on scheduling (no atomics).
__global__ void sequence_sum_kernel(const float* __restrict__ dg_tok, float* __restrict__ dgates, int64_t E,
                                    int64_t seq_len) {
  __shared__ float partial[kThreads];
  const int64_t s = blockIdx.x / E;
  const int64_t e = blockIdx.x - s * E;
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < seq_len; k += kThreads) acc += dg_tok[(s * seq_len + k) * E + e];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) dgates[blockIdx.x] = partial[0];
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename T>
cudaError_t gate_forward_impl(const void* H, const float* gates, const float* scaling, void* Hg, int64_t T_, int64_t E,
                              int64_t r, int64_t seq_len, cudaStream_t stream) {
  const int64_t n = T_ * E * r;
  if (n == 0) return cudaSuccess;
  return launch_kernel(gate_forward_kernel<T>, dim3(grid_for(n)), dim3(kThreads), 0, stream, static_cast<const T*>(H),
                       gates, scaling, static_cast<T*>(Hg), T_, E, r, seq_len);
}

template <typename T>
cudaError_t gate_backward_impl(const void* dHg, const void* H, const float* gates, const float* scaling, void* dH,
                               float* dg_tok, float* dgates, int64_t T_, int64_t E, int64_t r, int64_t seq_len,
                               cudaStream_t stream) {
  const int64_t n = T_ * E;
  if (n == 0) return cudaSuccess;
  cudaError_t err =
      launch_kernel(gate_backward_kernel<T>, dim3(grid_for(n)), dim3(kThreads), 0, stream, static_cast<const T*>(dHg),
                    static_cast<const T*>(H), gates, scaling, static_cast<T*>(dH), dg_tok, T_, E, r, seq_len);
  if (err != cudaSuccess || seq_len == 1) return err;
  return launch_sequence_sum(dg_tok, dgates, T_ / seq_len, E, seq_len, stream);
}

}  // namespace

cudaError_t launch_sequence_sum(const float* dg_tok, float* dgates, int64_t num_seq, int64_t E, int64_t seq_len,
                                cudaStream_t stream) {
  if (num_seq * E == 0) return cudaSuccess;
  return launch_kernel(sequence_sum_kernel, dim3(static_cast<unsigned>(num_seq * E)), dim3(kThreads), 0, stream, dg_tok,
                       dgates, E, seq_len);
}

cudaError_t launch_gate_forward(DType dtype, const void* H, const float* gates, const float* scaling, void* Hg,
                                int64_t T, int64_t E, int64_t r, int64_t seq_len, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return gate_forward_impl<float>(H, gates, scaling, Hg, T, E, r, seq_len, stream);
    case DType::kFloat16:
      return gate_forward_impl<__half>(H, gates, scaling, Hg, T, E, r, seq_len, stream);
    case DType::kBFloat16:
      return gate_forward_impl<__nv_bfloat16>(H, gates, scaling, Hg, T, E, r, seq_len, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gate_backward(DType dtype, const void* dHg, const void* H, const float* gates, const float* scaling,
                                 void* dH, float* dg_tok, float* dgates, int64_t T, int64_t E, int64_t r,
                                 int64_t seq_len, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return gate_backward_impl<float>(dHg, H, gates, scaling, dH, dg_tok, dgates, T, E, r, seq_len, stream);
    case DType::kFloat16:
      return gate_backward_impl<__half>(dHg, H, gates, scaling, dH, dg_tok, dgates, T, E, r, seq_len, stream);
    case DType::kBFloat16:
      return gate_backward_impl<__nv_bfloat16>(dHg, H, gates, scaling, dH, dg_tok, dgates, T, E, r, seq_len, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace personafuse
