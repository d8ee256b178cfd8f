// Launchers of the fused routed-LoRA kernels (csrc/lora/). Plain pointers and sizes: no torch headers in .cu.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "pfk_common.h"

namespace personafuse {

// Decode path (T <= 64), one cooperative launch (see csrc/lora/decode_kernel.cu):
//   y = x W^T + b (when W is given; else y holds the base output already)
//   y += sum_c (H[t, c] * gates[t / seq_len, e] * scaling[e]) B_cat[:, c],  H = x A_cat^T
struct DecodeArgs {
  DType dtype;           // kFloat16 or kBFloat16
  bool vectorized;       // 16-byte loads: K % 8 == 0 and x, W, A, B 16-byte aligned
  const void* x;         // [T, K]
  const void* W;         // [N, K] base weight, or null (y holds the base output; the LoRA term is added)
  const void* bias;      // [N] or null (with W only)
  const void* A;         // [E * r, K]
  const void* B;         // [E, N, r]
  const float* gates;    // [T / seq_len, E]
  const float* scaling;  // [E]
  void* y;               // [T, N]: written when W is given, else accumulated in place
  void* H;               // [T, E * r] out
  void* Hg;              // [T, E * r] scratch, x's dtype
  int T, K, N, E, r, seq_len;
  int k_chunk;        // columns of x staged in shared memory per step (phase 1)
  int c_chunk;        // columns of Hg staged per step (phase 2)
  size_t smem_bytes;  // DecodePlan::smem_bytes
  int grid;           // DecodeCut::grid, co-resident blocks
  int slices;         // DecodeCut::slices (1: phase 1 cuts rows only)
  int slice_len;      // DecodeCut::slice_len
  float* partials;    // [slices, T, NW + C] fp32 scratch when slices > 1, else null
};

// How the decode kernel stages its operands for T tokens (host-side, no CUDA calls).
struct DecodePlan {
  int k_chunk;        // a multiple of 256, min(T, 16) x k_chunk elements within kDecodeStageBytes
  int c_chunk;        // the same for E * r
  size_t smem_bytes;  // max(kDecodeReduceBytes, the larger stage)
};
constexpr int64_t kDecodeMaxTokens = 64;
constexpr int64_t kDecodeMaxWidth = 12288;    // E * r; wider adapters take the tensor-core path
constexpr int kDecodeTokensPerPass = 16;      // tokens a warp accumulates in registers at once
constexpr int kDecodeGroupRows = 16;          // rows a block works on at once (8 warps x 2)
constexpr int64_t kDecodeStageBytes = 32768;  // the staged tokens' operand
constexpr size_t kDecodeReduceBytes = 33792;  // lane reduction: 16 rows x 16 tokens x 33 floats
constexpr int kDecodeSliceStep = 256;         // K slices are whole warp steps (32 lanes x 8 elements)
// Slice only when T * K reaches this. Below it the unsliced cut is cheaper by the cost model (docs/cost-model.md):
// its blocks' re-reads of x from L2 (C = 160 blocks x T K x 2 bytes) and their FMAs take less than the second grid
// barrier that slicing adds (~2 us). At K = 4096 the model has the two even at T = 24; from T = 32 (T K = 131072)
// slicing saves 0.8 us of the LoRA-only launch, at T = 64 3.5 us. Estimates, not measurements.
constexpr int64_t kDecodeSliceMinWork = 131072;
DecodePlan plan_lora_decode(int64_t T, int64_t K, int64_t E, int64_t r);

// How phase 1's work is cut over the cooperative grid. Phase 1 dots the NW + C rows of [W; A_cat] (NW = N with
// the base, else 0) with every token; each block reads all of x for the rows it takes. With many rows (the base
// is fused) they are cut evenly over the blocks and x is read once per block. With few rows (the LoRA term
// alone: C = 160 is 10 groups of 16 against 264 blocks) most blocks would idle while each busy one restaged all
// of x, so the work is cut over (16-row group, K slice) pairs instead: each block takes one pair, writes fp32
// partial sums, and after a grid barrier the slices are added in slice order (deterministic).
struct DecodeCut {
  int grid;               // blocks, at most max_blocks (co-resident)
  int slices;             // K slices of phase 1; 1 when 2 x the row groups exceed max_blocks or T K is small
  int slice_len;          // columns per slice, a multiple of kDecodeSliceStep (K when slices == 1)
  int64_t partial_count;  // fp32 partial sums: slices * T * (NW + C) when slices > 1, else 0
};
DecodeCut decode_cut(bool with_base, int64_t T, int64_t N, int64_t K, int64_t C, int max_blocks);
// Co-resident blocks of the decode kernel for a dtype and shared-memory size on num_sms SMs (the occupancy query is
// made once per device and size).
cudaError_t decode_max_blocks(DType dtype, size_t smem_bytes, int num_sms, int* out);
// The whole launch plan of `a` from its dtype, sizes and W (null or not), on num_sms SMs: sets k_chunk, c_chunk,
// smem_bytes (plan_lora_decode), grid, slices and slice_len (decode_cut at the occupancy's max_blocks), and returns
// in *partial_count the fp32 scratch that a.partials must then point at (0: none, a.partials stays null).
cudaError_t plan_decode_launch(DecodeArgs& a, int num_sms, int64_t* partial_count);

cudaError_t launch_lora_decode(const DecodeArgs& args, cudaStream_t stream);

// Large-T path: tensor-core (WMMA, i.e. mma.sync) kernels for the two narrow GEMMs of the LoRA branch with the
// gate fused in their epilogues; the wide GEMMs (base, expand, dA, dB, dx) stay in cuBLAS. fp16 and bf16,
// 1 <= r <= kTensorCoreMaxRank, any T, K, N, E.
constexpr int64_t kTensorCoreMaxRank = 128;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// H = drop(x) A_cat^T and Hg = H * (gates * scaling) (csrc/lora/shrink_kernel.cu).
struct ShrinkArgs {
  DType dtype;           // kFloat16 or kBFloat16
  const void* x;         // [T, K]
  const void* A;         // [E * r, K]
  const float* gates;    // [T / seq_len, E]
  const float* scaling;  // [E]
  const int64_t* seed;   // [1] on the device (read only when dropout_p > 0)
  void* H;               // [T, E * r] out
  void* Hg;              // [T, E * r] out
  int64_t T, K;
  int E, r;
  int64_t seq_len;
  float dropout_p;  // in [0, 1)
};
cudaError_t launch_lora_shrink(const ShrinkArgs& args, cudaStream_t stream);

// dHg = dy B_cat with the gate backward in the epilogue (csrc/lora/dhg_kernel.cu):
//   dH = round(dHg) * (gates * scaling),  dg_tok[t, e] = scaling[e] * sum_j round(dHg)[t, e, j] H[t, e, j],
//   dgates = dg_tok summed over each sequence's seq_len tokens in a fixed order.
struct DhgArgs {
  DType dtype;           // kFloat16 or kBFloat16
  const void* dy;        // [T, N]
  const void* B;         // [E, N, r]
  const void* H;         // [T, E * r]
  const float* gates;    // [T / seq_len, E]
  const float* scaling;  // [E]
  void* dH;              // [T, E * r] out
  float* dg_tok;         // [T, E] out (scratch when seq_len > 1)
  float* dgates;         // [T / seq_len, E] out; may alias dg_tok when seq_len == 1
  int64_t T, N;
  int E, r;
  int64_t seq_len;
};
cudaError_t launch_lora_dhg(const DhgArgs& args, cudaStream_t stream);

}  // namespace personafuse
