// The rows of one routing-metadata block, staged in shared memory for the grouped kernels of csrc/topk/.
#pragma once
#include "pfk_device.cuh"
#include "pfk_topk.h"

namespace personafuse {

constexpr int kMaxBlockPairs = 64;  // block_m <= 64: one 64-row tensor-core tile

struct PairBlock {
  int group;  // g = e * k + s, or -1 for an unused block
  int expert;
  int slot;
  int rows;  // pairs in this block
};

// Arrays of kMaxBlockPairs entries placed after `base` bytes of dynamic shared memory.
struct PairArrays {
  int* pairs;
  int* toks;
  float* coef;
  static constexpr size_t kBytes = 3 * kMaxBlockPairs * 4;
  __device__ __forceinline__ static PairArrays at(unsigned char* smem, size_t base) {
    int* p = reinterpret_cast<int*>(smem + base);
    return {p, p + kMaxBlockPairs, reinterpret_cast<float*>(p + 2 * kMaxBlockPairs)};
  }
};

// Block b's group and, for each of its pairs, the pair id, its token and (w_pair given) w_p * s_e. Uniform over
// the block: every thread gets the same result, and all have passed a barrier when it returns a used block.
__device__ __forceinline__ PairBlock load_pair_block(const RoutingArgs& rt, int b, const PairArrays& arr,
                                                     const float* w_pair, const float* scaling) {
  const int g = rt.block_group[b];
  if (g < 0) return {-1, 0, 0, 0};
  const int start = rt.block_start[b];
  const int group_end = rt.group_start[g + 1];
  const int end = start + rt.block_m < group_end ? start + rt.block_m : group_end;
  const int e = g / rt.k;
  for (int i = threadIdx.x; i < end - start; i += blockDim.x) {
    const int p = rt.sorted_pairs[start + i];
    arr.pairs[i] = p;
    arr.toks[i] = p / rt.k;
    if (w_pair) arr.coef[i] = w_pair[p] * scaling[e];
  }
  __syncthreads();
  return {g, e, g - e * rt.k, end - start};
}

}  // namespace personafuse
