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
  DType dtype;            // kFloat16 or kBFloat16
  bool vectorized;        // 16-byte loads of A and B rows (K % 8 == 0, k_slice % 8 == 0, 16-byte aligned bases)
  const void* x;          // [T, K]
  const void* A;          // [E * r, K]
  const void* B;          // [E, N, r]
  const float* gates;     // [T / seq_len, E]
  const float* scaling;   // [E]
  void* y;                // [T, N], accumulated in place
  void* H;                // [T, E * r] out
  float* partial;         // [cdiv(K, k_slice), T, E * r] scratch
  float* Hg;              // [T, E * r] scratch
  int T, K, N, E, r, seq_len;
  int k_slice;            // K columns per phase-1 slice
  int rows_per_tile;      // Hg rows staged in shared memory per phase-3 pass
  size_t smem_bytes;      // max(T * k_slice, rows_per_tile * E * r) * 4
  int num_sms;
};

// How the decode kernel cuts the work for T tokens (host-side, no CUDA calls): the caller allocates
// partial [num_slices, T, E * r] float32 and copies the fields into DecodeArgs.
struct DecodePlan {
  int k_slice;         // about K / num_sms, a multiple of 8, and x's slice [T, k_slice] fp32 within 32 KiB
  int rows_per_tile;   // Hg rows per phase-3 pass: as many as fit kMaxWidth floats
  size_t smem_bytes;
  int num_slices;      // cdiv(K, k_slice)
};
constexpr int64_t kDecodeMaxTokens = 64;
constexpr int64_t kDecodeMaxWidth = 12288;  // E * r: one Hg row in float must fit the 48 KiB of shared memory
DecodePlan plan_lora_decode(int64_t T, int64_t K, int64_t E, int64_t r, int num_sms);

cudaError_t launch_lora_decode(const DecodeArgs& args, cudaStream_t stream);

}  // namespace personafuse
