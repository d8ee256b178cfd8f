// Per-expert weight gradients of top-k routed LoRA on tensor cores. One CUDA block per (expert, output tile)
// walks all of the expert's pairs (its k groups, contiguous in sorted_pairs) in order, 32 at a time, gathering
// rows on load; the reduction order is fixed, so the result is deterministic (no atomics, no split partials):
//   mode 0: dB[e, n, j] = sum_p dy[tok_p, n] * round(H[p, j] * w_p s_e)        out [E, N, r]
//   mode 1: dA[e, j, k] = sum_p dH[p, j] * drop(x)[tok_p, k]                    out [E, r, K]
// An expert with no pairs gets zeros.
#include "pfk_launch.cuh"
#include "pfk_lora.h"
#include "pfk_mma.cuh"
#include "pfk_topk.h"
#include "topk_block.cuh"

namespace personafuse {
namespace {

template <typename T, int BN, int MODE>
__global__ void __launch_bounds__(MmaTile<BN>::kThreads, 1)
    topk_wgrad_kernel(const T* __restrict__ P,            // mode 0: dy [T, N]; mode 1: dH [P, r]
                      const T* __restrict__ Q,            // mode 0: H [P, r]; mode 1: x [T, K]
                      const float* __restrict__ w_pair,   // [P]
                      const float* __restrict__ scaling,  // [E]
                      const int64_t* __restrict__ seed,
                      T* __restrict__ out,  // [E, I, J]
                      RoutingArgs rt, int64_t I, int64_t J, int r, bool vec_p, bool vec_q, float p, float scale) {
  using Tile = MmaTile<BN>;
  namespace wmma = nvcuda::wmma;
  PFK_DYNAMIC_SMEM(unsigned char, smem);
  const int i_tiles = static_cast<int>((I + Tile::BM - 1) / Tile::BM);
  const int j_tiles = static_cast<int>((J + BN - 1) / BN);
  const TileIndex tile = tile_index(j_tiles);
  const int e = static_cast<int>(tile.row / i_tiles);
  const int64_t i0 = (tile.row % i_tiles) * Tile::BM;
  const int64_t j0 = static_cast<int64_t>(tile.col) * BN;
  const int i_valid = static_cast<int>(I - i0 < Tile::BM ? I - i0 : Tile::BM);
  const int j_valid = static_cast<int>(J - j0 < BN ? J - j0 : BN);
  const int begin = rt.group_start[e * rt.k];
  const int count = rt.group_start[e * rt.k + rt.k] - begin;
  const float s_e = scaling[e];
  const float p_drop = MODE == kWgradA ? p : 0.f;
  const uint64_t s_drop = p_drop > 0.f ? static_cast<uint64_t>(*seed) : 0;
  // Each pipeline stage gathers its own 32 pairs, in its own arrays after the stages' shared memory.
  auto arrays = [&](const Stage<T>& s) {
    return PairArrays::at(smem, Tile::union_bytes(sizeof(T)) + static_cast<size_t>(s.index) * PairArrays::kBytes);
  };
  auto valid_at = [&](const Stage<T>& s) {
    return static_cast<int>(count - s.k0 < Tile::BK ? count - s.k0 : Tile::BK);
  };

  tile_mma<T, BN, wmma::col_major, wmma::row_major>(
      count, smem,
      [&](const Stage<T>& s) {
        const PairArrays arr = arrays(s);
        const int valid = valid_at(s);
        for (int i = threadIdx.x; i < valid; i += Tile::kThreads) {
          const int pair = rt.sorted_pairs[begin + s.k0 + i];
          arr.pairs[i] = pair;
          arr.toks[i] = pair / rt.k;
          arr.coef[i] = w_pair[pair] * s_e;
        }
        __syncthreads();
        const GatheredRows toks{arr.toks, valid}, pairs{arr.pairs, valid};
        if constexpr (MODE == kWgradB) {  // A = dy[tok]^T, B = H[p] w_p s_e
          load_c_tile<T, Tile::BK, Tile::BM, Tile::LDA_COL, Tile::kThreads>(P, toks, I, i0, i_valid, s.A, vec_p);
          load_c_tile<T, Tile::BK, BN, Tile::LDB_ROW, Tile::kThreads>(Q, pairs, J, j0, j_valid, s.B, vec_q);
        } else {  // A = dH[p]^T, B = drop(x)[tok]
          load_c_tile<T, Tile::BK, Tile::BM, Tile::LDA_COL, Tile::kThreads>(P, pairs, I, i0, i_valid, s.A, vec_p);
          load_c_tile<T, Tile::BK, BN, Tile::LDB_ROW, Tile::kThreads>(Q, toks, J, j0, j_valid, s.B, vec_q);
        }
      },
      [&](const Stage<T>& s) {  // the coefficient (mode 0) or the dropout mask (mode 1) on Q's rows
        const PairArrays arr = arrays(s);
        const int valid = valid_at(s);
        if constexpr (MODE == kWgradB) {
          const LoadOps ops{arr.coef};
          finish_c_tile<T, Tile::BK, BN, Tile::LDB_ROW, Tile::kThreads>(GatheredRows{arr.pairs, valid}, J, j0, s.B,
                                                                        ops);
        } else {
          const LoadOps ops{nullptr, s_drop, p_drop, scale};
          finish_c_tile<T, Tile::BK, BN, Tile::LDB_ROW, Tile::kThreads>(GatheredRows{arr.toks, valid}, J, j0, s.B, ops);
        }
      });

  const float* Cs = reinterpret_cast<const float*>(smem);
  for (int i = threadIdx.x; i < i_valid * j_valid; i += Tile::kThreads) {
    const int row = i / j_valid, col = i - row * j_valid;
    out[(static_cast<int64_t>(e) * I + i0 + row) * J + j0 + col] = from_float<T>(Cs[row * Tile::LDC + col]);
  }
}

template <typename T, int BN, int MODE>
cudaError_t launch_mode(const TopkWgradArgs& a, cudaStream_t stream) {
  using Tile = MmaTile<BN>;
  const int64_t I = MODE == kWgradB ? a.width : a.r;
  const int64_t J = MODE == kWgradB ? a.r : a.width;
  // P's rows have I columns, Q's rows J; 16-byte loads need rows of a multiple of 8 elements.
  const bool vec_p = I % 8 == 0 && aligned16(a.P);
  const bool vec_q = J % 8 == 0 && aligned16(a.Q);
  const float p = MODE == kWgradA ? a.dropout_p : 0.f;
  const float scale = p > 0.f ? static_cast<float>(1.0 / (1.0 - static_cast<double>(p))) : 1.f;
  const int64_t tiles = (I + Tile::BM - 1) / Tile::BM * ((J + BN - 1) / BN);
  return launch_kernel(topk_wgrad_kernel<T, BN, MODE>, dim3(static_cast<unsigned>(a.E * tiles)), dim3(Tile::kThreads),
                       Tile::union_bytes(sizeof(T)) + Tile::kStages * PairArrays::kBytes, stream,
                       static_cast<const T*>(a.P), static_cast<const T*>(a.Q), a.w_pair, a.scaling, a.seed,
                       static_cast<T*>(a.out), a.route, I, J, a.r, vec_p, vec_q, p, scale);
}

template <typename T>
cudaError_t launch_typed(const TopkWgradArgs& a, cudaStream_t stream) {
  if (a.mode == kWgradA) return launch_mode<T, 64, kWgradA>(a, stream);
  return dispatch_tile_width(a.r, [&](auto bn) { return launch_mode<T, decltype(bn)::value, kWgradB>(a, stream); });
}

}  // namespace

cudaError_t launch_topk_wgrad(const TopkWgradArgs& args, cudaStream_t stream) {
  if (args.E == 0 || args.width == 0) return cudaSuccess;
  if (args.r < 1 || args.r > kTensorCoreMaxRank || args.route.k < 1 || (args.mode != kWgradB && args.mode != kWgradA) ||
      !(args.dropout_p >= 0.f && args.dropout_p < 1.f))
    return cudaErrorInvalidValue;
  return dispatch_16bit(args.dtype, [&](auto t) { return launch_typed<decltype(t)>(args, stream); });
}

}  // namespace personafuse
