// Plain byte spans: the only currency the kernels accept.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmpack {

struct ConstBytes {
    const std::byte* data = nullptr;
    std::size_t size = 0;
};

struct MutableBytes {
    std::byte* data = nullptr;
    std::size_t size = 0;
};

}  // namespace mmpack
