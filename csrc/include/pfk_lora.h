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
  int num_sms;
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
DecodePlan plan_lora_decode(int64_t T, int64_t K, int64_t E, int64_t r);
// Blocks of the cooperative grid: enough for 16 rows each of the larger phase, at most max_blocks (co-resident).
int decode_grid(bool with_base, int64_t N, int64_t C, int max_blocks);

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
