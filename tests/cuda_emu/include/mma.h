// CPU emulation of the WMMA API (nvcuda::wmma) as documented in the CUDA C++ Programming Guide, for the
// 16x16x16 half / bfloat16 shapes with float accumulators that csrc/ uses. Every thread holds the whole tile
// (the hardware spreads it over the warp's lanes), so kernels may only use fragments through fill / load /
// mma / store, never element by element. Only lane 0's copy is stored, so the other lanes check the
// preconditions and skip the arithmetic (32x less work; results are the same). The documented preconditions
// are checked: the pointer 256-bit (32-byte) aligned, ldm a multiple of 16 bytes.
#pragma once
#include <string>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  T x[num_elements];
};

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check(const void* p, unsigned ldm, size_t elem_bytes, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::pfk_emu::device_fail(std::string(op) + ": pointer is not 32-byte aligned");
  if ((ldm * elem_bytes) % 16 != 0) ::pfk_emu::device_fail(std::string(op) + ": ldm is not a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

// matrix_a / matrix_b: element (i, j) of the kRows x kCols operand at p[i * ldm + j] (row_major) or
// p[i + j * ldm] (col_major).
template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "operand fragments need a layout");
  detail::check(p, ldm, sizeof(T), "load_matrix_sync");
  if (::pfk_emu::lane_id() != 0) return;
  using F = fragment<Use, M, N, K, T, L>;
  for (int i = 0; i < F::kRows; ++i)
    for (int j = 0; j < F::kCols; ++j)
      f.x[i * F::kCols + j] = std::is_same_v<L, row_major> ? p[i * ldm + j] : p[i + j * ldm];
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  detail::check(p, ldm, sizeof(float), "load_matrix_sync");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) f.x[i * N + j] = layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm];
}

// Warp-collective: lane 0 writes the tile, then the warp meets (what the other lanes' writes would have done).
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  detail::check(p, ldm, sizeof(float), "store_matrix_sync");
  if (::pfk_emu::lane_id() == 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * N + j];
  }
  __syncwarp();
}

// d = a b + c with float accumulation.
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (::pfk_emu::lane_id() != 0) return;
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += detail::to_f(a.x[i * K + k]) * detail::to_f(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
