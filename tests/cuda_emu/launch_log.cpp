// The emulator's launch log (cuda_runtime.h launch_log), read from Python through ctypes: tests/emu.py launch_log.
#include <cuda_runtime.h>

#include <cstdint>

// Records in the log now.
extern "C" int64_t pfk_emu_launch_log_size() {
  std::lock_guard<std::mutex> lock(pfk_emu::launch_log_mu());
  return static_cast<int64_t>(pfk_emu::launch_log().size());
}

// Copies up to `capacity` records as (blocks, threads, dynamic shared memory bytes, cooperative) into out
// [capacity * 4], clears the log, and returns how many records it held.
extern "C" int64_t pfk_emu_take_launch_log(int64_t* out, int64_t capacity) {
  std::lock_guard<std::mutex> lock(pfk_emu::launch_log_mu());
  auto& log = pfk_emu::launch_log();
  const int64_t n = static_cast<int64_t>(log.size());
  for (int64_t i = 0; i < n && i < capacity; ++i) {
    out[4 * i] = log[i].blocks;
    out[4 * i + 1] = log[i].threads;
    out[4 * i + 2] = static_cast<int64_t>(log[i].smem);
    out[4 * i + 3] = log[i].cooperative ? 1 : 0;
  }
  log.clear();
  return n;
}
