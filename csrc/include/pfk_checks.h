// Argument checks shared by every host entry point of personafuse_kernels._C.
// Each failing check raises a Python RuntimeError that names the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#ifdef PFK_CUDA_EMULATION  // tests/cuda_emu: the ops run on CPU tensors
#define PFK_ON_DEVICE(t) ((t).is_cpu())
#else
#define PFK_ON_DEVICE(t) ((t).is_cuda())
#endif
#define PFK_CHECK_CUDA(t) TORCH_CHECK(PFK_ON_DEVICE(t), #t " must be a CUDA tensor, got device ", (t).device())
#define PFK_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define PFK_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())
#define PFK_CHECK_DIM(t, d) TORCH_CHECK((t).dim() == (d), #t " must have ", (d), " dims, got shape ", (t).sizes())
#define PFK_CHECK_SHAPE(t, ...)                                                                              \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape (" #__VA_ARGS__ "), got ", \
              (t).sizes())
#define PFK_CHECK_INPUT(t) \
  PFK_CHECK_CUDA(t);       \
  PFK_CHECK_CONTIGUOUS(t)
