// Shared by the vector translation units (AVX2, AVX-512): the loop that steps several rANS
// streams side by side, one group of sixteen lanes each a turn, so that their chains of
// dependent steps (a gather, a multiply, a word read) overlap. Each file instantiates it with
// its own states and steps; internal linkage keeps the files' instructions apart.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmpack::rans {
namespace {

// Up to `groups` groups of kCount streams, fewer when one has less than kRoom bytes of words
// left before a group (its last words are then the scalar loop's, with its checks). Step(k, x,
// next, g) steps stream k's states x one group (the g-th of this call), reading its words at
// next. The states and word pointers are copied in and back, so that the compiler keeps them
// in registers (inlined always: the callers are the noinline functions that hold them). Returns
// the groups stepped.
template <unsigned kCount, std::ptrdiff_t kRoom, typename State, typename Step>
[[gnu::always_inline]] inline std::size_t step_groups(State* states, const std::uint8_t** next,
                                                      const std::uint8_t* const* ends,
                                                      std::size_t groups, Step step) noexcept {
    State x[kCount];
    const std::uint8_t* at[kCount];
#pragma GCC unroll 4
    for (unsigned k = 0; k < kCount; ++k) {
        x[k] = states[k];
        at[k] = next[k];
    }
    std::size_t g = 0;
    for (; g < groups; ++g) {
        bool room = true;
#pragma GCC unroll 4
        for (unsigned k = 0; k < kCount; ++k) room = room && ends[k] - at[k] >= kRoom;
        if (!room) break;
#pragma GCC unroll 4
        for (unsigned k = 0; k < kCount; ++k) step(k, x[k], at[k], g);
    }
#pragma GCC unroll 4
    for (unsigned k = 0; k < kCount; ++k) {
        states[k] = x[k];
        next[k] = at[k];
    }
    return g;
}

}  // namespace
}  // namespace mmpack::rans
