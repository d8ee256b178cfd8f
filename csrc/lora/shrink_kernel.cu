// Forward shrink of the large-T path, on tensor cores, with dropout on load and the gate in the epilogue:
//   H[t, c]  = sum_k drop(x)[t, k] A_cat[c, k]                    A_cat = lora_A viewed [C, K], C = E * r
//   Hg[t, c] = H[t, c] * (gates[t / seq_len, e] * scaling[e])     e = c / r, H rounded to its dtype first
// Both are written in x's dtype: H is kept for backward, Hg feeds the expand (a cuBLAS GEMM accumulating into the
// base output). drop(x) is never stored: the mask comes from philox(seed, t * K + k) as in ops/dropout.py.
#include "pfk_launch.cuh"
#include "pfk_lora.h"
#include "pfk_mma.cuh"

namespace personafuse {
namespace {

template <typename T, int BN>
__global__ void __launch_bounds__(MmaTile<BN>::kThreads, 1)
    lora_shrink_kernel(const T* __restrict__ x,            // [T, K]
                       const T* __restrict__ A,            // [C, K]
                       const float* __restrict__ gates,    // [T / seq_len, E]
                       const float* __restrict__ scaling,  // [E]
                       const int64_t* __restrict__ seed,   // [1] on the device, read when p > 0
                       T* __restrict__ H,                  // [T, C]
                       T* __restrict__ Hg,                 // [T, C]
                       int64_t T_, int64_t K, int E, int r, int64_t seq_len, bool vec, float p, float scale) {
  using Tile = MmaTile<BN>;
  namespace wmma = nvcuda::wmma;
  PFK_DYNAMIC_SMEM(unsigned char, smem);
  const int64_t C = static_cast<int64_t>(E) * r;
  const int ept = experts_per_tile<BN>(r);
  const TileIndex tile = tile_index((E + ept - 1) / ept);
  const int64_t m0 = tile.row * Tile::BM;
  const int64_t c0 = static_cast<int64_t>(tile.col) * ept * r;
  const int rows = static_cast<int>(T_ - m0 < Tile::BM ? T_ - m0 : Tile::BM);
  const int cols = static_cast<int>(C - c0 < ept * r ? C - c0 : ept * r);
  LoadOps drop;
  if (p > 0.f) drop = LoadOps{nullptr, static_cast<uint64_t>(*seed), p, scale};

  const DenseRows x_rows{m0, rows};
  tile_mma<T, BN, wmma::row_major, wmma::col_major>(
      K, smem,
      [&](const Stage<T>& s) {
        load_k_tile<T, Tile::BK, Tile::LDA_ROW, Tile::kThreads>(x, x_rows, Tile::BM, K, s.k0, s.A, vec);
        load_k_tile<T, Tile::BK, Tile::LDB_COL, Tile::kThreads>(A, DenseRows{c0, cols}, BN, K, s.k0, s.B, vec);
      },
      [&](const Stage<T>& s) {
        finish_k_tile<T, Tile::BK, Tile::LDA_ROW, Tile::kThreads>(x_rows, Tile::BM, K, s.k0, s.A, drop);
      });

  const float* Cs = reinterpret_cast<const float*>(smem);
  for (int i = threadIdx.x; i < rows * cols; i += Tile::kThreads) {
    const int row = i / cols, col = i - row * cols;
    const int64_t t = m0 + row, c = c0 + col;
    const int e = static_cast<int>(c / r);
    const float h = round_to<T>(Cs[row * Tile::LDC + col]);
    H[t * C + c] = from_float<T>(h);
    Hg[t * C + c] = from_float<T>(h * (gates[(t / seq_len) * E + e] * scaling[e]));
  }
}

template <typename T, int BN>
cudaError_t launch_bn(const ShrinkArgs& a, cudaStream_t stream) {
  using Tile = MmaTile<BN>;
  const int ept = experts_per_tile<BN>(a.r);
  const dim3 grid(static_cast<unsigned>((a.T + Tile::BM - 1) / Tile::BM * ((a.E + ept - 1) / ept)));
  const bool vec = a.K % 8 == 0 && aligned16(a.x) && aligned16(a.A);
  const float p = a.dropout_p;
  const float scale = p > 0.f ? static_cast<float>(1.0 / (1.0 - static_cast<double>(p))) : 1.f;
  return launch_kernel(lora_shrink_kernel<T, BN>, grid, dim3(Tile::kThreads), Tile::union_bytes(sizeof(T)), stream,
                       static_cast<const T*>(a.x), static_cast<const T*>(a.A), a.gates, a.scaling, a.seed,
                       static_cast<T*>(a.H), static_cast<T*>(a.Hg), a.T, a.K, a.E, a.r, a.seq_len, vec, p, scale);
}

// Two instantiations per dtype: rank up to 64 (64-column tiles, several experts each) and up to 128.
template <typename T>
cudaError_t launch_typed(const ShrinkArgs& a, cudaStream_t stream) {
  return dispatch_tile_width<64>(a.r, [&](auto bn) { return launch_bn<T, decltype(bn)::value>(a, stream); });
}

}  // namespace

cudaError_t launch_lora_shrink(const ShrinkArgs& args, cudaStream_t stream) {
  if (args.T == 0) return cudaSuccess;
  if (args.r < 1 || args.r > kTensorCoreMaxRank || args.E < 1 || args.K < 1 || args.seq_len < 1 ||
      !(args.dropout_p >= 0.f && args.dropout_p < 1.f))
    return cudaErrorInvalidValue;
  return dispatch_16bit(args.dtype, [&](auto t) { return launch_typed<decltype(t)>(args, stream); });
}

}  // namespace personafuse
