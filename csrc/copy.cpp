#include "mmpack/copy.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "mmpack/parallel.hpp"
#include "mmpack/xxh3.hpp"

namespace mmpack {

namespace {

// Unhashed segments larger than this are cut so that one big tensor still
// keeps every thread busy.
constexpr std::size_t kSplitBytes = std::size_t{1} << 20;

}  // namespace

void xor_bytes(std::byte* dst, const std::byte* src, std::size_t size) {
    std::size_t i = 0;
    // Eight bytes at a time through memcpy: no alignment is assumed and the
    // compiler vectorises the loop.
    for (; i + 8 <= size; i += 8) {
        std::uint64_t a;
        std::uint64_t b;
        std::memcpy(&a, dst + i, 8);
        std::memcpy(&b, src + i, 8);
        a ^= b;
        std::memcpy(dst + i, &a, 8);
    }
    for (; i < size; ++i) dst[i] ^= src[i];
}

namespace {

void copy_range(const Segment* segments, std::size_t begin, std::size_t end, std::uint64_t* hashes, SegmentOp op) {
    for (std::size_t k = begin; k < end; ++k) {
        const Segment& s = segments[k];
        if (s.size != 0) {
            if (op == SegmentOp::copy) {
                std::memcpy(s.dst, s.src, s.size);
            } else {
                xor_bytes(s.dst, s.src, s.size);
            }
        }
        if (hashes != nullptr) hashes[k] = xxh3_64(s.dst, s.size);
    }
}

std::vector<Segment> split_large(const Segment* segments, std::size_t n_segments) {
    std::vector<Segment> pieces;
    pieces.reserve(n_segments);
    for (std::size_t k = 0; k < n_segments; ++k) {
        const Segment& s = segments[k];
        if (s.size == 0) continue;
        for (std::size_t done = 0; done < s.size; done += kSplitBytes) {
            pieces.push_back(Segment{s.src + done, s.dst + done, std::min(kSplitBytes, s.size - done)});
        }
    }
    return pieces;
}

void copy_all(const Segment* segments, std::size_t n_segments, std::uint64_t* hashes, SegmentOp op) {
    std::vector<std::uint64_t> prefix(n_segments + 1, 0);
    for (std::size_t k = 0; k < n_segments; ++k) prefix[k + 1] = prefix[k] + segments[k].size;
    parallel_by_weight(
        n_segments, [&](std::size_t i) { return prefix[i]; },
        [&](std::size_t begin, std::size_t end) { copy_range(segments, begin, end, hashes, op); });
}

}  // namespace

void copy_segments(const Segment* segments, std::size_t n_segments, std::uint64_t* hashes, SegmentOp op) {
    if (hashes == nullptr && max_threads() > 1) {
        bool has_large = false;
        for (std::size_t k = 0; k < n_segments && !has_large; ++k) has_large = segments[k].size > 2 * kSplitBytes;
        if (has_large) {
            const std::vector<Segment> pieces = split_large(segments, n_segments);
            copy_all(pieces.data(), pieces.size(), nullptr, op);
            return;
        }
    }
    copy_all(segments, n_segments, hashes, op);
}

void hash_rows(ConstBytes data, std::size_t row_bytes, std::size_t n_rows, std::uint64_t* out) {
    parallel_by_weight(
        n_rows, [&](std::size_t i) { return static_cast<std::uint64_t>(i) * row_bytes; },
        [&](std::size_t begin, std::size_t end) {
            for (std::size_t r = begin; r < end; ++r) out[r] = xxh3_64(data.data + r * row_bytes, row_bytes);
        });
}

}  // namespace mmpack
