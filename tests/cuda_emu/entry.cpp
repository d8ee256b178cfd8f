// C entry points of the emulated extension for ctypes (tests/emu.py): the launchers of csrc/ run on the CPU.
// Pointers are CPU tensors' data; the return value is the launcher's cudaError_t.
#include <string>

#include "pfk_device.cuh"
#include "pfk_gate.h"
#include "pfk_lora.h"

using namespace personafuse;

extern "C" {

const char* pfk_emu_failure() { return pfk_emu::failure.c_str(); }

int pfk_emu_gate_forward(int dtype, const void* H, const float* gates, const float* scaling, void* Hg, int64_t T,
                         int64_t E, int64_t r, int64_t seq_len) {
  return launch_gate_forward(static_cast<DType>(dtype), H, gates, scaling, Hg, T, E, r, seq_len, nullptr);
}

int pfk_emu_gate_backward(int dtype, const void* dHg, const void* H, const float* gates, const float* scaling,
                          void* dH, float* dg_tok, float* dgates, int64_t T, int64_t E, int64_t r, int64_t seq_len) {
  return launch_gate_backward(static_cast<DType>(dtype), dHg, H, gates, scaling, dH, dg_tok, dgates, T, E, r,
                              seq_len, nullptr);
}

// out: k_slice, rows_per_tile, smem_bytes, num_slices
void pfk_emu_decode_plan(int64_t T, int64_t K, int64_t E, int64_t r, int num_sms, int64_t* out) {
  const DecodePlan p = plan_lora_decode(T, K, E, r, num_sms);
  out[0] = p.k_slice;
  out[1] = p.rows_per_tile;
  out[2] = static_cast<int64_t>(p.smem_bytes);
  out[3] = p.num_slices;
}

int pfk_emu_lora_decode(int dtype, int vectorized, const void* x, const void* A, const void* B, const float* gates,
                        const float* scaling, void* y, void* H, float* partial, float* Hg, int T, int K, int N, int E,
                        int r, int seq_len, int num_sms) {
  const DecodePlan p = plan_lora_decode(T, K, E, r, num_sms);
  DecodeArgs a{};
  a.dtype = static_cast<DType>(dtype);
  a.vectorized = vectorized != 0;
  a.x = x;
  a.A = A;
  a.B = B;
  a.gates = gates;
  a.scaling = scaling;
  a.y = y;
  a.H = H;
  a.partial = partial;
  a.Hg = Hg;
  a.T = T;
  a.K = K;
  a.N = N;
  a.E = E;
  a.r = r;
  a.seq_len = seq_len;
  a.k_slice = p.k_slice;
  a.rows_per_tile = p.rows_per_tile;
  a.smem_bytes = p.smem_bytes;
  a.num_sms = num_sms;
  return launch_lora_decode(a, nullptr);
}

int pfk_emu_lora_shrink(int dtype, const void* x, const void* A, const float* gates, const float* scaling,
                        const int64_t* seed, void* H, void* Hg, int64_t T, int64_t K, int E, int r, int64_t seq_len,
                        float dropout_p) {
  const ShrinkArgs a{static_cast<DType>(dtype), x, A, gates, scaling, seed, H, Hg, T, K, E, r, seq_len, dropout_p};
  return launch_lora_shrink(a, nullptr);
}

int pfk_emu_lora_dhg(int dtype, const void* dy, const void* B, const void* H, const float* gates,
                     const float* scaling, void* dH, float* dg_tok, float* dgates, int64_t T, int64_t N, int E, int r,
                     int64_t seq_len) {
  const DhgArgs a{static_cast<DType>(dtype), dy, B, H, gates, scaling, dH, dg_tok, dgates, T, N, E, r, seq_len};
  return launch_lora_dhg(a, nullptr);
}

void pfk_emu_philox(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = philox_uniform(seed, offset0 + static_cast<uint64_t>(i));
}

}  // extern "C"
