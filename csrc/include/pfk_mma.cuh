// The tensor-core main loop shared by the LoRA kernels of csrc/lora/ and csrc/topk/:
//
//   Cs[BM, BN] (fp32, shared memory) = Atile[BM, Kd] . Btile[Kd, BN]
//
// where issue(stage) stages columns [k0, k0 + BK) of the reduction dimension. Each operand is staged in one of
// two shared-memory layouts, named after the WMMA fragment layout that reads it:
//   A row_major: As[BM][BK + 8] (a row of A is contiguous)     A col_major: As[BK][BM + 8]
//   B col_major: Bs[BN][BK + 8] (a column of B is contiguous)  B row_major: Bs[BK][BN + 8]
// Tiles are 64 x BN x 32 with 4 warps in 2 x 2, each warp 2 x (BN/32) WMMA 16x16x16 fragments (mma.sync on
// sm_80+), fp32 accumulation, in a 3-stage cp.async pipeline (tile_mma below). Loaders zero-fill outside the
// matrices, so no size needs to be a multiple of 16. The loaders take a row map (local row -> global row, or -1
// for none), so the same code reads contiguous rows (dense path) and rows gathered through routing metadata
// (top-k path).
#pragma once
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "pfk_async.cuh"
#include "pfk_device.cuh"

namespace personafuse {

// Kernels built on this declare __launch_bounds__(kThreads, 1): with the first argument alone ptxas kept some
// instantiations at 128 (or fewer) registers on sm_80 and spilled (tests/test_cuda_resources.py checks).
template <int BN_>
struct MmaTile {
  static constexpr int BM = 64, BN = BN_, BK = 32, kThreads = 128;
  static constexpr int WM = BM / 2, WN = BN / 2, FM = WM / 16, FN = WN / 16;
  static constexpr int LDA_ROW = BK + 8, LDA_COL = BM + 8;  // As [BM][LDA_ROW] or [BK][LDA_COL]
  static constexpr int LDB_COL = BK + 8, LDB_ROW = BN + 8;  // Bs [BN][LDB_COL] or [BK][LDB_ROW]
  static constexpr int LDC = BN + 4;                        // Cs [BM][LDC] fp32, aliasing the stages afterwards
  // Stages of the cp.async pipeline. Two k-steps of loads stay in flight during each step's MMAs: at BN = 128 that
  // is 2 x 15 KiB per block, and with 3 blocks per SM (by registers) ~90 KiB per SM, above the ~22 KiB that
  // Little's law asks of an H100/H200 SM (3.35-4.8 TB/s x ~0.6 us over 132 SMs). A fourth stage would not add
  // bandwidth and would cost the third block per SM its shared memory.
  static constexpr int kStages = 3;
  static constexpr size_t kAElems =
      (size_t)BM * LDA_ROW > (size_t)BK* LDA_COL ? (size_t)BM * LDA_ROW : (size_t)BK * LDA_COL;
  static constexpr size_t kBElems =
      (size_t)BN * LDB_COL > (size_t)BK* LDB_ROW ? (size_t)BN * LDB_COL : (size_t)BK * LDB_ROW;
  static constexpr size_t kEpilogueBytes = (size_t)BM * LDC * sizeof(float);
  // Bytes of the main loop (every stage) / epilogue union, rounded to 128 so that extra arrays can follow it.
  __host__ __device__ static constexpr size_t union_bytes(size_t elem) {
    const size_t main = kStages * (kAElems + kBElems) * elem;
    const size_t u = main > kEpilogueBytes ? main : kEpilogueBytes;
    return (u + 127) / 128 * 128;
  }
  static_assert(BN % 32 == 0, "2 x 2 warps of 16-wide fragments");
  // Launches use the default 48 KiB of dynamic shared memory (no cudaFuncSetAttribute): the stages plus the
  // routing arrays the grouped kernels put after them (3 x 768 B in topk_wgrad) must fit.
  static_assert(union_bytes(2) + 3 * 768 <= 48 * 1024, "stages exceed the default dynamic shared memory");
};

// fn(std::integral_constant<int, BN>{}) with BN the narrowest column tile of 32, 64 or 128, and at least
// kMinWidth, that holds r columns. Kernels whose tile holds one expert take the default, so small ranks waste
// fewer tensor-core columns; the dense kernels pack several experts per tile and start at 64.
template <int kMinWidth = 32, typename Fn>
cudaError_t dispatch_tile_width(int r, Fn&& fn) {
  static_assert(kMinWidth == 32 || kMinWidth == 64, "tile widths are 32, 64 and 128");
  if constexpr (kMinWidth == 32) {  // not instantiated at all for kMinWidth = 64
    if (r <= 32) return fn(std::integral_constant<int, 32>{});
  }
  if (r <= 64) return fn(std::integral_constant<int, 64>{});
  return fn(std::integral_constant<int, 128>{});
}

// Experts per column tile for rank r (whole experts per tile, so per-expert reductions stay in one block).
template <int BN>
__host__ __device__ __forceinline__ int experts_per_tile(int r) {
  return r >= BN ? 1 : BN / r;
}

// Row maps: local row index -> global row, or -1 outside the matrix.
struct DenseRows {
  int64_t row0;
  int valid;
  __device__ __forceinline__ int64_t operator()(int row) const { return row < valid ? row0 + row : -1; }
};
struct GatheredRows {
  const int* rows;  // `valid` global row indices, in shared memory
  int valid;
  __device__ __forceinline__ int64_t operator()(int row) const { return row < valid ? rows[row] : -1; }
};

// Optional per-row work on loaded values: a coefficient (c(row) * v, rounded to T) and/or the dropout mask of
// element (grow, col) drawn from philox(seed, grow * ld + col), kept values scaled by `scale` and rounded to T
// as torch's drop(x) tensor is. Both are uniform over a launch. They are applied in shared memory once the raw
// tile has landed (finish_k_tile / finish_c_tile), so every operand can be copied asynchronously.
struct LoadOps {
  const float* coef = nullptr;  // [rows of the tile], in shared memory, or nullptr
  uint64_t seed = 0;
  float p = 0.f;
  float scale = 1.f;
  __device__ __forceinline__ bool any() const { return coef != nullptr || p > 0.f; }
};

template <typename T>
__device__ __forceinline__ void finish8(float v[8], int row, int64_t grow, int64_t ld, int64_t col,
                                        const LoadOps& ops) {
  if (ops.coef) {
    const float c = ops.coef[row];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = round_to<T>(v[i] * c);
  }
  if (ops.p > 0.f) {
    const uint64_t base = static_cast<uint64_t>(grow) * static_cast<uint64_t>(ld) + static_cast<uint64_t>(col);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      v[i] = philox_uniform(ops.seed, base + i) >= ops.p ? round_to<T>(v[i] * ops.scale) : 0.f;
  }
}

// dst[0..8) = src[0..n) then zeros: one asynchronous 16-byte copy when the 8 elements are in range and `vec` (src
// 16-byte aligned), else element loads stored now (the tails and unaligned operands).
template <typename T>
__device__ __forceinline__ void stage_chunk(T* dst, const T* src, int n, bool vec) {
  if (vec && n == 8) {
    async_copy16(dst, src, true);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = i < n ? src[i] : from_float<T>(0.f);
  }
}

// The chunk's 8 values in shared memory, transformed by `ops` in place. Called by the thread that staged the chunk,
// after its wait: its own copies are then visible to it without a barrier.
template <typename T>
__device__ __forceinline__ void finish_chunk(T* p, int row, int64_t grow, int64_t ld, int64_t col, const LoadOps& ops) {
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(p[i]);
  finish8<T>(v, row, grow, ld, col, ops);
#pragma unroll
  for (int i = 0; i < 8; ++i) p[i] = from_float<T>(v[i]);
}

// fn(row, col) for every 8-element chunk of a [rows, WIDTH] shared-memory tile: thread i takes chunks i,
// i + THREADS, ... The load_* and finish_* functions below walk a tile with it, so the thread that issued a
// chunk's copy is the one that finishes it after its own wait.
template <int WIDTH, int THREADS, typename Fn>
__device__ __forceinline__ void for_each_chunk(int rows, Fn fn) {
  constexpr int kChunksPerRow = WIDTH / 8;
  for (int chunk = threadIdx.x; chunk < rows * kChunksPerRow; chunk += THREADS) {
    const int row = chunk / kChunksPerRow;
    fn(row, (chunk - row * kChunksPerRow) * 8);
  }
}

// dst[row][kk] = src[rows(row), k0 + kk] for row < dst_rows, kk < BK (zero outside): rows of a row-major [*, Kd]
// matrix with the reduction dimension contiguous (an A row_major or B col_major tile). vec: 16-byte copies
// (Kd % 8 == 0, src 16-byte aligned).
template <typename T, int BK, int LD, int THREADS, typename Rows>
__device__ __forceinline__ void load_k_tile(const T* __restrict__ src, Rows rows, int dst_rows, int64_t Kd, int64_t k0,
                                            T* dst, bool vec) {
  for_each_chunk<BK, THREADS>(dst_rows, [&](int row, int kc) {
    const int64_t k = k0 + kc;
    const int64_t grow = rows(row);
    const int n = grow < 0 || k >= Kd ? 0 : static_cast<int>(Kd - k < 8 ? Kd - k : 8);
    stage_chunk(dst + row * LD + kc, n > 0 ? src + grow * Kd + k : src, n, vec);
  });
}

template <typename T, int BK, int LD, int THREADS, typename Rows>
__device__ __forceinline__ void finish_k_tile(Rows rows, int dst_rows, int64_t Kd, int64_t k0, T* dst,
                                              const LoadOps& ops) {
  if (!ops.any()) return;
  for_each_chunk<BK, THREADS>(dst_rows, [&](int row, int kc) {
    const int64_t grow = rows(row);
    if (grow >= 0) finish_chunk<T>(dst + row * LD + kc, row, grow, Kd, k0 + kc, ops);
  });
}

// dst[kk][c] = src[rows(kk) * ld + c0 + c] for kk < BK, c < WIDTH (zero for c >= cols): BK rows (the reduction
// dimension) of a row-major matrix, each giving WIDTH contiguous columns (an A col_major or B row_major tile).
// vec: 16-byte copies (ld % 8 == 0, c0 % 8 == 0, src 16-byte aligned).
template <typename T, int BK, int WIDTH, int LD, int THREADS, typename Rows>
__device__ __forceinline__ void load_c_tile(const T* __restrict__ src, Rows rows, int64_t ld, int64_t c0, int cols,
                                            T* dst, bool vec) {
  for_each_chunk<WIDTH, THREADS>(BK, [&](int kk, int c) {
    const int64_t grow = rows(kk);
    const int n = grow < 0 || c >= cols ? 0 : (cols - c < 8 ? cols - c : 8);
    stage_chunk(dst + kk * LD + c, n > 0 ? src + grow * ld + c0 + c : src, n, vec);
  });
}

template <typename T, int BK, int WIDTH, int LD, int THREADS, typename Rows>
__device__ __forceinline__ void finish_c_tile(Rows rows, int64_t ld, int64_t c0, T* dst, const LoadOps& ops) {
  if (!ops.any()) return;
  for_each_chunk<WIDTH, THREADS>(BK, [&](int kk, int c) {
    const int64_t grow = rows(kk);
    if (grow >= 0) finish_chunk<T>(dst + kk * LD + c, kk, grow, ld, c0 + c, ops);
  });
}

// One stage of the main loop's pipeline: columns [k0, k0 + BK) of the reduction dimension, staged in As and Bs.
template <typename T>
struct Stage {
  int64_t k0;
  int index;  // 0 .. kStages - 1, for kernels that keep per-stage arrays of their own
  T* A;
  T* B;
};

// For kernels whose operands need no work after landing.
struct NoFinish {
  template <typename S>
  __device__ __forceinline__ void operator()(const S&) const {}
};

// The main loop. issue(stage) starts the loads of a stage (load_k_tile, load_c_tile, load_lora_b_tile: copies in
// flight); finish(stage) runs after this thread's copies of that stage have landed, before the barrier that
// publishes the stage, and may transform the thread's own chunks in place (finish_k_tile, finish_c_tile). Both are
// called by every thread of the block. On return Cs (= smem as float [BM][LDC]) holds the tile and every thread
// may read it.
//
// Pipeline: kStages buffers; stage kt + kStages - 1 is issued while stage kt is multiplied, so kStages - 1 stages
// of loads are in flight during the MMAs, with one barrier per k-step. Iteration kt:
//   wait until stage kt has landed (at most kStages - 2 younger groups in flight), finish(kt), barrier;
//   issue(kt + kStages - 1) into the buffer that stage kt - 1 used (every warp left it before that barrier);
//   commit (an empty group past the end, so the wait count stays uniform); MMAs on stage kt.
// bfloat16 WMMA needs sm_80: built for an older arch (TORCH_CUDA_ARCH_LIST=7.5, say) the kernels compile to a trap,
// and the Python side never launches them there (ops/routed_lora_cuda.py use_tensor_core_kernels).
template <typename T, int BN, typename ALayout, typename BLayout, typename Issue, typename Finish = NoFinish>
__device__ __forceinline__ void tile_mma(int64_t Kd, unsigned char* smem, Issue&& issue, Finish&& finish = {}) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using Tile = MmaTile<BN>;
  constexpr int S = Tile::kStages;
  constexpr bool kARow = std::is_same<ALayout, wmma::row_major>::value;
  constexpr bool kBCol = std::is_same<BLayout, wmma::col_major>::value;
  float* Cs = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int k_steps = static_cast<int>((Kd + Tile::BK - 1) / Tile::BK);
  auto stage = [smem](int kt) {
    const int i = kt % S;
    T* A = reinterpret_cast<T*>(smem) + static_cast<size_t>(i) * (Tile::kAElems + Tile::kBElems);
    return Stage<T>{static_cast<int64_t>(kt) * Tile::BK, i, A, A + Tile::kAElems};
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Tile::FM][Tile::FN];
#pragma unroll
  for (int i = 0; i < Tile::FM; ++i)
#pragma unroll
    for (int j = 0; j < Tile::FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

#pragma unroll
  for (int kt = 0; kt < S - 1; ++kt) {
    if (kt < k_steps) issue(stage(kt));
    async_commit();
  }
  for (int kt = 0; kt < k_steps; ++kt) {
    const Stage<T> cur = stage(kt);
    async_wait<S - 2>();
    finish(cur);
    __syncthreads();
    if (kt + S - 1 < k_steps) issue(stage(kt + S - 1));
    async_commit();
#pragma unroll
    for (int kk = 0; kk < Tile::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a[Tile::FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b[Tile::FN];
#pragma unroll
      for (int i = 0; i < Tile::FM; ++i) {
        const int row = wm * Tile::WM + i * 16;
        if constexpr (kARow) {
          wmma::load_matrix_sync(a[i], cur.A + row * Tile::LDA_ROW + kk, Tile::LDA_ROW);
        } else {
          wmma::load_matrix_sync(a[i], cur.A + kk * Tile::LDA_COL + row, Tile::LDA_COL);
        }
      }
#pragma unroll
      for (int j = 0; j < Tile::FN; ++j) {
        const int col = wn * Tile::WN + j * 16;
        if constexpr (kBCol) {
          wmma::load_matrix_sync(b[j], cur.B + col * Tile::LDB_COL + kk, Tile::LDB_COL);
        } else {
          wmma::load_matrix_sync(b[j], cur.B + kk * Tile::LDB_ROW + col, Tile::LDB_ROW);
        }
      }
#pragma unroll
      for (int i = 0; i < Tile::FM; ++i)
#pragma unroll
        for (int j = 0; j < Tile::FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  async_wait<0>();  // only empty groups remain; Cs aliases every stage, so all warps finish their MMAs first
  __syncthreads();
#pragma unroll
  for (int i = 0; i < Tile::FM; ++i)
#pragma unroll
    for (int j = 0; j < Tile::FN; ++j)
      wmma::store_matrix_sync(Cs + (wm * Tile::WM + i * 16) * Tile::LDC + wn * Tile::WN + j * 16, acc[i][j], Tile::LDC,
                              wmma::mem_row_major);
  __syncthreads();
#endif
}

// The (row tile, column tile) of this block for a grid of row_tiles * col_tiles blocks. The column tile varies
// fastest, so blocks reading the same rows of the activation run together and share them through L2.
struct TileIndex {
  int64_t row;
  int col;
};
__device__ __forceinline__ TileIndex tile_index(int col_tiles) {
  return {static_cast<int64_t>(blockIdx.x) / col_tiles, static_cast<int>(blockIdx.x % col_tiles)};
}

// Qs[kk][j] = B[e0 + j / r, k0 + kk, j % r] for j < cols (whole experts), zero elsewhere: BK rows of lora_B
// [E, N, r] with its experts side by side (a B row_major tile). vec: r % 8 == 0 and B 16-byte aligned, so 8
// columns starting at a multiple of 8 lie in one expert and are contiguous.
template <typename T, int BN>
__device__ __forceinline__ void load_lora_b_tile(const T* __restrict__ B, int64_t N, int r, int e0, int cols,
                                                 int64_t k0, T* Bs, bool vec) {
  using Tile = MmaTile<BN>;
  constexpr int kChunksPerRow = BN / 8;
  for (int chunk = threadIdx.x; chunk < Tile::BK * kChunksPerRow; chunk += Tile::kThreads) {
    const int kk = chunk / kChunksPerRow;
    const int j0 = (chunk - kk * kChunksPerRow) * 8;
    const int64_t n = k0 + kk;
    T* out = Bs + kk * Tile::LDB_ROW + j0;
    if (vec && n < N && j0 + 8 <= cols) {
      async_copy16(out, B + (static_cast<int64_t>(e0 + j0 / r) * N + n) * r + j0 % r, true);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int j = j0 + i;
        out[i] = (n < N && j < cols) ? B[(static_cast<int64_t>(e0 + j / r) * N + n) * r + j % r] : from_float<T>(0.f);
      }
    }
  }
}

}  // namespace personafuse
