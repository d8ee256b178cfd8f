// Decode path of the routed linear (T <= 64 tokens): base GEMV, shrink, gate and expand in ONE cooperative launch.
//   H[t, c]  = sum_k x[t, k] A_cat[c, k]                    A_cat = lora_A viewed [C, K], C = E * r
//   Hg[t, c] = H[t, c] * (gates[t / seq_len, e] * s[e])     e = c / r, rounded to x's dtype (as the torch backend)
//   y[t, n]  = x[t, :] . W[n, :] + b[n]                     when W is given (else y already holds the base output)
//   y[t, n] += sum_c Hg[t, c] B[e, n, j]                    c = e * r + j, lora_B [E, N, r]
// At decode sizes every operand is read once and the cost is bytes: W is by far the largest (N x K against
// (N + K) x C for the adapters), so the kernel streams W once and the adapters ride along in the same pass:
//   phase 1: the rows of [W; A_cat] ([N + C, K]) are cut evenly across the blocks; each block dots its rows with
//            every token of x (the base output, or H and Hg). One pass over W, A and x; no split-K partials.
//            With too few rows for the grid (W = null: C rows only), (16-row group, K slice) pairs are cut
//            instead and the slices' fp32 partial sums are added after a grid barrier (DecodeCut in pfk_lora.h).
//   grid-wide barrier (Hg complete, cooperative launch)
//   phase 2: the output columns are cut evenly across the blocks; column n dots B_cat's row n (the E slices
//            B[e, n, :]) with Hg and adds into y.
// Both phases are one routine (rows_dot_tokens): a block takes 16 rows at a time (2 per warp), lanes split each
// row 8 elements apiece (16-byte loads), the tokens' operand is staged in shared memory a chunk at a time, and the
// 32 lanes' partial sums are reduced through shared memory in lane order, so results are deterministic.
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
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 2;                    // rows a warp holds at once (2 independent 16-byte loads)
constexpr int kGroupRows = kWarps * kRowsPerWarp;  // rows of the block per pass
constexpr int kTok = kDecodeTokensPerPass;         // tokens accumulated in registers per pass
constexpr int kVec = 8;                            // 16-bit elements per 16-byte load
constexpr int kWarpStep = 32 * kVec;               // elements a warp covers per step
constexpr int kRedStride = 33;                     // odd lane stride: the reduction reads are conflict-free
static_assert(kGroupRows == kDecodeGroupRows && kGroupRows * kTok * kRedStride * sizeof(float) == kDecodeReduceBytes,
              "pfk_lora.h is out of date");

// 8 elements of a row of length len from element k (k % 8 == 0), zero past len: one 16-byte load when vec.
template <typename T>
__device__ __forceinline__ void load_row8(const T* row, int k, int len, bool vec, float out[kVec]) {
  if (vec && k + kVec <= len) {
    load8<T, true>(row + k, out);
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = k + i < len ? to_float(row[k + i]) : 0.f;
}

// Phase 1's rows: W's N rows (when W is given), then A_cat's C rows, all of length K.
template <typename T>
struct StackedRows {
  const T* W;  // [NW, K] or null (NW = 0)
  const T* A;  // [C, K]
  int NW, K;
  bool vec;  // K % 8 == 0 and W, A 16-byte aligned
  __device__ void load(int row, int k, float out[kVec]) const {
    const T* p = row < NW ? W + static_cast<int64_t>(row) * K : A + static_cast<int64_t>(row - NW) * K;
    load_row8(p, k, K, vec, out);
  }
};

// Phase 2's rows: row n of B_cat [N, C], that is B[0, n, :], ..., B[E - 1, n, :] (r elements each).
template <typename T>
struct ExpertColumns {
  const T* B;  // [E, N, r]
  int N, r, C;
  bool vec;  // r % 8 == 0 and B 16-byte aligned: 8 elements from c % 8 == 0 never straddle two experts
  __device__ void load(int n, int c, float out[kVec]) const {
    if (vec && c + kVec <= C) {
      const int e = c / r;
      load8<T, true>(B + (static_cast<int64_t>(e) * N + n) * r + (c - e * r), out);
      return;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int cc = c + i, e = cc / r;
      out[i] = cc < C ? to_float(B[(static_cast<int64_t>(e) * N + n) * r + (cc - e * r)]) : 0.f;
    }
  }
};

// epi(row, t, sum_{k in [k_begin, k_end)} X[t, k] rows(row)[k]) for rows [row0, row1) and tokens [0, T_); X
// [T_, len] row-major, k_begin a multiple of 8. X is staged in shared memory `chunk` columns (a multiple of 8)
// and up to kTok tokens at a time; smem holds min(T_, kTok) * chunk elements, and kDecodeReduceBytes for the lane
// reduction (the same bytes, reused). Control flow depends only on the block's ranges, so every thread reaches
// every barrier.
template <typename T, typename Rows, typename Epi>
__device__ void rows_dot_tokens(const Rows& rows, const T* __restrict__ X, int len, bool vec_x, int T_, int row0,
                                int row1, int k_begin, int k_end, int chunk, unsigned char* smem, Epi epi) {
  T* xs = reinterpret_cast<T*>(smem);
  float* red = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int g0 = row0; g0 < row1; g0 += kGroupRows) {
    for (int t0 = 0; t0 < T_; t0 += kTok) {
      const int tp = min(kTok, T_ - t0);
      float acc[kRowsPerWarp][kTok];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int tt = 0; tt < kTok; ++tt) acc[i][tt] = 0.f;
      }
      for (int k0 = k_begin; k0 < k_end; k0 += chunk) {
        const int kc = min(chunk, k_end - k0);  // staged columns past kc are zero, so rows' loads past it add 0
        __syncthreads();  // every warp is done with the previous chunk (or the previous pass's reduction)
        for (int i = threadIdx.x * kVec; i < tp * chunk; i += kThreads * kVec) {
          const int tt = i / chunk, kk = i - tt * chunk;  // chunk % 8 == 0: the 8 elements share a token
          const T* src = X + static_cast<int64_t>(t0 + tt) * len + k0;
          if (vec_x && kk + kVec <= kc) {
            *reinterpret_cast<uint4*>(xs + i) = *reinterpret_cast<const uint4*>(src + kk);
          } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) xs[i + j] = kk + j < kc ? src[kk + j] : from_float<T>(0.f);
          }
        }
        __syncthreads();
        // a warp whose rows all lie past the range has nothing to add: it skips to the next barrier, and its
        // issue slots go to the SM's other warps (a block's last pass is often short: 17 rows = 16 + 1)
        const int kk_end = g0 + warp * kRowsPerWarp < row1 ? kc : 0;
#pragma unroll 2
        for (int kk = lane * kVec; kk < kk_end; kk += kWarpStep) {
          float w[kRowsPerWarp][kVec];
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) {
            const int row = g0 + warp * kRowsPerWarp + i;
            if (row < row1) {
              rows.load(row, k0 + kk, w[i]);
            } else {
#pragma unroll
              for (int j = 0; j < kVec; ++j) w[i][j] = 0.f;
            }
          }
#pragma unroll
          for (int tt = 0; tt < kTok; ++tt) {
            if (tt < tp) {
              float xv[kVec];
              load8<T, true>(xs + tt * chunk + kk, xv);
#pragma unroll
              for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
                for (int j = 0; j < kVec; ++j) acc[i][tt] += w[i][j] * xv[j];
              }
            }
          }
        }
      }
      __syncthreads();  // xs is read by every warp: only now may the reduction overwrite it
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int tt = 0; tt < kTok; ++tt) {
          if (tt < tp) red[((warp * kRowsPerWarp + i) * kTok + tt) * kRedStride + lane] = acc[i][tt];
        }
      }
      __syncthreads();
      for (int o = threadIdx.x; o < kGroupRows * tp; o += kThreads) {
        const int rl = o / tp, tt = o - rl * tp;
        const float* p = red + (rl * kTok + tt) * kRedStride;
        float sum = 0.f;
        for (int l = 0; l < 32; ++l) sum += p[l];  // lane order: deterministic
        if (g0 + rl < row1) epi(g0 + rl, t0 + tt, sum);
      }
    }
  }
}

// Rows [begin, end) of `rows` that block b of `blocks` takes: an even cut (sizes differ by at most one).
__device__ __forceinline__ void even_cut(int rows, int b, int blocks, int* begin, int* end) {
  *begin = static_cast<int>(static_cast<int64_t>(rows) * b / blocks);
  *end = static_cast<int>(static_cast<int64_t>(rows) * (b + 1) / blocks);
}

// (kThreads, 2): two blocks per SM (the cooperative grid is sized from the occupancy), up to 128 registers.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    lora_decode_kernel(const T* __restrict__ x,            // [T, K]
                       const T* __restrict__ W,            // [N, K], or null: y holds the base output
                       const T* __restrict__ bias,         // [N] or null (with W only)
                       const T* __restrict__ A,            // [C, K]
                       const T* __restrict__ B,            // [E, N, r]
                       const float* __restrict__ gates,    // [T / seq_len, E]
                       const float* __restrict__ scaling,  // [E]
                       T* __restrict__ y,                  // [T, N]: written (W given) or accumulated in place
                       T* __restrict__ H,                  // [T, C] out
                       T* __restrict__ Hg,                 // [T, C] scratch
                       float* __restrict__ partials,       // [slices, T, NW + C] scratch when slices > 1
                       int T_, int K, int N, int E, int r, int seq_len, int k_chunk, int c_chunk, int slices,
                       int slice_len, bool vec) {
  PFK_DYNAMIC_SMEM(unsigned char, smem);
  cg::grid_group grid = cg::this_grid();
  const int C = E * r;
  const int NW = W != nullptr ? N : 0;
  const int R1 = NW + C;
  const StackedRows<T> stacked{W, A, NW, K, vec};
  // Phase 1's result for a row of [W; A_cat]: a base column (y = x W^T + b) or a shrink column (H, Hg).
  auto finish = [&](int row, int t, float sum) {
    if (row < NW) {
      const float b = bias != nullptr ? to_float(bias[row]) : 0.f;
      y[static_cast<int64_t>(t) * N + row] = from_float<T>(sum + b);
    } else {
      const int c = row - NW, e = c / r;
      const T h = from_float<T>(sum);
      H[static_cast<int64_t>(t) * C + c] = h;
      // torch's order: H * (g * s), rounded to the dtype
      Hg[static_cast<int64_t>(t) * C + c] = from_float<T>(to_float(h) * (gates[(t / seq_len) * E + e] * scaling[e]));
    }
  };
  int begin = 0, end = 0;

  // Phase 1: base columns and the shrink, one pass over the stacked rows.
  if (slices == 1) {  // rows cut evenly over the blocks, all of K each
    even_cut(R1, blockIdx.x, gridDim.x, &begin, &end);
    rows_dot_tokens(stacked, x, K, vec, T_, begin, end, 0, K, k_chunk, smem, finish);
  } else {  // (16-row group, K slice) pairs, one per block (the host sizes the grid so); slice sums, then finish
    const int items = (R1 + kGroupRows - 1) / kGroupRows * slices;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
      const int g = item / slices, s = item - g * slices;
      const int k_begin = s * slice_len, k_end = min(K, k_begin + slice_len);
      float* part = partials + static_cast<int64_t>(s) * T_ * R1;
      rows_dot_tokens(stacked, x, K, vec, T_, g * kGroupRows, min(R1, (g + 1) * kGroupRows), k_begin, k_end, k_chunk,
                      smem, [&](int row, int t, float sum) { part[static_cast<int64_t>(t) * R1 + row] = sum; });
    }
    grid.sync();
    const int64_t outputs = static_cast<int64_t>(T_) * R1;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < outputs;
         i += static_cast<int64_t>(gridDim.x) * kThreads) {
      float sum = 0.f;
      for (int s = 0; s < slices; ++s) sum += partials[s * outputs + i];  // slice order: deterministic
      finish(static_cast<int>(i % R1), static_cast<int>(i / R1), sum);
    }
  }
  grid.sync();

  // Phase 2: y[:, n] += Hg B_cat[n, :]^T for the block's columns.
  even_cut(N, blockIdx.x, gridDim.x, &begin, &end);
  rows_dot_tokens(ExpertColumns<T>{B, N, r, C, vec && r % kVec == 0}, Hg, C, vec && C % kVec == 0, T_, begin, end, 0, C,
                  c_chunk, smem, [&](int n, int t, float sum) {
                    T* out = y + static_cast<int64_t>(t) * N + n;
                    *out = from_float<T>(to_float(*out) + sum);
                  });
}

// Resident blocks per SM of one kernel instantiation at a dynamic shared-memory size: asked of the driver once per
// (device, size), not on every decode step.
struct OccupancyCache {
  std::mutex mu;
  std::vector<std::pair<std::pair<int, size_t>, int>> per_sm;  // ((device, smem), blocks per SM)
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
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  cache.per_sm.push_back({{device, smem}, per_sm});
  *out = per_sm;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_impl(const DecodeArgs& a, cudaStream_t stream) {
  if (a.grid < 1 || a.slices < 1 || (a.slices > 1 && a.partials == nullptr)) return cudaErrorInvalidValue;
  return launch_cooperative(lora_decode_kernel<T>, dim3(a.grid), dim3(kThreads), a.smem_bytes, stream, a.x, a.W, a.bias,
                            a.A, a.B, a.gates, a.scaling, a.y, a.H, a.Hg, a.partials, a.T, a.K, a.N, a.E, a.r,
                            a.seq_len, a.k_chunk, a.c_chunk, a.slices, a.slice_len, a.vectorized);
}

template <typename T>
cudaError_t max_blocks_impl(size_t smem_bytes, int num_sms, int* out) {
  static OccupancyCache cache;  // one per instantiation
  int per_sm = 0;
  const cudaError_t err = blocks_per_sm(lora_decode_kernel<T>, cache, smem_bytes, &per_sm);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  *out = per_sm * num_sms;
  return cudaSuccess;
}

}  // namespace

DecodePlan plan_lora_decode(int64_t T, int64_t K, int64_t E, int64_t r) {
  const int64_t tok = std::min<int64_t>(T, kDecodeTokensPerPass);
  // columns staged per chunk: the stage is at most kDecodeStageBytes, a multiple of 256 (one warp step), no more
  // than the row length needs
  auto chunk = [&](int64_t len) {
    const int64_t fit = std::max<int64_t>(256, kDecodeStageBytes / (2 * tok) / 256 * 256);
    return static_cast<int>(std::min<int64_t>(fit, (len + 255) / 256 * 256));
  };
  DecodePlan p{};
  p.k_chunk = chunk(K);
  p.c_chunk = chunk(E * r);
  p.smem_bytes = std::max<size_t>(kDecodeReduceBytes, 2 * static_cast<size_t>(tok * std::max(p.k_chunk, p.c_chunk)));
  return p;
}

DecodeCut decode_cut(bool with_base, int64_t T, int64_t N, int64_t K, int64_t C, int max_blocks) {
  const int64_t rows = (with_base ? N : 0) + C;
  const int64_t groups = (rows + kDecodeGroupRows - 1) / kDecodeGroupRows;
  const int64_t phase2 = (N + kDecodeGroupRows - 1) / kDecodeGroupRows;
  const int64_t steps = (K + kDecodeSliceStep - 1) / kDecodeSliceStep;
  DecodeCut cut{};
  int64_t slices = std::min<int64_t>(max_blocks / std::max<int64_t>(groups, 1), steps);
  if (slices < 2 || T * K < kDecodeSliceMinWork) {
    cut.slices = 1;
    cut.slice_len = static_cast<int>(K);
    cut.grid = static_cast<int>(std::min<int64_t>(std::max<int64_t>({1, groups, phase2}), max_blocks));
    cut.partial_count = 0;
    return cut;
  }
  const int64_t len = ((K + slices - 1) / slices + kDecodeSliceStep - 1) / kDecodeSliceStep * kDecodeSliceStep;
  slices = (K + len - 1) / len;
  cut.slices = static_cast<int>(slices);
  cut.slice_len = static_cast<int>(len);
  cut.grid = static_cast<int>(std::min<int64_t>(std::max<int64_t>(groups * slices, phase2), max_blocks));
  cut.partial_count = slices * T * rows;
  return cut;
}

cudaError_t decode_max_blocks(DType dtype, size_t smem_bytes, int num_sms, int* out) {
  return dispatch_16bit(dtype, [&](auto t) { return max_blocks_impl<decltype(t)>(smem_bytes, num_sms, out); });
}

cudaError_t plan_decode_launch(DecodeArgs& a, int num_sms, int64_t* partial_count) {
  const DecodePlan plan = plan_lora_decode(a.T, a.K, a.E, a.r);
  int max_blocks = 0;
  const cudaError_t err = decode_max_blocks(a.dtype, plan.smem_bytes, num_sms, &max_blocks);
  if (err != cudaSuccess) return err;
  const DecodeCut cut = decode_cut(a.W != nullptr, a.T, a.N, a.K, static_cast<int64_t>(a.E) * a.r, max_blocks);
  a.k_chunk = plan.k_chunk;
  a.c_chunk = plan.c_chunk;
  a.smem_bytes = plan.smem_bytes;
  a.grid = cut.grid;
  a.slices = cut.slices;
  a.slice_len = cut.slice_len;
  a.partials = nullptr;
  *partial_count = cut.partial_count;
  return cudaSuccess;
}

cudaError_t launch_lora_decode(const DecodeArgs& args, cudaStream_t stream) {
  return dispatch_16bit(args.dtype, [&](auto t) { return launch_impl<decltype(t)>(args, stream); });
}

}  // namespace personafuse
