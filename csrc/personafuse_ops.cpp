// personafuse_kernels._C: the one registration file of the CUDA extension.
// Declares the `personafuse` ops with TORCH_LIBRARY and binds their CUDA kernels with TORCH_LIBRARY_IMPL.
// The Python package registers its own high-level ops (routed_lora_forward/backward) as fragments of the
// same namespace with torch.library.custom_op.
// Built with PFK_CUDA_EMULATION (tests/emu.py), the same file registers the same ops as `personafuse_emu` for CPU
// tensors on top of the emulated CUDA runtime of tests/cuda_emu, so CI runs this glue too.
#include <Python.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#ifdef PFK_CUDA_EMULATION
#include "pfk_emu_torch.h"  // CUDAGuard and the current stream, stood in for on the CPU
#define PFK_LIBRARY personafuse_emu
#define PFK_DISPATCH_KEY CPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define PFK_LIBRARY personafuse
#define PFK_DISPATCH_KEY CUDA
#endif
// One level of indirection so that the macros above expand before TORCH_LIBRARY pastes its arguments.
#define PFK_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define PFK_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

#include "pfk_checks.h"
#include "pfk_gate.h"
#include "pfk_lora.h"
#include "pfk_topk.h"

namespace personafuse {
namespace {

DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_gate_args(const at::Tensor& H, const at::Tensor& gates, const at::Tensor& scaling, int64_t E,
                     int64_t seq_len) {
  PFK_CHECK_INPUT(H);
  PFK_CHECK_INPUT(gates);
  PFK_CHECK_INPUT(scaling);
  PFK_CHECK_DIM(H, 2);      // [T, E*r]
  PFK_CHECK_DIM(gates, 2);  // [T / seq_len, E]
  PFK_CHECK_DTYPE(gates, at::kFloat);
  PFK_CHECK_DTYPE(scaling, at::kFloat);
  TORCH_CHECK(E > 0, "gates must have at least one expert column, got shape ", gates.sizes());
  TORCH_CHECK(seq_len >= 1, "seq_len must be >= 1, got ", seq_len);
  const int64_t T = H.size(0);
  TORCH_CHECK(H.size(1) % E == 0, "H's width ", H.size(1), " is not a multiple of the expert count ", E);
  TORCH_CHECK(T % seq_len == 0, "T = ", T, " tokens is not a multiple of seq_len = ", seq_len);
  PFK_CHECK_SHAPE(gates, T / seq_len, E);
  PFK_CHECK_SHAPE(scaling, E);
  TORCH_CHECK(gates.device() == H.device() && scaling.device() == H.device(),
              "H, gates and scaling must be on one device, got ", H.device(), ", ", gates.device(), ", ",
              scaling.device());
}

// Hg = H * scaling[e] * gates[t / seq_len, e]
at::Tensor gate_forward(const at::Tensor& H,        // [T, E*r]
                        const at::Tensor& gates,    // [T / seq_len, E] float32
                        const at::Tensor& scaling,  // [E] float32
                        int64_t seq_len) {
  const int64_t E = gates.dim() == 2 ? gates.size(1) : 0;
  check_gate_args(H, gates, scaling, E, seq_len);
  const DType dtype = to_dtype(H, "H");
  const c10::cuda::CUDAGuard guard(H.device());
  at::Tensor Hg = at::empty_like(H);
  const int64_t T = H.size(0);
  const cudaError_t err =
      launch_gate_forward(dtype, H.data_ptr(), gates.data_ptr<float>(), scaling.data_ptr<float>(), Hg.data_ptr(), T, E,
                          H.size(1) / E, seq_len, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse gate_forward launch failed: ", cudaGetErrorString(err));
  return Hg;
}

// (dH, dgates) with dH = dHg * scaling[e] * g, dgates[s, e] = sum_{t in s} scaling[e] * <dHg[t, e, :], H[t, e, :]>
std::tuple<at::Tensor, at::Tensor> gate_backward(const at::Tensor& dHg,      // [T, E*r]
                                                 const at::Tensor& H,        // [T, E*r]
                                                 const at::Tensor& gates,    // [T / seq_len, E] float32
                                                 const at::Tensor& scaling,  // [E] float32
                                                 int64_t seq_len) {
  const int64_t E = gates.dim() == 2 ? gates.size(1) : 0;
  check_gate_args(H, gates, scaling, E, seq_len);
  PFK_CHECK_INPUT(dHg);
  TORCH_CHECK(dHg.sizes() == H.sizes(), "dHg must have H's shape ", H.sizes(), ", got ", dHg.sizes());
  TORCH_CHECK(dHg.scalar_type() == H.scalar_type(), "dHg and H must share a dtype, got ", dHg.scalar_type(), " and ",
              H.scalar_type());
  const DType dtype = to_dtype(H, "H");
  const c10::cuda::CUDAGuard guard(H.device());
  const int64_t T = H.size(0);
  at::Tensor dH = at::empty_like(H);
  at::Tensor dgates = at::empty({T / seq_len, E}, gates.options());
  at::Tensor dg_tok = seq_len == 1 ? dgates : at::empty({T, E}, gates.options());
  const cudaError_t err =
      launch_gate_backward(dtype, dHg.data_ptr(), H.data_ptr(), gates.data_ptr<float>(), scaling.data_ptr<float>(),
                           dH.data_ptr(), dg_tok.data_ptr<float>(), dgates.data_ptr<float>(), T, E, H.size(1) / E,
                           seq_len, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse gate_backward launch failed: ", cudaGetErrorString(err));
  return {dH, dgates};
}

// Streaming multiprocessors of a device, asked of the driver once per device (not on every decode step).
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int n = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
              "cudaDeviceGetAttribute failed");
  if (device >= 0 && device < static_cast<int>(cache.size())) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// The decode launch (T <= 64) for y [T, N]: with weight (defined), y = x W^T + b + LoRA term (W streamed once);
// without, y += LoRA term. Returns H [T, E*r] (kept for backward). op names the caller in error messages.
at::Tensor run_decode(const char* op, at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                      const at::Tensor& gates, const at::Tensor& scaling, int64_t seq_len) {
  std::vector<const at::Tensor*> all{&y, &x, &lora_A, &lora_B, &gates, &scaling};
  if (weight.defined()) all.push_back(&weight);
  if (bias.defined()) all.push_back(&bias);
  for (const at::Tensor* t : all) {
    TORCH_CHECK(PFK_ON_DEVICE(*t) && t->is_contiguous(), op, ": every tensor must be a contiguous CUDA tensor");
  }
  PFK_CHECK_DIM(x, 2);
  PFK_CHECK_DIM(y, 2);
  PFK_CHECK_DIM(lora_A, 3);
  PFK_CHECK_DIM(lora_B, 3);
  const int64_t T = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t E = lora_A.size(0), r = lora_A.size(1), C = E * r;
  TORCH_CHECK(T >= 1 && T <= kDecodeMaxTokens, op, " is for 1 to ", kDecodeMaxTokens, " tokens, got ", T);
  TORCH_CHECK(C <= kDecodeMaxWidth, op, " needs E * r <= ", kDecodeMaxWidth, ", got ", C);
  PFK_CHECK_SHAPE(y, T, N);
  PFK_CHECK_SHAPE(lora_A, E, r, K);
  PFK_CHECK_SHAPE(lora_B, E, N, r);
  if (weight.defined()) PFK_CHECK_SHAPE(weight, N, K);
  if (bias.defined()) {
    TORCH_CHECK(weight.defined(), op, ": a bias comes with the weight");
    PFK_CHECK_SHAPE(bias, N);
  }
  TORCH_CHECK(seq_len >= 1 && T % seq_len == 0, "seq_len must divide T = ", T, ", got ", seq_len);
  PFK_CHECK_SHAPE(gates, T / seq_len, E);
  PFK_CHECK_SHAPE(scaling, E);
  PFK_CHECK_DTYPE(gates, at::kFloat);
  PFK_CHECK_DTYPE(scaling, at::kFloat);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              " supports float16 and bfloat16, got ", x.scalar_type());
  const char* operands = weight.defined() ? "y, weight, bias, lora_A and lora_B" : "y, lora_A and lora_B";
  for (const at::Tensor* t : all) {
    if (t == &gates || t == &scaling) continue;
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", operands, " must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  DecodeArgs a{};
  a.dtype = to_dtype(x, "x");
  a.vectorized =
      K % 8 == 0 && aligned(x) && aligned(lora_A) && aligned(lora_B) && (!weight.defined() || aligned(weight));
  a.x = x.data_ptr();
  a.W = weight.defined() ? weight.data_ptr() : nullptr;
  a.bias = bias.defined() ? bias.data_ptr() : nullptr;
  a.A = lora_A.data_ptr();
  a.B = lora_B.data_ptr();
  a.gates = gates.data_ptr<float>();
  a.scaling = scaling.data_ptr<float>();
  a.y = y.data_ptr();
  a.T = static_cast<int>(T);
  a.K = static_cast<int>(K);
  a.N = static_cast<int>(N);
  a.E = static_cast<int>(E);
  a.r = static_cast<int>(r);
  a.seq_len = static_cast<int>(seq_len);
  int64_t partial_count = 0;
  const cudaError_t planned = plan_decode_launch(a, sm_count(x.device().index()), &partial_count);
  TORCH_CHECK(planned == cudaSuccess, "personafuse ", op, ": occupancy query failed: ", cudaGetErrorString(planned));
  // one allocation: H and the Hg scratch, [T, C] each in x's dtype, then the slices' fp32 partial sums (each part
  // starting on a 16-byte boundary)
  auto round16 = [](int64_t bytes) { return (bytes + 15) / 16 * 16; };
  const int64_t hc_bytes = T * C * x.element_size();
  const int64_t partial_at = 2 * round16(hc_bytes);
  at::Tensor storage =
      at::empty({partial_at + partial_count * static_cast<int64_t>(sizeof(float))}, x.options().dtype(at::kByte));
  at::Tensor H = storage.narrow(0, 0, hc_bytes).view(x.scalar_type()).view({T, C});
  char* base = static_cast<char*>(storage.data_ptr());
  a.H = base;
  a.Hg = base + round16(hc_bytes);
  if (partial_count > 0) a.partials = reinterpret_cast<float*>(base + partial_at);
  const cudaError_t err = launch_lora_decode(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse ", op, " launch failed: ", cudaGetErrorString(err));
  return H;
}

// y += LoRA term for T <= 64 in one launch (y computed by someone else: a quantized base, an accumulator);
// returns H [T, E*r].
at::Tensor lora_decode_(at::Tensor& y,              // [T, N]
                        const at::Tensor& x,        // [T, K]
                        const at::Tensor& lora_A,   // [E, r, K]
                        const at::Tensor& lora_B,   // [E, N, r]
                        const at::Tensor& gates,    // [T / seq_len, E] float32
                        const at::Tensor& scaling,  // [E] float32
                        int64_t seq_len) {
  return run_decode("lora_decode_", y, x, at::Tensor(), at::Tensor(), lora_A, lora_B, gates, scaling, seq_len);
}

// The whole routed linear for T <= 64 in one launch: (y = x W^T + b + LoRA term [T, N], H [T, E*r]).
std::tuple<at::Tensor, at::Tensor> lora_decode_linear(const at::Tensor& x,                    // [T, K]
                                                      const at::Tensor& weight,               // [N, K]
                                                      const c10::optional<at::Tensor>& bias,  // [N]
                                                      const at::Tensor& lora_A,               // [E, r, K]
                                                      const at::Tensor& lora_B,               // [E, N, r]
                                                      const at::Tensor& gates,    // [T / seq_len, E] float32
                                                      const at::Tensor& scaling,  // [E] float32
                                                      int64_t seq_len) {
  PFK_CHECK_DIM(x, 2);
  PFK_CHECK_DIM(weight, 2);
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  at::Tensor H = run_decode("lora_decode_linear", y, x, weight, bias.has_value() ? *bias : at::Tensor(), lora_A, lora_B,
                            gates, scaling, seq_len);
  return {y, H};
}

void check_low_precision_operands(const at::Tensor& ref, std::initializer_list<const at::Tensor*> same_dtype,
                                  const char* op) {
  TORCH_CHECK(ref.scalar_type() == at::kHalf || ref.scalar_type() == at::kBFloat16, op,
              " supports float16 and bfloat16, got ", ref.scalar_type());
  for (const at::Tensor* t : same_dtype) {
    TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": every operand must have dtype ", ref.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == ref.device(), op, ": every operand must be on ", ref.device(), ", got ", t->device());
  }
}

void check_rank(int64_t r, const char* op) {
  TORCH_CHECK(r >= 1 && r <= kTensorCoreMaxRank, op, " supports ranks 1 to ", kTensorCoreMaxRank, ", got ", r);
}

// The device seed of the dropout mask: checked and returned when dropout_p > 0, nullptr when it is 0.
const int64_t* seed_ptr(const at::Tensor& seed, const at::Tensor& ref, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return nullptr;
  TORCH_CHECK(
      PFK_ON_DEVICE(seed) && seed.scalar_type() == at::kLong && seed.numel() >= 1 && seed.device() == ref.device(),
      "dropout needs a one-element int64 seed on ", ref.device());
  return seed.data_ptr<int64_t>();
}

// Large-T forward shrink on tensor cores: (H, Hg), H = drop(x) A_cat^T, Hg = H * (gates * scaling).
std::tuple<at::Tensor, at::Tensor> lora_shrink(const at::Tensor& x,        // [T, K]
                                               const at::Tensor& lora_A,   // [E, r, K]
                                               const at::Tensor& gates,    // [T / seq_len, E] float32
                                               const at::Tensor& scaling,  // [E] float32
                                               const at::Tensor& seed,     // int64 [1] (or [0] when p == 0)
                                               int64_t seq_len, double dropout_p) {
  PFK_CHECK_INPUT(x);
  PFK_CHECK_INPUT(lora_A);
  PFK_CHECK_DIM(x, 2);
  PFK_CHECK_DIM(lora_A, 3);
  const int64_t T = x.size(0), K = x.size(1), E = lora_A.size(0), r = lora_A.size(1);
  PFK_CHECK_SHAPE(lora_A, E, r, K);
  check_rank(r, "lora_shrink");
  check_low_precision_operands(x, {&lora_A}, "lora_shrink");
  const int64_t* seed_data = seed_ptr(seed, x, dropout_p);
  at::Tensor H = at::empty({T, E * r}, x.options());
  check_gate_args(H, gates, scaling, E, seq_len);
  at::Tensor Hg = at::empty_like(H);
  const c10::cuda::CUDAGuard guard(x.device());
  const ShrinkArgs a{to_dtype(x, "x"),
                     x.data_ptr(),
                     lora_A.data_ptr(),
                     gates.data_ptr<float>(),
                     scaling.data_ptr<float>(),
                     seed_data,
                     H.data_ptr(),
                     Hg.data_ptr(),
                     T,
                     K,
                     static_cast<int>(E),
                     static_cast<int>(r),
                     seq_len,
                     static_cast<float>(dropout_p)};
  const cudaError_t err = launch_lora_shrink(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse lora_shrink launch failed: ", cudaGetErrorString(err));
  return {H, Hg};
}

// Large-T backward of the gate fused with dHg = dy B_cat on tensor cores: (dH, dgates).
std::tuple<at::Tensor, at::Tensor> lora_dhg(const at::Tensor& dy,       // [T, N]
                                            const at::Tensor& lora_B,   // [E, N, r]
                                            const at::Tensor& H,        // [T, E * r]
                                            const at::Tensor& gates,    // [T / seq_len, E] float32
                                            const at::Tensor& scaling,  // [E] float32
                                            int64_t seq_len) {
  PFK_CHECK_INPUT(dy);
  PFK_CHECK_INPUT(lora_B);
  PFK_CHECK_DIM(dy, 2);
  PFK_CHECK_DIM(lora_B, 3);
  const int64_t T = dy.size(0), N = dy.size(1), E = lora_B.size(0), r = lora_B.size(2);
  PFK_CHECK_SHAPE(lora_B, E, N, r);
  check_rank(r, "lora_dhg");
  check_gate_args(H, gates, scaling, E, seq_len);
  PFK_CHECK_SHAPE(H, T, E * r);
  check_low_precision_operands(dy, {&lora_B, &H}, "lora_dhg");
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dH = at::empty_like(H);
  at::Tensor dgates = at::empty({T / seq_len, E}, gates.options());
  at::Tensor dg_tok = seq_len == 1 ? dgates : at::empty({T, E}, gates.options());
  const DhgArgs a{to_dtype(dy, "dy"),
                  dy.data_ptr(),
                  lora_B.data_ptr(),
                  H.data_ptr(),
                  gates.data_ptr<float>(),
                  scaling.data_ptr<float>(),
                  dH.data_ptr(),
                  dg_tok.data_ptr<float>(),
                  dgates.data_ptr<float>(),
                  T,
                  N,
                  static_cast<int>(E),
                  static_cast<int>(r),
                  seq_len};
  const cudaError_t err = launch_lora_dhg(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse lora_dhg launch failed: ", cudaGetErrorString(err));
  return {dH, dgates};
}

// ---- top-k routed LoRA (csrc/topk/) ----

RoutingArgs routing_args(const at::Tensor& ref, const at::Tensor& sorted_pairs, const at::Tensor& group_start,
                         const at::Tensor* block_group, const at::Tensor* block_start, int64_t block_m, int64_t k,
                         int64_t num_pairs, int64_t num_experts) {
  using Ptrs = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : Ptrs{&sorted_pairs, &group_start, block_group, block_start}) {
    if (!t) continue;
    TORCH_CHECK(PFK_ON_DEVICE(*t) && t->is_contiguous() && t->device() == ref.device() && t->dim() == 1 &&
                    t->scalar_type() == at::kInt,
                "routing metadata must be contiguous 1-D int32 tensors on ", ref.device(),
                " (personafuse_kernels.routing.topk.build_routing_metadata)");
  }
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(sorted_pairs.numel() == num_pairs, "sorted_pairs has ", sorted_pairs.numel(),
              " entries, expected T * k = ", num_pairs);
  if (num_experts > 0) {
    TORCH_CHECK(group_start.numel() == num_experts * k + 1, "group_start must have E * k + 1 = ", num_experts * k + 1,
                " entries, got ", group_start.numel());
  }
  RoutingArgs rt{sorted_pairs.data_ptr<int>(), group_start.data_ptr<int>(), nullptr, nullptr, 0,
                 static_cast<int>(block_m),    static_cast<int>(k)};
  if (block_group) {
    TORCH_CHECK(block_start && block_group->numel() == block_start->numel(),
                "block_group and block_start must have the same length");
    TORCH_CHECK(block_m >= 1 && block_m <= 64, "block_m must be in [1, 64] for the cuda backend, got ", block_m);
    rt.block_group = block_group->data_ptr<int>();
    rt.block_start = block_start->data_ptr<int>();
    rt.num_blocks = static_cast<int>(block_group->numel());
  }
  return rt;
}

void check_routing_weights(const at::Tensor& w_pair, const at::Tensor& scaling, const at::Tensor& ref, int64_t P,
                           int64_t E) {
  PFK_CHECK_INPUT(w_pair);
  PFK_CHECK_INPUT(scaling);
  PFK_CHECK_DTYPE(w_pair, at::kFloat);
  PFK_CHECK_DTYPE(scaling, at::kFloat);
  PFK_CHECK_SHAPE(w_pair, P);
  PFK_CHECK_SHAPE(scaling, E);
  TORCH_CHECK(w_pair.device() == ref.device() && scaling.device() == ref.device(), "w_pair and scaling must be on ",
              ref.device());
}

// kPairShrink: (H, Hg) [P, r] from X = x [T, K], M = lora_A [E, r, K]; kPairDhg: (dH [P, r], dw [P] float32)
// from X = dy [T, N], M = lora_B [E, N, r] and H. Behind topk_pair_shrink and topk_pair_dhg.
std::tuple<at::Tensor, at::Tensor> topk_pair_gemm(int mode, const at::Tensor& X, const at::Tensor& M,
                                                  const at::Tensor& w_pair, const at::Tensor& scaling,
                                                  const at::Tensor& seed, const c10::optional<at::Tensor>& H,
                                                  const at::Tensor& sorted_pairs, const at::Tensor& group_start,
                                                  const at::Tensor& block_group, const at::Tensor& block_start,
                                                  int64_t block_m, int64_t k, double dropout_p) {
  const char* op = mode == kPairShrink ? "topk_pair_shrink" : "topk_pair_dhg";
  PFK_CHECK_INPUT(X);
  PFK_CHECK_INPUT(M);
  PFK_CHECK_DIM(X, 2);
  PFK_CHECK_DIM(M, 3);
  const int64_t T = X.size(0), L = X.size(1), E = M.size(0), P = T * k;
  const int64_t r = mode == kPairShrink ? M.size(1) : M.size(2);
  if (mode == kPairShrink) {
    PFK_CHECK_SHAPE(M, E, r, L);
  } else {
    PFK_CHECK_SHAPE(M, E, L, r);
  }
  check_rank(r, op);
  check_low_precision_operands(X, {&M}, op);
  check_routing_weights(w_pair, scaling, X, P, E);
  const RoutingArgs rt = routing_args(X, sorted_pairs, group_start, &block_group, &block_start, block_m, k, P, E);
  const c10::cuda::CUDAGuard guard(X.device());
  TopkPairArgs a{to_dtype(X, "X"),
                 static_cast<int>(mode),
                 X.data_ptr(),
                 M.data_ptr(),
                 w_pair.data_ptr<float>(),
                 scaling.data_ptr<float>(),
                 nullptr,
                 nullptr,
                 nullptr,
                 nullptr,
                 nullptr,
                 L,
                 static_cast<int>(E),
                 static_cast<int>(r),
                 0.f,
                 rt};
  at::Tensor first, second;
  if (mode == kPairShrink) {
    a.seed = seed_ptr(seed, X, dropout_p);
    a.dropout_p = static_cast<float>(dropout_p);
    first = at::empty({P, r}, X.options());
    second = at::empty({P, r}, X.options());
    a.out_H = first.data_ptr();
    a.out = second.data_ptr();
  } else {
    TORCH_CHECK(H.has_value(), "topk_pair_dhg needs H");
    PFK_CHECK_INPUT((*H));
    PFK_CHECK_SHAPE((*H), P, r);
    check_low_precision_operands(X, {&*H}, op);
    a.H = H->data_ptr();
    first = at::empty({P, r}, X.options());
    second = at::zeros({P}, w_pair.options());  // a pair in no group (index -1: no adapter) keeps dw = 0
    a.out = first.data_ptr();
    a.dw = second.data_ptr<float>();
  }
  const cudaError_t err = launch_topk_pair_gemm(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse ", op, " launch failed: ", cudaGetErrorString(err));
  return {first, second};
}

// out [T, n_out] += the grouped expand: kExpandY Hg B_e^T (M = lora_B [E, N, r]); kExpandDx drop'(dH A_e)
// (M = lora_A [E, r, K]). Behind topk_expand_y_ and topk_expand_dx_.
void topk_expand(at::Tensor& out, int mode, const at::Tensor& X2, const at::Tensor& M, const at::Tensor& seed,
                 const at::Tensor& sorted_pairs, const at::Tensor& group_start, const at::Tensor& block_group,
                 const at::Tensor& block_start, int64_t block_m, int64_t k, double dropout_p) {
  const char* op = mode == kExpandY ? "topk_expand_y_" : "topk_expand_dx_";
  PFK_CHECK_INPUT(out);
  PFK_CHECK_INPUT(X2);
  PFK_CHECK_INPUT(M);
  PFK_CHECK_DIM(out, 2);
  PFK_CHECK_DIM(X2, 2);
  PFK_CHECK_DIM(M, 3);
  const int64_t T = out.size(0), n_out = out.size(1), E = M.size(0), r = X2.size(1);
  if (mode == kExpandY) {
    PFK_CHECK_SHAPE(M, E, n_out, r);
  } else {
    PFK_CHECK_SHAPE(M, E, r, n_out);
  }
  PFK_CHECK_SHAPE(X2, T * k, r);
  check_rank(r, op);
  check_low_precision_operands(out, {&X2, &M}, op);
  const RoutingArgs rt = routing_args(out, sorted_pairs, group_start, &block_group, &block_start, block_m, k, T * k, E);
  const c10::cuda::CUDAGuard guard(out.device());
  const TopkExpandArgs a{to_dtype(out, "out"),
                         static_cast<int>(mode),
                         X2.data_ptr(),
                         M.data_ptr(),
                         out.data_ptr(),
                         mode == kExpandDx ? seed_ptr(seed, out, dropout_p) : nullptr,
                         n_out,
                         static_cast<int>(E),
                         static_cast<int>(r),
                         mode == kExpandDx ? static_cast<float>(dropout_p) : 0.f,
                         rt};
  const cudaError_t err = launch_topk_expand(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse ", op, " launch failed: ", cudaGetErrorString(err));
}

// kWgradB: dB [E, N, r] from P = dy [T, N], Q = H [T * k, r]; kWgradA: dA [E, r, K] from P = dH [T * k, r],
// Q = x [T, K]. Behind topk_wgrad_B and topk_wgrad_A.
at::Tensor topk_wgrad(int mode, const at::Tensor& P, const at::Tensor& Q, const at::Tensor& w_pair,
                      const at::Tensor& scaling, const at::Tensor& seed, const at::Tensor& sorted_pairs,
                      const at::Tensor& group_start, int64_t num_experts, int64_t k, double dropout_p) {
  const char* op = mode == kWgradB ? "topk_wgrad_B" : "topk_wgrad_A";
  PFK_CHECK_INPUT(P);
  PFK_CHECK_INPUT(Q);
  PFK_CHECK_DIM(P, 2);
  PFK_CHECK_DIM(Q, 2);
  const at::Tensor& tokens = mode == kWgradB ? P : Q;  // [T, width]
  const at::Tensor& pairs = mode == kWgradB ? Q : P;   // [T * k, r]
  const int64_t T = tokens.size(0), width = tokens.size(1), r = pairs.size(1), E = num_experts;
  PFK_CHECK_SHAPE(pairs, T * k, r);
  TORCH_CHECK(E >= 1, "num_experts must be >= 1, got ", E);
  check_rank(r, op);
  check_low_precision_operands(P, {&Q}, op);
  check_routing_weights(w_pair, scaling, P, T * k, E);
  const RoutingArgs rt = routing_args(P, sorted_pairs, group_start, nullptr, nullptr, 0, k, T * k, E);
  const c10::cuda::CUDAGuard guard(P.device());
  at::Tensor out = mode == kWgradB ? at::empty({E, width, r}, P.options()) : at::empty({E, r, width}, P.options());
  const TopkWgradArgs a{to_dtype(P, "P"),
                        static_cast<int>(mode),
                        P.data_ptr(),
                        Q.data_ptr(),
                        w_pair.data_ptr<float>(),
                        scaling.data_ptr<float>(),
                        mode == kWgradA ? seed_ptr(seed, P, dropout_p) : nullptr,
                        out.data_ptr(),
                        width,
                        static_cast<int>(E),
                        static_cast<int>(r),
                        mode == kWgradA ? static_cast<float>(dropout_p) : 0.f,
                        rt};
  const cudaError_t err = launch_topk_wgrad(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse ", op, " launch failed: ", cudaGetErrorString(err));
  return out;
}

// The registered ops, one per variant (none is chosen by an integer mode). Shapes as above.
std::tuple<at::Tensor, at::Tensor> topk_pair_shrink(const at::Tensor& x, const at::Tensor& lora_A,
                                                    const at::Tensor& w_pair, const at::Tensor& scaling,
                                                    const at::Tensor& seed, const at::Tensor& sorted_pairs,
                                                    const at::Tensor& group_start, const at::Tensor& block_group,
                                                    const at::Tensor& block_start, int64_t block_m, int64_t k,
                                                    double dropout_p) {
  return topk_pair_gemm(kPairShrink, x, lora_A, w_pair, scaling, seed, c10::nullopt, sorted_pairs, group_start,
                        block_group, block_start, block_m, k, dropout_p);
}

std::tuple<at::Tensor, at::Tensor> topk_pair_dhg(const at::Tensor& dy, const at::Tensor& lora_B,
                                                 const at::Tensor& w_pair, const at::Tensor& scaling,
                                                 const at::Tensor& H, const at::Tensor& sorted_pairs,
                                                 const at::Tensor& group_start, const at::Tensor& block_group,
                                                 const at::Tensor& block_start, int64_t block_m, int64_t k) {
  const at::Tensor no_seed;
  return topk_pair_gemm(kPairDhg, dy, lora_B, w_pair, scaling, no_seed, H, sorted_pairs, group_start, block_group,
                        block_start, block_m, k, 0.0);
}

void topk_expand_y_(at::Tensor& y, const at::Tensor& Hg, const at::Tensor& lora_B, const at::Tensor& sorted_pairs,
                    const at::Tensor& group_start, const at::Tensor& block_group, const at::Tensor& block_start,
                    int64_t block_m, int64_t k) {
  const at::Tensor no_seed;
  topk_expand(y, kExpandY, Hg, lora_B, no_seed, sorted_pairs, group_start, block_group, block_start, block_m, k, 0.0);
}

void topk_expand_dx_(at::Tensor& dx, const at::Tensor& dH, const at::Tensor& lora_A, const at::Tensor& seed,
                     const at::Tensor& sorted_pairs, const at::Tensor& group_start, const at::Tensor& block_group,
                     const at::Tensor& block_start, int64_t block_m, int64_t k, double dropout_p) {
  topk_expand(dx, kExpandDx, dH, lora_A, seed, sorted_pairs, group_start, block_group, block_start, block_m, k,
              dropout_p);
}

at::Tensor topk_wgrad_B(const at::Tensor& dy, const at::Tensor& H, const at::Tensor& w_pair, const at::Tensor& scaling,
                        const at::Tensor& sorted_pairs, const at::Tensor& group_start, int64_t num_experts, int64_t k) {
  const at::Tensor no_seed;
  return topk_wgrad(kWgradB, dy, H, w_pair, scaling, no_seed, sorted_pairs, group_start, num_experts, k, 0.0);
}

at::Tensor topk_wgrad_A(const at::Tensor& dH, const at::Tensor& x, const at::Tensor& w_pair, const at::Tensor& scaling,
                        const at::Tensor& seed, const at::Tensor& sorted_pairs, const at::Tensor& group_start,
                        int64_t num_experts, int64_t k, double dropout_p) {
  return topk_wgrad(kWgradA, dH, x, w_pair, scaling, seed, sorted_pairs, group_start, num_experts, k, dropout_p);
}

}  // namespace
}  // namespace personafuse

PFK_TORCH_LIBRARY(PFK_LIBRARY, m) {
  m.def("gate_forward(Tensor H, Tensor gates, Tensor scaling, int seq_len) -> Tensor");
  m.def("gate_backward(Tensor dHg, Tensor H, Tensor gates, Tensor scaling, int seq_len) -> (Tensor, Tensor)");
  m.def(
      "lora_decode_(Tensor(a!) y, Tensor x, Tensor lora_A, Tensor lora_B, Tensor gates, Tensor scaling, "
      "int seq_len) -> Tensor");
  m.def(
      "lora_decode_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor gates, "
      "Tensor scaling, int seq_len) -> (Tensor, Tensor)");
  m.def(
      "lora_shrink(Tensor x, Tensor lora_A, Tensor gates, Tensor scaling, Tensor seed, int seq_len, "
      "float dropout_p) -> (Tensor, Tensor)");
  m.def("lora_dhg(Tensor dy, Tensor lora_B, Tensor H, Tensor gates, Tensor scaling, int seq_len) -> (Tensor, Tensor)");
  m.def(
      "topk_pair_shrink(Tensor x, Tensor lora_A, Tensor w_pair, Tensor scaling, Tensor seed, Tensor sorted_pairs, "
      "Tensor group_start, Tensor block_group, Tensor block_start, int block_m, int k, float dropout_p) "
      "-> (Tensor, Tensor)");
  m.def(
      "topk_pair_dhg(Tensor dy, Tensor lora_B, Tensor w_pair, Tensor scaling, Tensor H, Tensor sorted_pairs, "
      "Tensor group_start, Tensor block_group, Tensor block_start, int block_m, int k) -> (Tensor, Tensor)");
  m.def(
      "topk_expand_y_(Tensor(a!) y, Tensor Hg, Tensor lora_B, Tensor sorted_pairs, Tensor group_start, "
      "Tensor block_group, Tensor block_start, int block_m, int k) -> ()");
  m.def(
      "topk_expand_dx_(Tensor(a!) dx, Tensor dH, Tensor lora_A, Tensor seed, Tensor sorted_pairs, "
      "Tensor group_start, Tensor block_group, Tensor block_start, int block_m, int k, float dropout_p) -> ()");
  m.def(
      "topk_wgrad_B(Tensor dy, Tensor H, Tensor w_pair, Tensor scaling, Tensor sorted_pairs, Tensor group_start, "
      "int num_experts, int k) -> Tensor");
  m.def(
      "topk_wgrad_A(Tensor dH, Tensor x, Tensor w_pair, Tensor scaling, Tensor seed, Tensor sorted_pairs, "
      "Tensor group_start, int num_experts, int k, float dropout_p) -> Tensor");
}

PFK_TORCH_LIBRARY_IMPL(PFK_LIBRARY, PFK_DISPATCH_KEY, m) {
  m.impl("gate_forward", &personafuse::gate_forward);
  m.impl("gate_backward", &personafuse::gate_backward);
  m.impl("lora_decode_", &personafuse::lora_decode_);
  m.impl("lora_decode_linear", &personafuse::lora_decode_linear);
  m.impl("lora_shrink", &personafuse::lora_shrink);
  m.impl("lora_dhg", &personafuse::lora_dhg);
  m.impl("topk_pair_shrink", &personafuse::topk_pair_shrink);
  m.impl("topk_pair_dhg", &personafuse::topk_pair_dhg);
  m.impl("topk_expand_y_", &personafuse::topk_expand_y_);
  m.impl("topk_expand_dx_", &personafuse::topk_expand_dx_);
  m.impl("topk_wgrad_B", &personafuse::topk_wgrad_B);
  m.impl("topk_wgrad_A", &personafuse::topk_wgrad_A);
}

// A Python module with no functions: importing personafuse_kernels._C loads the library and runs the
// registrations above. (No pybind11: it would add a minute of compile time for nothing.)
static struct PyModuleDef pfk_module = {PyModuleDef_HEAD_INIT, "_C", "personafuse CUDA ops (torch.ops.personafuse)", -1,
                                        nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pfk_module); }
