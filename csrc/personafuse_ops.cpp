// personafuse_kernels._C: the one registration file of the CUDA extension.
// Declares the `personafuse` ops with TORCH_LIBRARY and binds their CUDA kernels with TORCH_LIBRARY_IMPL.
// The Python package registers its own high-level ops (routed_lora_forward/backward) as fragments of the
// same namespace with torch.library.custom_op.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pfk_checks.h"
#include "pfk_gate.h"

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

}  // namespace
}  // namespace personafuse

TORCH_LIBRARY(personafuse, m) {
  m.def("gate_forward(Tensor H, Tensor gates, Tensor scaling, int seq_len) -> Tensor");
  m.def("gate_backward(Tensor dHg, Tensor H, Tensor gates, Tensor scaling, int seq_len) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(personafuse, CUDA, m) {
  m.impl("gate_forward", &personafuse::gate_forward);
  m.impl("gate_backward", &personafuse::gate_backward);
}

// A Python module with no functions: importing personafuse_kernels._C loads the library and runs the
// registrations above. (No pybind11: it would add a minute of compile time for nothing.)
static struct PyModuleDef pfk_module = {PyModuleDef_HEAD_INIT, "_C", "personafuse CUDA ops (torch.ops.personafuse)",
                                        -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pfk_module); }
