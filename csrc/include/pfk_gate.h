// Launchers of the gate kernels (csrc/gate/gate_kernels.cu). Plain pointers and sizes only, so the
// .cu file needs no torch headers and compiles in seconds.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "pfk_common.h"

namespace personafuse {

// Hg[t, e*r + j] = H[t, e*r + j] * scaling[e] * gates[t / seq_len, e]
//   H, Hg:   [T, E*r]   (dtype)
//   gates:   [T / seq_len, E] float32; seq_len = 1 for per-token gates, L for per-sequence gates
//   scaling: [E] float32
cudaError_t launch_gate_forward(DType dtype, const void* H, const float* gates, const float* scaling, void* Hg,
                                int64_t T, int64_t E, int64_t r, int64_t seq_len, cudaStream_t stream);

// dH[t, e*r + j]  = dHg[t, e*r + j] * scaling[e] * gates[t / seq_len, e]
// dg_tok[t, e]    = scaling[e] * sum_j dHg[t, e*r + j] * H[t, e*r + j]        (fp32)
// dgates[s, e]    = sum over the seq_len tokens t of sequence s of dg_tok[t, e] (fixed order: deterministic)
//   dHg, H, dH: [T, E*r] (dtype); gates, dgates: [T / seq_len, E] float32; dg_tok: [T, E] float32 scratch
//   (may alias dgates when seq_len == 1)
cudaError_t launch_gate_backward(DType dtype, const void* dHg, const void* H, const float* gates, const float* scaling,
                                 void* dH, float* dg_tok, float* dgates, int64_t T, int64_t E, int64_t r,
                                 int64_t seq_len, cudaStream_t stream);

// dgates[s, e] = sum_{k < seq_len} dg_tok[s * seq_len + k, e], one block per (s, e), fixed order.
cudaError_t launch_sequence_sum(const float* dg_tok, float* dgates, int64_t num_seq, int64_t E, int64_t seq_len,
                                cudaStream_t stream);

}  // namespace personafuse
