#include "mmpack/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <system_error>
#include <thread>
#include <vector>

namespace mmpack {

namespace {

unsigned default_threads() noexcept {
    const unsigned hw = std::thread::hardware_concurrency();
    return std::clamp(hw, 1u, 16u);
}

std::atomic<unsigned> g_max_threads{default_threads()};

// First item index whose prefix weight reaches `target` (binary search).
std::size_t first_item_at_weight(std::size_t n_items,
                                 const std::function<std::uint64_t(std::size_t)>& weight_prefix,
                                 std::uint64_t target) {
    std::size_t lo = 0;
    std::size_t hi = n_items;
    while (lo < hi) {
        const std::size_t mid = lo + (hi - lo) / 2;
        if (weight_prefix(mid) < target) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

}  // namespace

void set_max_threads(unsigned n) noexcept { g_max_threads.store(n == 0 ? default_threads() : n); }

unsigned max_threads() noexcept { return g_max_threads.load(); }

void parallel_by_weight(std::size_t n_items, const std::function<std::uint64_t(std::size_t)>& weight_prefix,
                        const std::function<void(std::size_t, std::size_t)>& body, std::uint64_t min_weight) {
    if (n_items == 0) return;
    const std::uint64_t total = weight_prefix(n_items);
    const std::size_t by_size = static_cast<std::size_t>(total / std::max<std::uint64_t>(min_weight, 1));
    const std::size_t n_threads = std::min<std::size_t>({max_threads(), n_items, std::max<std::size_t>(by_size, 1)});
    if (n_threads <= 1) {
        body(0, n_items);
        return;
    }
    std::vector<std::size_t> bounds(n_threads + 1, n_items);
    bounds[0] = 0;
    for (std::size_t t = 1; t < n_threads; ++t) {
        bounds[t] = std::max(bounds[t - 1], first_item_at_weight(n_items, weight_prefix, total * t / n_threads));
    }
    std::vector<std::thread> workers;
    workers.reserve(n_threads - 1);
    for (std::size_t t = 1; t < n_threads; ++t) {
        if (bounds[t] == bounds[t + 1]) continue;
        try {
            workers.emplace_back(body, bounds[t], bounds[t + 1]);
        } catch (const std::system_error&) {
            // Out of threads: do this share here rather than fail the job.
            body(bounds[t], bounds[t + 1]);
        }
    }
    if (bounds[0] < bounds[1]) body(bounds[0], bounds[1]);
    for (auto& w : workers) w.join();
}

}  // namespace mmpack
