// personafuse_kernels._C: the one registration file of the CUDA extension.
// Declares the `personafuse` ops with TORCH_LIBRARY and binds their CUDA kernels with TORCH_LIBRARY_IMPL.
// The Python package registers its own high-level ops (routed_lora_forward/backward) as fragments of the
// same namespace with torch.library.custom_op.
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pfk_checks.h"
#include "pfk_gate.h"
#include "pfk_lora.h"

namespace personafuse {
namespace {

DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_gate_args(const at::Tensor& H, const at::Tensor& gates, const at::Tensor& scaling, int64_t E,
                     int64_t seq_len) {
  PFK_CHECK_INPUT(H);
  PFK_CHECK_INPUT(gates);
  PFK_CHECK_INPUT(scaling);
  PFK_CHECK_DIM(H, 2);     // [T, E*r]
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
      launch_gate_forward(dtype, H.data_ptr(), gates.data_ptr<float>(), scaling.data_ptr<float>(), Hg.data_ptr(), T,
                          E, H.size(1) / E, seq_len, c10::cuda::getCurrentCUDAStream().stream());
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
  TORCH_CHECK(dHg.scalar_type() == H.scalar_type(), "dHg and H must share a dtype, got ", dHg.scalar_type(),
              " and ", H.scalar_type());
  const DType dtype = to_dtype(H, "H");
  const c10::cuda::CUDAGuard guard(H.device());
  const int64_t T = H.size(0);
  at::Tensor dH = at::empty_like(H);
  at::Tensor dgates = at::empty({T / seq_len, E}, gates.options());
  at::Tensor dg_tok = seq_len == 1 ? dgates : at::empty({T, E}, gates.options());
  const cudaError_t err = launch_gate_backward(dtype, dHg.data_ptr(), H.data_ptr(), gates.data_ptr<float>(),
                                               scaling.data_ptr<float>(), dH.data_ptr(), dg_tok.data_ptr<float>(),
                                               dgates.data_ptr<float>(), T, E, H.size(1) / E, seq_len,
                                               c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse gate_backward launch failed: ", cudaGetErrorString(err));
  return {dH, dgates};
}

// y += LoRA branch for T <= 64 in one launch; returns H [T, E*r] (kept for backward).
at::Tensor lora_decode_(at::Tensor& y,               // [T, N]
                        const at::Tensor& x,         // [T, K]
                        const at::Tensor& lora_A,    // [E, r, K]
                        const at::Tensor& lora_B,    // [E, N, r]
                        const at::Tensor& gates,     // [T / seq_len, E] float32
                        const at::Tensor& scaling,   // [E] float32
                        int64_t seq_len) {
  using Ptrs = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : Ptrs{&y, &x, &lora_A, &lora_B, &gates, &scaling}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous(), "lora_decode_: every tensor must be a contiguous CUDA tensor");
  }
  PFK_CHECK_DIM(x, 2);
  PFK_CHECK_DIM(y, 2);
  PFK_CHECK_DIM(lora_A, 3);
  PFK_CHECK_DIM(lora_B, 3);
  const int64_t T = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t E = lora_A.size(0), r = lora_A.size(1), C = E * r;
  TORCH_CHECK(T >= 1 && T <= kDecodeMaxTokens, "lora_decode_ is for 1 to ", kDecodeMaxTokens, " tokens, got ", T);
  TORCH_CHECK(C <= kDecodeMaxWidth, "lora_decode_ needs E * r <= ", kDecodeMaxWidth, ", got ", C);
  PFK_CHECK_SHAPE(y, T, N);
  PFK_CHECK_SHAPE(lora_A, E, r, K);
  PFK_CHECK_SHAPE(lora_B, E, N, r);
  TORCH_CHECK(seq_len >= 1 && T % seq_len == 0, "seq_len must divide T = ", T, ", got ", seq_len);
  PFK_CHECK_SHAPE(gates, T / seq_len, E);
  PFK_CHECK_SHAPE(scaling, E);
  PFK_CHECK_DTYPE(gates, at::kFloat);
  PFK_CHECK_DTYPE(scaling, at::kFloat);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "lora_decode_ supports float16 and bfloat16, got ", x.scalar_type());
  for (const at::Tensor* t : Ptrs{&y, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "lora_decode_: y, lora_A and lora_B must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  int num_sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.device().index()) == cudaSuccess,
              "cudaDeviceGetAttribute failed");
  const DecodePlan plan = plan_lora_decode(T, K, E, r, num_sms);
  DecodeArgs a{};
  a.dtype = to_dtype(x, "x");
  a.k_slice = plan.k_slice;
  a.rows_per_tile = plan.rows_per_tile;
  a.smem_bytes = plan.smem_bytes;
  at::Tensor H = at::empty({T, C}, x.options());
  at::Tensor partial = at::empty({plan.num_slices, T, C}, gates.options());
  at::Tensor Hg = at::empty({T, C}, gates.options());
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  a.vectorized = K % 8 == 0 && aligned(lora_A) && aligned(lora_B);
  a.x = x.data_ptr();
  a.A = lora_A.data_ptr();
  a.B = lora_B.data_ptr();
  a.gates = gates.data_ptr<float>();
  a.scaling = scaling.data_ptr<float>();
  a.y = y.data_ptr();
  a.H = H.data_ptr();
  a.partial = partial.data_ptr<float>();
  a.Hg = Hg.data_ptr<float>();
  a.T = static_cast<int>(T);
  a.K = static_cast<int>(K);
  a.N = static_cast<int>(N);
  a.E = static_cast<int>(E);
  a.r = static_cast<int>(r);
  a.seq_len = static_cast<int>(seq_len);
  a.num_sms = num_sms;
  const cudaError_t err = launch_lora_decode(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse lora_decode_ launch failed: ", cudaGetErrorString(err));
  return H;
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
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    PFK_CHECK_CUDA(seed);
    PFK_CHECK_DTYPE(seed, at::kLong);
    TORCH_CHECK(seed.numel() >= 1 && seed.device() == x.device(), "dropout needs a one-element int64 seed on ",
                x.device());
  }
  at::Tensor H = at::empty({T, E * r}, x.options());
  check_gate_args(H, gates, scaling, E, seq_len);
  at::Tensor Hg = at::empty_like(H);
  const c10::cuda::CUDAGuard guard(x.device());
  const ShrinkArgs a{to_dtype(x, "x"), x.data_ptr(), lora_A.data_ptr(), gates.data_ptr<float>(),
                     scaling.data_ptr<float>(), dropout_p > 0.0 ? seed.data_ptr<int64_t>() : nullptr, H.data_ptr(),
                     Hg.data_ptr(), T, K, static_cast<int>(E), static_cast<int>(r), seq_len,
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
  const DhgArgs a{to_dtype(dy, "dy"), dy.data_ptr(), lora_B.data_ptr(), H.data_ptr(), gates.data_ptr<float>(),
                  scaling.data_ptr<float>(), dH.data_ptr(), dg_tok.data_ptr<float>(), dgates.data_ptr<float>(), T, N,
                  static_cast<int>(E), static_cast<int>(r), seq_len};
  const cudaError_t err = launch_lora_dhg(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personafuse lora_dhg launch failed: ", cudaGetErrorString(err));
  return {dH, dgates};
}

}  // namespace
}  // namespace personafuse

TORCH_LIBRARY(personafuse, m) {
  m.def("gate_forward(Tensor H, Tensor gates, Tensor scaling, int seq_len) -> Tensor");
  m.def("gate_backward(Tensor dHg, Tensor H, Tensor gates, Tensor scaling, int seq_len) -> (Tensor, Tensor)");
  m.def("lora_decode_(Tensor(a!) y, Tensor x, Tensor lora_A, Tensor lora_B, Tensor gates, Tensor scaling, "
        "int seq_len) -> Tensor");
  m.def("lora_shrink(Tensor x, Tensor lora_A, Tensor gates, Tensor scaling, Tensor seed, int seq_len, "
        "float dropout_p) -> (Tensor, Tensor)");
  m.def("lora_dhg(Tensor dy, Tensor lora_B, Tensor H, Tensor gates, Tensor scaling, int seq_len) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(personafuse, CUDA, m) {
  m.impl("gate_forward", &personafuse::gate_forward);
  m.impl("gate_backward", &personafuse::gate_backward);
  m.impl("lora_decode_", &personafuse::lora_decode_);
  m.impl("lora_shrink", &personafuse::lora_shrink);
  m.impl("lora_dhg", &personafuse::lora_dhg);
}

// A Python module with no functions: importing personafuse_kernels._C loads the library and runs the
// registrations above. (No pybind11: it would add a minute of compile time for nothing.)
static struct PyModuleDef pfk_module = {PyModuleDef_HEAD_INIT, "_C", "personafuse CUDA ops (torch.ops.personafuse)",
                                        -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pfk_module); }
