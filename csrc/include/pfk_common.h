// Shared by the kernel launchers: the element types they are instantiated for.
#pragma once

namespace personafuse {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace personafuse
