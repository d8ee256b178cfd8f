// CPU stand-ins for the two c10::cuda facilities csrc/personafuse_ops.cpp uses, for its emulated build.
#pragma once
#include <c10/core/Device.h>

#include "cuda_runtime.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct EmulatedStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
