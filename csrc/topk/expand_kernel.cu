// Grouped expand of top-k routed LoRA on tensor cores: for the pairs of one slot (one launch per slot, so each
// token's row is touched by one block: no atomics, deterministic), a 64-pair x 64-column tile of
//   mode 0: y[tok_p, n]  += sum_j Hg[p, j] B[e, n, j]                          (reduction over r)
//   mode 1: dx[tok_p, n] += keep(tok_p, n) / (1 - p) * sum_j dH[p, j] A[e, j, n]   (drop' with the forward mask)
// added in fp32 to the value in place and rounded once.
#include "pfk_launch.cuh"
#include "pfk_lora.h"
#include "pfk_mma.cuh"
#include "pfk_topk.h"
#include "topk_block.cuh"

namespace personafuse {
namespace {

constexpr int kTileN = 64;

template <typename T, int MODE>
__global__ void __launch_bounds__(MmaTile<kTileN>::kThreads, 1)
    topk_expand_kernel(const T* __restrict__ X2,  // [P, r]
                       const T* __restrict__ M,   // lora_B [E, N, r] (mode 0) or lora_A [E, r, K] (mode 1)
                       T* __restrict__ out,       // [T, n_out]
                       const int64_t* __restrict__ seed, RoutingArgs rt, int64_t n_out, int r, int slot, bool vec_x2,
                       bool vec_m, float p, float scale) {
  using Tile = MmaTile<kTileN>;
  namespace wmma = nvcuda::wmma;
  PFK_DYNAMIC_SMEM(unsigned char, smem);
  const int col_tiles = static_cast<int>((n_out + kTileN - 1) / kTileN);
  const TileIndex tile = tile_index(col_tiles);
  const int g = rt.block_group[tile.row];
  if (g < 0 || g % rt.k != slot) return;
  const PairArrays arr = PairArrays::at(smem, Tile::union_bytes(sizeof(T)));
  const PairBlock blk = load_pair_block(rt, static_cast<int>(tile.row), arr, nullptr, nullptr);
  const int64_t n0 = static_cast<int64_t>(tile.col) * kTileN;
  const int cols = static_cast<int>(n_out - n0 < kTileN ? n_out - n0 : kTileN);
  const GatheredRows pairs{arr.pairs, blk.rows};

  if constexpr (MODE == kExpandY) {
    const T* B_e = M + static_cast<int64_t>(blk.expert) * n_out * r;  // [N, r]: column n of the operand is row n
    tile_mma<T, kTileN, wmma::row_major, wmma::col_major>(r, smem, [&](const Stage<T>& s) {
      load_k_tile<T, Tile::BK, Tile::LDA_ROW, Tile::kThreads>(X2, pairs, Tile::BM, r, s.k0, s.A, vec_x2);
      load_k_tile<T, Tile::BK, Tile::LDB_COL, Tile::kThreads>(B_e, DenseRows{n0, cols}, kTileN, r, s.k0, s.B, vec_x2);
    });
  } else {
    const T* A_e = M + static_cast<int64_t>(blk.expert) * r * n_out;  // [r, K]
    tile_mma<T, kTileN, wmma::row_major, wmma::row_major>(r, smem, [&](const Stage<T>& s) {
      load_k_tile<T, Tile::BK, Tile::LDA_ROW, Tile::kThreads>(X2, pairs, Tile::BM, r, s.k0, s.A, vec_x2);
      load_c_tile<T, Tile::BK, kTileN, Tile::LDB_ROW, Tile::kThreads>(A_e, DenseRows{s.k0, static_cast<int>(r - s.k0)},
                                                                      n_out, n0, cols, s.B, vec_m);
    });
  }

  const float* Cs = reinterpret_cast<const float*>(smem);
  const uint64_t s = (MODE == kExpandDx && p > 0.f) ? static_cast<uint64_t>(*seed) : 0;
  for (int i = threadIdx.x; i < blk.rows * cols; i += Tile::kThreads) {
    const int row = i / cols, col = i - row * cols;
    const int64_t at = static_cast<int64_t>(arr.toks[row]) * n_out + n0 + col;
    float v = Cs[row * Tile::LDC + col];
    if (MODE == kExpandDx && p > 0.f) v = philox_uniform(s, static_cast<uint64_t>(at)) >= p ? v * scale : 0.f;
    out[at] = from_float<T>(to_float(out[at]) + v);
  }
}

template <typename T, int MODE>
cudaError_t launch_mode(const TopkExpandArgs& a, cudaStream_t stream) {
  using Tile = MmaTile<kTileN>;
  const bool vec_x2 = a.r % 8 == 0 && aligned16(a.X2) && aligned16(a.M);
  const bool vec_m = a.n_out % 8 == 0 && aligned16(a.M);
  const float p = MODE == kExpandDx ? a.dropout_p : 0.f;
  const float scale = p > 0.f ? static_cast<float>(1.0 / (1.0 - static_cast<double>(p))) : 1.f;
  const int64_t col_tiles = (a.n_out + kTileN - 1) / kTileN;
  const dim3 grid(static_cast<unsigned>(a.route.num_blocks * col_tiles));
  for (int slot = 0; slot < a.route.k; ++slot) {
    const cudaError_t err = launch_kernel(
        topk_expand_kernel<T, MODE>, grid, dim3(Tile::kThreads), Tile::union_bytes(sizeof(T)) + PairArrays::kBytes,
        stream, static_cast<const T*>(a.X2), static_cast<const T*>(a.M), static_cast<T*>(a.out), a.seed, a.route,
        a.n_out, a.r, slot, vec_x2, vec_m, p, scale);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_topk_expand(const TopkExpandArgs& args, cudaStream_t stream) {
  if (args.route.num_blocks == 0 || args.n_out == 0) return cudaSuccess;
  if (args.r < 1 || args.r > kTensorCoreMaxRank || args.route.block_m < 1 || args.route.block_m > kMaxBlockPairs ||
      args.route.k < 1 || (args.mode != kExpandY && args.mode != kExpandDx) ||
      !(args.dropout_p >= 0.f && args.dropout_p < 1.f))
    return cudaErrorInvalidValue;
  return dispatch_16bit(args.dtype, [&](auto t) {
    using T = decltype(t);
    return args.mode == kExpandY ? launch_mode<T, kExpandY>(args, stream) : launch_mode<T, kExpandDx>(args, stream);
  });
}

}  // namespace personafuse
