// CPU emulation of cuda_fp16.h's storage type and the conversions csrc/ uses (round to nearest even).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
using half = __half;

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
