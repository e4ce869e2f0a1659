// XXH3-64, written from the public specification of the xxHash family
// (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md).
// Results equal XXH3_64bits_withSeed() of the reference library, which the
// test suite proves against the `xxhash` PyPI package.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmpack {

// One-shot XXH3-64 of `size` bytes at `data` with the default secret.
std::uint64_t xxh3_64(const void* data, std::size_t size, std::uint64_t seed = 0) noexcept;

// Name of the code path the long-input loop uses on this CPU ("avx2", "sse2"
// or "scalar"); reported by benchmarks so numbers can be compared honestly.
const char* xxh3_simd_path() noexcept;

}  // namespace mmpack
