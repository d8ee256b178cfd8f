// C entry points of the emulated extension for ctypes (tests/emu.py): the launchers of csrc/ run on the CPU.
// Pointers are CPU tensors' data; the return value is the launcher's cudaError_t.
#include <cmath>
#include <string>
#include <vector>

#include "pfk_async.cuh"
#include "pfk_device.cuh"
#include "pfk_gate.h"
#include "pfk_launch.cuh"
#include "pfk_lora.h"
#include "pfk_topk.h"

using namespace personafuse;

namespace {

// The emulator's own check of its cp.async semantics: one warp streams `steps` tiles of 32 x 4 floats from src to
// dst through a 3-stage pipeline in shared memory, each thread reading back only its own copies, after a wait
// that leaves kInFlight groups outstanding (1 is right for 3 stages). With kInFlight = 2 a tile is read before it
// lands; with exit_wait false the last tiles are still in flight when the threads exit.
template <int kInFlight>
__global__ void async_probe_kernel(const float* src, float* dst, int steps, bool exit_wait) {
  alignas(16) __shared__ float buf[3][32 * 4];
  const int t = threadIdx.x;
  for (int s = 0; s < 2; ++s) {
    if (s < steps) async_copy16(&buf[s][t * 4], src + (s * 32 + t) * 4, true);
    async_commit();
  }
  for (int kt = 0; kt < steps; ++kt) {
    async_wait<kInFlight>();
    for (int i = 0; i < 4; ++i) dst[(kt * 32 + t) * 4 + i] = buf[kt % 3][t * 4 + i];
    if (kt + 2 < steps) async_copy16(&buf[(kt + 2) % 3][t * 4], src + ((kt + 2) * 32 + t) * 4, true);
    async_commit();
  }
  if (exit_wait) async_wait<0>();
}

}  // namespace

extern "C" {

int pfk_emu_async_probe(const float* src, float* dst, int steps, int in_flight, int exit_wait) {
  auto kernel = in_flight == 1 ? async_probe_kernel<1> : in_flight == 2 ? async_probe_kernel<2> : async_probe_kernel<8>;
  return launch_kernel(kernel, dim3(1), dim3(32), 0, nullptr, src, dst, steps, exit_wait != 0);
}

const char* pfk_emu_failure() { return pfk_emu::failure.c_str(); }

int pfk_emu_gate_forward(int dtype, const void* H, const float* gates, const float* scaling, void* Hg, int64_t T,
                         int64_t E, int64_t r, int64_t seq_len) {
  return launch_gate_forward(static_cast<DType>(dtype), H, gates, scaling, Hg, T, E, r, seq_len, nullptr);
}

int pfk_emu_gate_backward(int dtype, const void* dHg, const void* H, const float* gates, const float* scaling, void* dH,
                          float* dg_tok, float* dgates, int64_t T, int64_t E, int64_t r, int64_t seq_len) {
  return launch_gate_backward(static_cast<DType>(dtype), dHg, H, gates, scaling, dH, dg_tok, dgates, T, E, r, seq_len,
                              nullptr);
}

// out: k_chunk, c_chunk, smem_bytes
void pfk_emu_decode_plan(int64_t T, int64_t K, int64_t E, int64_t r, int64_t* out) {
  const DecodePlan p = plan_lora_decode(T, K, E, r);
  out[0] = p.k_chunk;
  out[1] = p.c_chunk;
  out[2] = static_cast<int64_t>(p.smem_bytes);
}

void pfk_emu_decode_cut(int with_base, int64_t T, int64_t N, int64_t K, int64_t C, int max_blocks, int64_t* out) {
  const DecodeCut c = decode_cut(with_base != 0, T, N, K, C, max_blocks);
  out[0] = c.grid;
  out[1] = c.slices;
  out[2] = c.slice_len;
  out[3] = c.partial_count;
}

// W and bias may be null (y then holds the base output and the LoRA term is added to it).
int pfk_emu_lora_decode(int dtype, int vectorized, const void* x, const void* W, const void* bias, const void* A,
                        const void* B, const float* gates, const float* scaling, void* y, void* H, void* Hg, int T,
                        int K, int N, int E, int r, int seq_len, int num_sms) {
  DecodeArgs a{};
  a.dtype = static_cast<DType>(dtype);
  a.vectorized = vectorized != 0;
  a.x = x;
  a.W = W;
  a.bias = bias;
  a.A = A;
  a.B = B;
  a.gates = gates;
  a.scaling = scaling;
  a.y = y;
  a.H = H;
  a.Hg = Hg;
  a.T = T;
  a.K = K;
  a.N = N;
  a.E = E;
  a.r = r;
  a.seq_len = seq_len;
  int64_t partial_count = 0;
  const cudaError_t err = plan_decode_launch(a, num_sms, &partial_count);
  if (err != cudaSuccess) return err;
  std::vector<float> partials(static_cast<size_t>(partial_count), std::nanf(""));  // unwritten reads show
  if (partial_count > 0) a.partials = partials.data();
  return launch_lora_decode(a, nullptr);
}

int pfk_emu_lora_shrink(int dtype, const void* x, const void* A, const float* gates, const float* scaling,
                        const int64_t* seed, void* H, void* Hg, int64_t T, int64_t K, int E, int r, int64_t seq_len,
                        float dropout_p) {
  const ShrinkArgs a{static_cast<DType>(dtype), x, A, gates, scaling, seed, H, Hg, T, K, E, r, seq_len, dropout_p};
  return launch_lora_shrink(a, nullptr);
}

int pfk_emu_lora_dhg(int dtype, const void* dy, const void* B, const void* H, const float* gates, const float* scaling,
                     void* dH, float* dg_tok, float* dgates, int64_t T, int64_t N, int E, int r, int64_t seq_len) {
  const DhgArgs a{static_cast<DType>(dtype), dy, B, H, gates, scaling, dH, dg_tok, dgates, T, N, E, r, seq_len};
  return launch_lora_dhg(a, nullptr);
}

void pfk_emu_philox(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = philox_uniform(seed, offset0 + static_cast<uint64_t>(i));
}

RoutingArgs routing(const int* sorted_pairs, const int* group_start, const int* block_group, const int* block_start,
                    int num_blocks, int block_m, int k) {
  return RoutingArgs{sorted_pairs, group_start, block_group, block_start, num_blocks, block_m, k};
}

int pfk_emu_topk_pair_gemm(int dtype, int mode, const void* X, const void* M, const float* w_pair, const float* scaling,
                           const int64_t* seed, const void* H, void* out_H, void* out, float* dw, int64_t L, int E,
                           int r, float dropout_p, const int* sorted_pairs, const int* group_start,
                           const int* block_group, const int* block_start, int num_blocks, int block_m, int k) {
  const TopkPairArgs a{static_cast<DType>(dtype),
                       mode,
                       X,
                       M,
                       w_pair,
                       scaling,
                       seed,
                       H,
                       out_H,
                       out,
                       dw,
                       L,
                       E,
                       r,
                       dropout_p,
                       routing(sorted_pairs, group_start, block_group, block_start, num_blocks, block_m, k)};
  return launch_topk_pair_gemm(a, nullptr);
}

int pfk_emu_topk_expand(int dtype, int mode, const void* X2, const void* M, void* out, const int64_t* seed,
                        int64_t n_out, int E, int r, float dropout_p, const int* sorted_pairs, const int* group_start,
                        const int* block_group, const int* block_start, int num_blocks, int block_m, int k) {
  const TopkExpandArgs a{static_cast<DType>(dtype),
                         mode,
                         X2,
                         M,
                         out,
                         seed,
                         n_out,
                         E,
                         r,
                         dropout_p,
                         routing(sorted_pairs, group_start, block_group, block_start, num_blocks, block_m, k)};
  return launch_topk_expand(a, nullptr);
}

int pfk_emu_topk_wgrad(int dtype, int mode, const void* P, const void* Q, const float* w_pair, const float* scaling,
                       const int64_t* seed, void* out, int64_t width, int E, int r, float dropout_p,
                       const int* sorted_pairs, const int* group_start, int k) {
  const TopkWgradArgs a{static_cast<DType>(dtype),
                        mode,
                        P,
                        Q,
                        w_pair,
                        scaling,
                        seed,
                        out,
                        width,
                        E,
                        r,
                        dropout_p,
                        routing(sorted_pairs, group_start, nullptr, nullptr, 0, 0, k)};
  return launch_topk_wgrad(a, nullptr);
}

}  // extern "C"
