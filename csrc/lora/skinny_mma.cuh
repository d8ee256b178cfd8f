// The tensor-core main loop shared by the large-T LoRA kernels (shrink_kernel.cu, dhg_kernel.cu):
//
//   Cs[BM, BN] (fp32, shared memory) = P[m0 : m0 + BM, :] . Q[c0 : c0 + BN, :]^T
//
// P is a row-major [M, Kd] activation (x or dy, M = tokens, large); Q is the narrow [C, Kd] LoRA operand
// (C = E * r, small), laid out either K-contiguous (A_cat rows: a col_major WMMA operand) or C-contiguous
// (lora_B [E, N, r]: a row_major operand). Tiles are 64 x BN x 32 with 4 warps in 2 x 2, each warp
// (BN/2 / 16) x 2 WMMA 16x16x16 fragments (mma.sync on sm_80+), fp32 accumulation. A column tile holds
// whole experts (W = experts_per_tile * r <= BN columns), so per-expert reductions in the epilogue need no
// second pass. Operand tiles are zero-filled outside the matrix, so no shape needs to be a multiple of 16.
#pragma once
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "pfk_device.cuh"

namespace personafuse {

template <int BN_>
struct SkinnyTile {
  static constexpr int BM = 64, BN = BN_, BK = 32, kThreads = 128;
  static constexpr int WM = BM / 2, WN = BN / 2, FM = WM / 16, FN = WN / 16;
  static constexpr int LDP = BK + 8;      // Ps [BM][LDP]
  static constexpr int LDQ_K = BK + 8;    // Qs [BN][LDQ_K] for a K-contiguous Q (col_major operand)
  static constexpr int LDQ_C = BN + 8;    // Qs [BK][LDQ_C] for a C-contiguous Q (row_major operand)
  static constexpr int LDC = BN + 4;      // Cs [BM][LDC] fp32, aliasing Ps and Qs after the main loop
  static constexpr size_t kQElems = (size_t)BN * LDQ_K > (size_t)BK * LDQ_C ? (size_t)BN * LDQ_K : (size_t)BK * LDQ_C;
  static constexpr size_t main_bytes(size_t elem) { return ((size_t)BM * LDP + kQElems) * elem; }
  static constexpr size_t kEpilogueBytes = (size_t)BM * LDC * sizeof(float);
  static constexpr size_t smem_bytes(size_t elem) {
    return main_bytes(elem) > kEpilogueBytes ? main_bytes(elem) : kEpilogueBytes;
  }
  static_assert(BN % 32 == 0 && BM % 32 == 0, "2 x 2 warps of 16-wide fragments");
};

// Experts per column tile and the tile width in columns for rank r.
template <int BN>
__host__ __device__ __forceinline__ int experts_per_tile(int r) { return r >= BN ? 1 : BN / r; }

// The (row tile, column tile) of this block. The column tile varies fastest, so the blocks that read the same
// rows of the activation run together and share them through L2 (it is read once from DRAM, not once per
// column tile).
struct TileIndex {
  int64_t row;
  int col;
};
template <int BN>
__device__ __forceinline__ TileIndex tile_index_for(int r, int E) {
  const int ept = experts_per_tile<BN>(r);
  const int col_tiles = (E + ept - 1) / ept;
  return {static_cast<int64_t>(blockIdx.x) / col_tiles, static_cast<int>(blockIdx.x % col_tiles)};
}

// Rows [row0, row0 + rows_valid) x columns [k0, k0 + BK) of a row-major [*, Kd] matrix into dst [dst_rows][LD],
// zero outside. vec: 16-byte loads (Kd % 8 == 0, 16-byte aligned base). p > 0: drop(src), the mask of element
// (row, k) drawn from philox(seed, row * Kd + k), kept values scaled by `scale` (= 1 / (1 - p)) and rounded to T
// as torch's drop(x) tensor is. Both flags are uniform over a launch, so the branches do not diverge.
template <typename T, int BK, int LD, int THREADS>
__device__ __forceinline__ void load_k_tile(const T* __restrict__ src, int64_t row0, int rows_valid, int dst_rows,
                                            int64_t Kd, int64_t k0, T* dst, bool vec, uint64_t seed, float p,
                                            float scale) {
  constexpr int kChunksPerRow = BK / 8;
  for (int chunk = threadIdx.x; chunk < dst_rows * kChunksPerRow; chunk += THREADS) {
    const int row = chunk / kChunksPerRow;
    const int kc = (chunk - row * kChunksPerRow) * 8;
    const int64_t k = k0 + kc;
    float v[8];
    if (vec && row < rows_valid && k + 8 <= Kd) {
      load8<T, true>(src + (row0 + row) * Kd + k, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        v[i] = (row < rows_valid && k + i < Kd) ? to_float(src[(row0 + row) * Kd + k + i]) : 0.f;
    }
    if (p > 0.f) {
      const uint64_t base = static_cast<uint64_t>(row0 + row) * static_cast<uint64_t>(Kd) + static_cast<uint64_t>(k);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = philox_uniform(seed, base + i) >= p ? round_to<T>(v[i] * scale) : 0.f;
    }
    T* out = dst + row * LD + kc;
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = from_float<T>(v[i]);
  }
}

// The main loop. load_tiles(k0, Ps, Qs) fills the operand tiles for columns [k0, k0 + BK) of Kd; QLayout is
// nvcuda::wmma::col_major (Qs [BN][LDQ_K]) or row_major (Qs [BK][LDQ_C]). On return Cs holds the fp32 tile
// and every thread of the block may read it.
template <typename T, int BN, typename QLayout, typename LoadTiles>
__device__ __forceinline__ void skinny_mma(int64_t Kd, unsigned char* smem, LoadTiles&& load_tiles) {
  namespace wmma = nvcuda::wmma;
  using Tile = SkinnyTile<BN>;
  constexpr bool kQColMajor = std::is_same<QLayout, wmma::col_major>::value;
  T* Ps = reinterpret_cast<T*>(smem);
  T* Qs = Ps + Tile::BM * Tile::LDP;
  float* Cs = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x / 32;
  const int wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Tile::FM][Tile::FN];
#pragma unroll
  for (int i = 0; i < Tile::FM; ++i)
#pragma unroll
    for (int j = 0; j < Tile::FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < Kd; k0 += Tile::BK) {
    load_tiles(k0, Ps, Qs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < Tile::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[Tile::FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, QLayout> b[Tile::FN];
#pragma unroll
      for (int i = 0; i < Tile::FM; ++i)
        wmma::load_matrix_sync(a[i], Ps + (wm * Tile::WM + i * 16) * Tile::LDP + kk, Tile::LDP);
#pragma unroll
      for (int j = 0; j < Tile::FN; ++j) {
        const int col = wn * Tile::WN + j * 16;
        if constexpr (kQColMajor) {
          wmma::load_matrix_sync(b[j], Qs + col * Tile::LDQ_K + kk, Tile::LDQ_K);
        } else {
          wmma::load_matrix_sync(b[j], Qs + kk * Tile::LDQ_C + col, Tile::LDQ_C);
        }
      }
#pragma unroll
      for (int i = 0; i < Tile::FM; ++i)
#pragma unroll
        for (int j = 0; j < Tile::FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten next iteration, and Cs aliases them
  }
#pragma unroll
  for (int i = 0; i < Tile::FM; ++i)
#pragma unroll
    for (int j = 0; j < Tile::FN; ++j)
      wmma::store_matrix_sync(Cs + (wm * Tile::WM + i * 16) * Tile::LDC + wn * Tile::WN + j * 16, acc[i][j],
                              Tile::LDC, wmma::mem_row_major);
  __syncthreads();
}

}  // namespace personafuse
