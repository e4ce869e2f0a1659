// Gather and scatter: one loop of byte copies, each optionally hashed right
// after it is copied, while the bytes are still in cache.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mmpack/span.hpp"

namespace mmpack {

// One copy of `size` bytes. A gather is a list of segments with scattered
// sources and one destination buffer; a scatter is the reverse.
struct Segment {
    const std::byte* src;
    std::byte* dst;
    std::size_t size;
};

// What a segment does to its destination: overwrite it, or XOR the source
// into it (undoing an XOR delta against a reference in the same pass).
enum class SegmentOp { copy, xor_into };

// Applies every segment (they must not overlap one another). When `hashes` is
// not null, hashes[k] receives the XXH3-64 of segment k's destination bytes
// after the operation.
void copy_segments(const Segment* segments, std::size_t n_segments, std::uint64_t* hashes,
                   SegmentOp op = SegmentOp::copy);

// dst[i] ^= src[i] for i < size (no alignment assumed; the ranges must not overlap).
void xor_bytes(std::byte* dst, const std::byte* src, std::size_t size);

// out[r] = XXH3-64 of bytes [r * row_bytes, (r + 1) * row_bytes) of `data`,
// for r < n_rows. data.size must be n_rows * row_bytes (checked by callers).
void hash_rows(ConstBytes data, std::size_t row_bytes, std::size_t n_rows, std::uint64_t* out);

}  // namespace mmpack
