// Decode path of the routed LoRA forward (T <= 64 tokens): shrink + gate + expand in ONE cooperative launch,
// added into the base output y that cuBLAS computed:
//   H[t, c]  = sum_k x[t, k] A_cat[c, k]                     A_cat = lora_A viewed [C, K], C = E * r
//   Hg[t, c] = H[t, c] * scaling[e] * gates[t / seq_len, e]  e = c / r
//   y[t, n] += sum_c Hg[t, c] * B[e, n, j]                   c = e * r + j, lora_B [E, N, r]
// Bandwidth-bound by design: every byte of A and B is read once from DRAM, with 16-byte vector loads where the
// rows are 16-byte aligned. Three phases separated by grid-wide barriers (cooperative launch):
//   1. K is cut into slices; block s computes fp32 partial sums of H over its slice for all (t, c)
//   2. partials are summed in slice order (deterministic), rounded to H's dtype, gated into Hg (fp32)
//   3. N is cut into blocks of threads, one output column per thread, all T rows; y is read and written once
// Only cuda_runtime, cooperative_groups and the fp16/bf16 headers: this file compiles in seconds.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "pfk_device.cuh"
#include "pfk_launch.cuh"
#include "pfk_lora.h"

namespace cg = cooperative_groups;

namespace personafuse {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerPass = 8;  // tokens accumulated in registers at once

// (kThreads, 2): at least 2 blocks per SM, which lets ptxas use up to 128 registers; with the default it chose 64
// on sm_80 and spilled (tests/test_cuda_resources.py checks for spills).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads, 2)
    lora_decode_kernel(const T* __restrict__ x,            // [T, K]
                       const T* __restrict__ A,            // [C, K]
                       const T* __restrict__ B,            // [E, N, r]
                       const float* __restrict__ gates,    // [T / seq_len, E]
                       const float* __restrict__ scaling,  // [E]
                       T* __restrict__ y,                  // [T, N], accumulated in place
                       T* __restrict__ H,                  // [T, C]
                       float* __restrict__ partial,        // [num_slices, T, C]
                       float* __restrict__ Hg,             // [T, C]
                       int T_, int K, int N, int E, int r, int seq_len, int k_slice, int rows_per_tile) {
  PFK_DYNAMIC_SMEM(float, smem);
  cg::grid_group grid = cg::this_grid();
  const int C = E * r;
  const int num_slices = (K + k_slice - 1) / k_slice;

  // Phase 1: partial H over K-slices. x's slice is staged in shared memory as float [T, k_slice].
  for (int s = blockIdx.x; s < num_slices; s += gridDim.x) {
    const int k0 = s * k_slice;
    const int len = min(k_slice, K - k0);
    for (int i = threadIdx.x; i < T_ * k_slice; i += blockDim.x) {
      const int t = i / k_slice, kk = i - t * k_slice;
      smem[i] = kk < len ? to_float(x[(int64_t)t * K + k0 + kk]) : 0.f;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const T* a_row = A + (int64_t)c * K + k0;
      for (int t0 = 0; t0 < T_; t0 += kRowsPerPass) {
        float acc[kRowsPerPass] = {};
        int kk = 0;
        for (; kk + 8 <= len; kk += 8) {
          float a[8];
          load8<T, VEC>(a_row + kk, a);
#pragma unroll
          for (int tt = 0; tt < kRowsPerPass; ++tt) {
            if (t0 + tt < T_) {
              const float* xs = smem + (t0 + tt) * k_slice + kk;
#pragma unroll
              for (int i = 0; i < 8; ++i) acc[tt] += xs[i] * a[i];
            }
          }
        }
        for (; kk < len; ++kk) {
          const float a = to_float(a_row[kk]);
#pragma unroll
          for (int tt = 0; tt < kRowsPerPass; ++tt)
            if (t0 + tt < T_) acc[tt] += smem[(t0 + tt) * k_slice + kk] * a;
        }
#pragma unroll
        for (int tt = 0; tt < kRowsPerPass; ++tt)
          if (t0 + tt < T_) partial[((int64_t)s * T_ + t0 + tt) * C + c] = acc[tt];
      }
    }
    __syncthreads();
  }
  grid.sync();

  // Phase 2: H = sum of partials in slice order (deterministic), Hg = H * s_e * g.
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t nthreads = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = tid; i < (int64_t)T_ * C; i += nthreads) {
    const int t = static_cast<int>(i / C), c = static_cast<int>(i - (int64_t)t * C);
    float sum = 0.f;
    for (int s = 0; s < num_slices; ++s) sum += partial[(int64_t)s * T_ * C + i];
    H[i] = from_float<T>(sum);
    const int e = c / r;
    Hg[i] = to_float(H[i]) * (gates[(t / seq_len) * E + e] * scaling[e]);  // torch's order: H * (g * s)
  }
  grid.sync();

  // Phase 3: y[t, n] += sum_c Hg[t, c] B[e, n, j]; Hg rows staged in shared memory, rows_per_tile at a time.
  const bool vec_b = VEC && (r % 8 == 0);
  for (int n0 = blockIdx.x * blockDim.x; n0 < N; n0 += gridDim.x * blockDim.x) {
    const int n = n0 + threadIdx.x;
    for (int t_tile = 0; t_tile < T_; t_tile += rows_per_tile) {
      const int rows = min(rows_per_tile, T_ - t_tile);
      __syncthreads();
      for (int i = threadIdx.x; i < rows * C; i += blockDim.x) smem[i] = Hg[(int64_t)t_tile * C + i];
      __syncthreads();
      if (n < N) {
        for (int t0 = 0; t0 < rows; t0 += kRowsPerPass) {
          float acc[kRowsPerPass] = {};
          for (int e = 0; e < E; ++e) {
            const T* b_row = B + ((int64_t)e * N + n) * r;
            int j = 0;
            if (vec_b) {
              for (; j + 8 <= r; j += 8) {
                float b[8];
                load8<T, true>(b_row + j, b);
#pragma unroll
                for (int tt = 0; tt < kRowsPerPass; ++tt) {
                  if (t0 + tt < rows) {
                    const float* hg = smem + (t0 + tt) * C + e * r + j;
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[tt] += hg[i] * b[i];
                  }
                }
              }
            }
            for (; j < r; ++j) {
              const float b = to_float(b_row[j]);
#pragma unroll
              for (int tt = 0; tt < kRowsPerPass; ++tt)
                if (t0 + tt < rows) acc[tt] += smem[(t0 + tt) * C + e * r + j] * b;
            }
          }
#pragma unroll
          for (int tt = 0; tt < kRowsPerPass; ++tt) {
            if (t0 + tt < rows) {
              T* out = y + (int64_t)(t_tile + t0 + tt) * N + n;
              *out = from_float<T>(to_float(*out) + acc[tt]);
            }
          }
        }
      }
    }
  }
}

// Resident blocks per SM of one kernel instantiation at a dynamic shared-memory size, and the largest size its
// attribute was raised to: asked of the driver once per (device, size), not on every decode step.
struct OccupancyCache {
  std::mutex mu;
  std::vector<std::pair<std::pair<int, size_t>, int>> per_sm;  // ((device, smem), blocks per SM)
  std::vector<std::pair<int, size_t>> smem_set;                // (device, largest smem attribute set)
};

template <typename Kernel>
cudaError_t blocks_per_sm(Kernel kernel, OccupancyCache& cache, size_t smem, int* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(cache.mu);
  for (const auto& e : cache.per_sm) {
    if (e.first.first == device && e.first.second == smem) {
      *out = e.second;
      return cudaSuccess;
    }
  }
  if (smem > 48 * 1024) {
    size_t done = 0;
    for (const auto& e : cache.smem_set) {
      if (e.first == device) done = e.second;
    }
    if (smem > done) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
      cache.smem_set.emplace_back(device, smem);
    }
  }
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  cache.per_sm.push_back({{device, smem}, per_sm});
  *out = per_sm;
  return cudaSuccess;
}

template <typename T, bool VEC>
cudaError_t launch_impl(const DecodeArgs& a, cudaStream_t stream) {
  auto kernel = lora_decode_kernel<T, VEC>;
  static OccupancyCache cache;  // one per instantiation
  const size_t smem = a.smem_bytes;
  int per_sm = 0;
  cudaError_t err = blocks_per_sm(kernel, cache, smem, &per_sm);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  const int num_slices = (a.K + a.k_slice - 1) / a.k_slice;
  int want = num_slices;
  want = want > (a.N + kThreads - 1) / kThreads ? want : (a.N + kThreads - 1) / kThreads;
  const int grid = want < per_sm * a.num_sms ? want : per_sm * a.num_sms;  // every block co-resident
  return launch_cooperative(kernel, dim3(grid), dim3(kThreads), smem, stream, a.x, a.A, a.B, a.gates, a.scaling, a.y,
                            a.H, a.partial, a.Hg, a.T, a.K, a.N, a.E, a.r, a.seq_len, a.k_slice, a.rows_per_tile);
}

}  // namespace

DecodePlan plan_lora_decode(int64_t T, int64_t K, int64_t E, int64_t r, int num_sms) {
  auto round_down8 = [](int64_t v) { return v < 8 ? int64_t{8} : v - v % 8; };
  const int64_t C = E * r;
  DecodePlan p{};
  p.k_slice = static_cast<int>(round_down8(std::min<int64_t>((K + num_sms - 1) / num_sms + 7, 8192 / T)));
  p.rows_per_tile = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(T, kDecodeMaxWidth / C)));
  p.smem_bytes = 4 * static_cast<size_t>(std::max<int64_t>(T * p.k_slice, p.rows_per_tile * C));
  p.num_slices = static_cast<int>((K + p.k_slice - 1) / p.k_slice);
  return p;
}

cudaError_t launch_lora_decode(const DecodeArgs& args, cudaStream_t stream) {
  return dispatch_16bit(args.dtype, [&](auto t) {
    using T = decltype(t);
    return args.vectorized ? launch_impl<T, true>(args, stream) : launch_impl<T, false>(args, stream);
  });
}

}  // namespace personafuse
