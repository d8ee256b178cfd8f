// CPU emulation of the grid-wide barrier of cooperative_groups (cooperative launches only).
#pragma once
#include "cuda_runtime.h"

namespace cooperative_groups {
struct grid_group {
  void sync() const {
    if (!::pfk_emu::ctx.grid_bar) ::pfk_emu::device_fail("grid.sync() outside a cooperative launch");
    ::pfk_emu::ctx.grid_bar->arrive_and_wait();
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups
