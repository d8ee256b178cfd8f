// CPU emulation of the part of the CUDA runtime that csrc/*.cu uses, so that CI (no GPU) runs the extension's
// kernels and launchers unchanged: every CUDA thread is a std::thread, __syncthreads a std::barrier.
//
// What it checks: indexing, tiling, bounds, the kernels' arithmetic and reductions, launch limits (block size,
// dynamic shared memory over 48 KiB without cudaFuncSetAttribute), and WMMA's documented preconditions
// (32-byte aligned pointers, ldm multiples) in mma.h, and cp.async waits (copies land only at the wait; see
// AsyncGroups). Shared memory starts filled with NaN bytes, so reading
// what no thread wrote shows up in the results. With -fsanitize=address,undefined it is a CPU memcheck.
// What it cannot check: timing, the GPU memory model beyond barriers, warp-level hardware layouts.
//
// Rules for kernels that run here (all of csrc/ follows them):
//   - launches go through personafuse::launch_kernel / launch_cooperative (csrc/include/pfk_launch.cuh);
//   - static __shared__ arrays only in kernels that are not launched cooperatively (blocks of a normal launch
//     run one after another here; a cooperative launch runs all blocks at once and uses dynamic smem);
//   - dynamic shared memory through PFK_DYNAMIC_SMEM.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#define PFK_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaStream_t = struct CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

using std::max;
using std::min;

namespace pfk_emu {

constexpr int kWarpSize = 32;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxSmem = 227 * 1024;  // H100 / H200 opt-in maximum per block

using Barrier = std::barrier<>;

struct ThreadCtx {
  dim3 tid, bid, bdim, gdim;
  int linear_tid = 0;
  Barrier* block_bar = nullptr;
  Barrier* warp_bar = nullptr;
  Barrier* grid_bar = nullptr;
  unsigned char* dyn_smem = nullptr;
};
inline thread_local ThreadCtx ctx;
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local std::string failure;  // first exception message of the last launch

// Kernels whose dynamic shared memory limit was raised with cudaFuncSetAttribute.
inline std::vector<std::pair<const void*, int>>& smem_limits() {
  static std::vector<std::pair<const void*, int>> limits;
  return limits;
}

inline int lane_id() { return ctx.linear_tid % kWarpSize; }

// cp.async (csrc/include/pfk_async.cuh): each thread's copies wait in groups and land in shared memory only when a
// wait retires their group, as late as the hardware may land them. Until then the destination holds NaN bytes, so
// reading a stage before its wait (a missing wait, a wait that leaves too many groups in flight, a stage index off
// by one) gives NaN instead of the right data by luck. A thread that exits with copies in flight fails the launch.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char bytes[16];
};
struct AsyncGroups {
  std::vector<AsyncCopy> open;                   // issued since the last commit
  std::deque<std::vector<AsyncCopy>> in_flight;  // committed, oldest first
};
inline thread_local AsyncGroups async_groups;

inline void cp_async16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || (valid && reinterpret_cast<uintptr_t>(src) % 16))
    throw std::runtime_error("cp.async: 16-byte copy with a misaligned address");
  AsyncCopy c{static_cast<unsigned char*>(dst), {}};
  if (valid) std::memcpy(c.bytes, src, 16);  // the source is read when the copy is issued
  std::memset(dst, 0xFF, 16);                // and the destination is undefined until the wait
  async_groups.open.push_back(c);
}
inline void cp_async_commit() {
  async_groups.in_flight.push_back(std::move(async_groups.open));
  async_groups.open.clear();
}
inline void cp_async_wait(int n) {
  while (async_groups.in_flight.size() > static_cast<size_t>(n)) {
    for (const AsyncCopy& c : async_groups.in_flight.front()) std::memcpy(c.dst, c.bytes, 16);
    async_groups.in_flight.pop_front();
  }
}
// Called when a thread's kernel body returns: every copy it issued must have been waited for.
inline void cp_async_check_drained() {
  bool pending = !async_groups.open.empty();
  for (const auto& g : async_groups.in_flight) pending = pending || !g.empty();
  async_groups = AsyncGroups{};
  if (pending) throw std::runtime_error("cp.async: a thread exited with copies still in flight (a missing wait)");
}

struct Block {
  std::unique_ptr<Barrier> bar;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<unsigned char> smem;
  Block(int threads, size_t smem_bytes) : bar(std::make_unique<Barrier>(threads)), smem(smem_bytes + 128) {
    for (int w = 0; w * kWarpSize < threads; ++w)
      warps.push_back(std::make_unique<Barrier>(std::min(kWarpSize, threads - w * kWarpSize)));
    std::memset(smem.data(), 0xFF, smem.size());  // NaN in every float type: unwritten reads show up
  }
  unsigned char* smem_base() {
    auto p = reinterpret_cast<uintptr_t>(smem.data());
    return smem.data() + ((128 - p % 128) % 128);  // as aligned as PFK_DYNAMIC_SMEM declares it on the GPU
  }
};

inline dim3 unflatten(unsigned i, dim3 d) { return dim3(i % d.x, (i / d.x) % d.y, i / (d.x * d.y)); }

// Runs one CUDA thread's share of the kernel; on return the thread leaves its barriers (as an exited GPU thread
// stops counting for __syncthreads).
template <typename Fn>
void run_thread(Fn& body, int linear_tid, dim3 bdim, dim3 gdim, unsigned block_id, Block& blk, Barrier* grid_bar) {
  ctx.tid = unflatten(linear_tid, bdim);
  ctx.bid = unflatten(block_id, gdim);
  ctx.bdim = bdim;
  ctx.gdim = gdim;
  ctx.linear_tid = linear_tid;
  ctx.block_bar = blk.bar.get();
  ctx.warp_bar = blk.warps[linear_tid / kWarpSize].get();
  ctx.grid_bar = grid_bar;
  ctx.dyn_smem = blk.smem_base();
  body();
  ctx.block_bar->arrive_and_drop();
  ctx.warp_bar->arrive_and_drop();
  if (grid_bar) grid_bar->arrive_and_drop();
}

// Every launch that passed the configuration checks, in order: what tests/emu.py's launch_log() reads back through
// tests/cuda_emu/launch_log.cpp to hold the cost model's launch geometry to the launchers' own.
struct LaunchRecord {
  long blocks;
  int threads;
  size_t smem;
  bool cooperative;
};
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}
inline std::mutex& launch_log_mu() {
  static std::mutex mu;
  return mu;
}

// Launch: a normal launch runs its blocks one after another (all threads of a block at once); a cooperative
// launch runs every block at once, as grid.sync() needs.
template <typename... P>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, bool cooperative, P... args) {
  const long threads = (long)block.x * block.y * block.z;
  const long blocks = (long)grid.x * grid.y * grid.z;
  size_t limit = kDefaultSmem;
  for (auto& [fn, bytes] : smem_limits())
    if (fn == reinterpret_cast<const void*>(kernel)) limit = bytes;
  if (threads < 1 || threads > 1024 || blocks < 1 || grid.y > 65535 || grid.z > 65535 || smem > limit ||
      smem > kMaxSmem) {
    last_error = cudaErrorInvalidConfiguration;
    return last_error;
  }
  {
    std::lock_guard<std::mutex> lock(launch_log_mu());
    launch_log().push_back({blocks, static_cast<int>(threads), smem, cooperative});
  }
  std::tuple<P...> targs(args...);
  std::string error;
  std::mutex error_mu;
  auto body = [&]() {
    try {
      std::apply(kernel, targs);
      cp_async_check_drained();
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (error.empty()) error = e.what();
    }
    async_groups = AsyncGroups{};
  };
  std::vector<std::thread> pool;
  if (cooperative) {
    if (blocks * threads > 8192) {
      last_error = cudaErrorInvalidConfiguration;  // "too many blocks in cooperative launch" at emulator scale
      return last_error;
    }
    Barrier grid_bar(blocks * threads);
    std::vector<std::unique_ptr<Block>> blks;
    for (long b = 0; b < blocks; ++b) blks.push_back(std::make_unique<Block>(threads, smem));
    for (long b = 0; b < blocks; ++b)
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, b, t] { run_thread(body, t, block, grid, b, *blks[b], &grid_bar); });
    for (auto& th : pool) th.join();
  } else {
    Barrier end_of_block(threads);
    std::vector<std::unique_ptr<Block>> blks(blocks);
    blks[0] = std::make_unique<Block>(threads, smem);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        for (long b = 0; b < blocks; ++b) {
          run_thread(body, t, block, grid, b, *blks[b], nullptr);
          end_of_block.arrive_and_wait();
          if (t == 0) {  // the next block's barriers and fresh (NaN-filled) shared memory
            blks[b].reset();
            if (b + 1 < blocks) blks[b + 1] = std::make_unique<Block>(threads, smem);
          }
          end_of_block.arrive_and_wait();
        }
      });
    }
    for (auto& th : pool) th.join();
  }
  if (!error.empty()) {
    failure = error;
    last_error = cudaErrorLaunchFailure;
    return last_error;
  }
  last_error = cudaSuccess;
  return cudaSuccess;
}

// A device-side assertion failure (like a trap on the GPU): the launch reports cudaErrorLaunchFailure.
inline void device_fail(const std::string& what) { throw std::runtime_error(what); }

}  // namespace pfk_emu

#define threadIdx (::pfk_emu::ctx.tid)
#define blockIdx (::pfk_emu::ctx.bid)
#define blockDim (::pfk_emu::ctx.bdim)
#define gridDim (::pfk_emu::ctx.gdim)
#define PFK_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::pfk_emu::ctx.dyn_smem)

inline void __syncthreads() { ::pfk_emu::ctx.block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::pfk_emu::ctx.warp_bar->arrive_and_wait(); }

inline cudaError_t cudaGetLastError() {
  cudaError_t e = ::pfk_emu::last_error;
  ::pfk_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::pfk_emu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "unspecified launch failure";
  }
}

// One emulated device, number 0.
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// An emulated device with 4 SMs: cooperative launches stay small enough to run as threads.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = 4;
  return cudaSuccess;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || (size_t)value > ::pfk_emu::kMaxSmem)
    return cudaErrorInvalidValue;
  ::pfk_emu::smem_limits().emplace_back(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

// Occupancy as the register-free part of the hardware rule: 2048 threads and 228 KiB of shared memory per SM.
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, F*, int block_size, size_t smem) {
  int by_threads = 2048 / std::max(block_size, 1);
  int by_smem = smem ? static_cast<int>((228 * 1024) / (smem + 1024)) : 32;
  *num_blocks = std::min({by_threads, by_smem, 32});
  return cudaSuccess;
}
