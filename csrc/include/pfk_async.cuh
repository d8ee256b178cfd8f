// Asynchronous global -> shared copies (cp.async, sm_80+), the loads of the multi-stage main loop in pfk_mma.cuh:
//
//   async_copy16(dst, src, valid)   16 bytes src -> dst (shared memory), or 16 zero bytes when !valid; both
//                                   pointers 16-byte aligned. The copy is in flight until a wait retires its group.
//   async_commit()                  closes the group of copies this thread issued since the last commit.
//   async_wait<N>()                 returns when at most N of this thread's committed groups are still in flight.
//
// A thread sees its own copies after the wait that retires them; other threads see them after a __syncthreads()
// that follows that wait. Under tests/cuda_emu the copies land in shared memory only at the wait, and their
// destination reads as NaN until then, so a missing or too-loose wait shows up in the results.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace personafuse {

__device__ __forceinline__ void async_copy16(void* dst, const void* src, bool valid) {
#ifdef PFK_CUDA_EMULATION
  ::pfk_emu::cp_async16(dst, src, valid);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst_shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  // .cg: cache in L2 only (each byte is read once per block); a source size of 0 fills the 16 bytes with zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_shared), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = valid ? *reinterpret_cast<const uint4*>(src) : uint4{0u, 0u, 0u, 0u};
#endif
}

__device__ __forceinline__ void async_commit() {
#ifdef PFK_CUDA_EMULATION
  ::pfk_emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_wait() {
#ifdef PFK_CUDA_EMULATION
  ::pfk_emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace personafuse
