// Launchers of the top-k routed LoRA kernels (csrc/topk/): grouped tensor-core kernels over the routing
// metadata of personafuse_kernels/routing/topk.py. Pairs p = t * k + s (token t, slot s) are sorted by group
// g = e * k + s; block b of the metadata covers positions [block_start[b], min(block_start[b] + block_m,
// group_start[g + 1])) of sorted_pairs for g = block_group[b] (-1: an unused block). Only the k chosen experts
// of each token are computed. fp16 / bf16, 1 <= r <= kTensorCoreMaxRank (pfk_lora.h), block_m <= 64.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "pfk_common.h"

namespace personafuse {

struct RoutingArgs {
  const int* sorted_pairs;  // [P] int32
  const int* group_start;   // [E * k + 1] int32
  const int* block_group;   // [num_blocks] int32
  const int* block_start;   // [num_blocks] int32
  int num_blocks;
  int block_m;
  int k;
};

// The variants of each grouped kernel, named: the `mode` of the argument structs below is one of these (the ops
// personafuse_ops.cpp registers are one per variant, never chosen by a number).
constexpr int kPairShrink = 0;  // forward: H[p] and Hg[p]
constexpr int kPairDhg = 1;     // backward: dH[p] and dw[p]
constexpr int kExpandY = 0;     // y += Hg B_e^T
constexpr int kExpandDx = 1;    // dx += drop'(dH A_e)
constexpr int kWgradB = 0;      // dB_e [N, r]
constexpr int kWgradA = 1;      // dA_e [r, K]

// Per pair, over the long dimension L: mode 0 (forward shrink) H[p] = drop(x)[tok] A_e^T, Hg[p] = H[p] w_p s_e;
// mode 1 (backward) dHg = dy[tok] B_e, dH[p] = dHg w_p s_e, dw[p] = s_e <dHg, H[p]>.
struct TopkPairArgs {
  DType dtype;
  int mode;
  const void* X;         // [T, L]: x (mode 0, L = K) or dy (mode 1, L = N)
  const void* M;         // lora_A [E, r, K] (mode 0) or lora_B [E, N, r] (mode 1)
  const float* w_pair;   // [P] routing weights
  const float* scaling;  // [E]
  const int64_t* seed;   // [1], mode 0 with dropout_p > 0
  const void* H;         // mode 1: [P, r] saved by forward
  void* out_H;           // mode 0: H [P, r]
  void* out;             // mode 0: Hg [P, r]; mode 1: dH [P, r]
  float* dw;             // mode 1: [P]
  int64_t L;
  int E, r;
  float dropout_p;
  RoutingArgs route;
};
cudaError_t launch_topk_pair_gemm(const TopkPairArgs& args, cudaStream_t stream);

// out[tok_p, :] += d * X2[p] M_e for every pair, one launch per slot (a token appears once per slot, so rows
// never collide: no atomics, deterministic): mode 0 y += Hg B_e^T (M = lora_B [E, N, r], d = 1); mode 1
// dx += drop'(dH A_e) (M = lora_A [E, r, K], d = keep(tok, n) / (1 - p)).
struct TopkExpandArgs {
  DType dtype;
  int mode;
  const void* X2;  // [P, r]
  const void* M;
  void* out;            // [T, n_out] accumulated in place
  const int64_t* seed;  // mode 1 with dropout_p > 0
  int64_t n_out;
  int E, r;
  float dropout_p;
  RoutingArgs route;
};
cudaError_t launch_topk_expand(const TopkExpandArgs& args, cudaStream_t stream);

// Per-expert weight gradients, reduced over the expert's pairs in a fixed order (deterministic):
// mode 0 dB[e] [N, r] = sum_p dy[tok]^T (H[p] w_p s_e); mode 1 dA[e] [r, K] = sum_p dH[p]^T drop(x)[tok].
struct TopkWgradArgs {
  DType dtype;
  int mode;
  const void* P;         // mode 0: dy [T, N]; mode 1: dH [P, r]
  const void* Q;         // mode 0: H [P, r]; mode 1: x [T, K]
  const float* w_pair;   // [P]
  const float* scaling;  // [E]
  const int64_t* seed;   // mode 1 with dropout_p > 0
  void* out;             // mode 0: [E, N, r]; mode 1: [E, r, K]
  int64_t width;         // N (mode 0) or K (mode 1)
  int E, r;
  float dropout_p;
  RoutingArgs route;  // sorted_pairs, group_start and k are used
};
cudaError_t launch_topk_wgrad(const TopkWgradArgs& args, cudaStream_t stream);

}  // namespace personafuse
