// Shared by the vector translation units (AVX2, AVX-512): the loop that steps several rANS
// streams side by side, one group of sixteen lanes each a turn, so that their chains of
// dependent steps (a gather, a multiply, a word read) overlap. Each file instantiates it with
// its own states and steps; internal linkage keeps the files' instructions apart.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "rans_internal.hpp"

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

// `groups` whole groups of kCount of step_streams' streams side by side, fewer when one's words
// run short; see step_streams for Load, Store and Step.
template <unsigned kCount, std::ptrdiff_t kRoom, typename State, typename Load, typename Store, typename Step>
inline std::size_t step_together(StreamSteps* const* streams, std::size_t groups, Load load, Store store,
                                 Step step) noexcept {
    State x[kCount];
    const std::uint8_t* next[kCount];
    const std::uint8_t* ends[kCount];
    // Locals, not reloaded through `streams` after every store of symbols (a byte store may
    // alias them).
    const DecodeTable* tables[kCount];
    std::uint8_t* out[kCount];
    for (unsigned k = 0; k < kCount; ++k) {
        x[k] = load(*streams[k]->decoder);
        next[k] = streams[k]->decoder->next;
        ends[k] = streams[k]->decoder->end;
        tables[k] = streams[k]->table;
        out[k] = streams[k]->out + kLanes * streams[k]->done;
    }
    const std::size_t g = step_groups<kCount, kRoom>(
        x, next, ends, groups,
        [&](unsigned k, State& state, const std::uint8_t*& at, std::size_t i) { step(state, *tables[k], at, out[k] + i * kLanes); });
    for (unsigned k = 0; k < kCount; ++k) {
        store(*streams[k]->decoder, x[k]);
        streams[k]->decoder->next = next[k];
        streams[k]->done += g;
    }
    return g;
}

// step_streams_avx2 and _avx512 (rans_internal.hpp): the streams four at a time, in order; when
// one is done (or short of words) the next waiting joins. Load(decoder) returns a decoder's
// states as a State, Store(decoder, state) puts them back, and Step(state, table, next, out)
// steps one group of sixteen lanes, reading words at next, its symbols (bytes) to out. kRoom is
// the words a step may load, as in step_groups.
template <std::ptrdiff_t kRoom, typename State, typename Load, typename Store, typename Step>
inline void step_streams(StreamSteps* streams, std::size_t count, Load load, Store store, Step step) noexcept {
    for (;;) {
        StreamSteps* active[kMaxTogether];
        unsigned n = 0;
        std::size_t groups = SIZE_MAX;
        for (std::size_t i = 0; i < count && n < kMaxTogether; ++i) {
            StreamSteps& s = streams[i];
            if (s.short_of_words || s.done >= s.groups || s.decoder->lane != 0) continue;
            active[n++] = &s;
            groups = std::min(groups, s.groups - s.done);
        }
        if (n == 0) return;
        const std::size_t g = with_chunk_count(n, [&](auto c) {
            return step_together<decltype(c)::value, kRoom, State>(active, groups, load, store, step);
        });
        if (g < groups) {
            for (unsigned k = 0; k < n; ++k) {
                const Decoder& d = *active[k]->decoder;
                active[k]->short_of_words = active[k]->short_of_words || d.end - d.next < kRoom;
            }
        }
    }
}

}  // namespace
}  // namespace mmpack::rans
