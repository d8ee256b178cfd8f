// Launchers of the fused routed-LoRA kernels (csrc/lora/). Plain pointers and sizes: no torch headers in .cu.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "pfk_common.h"

namespace personafuse {

// Decode path (T <= 64): y[t, :] += sum_c (H[t, c] * scaling[e] * gates[t / seq_len, e]) B_cat[:, c]
// with H = x A_cat^T, in one cooperative launch (see csrc/lora/decode_kernel.cu).
struct DecodeArgs {
  DType dtype;           // kFloat16 or kBFloat16
  bool vectorized;       // 16-byte loads of A and B rows (K % 8 == 0, k_slice % 8 == 0, 16-byte aligned bases)
  const void* x;         // [T, K]
  const void* A;         // [E * r, K]
  const void* B;         // [E, N, r]
  const float* gates;    // [T / seq_len, E]
  const float* scaling;  // [E]
  void* y;               // [T, N], accumulated in place
  void* H;               // [T, E * r] out
  float* partial;        // [cdiv(K, k_slice), T, E * r] scratch
  float* Hg;             // [T, E * r] scratch
  int T, K, N, E, r, seq_len;
  int k_slice;        // K columns per phase-1 slice
  int rows_per_tile;  // Hg rows staged in shared memory per phase-3 pass
  size_t smem_bytes;  // max(T * k_slice, rows_per_tile * E * r) * 4
  int num_sms;
};

// How the decode kernel cuts the work for T tokens (host-side, no CUDA calls): the caller allocates
// partial [num_slices, T, E * r] float32 and copies the fields into DecodeArgs.
struct DecodePlan {
  int k_slice;        // about K / num_sms, a multiple of 8, and x's slice [T, k_slice] fp32 within 32 KiB
  int rows_per_tile;  // Hg rows per phase-3 pass: as many as fit kMaxWidth floats
  size_t smem_bytes;
  int num_slices;  // cdiv(K, k_slice)
};
constexpr int64_t kDecodeMaxTokens = 64;
constexpr int64_t kDecodeMaxWidth = 12288;  // E * r: one Hg row in float must fit the 48 KiB of shared memory
DecodePlan plan_lora_decode(int64_t T, int64_t K, int64_t E, int64_t r, int num_sms);

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
