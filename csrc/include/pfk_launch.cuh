// Kernel launches for the .cu files: the one place that spells <<<...>>> and cudaLaunchCooperativeKernel, so
// that tests/cuda_emu (a CPU emulation of the CUDA runtime, defining PFK_CUDA_EMULATION) runs the very same
// launchers and kernels in CI.
#pragma once
#include <cuda_runtime.h>

#include <tuple>

// Dynamic shared memory of a kernel, 128-byte aligned (WMMA wants 32): PFK_DYNAMIC_SMEM(float, smem);
#ifndef PFK_CUDA_EMULATION
#define PFK_DYNAMIC_SMEM(type, name)                         \
  extern __shared__ __align__(128) unsigned char pfk_smem[]; \
  type* name = reinterpret_cast<type*>(pfk_smem)
#endif

namespace personafuse {

// kernel<<<grid, block, smem, stream>>>(args...), returning the launch error.
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch_kernel: wrong number of kernel arguments");
#ifdef PFK_CUDA_EMULATION
  (void)stream;
  return ::pfk_emu::launch(kernel, grid, block, smem, /*cooperative=*/false, static_cast<P>(args)...);
#else
  // clang-format reads a .cuh as C++ and would split the >>> of the launch:
  // clang-format off
  kernel<<<grid, block, smem, stream>>>(static_cast<P>(args)...);
  // clang-format on
  return cudaGetLastError();
#endif
}

// A cooperative launch (every block co-resident; grid.sync() allowed). The caller sizes the grid from
// cudaOccupancyMaxActiveBlocksPerMultiprocessor.
template <typename... P, typename... A>
cudaError_t launch_cooperative(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch_cooperative: wrong number of kernel arguments");
#ifdef PFK_CUDA_EMULATION
  (void)stream;
  return ::pfk_emu::launch(kernel, grid, block, smem, /*cooperative=*/true, static_cast<P>(args)...);
#else
  std::tuple<P...> typed(static_cast<P>(args)...);
  void* ptrs[sizeof...(P) > 0 ? sizeof...(P) : 1];
  std::apply(
      [&ptrs](auto&... a) {
        int i = 0;
        ((ptrs[i++] = static_cast<void*>(&a)), ...);
      },
      typed);
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs, smem, stream);
#endif
}

}  // namespace personafuse
