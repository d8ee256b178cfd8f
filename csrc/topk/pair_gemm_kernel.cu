// Grouped per-pair GEMM of top-k routed LoRA on tensor cores, one routing-metadata block (<= 64 pairs of one
// expert e and slot) per CUDA block, the tokens' rows gathered on load:
//   mode 0 (forward):  H[p] = drop(x)[tok_p] A_e^T,  Hg[p] = round(H[p]) * (w_p s_e)            [P, r] each
//   mode 1 (backward): dHg = dy[tok_p] B_e,  dH[p] = round(dHg) * (w_p s_e),
//                      dw[p] = s_e * sum_j round(dHg)[j] H[p, j]                              [P, r], [P]
// Same rounding as the dense torch reference with gates scattered from the top-k weights.
#include "pfk_launch.cuh"
#include "pfk_lora.h"
#include "pfk_mma.cuh"
#include "pfk_topk.h"
#include "topk_block.cuh"

namespace personafuse {
namespace {

template <typename T, int BN, int MODE>
__global__ void __launch_bounds__(MmaTile<BN>::kThreads, 1)
    topk_pair_gemm_kernel(const T* __restrict__ X,            // [T, L]
                          const T* __restrict__ M,            // lora_A [E, r, K] or lora_B [E, N, r]
                          const float* __restrict__ w_pair,   // [P]
                          const float* __restrict__ scaling,  // [E]
                          const int64_t* __restrict__ seed,
                          const T* __restrict__ H,  // mode 1: [P, r]
                          T* __restrict__ out_H,    // mode 0: [P, r]
                          T* __restrict__ out,      // [P, r]
                          float* __restrict__ dw,   // mode 1: [P]
                          RoutingArgs rt, int64_t L, int r, bool vec_x, bool vec_m, float p, float scale) {
  using Tile = MmaTile<BN>;
  namespace wmma = nvcuda::wmma;
  PFK_DYNAMIC_SMEM(unsigned char, smem);
  const PairArrays arr = PairArrays::at(smem, Tile::union_bytes(sizeof(T)));
  const PairBlock blk = load_pair_block(rt, blockIdx.x, arr, w_pair, scaling);
  if (blk.group < 0) return;
  const GatheredRows toks{arr.toks, blk.rows};

  if constexpr (MODE == kPairShrink) {
    LoadOps drop;
    if (p > 0.f) drop = LoadOps{nullptr, static_cast<uint64_t>(*seed), p, scale};
    const T* A_e = M + static_cast<int64_t>(blk.expert) * r * L;  // [r, K]
    tile_mma<T, BN, wmma::row_major, wmma::col_major>(
        L, smem,
        [&](const Stage<T>& s) {
          load_k_tile<T, Tile::BK, Tile::LDA_ROW, Tile::kThreads>(X, toks, Tile::BM, L, s.k0, s.A, vec_x);
          load_k_tile<T, Tile::BK, Tile::LDB_COL, Tile::kThreads>(A_e, DenseRows{0, r}, BN, L, s.k0, s.B, vec_m);
        },
        [&](const Stage<T>& s) {
          finish_k_tile<T, Tile::BK, Tile::LDA_ROW, Tile::kThreads>(toks, Tile::BM, L, s.k0, s.A, drop);
        });
  } else {
    tile_mma<T, BN, wmma::row_major, wmma::row_major>(L, smem, [&](const Stage<T>& s) {
      load_k_tile<T, Tile::BK, Tile::LDA_ROW, Tile::kThreads>(X, toks, Tile::BM, L, s.k0, s.A, vec_x);
      load_lora_b_tile<T, BN>(M, L, r, blk.expert, r, s.k0, s.B, vec_m);
    });
  }

  const float* Cs = reinterpret_cast<const float*>(smem);
  for (int i = threadIdx.x; i < blk.rows * r; i += Tile::kThreads) {
    const int row = i / r, col = i - row * r;
    const int64_t at = static_cast<int64_t>(arr.pairs[row]) * r + col;
    const float v = round_to<T>(Cs[row * Tile::LDC + col]);
    if constexpr (MODE == kPairShrink) out_H[at] = from_float<T>(v);
    out[at] = from_float<T>(v * arr.coef[row]);
  }
  if constexpr (MODE == kPairDhg) {
    const float s_e = scaling[blk.expert];
    for (int row = threadIdx.x; row < blk.rows; row += Tile::kThreads) {
      const int64_t pair = arr.pairs[row];
      float acc = 0.f;
      for (int j = 0; j < r; ++j) acc += round_to<T>(Cs[row * Tile::LDC + j]) * to_float(H[pair * r + j]);
      dw[pair] = acc * s_e;
    }
  }
}

template <typename T, int BN, int MODE>
cudaError_t launch_mode(const TopkPairArgs& a, cudaStream_t stream) {
  using Tile = MmaTile<BN>;
  const bool vec_x = a.L % 8 == 0 && aligned16(a.X);
  const bool vec_m = (MODE == kPairShrink ? a.L % 8 == 0 : a.r % 8 == 0) && aligned16(a.M);
  const float p = MODE == kPairShrink ? a.dropout_p : 0.f;
  const float scale = p > 0.f ? static_cast<float>(1.0 / (1.0 - static_cast<double>(p))) : 1.f;
  return launch_kernel(topk_pair_gemm_kernel<T, BN, MODE>, dim3(a.route.num_blocks), dim3(Tile::kThreads),
                       Tile::union_bytes(sizeof(T)) + PairArrays::kBytes, stream, static_cast<const T*>(a.X),
                       static_cast<const T*>(a.M), a.w_pair, a.scaling, a.seed, static_cast<const T*>(a.H),
                       static_cast<T*>(a.out_H), static_cast<T*>(a.out), a.dw, a.route, a.L, a.r, vec_x, vec_m, p,
                       scale);
}

template <typename T>
cudaError_t launch_typed(const TopkPairArgs& a, cudaStream_t stream) {
  return dispatch_tile_width(a.r, [&](auto bn) {
    constexpr int BN = decltype(bn)::value;
    return a.mode == kPairShrink ? launch_mode<T, BN, kPairShrink>(a, stream) : launch_mode<T, BN, kPairDhg>(a, stream);
  });
}

}  // namespace

cudaError_t launch_topk_pair_gemm(const TopkPairArgs& args, cudaStream_t stream) {
  if (args.route.num_blocks == 0) return cudaSuccess;
  if (args.r < 1 || args.r > kTensorCoreMaxRank || args.L < 1 || args.route.block_m < 1 ||
      args.route.block_m > kMaxBlockPairs || args.route.k < 1 || (args.mode != kPairShrink && args.mode != kPairDhg) ||
      !(args.dropout_p >= 0.f && args.dropout_p < 1.f))
    return cudaErrorInvalidValue;
  return dispatch_16bit(args.dtype, [&](auto t) { return launch_typed<decltype(t)>(args, stream); });
}

}  // namespace personafuse
