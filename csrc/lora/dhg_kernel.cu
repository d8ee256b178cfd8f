// Backward of the LoRA branch's gate, fused into the GEMM that produces its input, on tensor cores:
//   dHg[t, c]   = sum_n dy[t, n] B[e, n, j]                         c = e * r + j, lora_B [E, N, r]
//   dH[t, c]    = round(dHg[t, c]) * (gates[t / seq_len, e] * scaling[e])
//   dg_tok[t, e] = scaling[e] * sum_j round(dHg[t, e * r + j]) * H[t, e * r + j]
// dHg itself is never written: dB is computed from Hg, and dA, dx from dH. A column tile holds whole experts,
// so dg_tok[t, e] is one fixed-order sum in one thread (deterministic, no atomics). Per-sequence gates then
// sum dg_tok over each sequence in a second, fixed-order kernel (gate_kernels.cu).
#include "pfk_gate.h"
#include "pfk_launch.cuh"
#include "pfk_lora.h"
#include "pfk_mma.cuh"

namespace personafuse {
namespace {

template <typename T, int BN>
__global__ void __launch_bounds__(MmaTile<BN>::kThreads, 1)
    lora_dhg_kernel(const T* __restrict__ dy,           // [T, N]
                    const T* __restrict__ B,            // [E, N, r]
                    const T* __restrict__ H,            // [T, C]
                    const float* __restrict__ gates,    // [T / seq_len, E]
                    const float* __restrict__ scaling,  // [E]
                    T* __restrict__ dH,                 // [T, C]
                    float* __restrict__ dg_tok,         // [T, E]
                    int64_t T_, int64_t N, int E, int r, int64_t seq_len, bool vec_dy, bool vec_b) {
  using Tile = MmaTile<BN>;
  namespace wmma = nvcuda::wmma;
  PFK_DYNAMIC_SMEM(unsigned char, smem);
  const int64_t C = static_cast<int64_t>(E) * r;
  const int ept = experts_per_tile<BN>(r);
  const TileIndex tile = tile_index((E + ept - 1) / ept);
  const int64_t m0 = tile.row * Tile::BM;
  const int e0 = tile.col * ept;
  const int experts = E - e0 < ept ? E - e0 : ept;
  const int cols = experts * r;
  const int64_t c0 = static_cast<int64_t>(e0) * r;
  const int rows = static_cast<int>(T_ - m0 < Tile::BM ? T_ - m0 : Tile::BM);

  tile_mma<T, BN, wmma::row_major, wmma::row_major>(N, smem, [&](const Stage<T>& s) {
    load_k_tile<T, Tile::BK, Tile::LDA_ROW, Tile::kThreads>(dy, DenseRows{m0, rows}, Tile::BM, N, s.k0, s.A, vec_dy);
    load_lora_b_tile<T, BN>(B, N, r, e0, cols, s.k0, s.B, vec_b);
  });

  const float* Cs = reinterpret_cast<const float*>(smem);
  for (int i = threadIdx.x; i < rows * cols; i += Tile::kThreads) {
    const int row = i / cols, col = i - row * cols;
    const int64_t t = m0 + row, c = c0 + col;
    const int e = static_cast<int>(c / r);
    const float d = round_to<T>(Cs[row * Tile::LDC + col]);
    dH[t * C + c] = from_float<T>(d * (gates[(t / seq_len) * E + e] * scaling[e]));
  }
  for (int i = threadIdx.x; i < rows * experts; i += Tile::kThreads) {
    const int row = i / experts, local = i - row * experts;
    const int64_t t = m0 + row;
    const int e = e0 + local;
    const float* d = Cs + row * Tile::LDC + local * r;
    const T* h = H + t * C + static_cast<int64_t>(e) * r;
    float acc = 0.f;
    for (int j = 0; j < r; ++j) acc += round_to<T>(d[j]) * to_float(h[j]);
    dg_tok[t * E + e] = acc * scaling[e];
  }
}

template <typename T, int BN>
cudaError_t launch_bn(const DhgArgs& a, cudaStream_t stream) {
  using Tile = MmaTile<BN>;
  const int ept = experts_per_tile<BN>(a.r);
  const dim3 grid(static_cast<unsigned>((a.T + Tile::BM - 1) / Tile::BM * ((a.E + ept - 1) / ept)));
  const bool vec_dy = a.N % 8 == 0 && aligned16(a.dy);
  const bool vec_b = a.r % 8 == 0 && aligned16(a.B);
  return launch_kernel(lora_dhg_kernel<T, BN>, grid, dim3(Tile::kThreads), Tile::union_bytes(sizeof(T)), stream,
                       static_cast<const T*>(a.dy), static_cast<const T*>(a.B), static_cast<const T*>(a.H), a.gates,
                       a.scaling, static_cast<T*>(a.dH), a.dg_tok, a.T, a.N, a.E, a.r, a.seq_len, vec_dy, vec_b);
}

// Two instantiations per dtype: rank up to 64 (64-column tiles, several experts each) and up to 128.
template <typename T>
cudaError_t launch_typed(const DhgArgs& a, cudaStream_t stream) {
  return dispatch_tile_width<64>(a.r, [&](auto bn) { return launch_bn<T, decltype(bn)::value>(a, stream); });
}

}  // namespace

cudaError_t launch_lora_dhg(const DhgArgs& args, cudaStream_t stream) {
  if (args.T == 0) return cudaSuccess;
  if (args.r < 1 || args.r > kTensorCoreMaxRank || args.E < 1 || args.N < 1 || args.seq_len < 1)
    return cudaErrorInvalidValue;
  const cudaError_t err = dispatch_16bit(args.dtype, [&](auto t) { return launch_typed<decltype(t)>(args, stream); });
  if (err != cudaSuccess || args.seq_len == 1) return err;
  return launch_sequence_sum(args.dg_tok, args.dgates, args.T / args.seq_len, args.E, args.seq_len, stream);
}

}  // namespace personafuse
