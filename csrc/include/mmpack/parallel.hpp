// Splitting a job across threads by bytes, not by item count: a plan mixes
// 4-byte biases with 36 KB weight rows, and equal counts would not balance.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace mmpack {

// Thread count used by every kernel; 0 restores the default (the number of
// hardware threads, at most 16).
void set_max_threads(unsigned n) noexcept;
unsigned max_threads() noexcept;

// Jobs below this many bytes run on the calling thread: starting a thread
// costs tens of microseconds, more than copying this much.
inline constexpr std::size_t kParallelMinBytes = std::size_t{1} << 20;

// Calls body(begin, end) on disjoint item ranges covering [0, n_items), each
// with about the same total weight. weight_prefix(i) is the summed weight of
// items [0, i), non-decreasing, with weight_prefix(0) == 0. Runs inline when
// the total weight is below min_weight (kParallelMinBytes: copies) or one
// thread is allowed; each thread gets at least min_weight.
void parallel_by_weight(std::size_t n_items, const std::function<std::uint64_t(std::size_t)>& weight_prefix,
                        const std::function<void(std::size_t, std::size_t)>& body,
                        std::uint64_t min_weight = kParallelMinBytes);

}  // namespace mmpack
