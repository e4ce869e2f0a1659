// The rANS loops with AVX2: the sixteen states are two vectors of eight
// lanes. This file alone is compiled with -mavx2 -mbmi -mbmi2 -mpopcnt; rans.cpp
// and fields.cpp call it only after the CPU reported them.
//
// One decoding step of eight lanes: gather each lane's table entry, x = freq *
// (x >> 12) + bias, then the lanes whose state fell below 2^16 take the next
// words in lane order (a permutation from a table indexed by the lane mask
// places them), exactly as the scalar loop reads them one lane after the
// other. A gather costs about ten cycles of throughput on the CPUs measured
// (AMD Zen 3), and a step waits on one: up to four chunks step together, so
// that their chains overlap, and the head values of most symbols are computed
// rather than gathered a second time.
#include <immintrin.h>

#include <algorithm>
#include <array>

#include "rans_internal.hpp"
#include "simd_nibbles.hpp"
#include "simd_steps.hpp"

namespace mmpack::rans {

namespace {

constexpr std::array<std::array<std::uint32_t, 8>, 256> make_expand() {
    std::array<std::array<std::uint32_t, 8>, 256> table{};
    for (unsigned mask = 0; mask < 256; ++mask) {
        unsigned taken = 0;
        for (unsigned lane = 0; lane < 8; ++lane) {
            if (mask >> lane & 1u) table[mask][lane] = taken++;
        }
    }
    return table;
}

alignas(32) constexpr auto kExpand = make_expand();

// At least this many bytes of words must remain before a group: the two
// unconditional 16-byte loads then stay inside the stream.
constexpr std::ptrdiff_t kGroupBytes = 32;

struct Lanes {
    __m256i lo;  // states of lanes 0..7
    __m256i hi;  // lanes 8..15
};

inline Lanes load_states(const Decoder& d) noexcept {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.x)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.x + 8))};
}

inline void store_states(Decoder& d, const Lanes& lanes) noexcept {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d.x), lanes.lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d.x + 8), lanes.hi);
}

// One decoding step of eight lanes; returns their table entries.
inline __m256i step(__m256i& x, const DecodeTable& table, const std::uint8_t*& next) noexcept {
    const __m256i mask12 = _mm256_set1_epi32(0xFFF);
    const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table.slot), _mm256_and_si256(x, mask12), 4);
    const __m256i freq = _mm256_and_si256(entry, mask12);
    const __m256i bias = _mm256_and_si256(_mm256_srli_epi32(entry, 12), mask12);
    const __m256i decoded = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(x, kScaleBits)), bias);
    const __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(decoded, 16), _mm256_setzero_si256());
    const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(need)));
    const __m256i words = _mm256_permutevar8x32_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(next))),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand[mask].data())));
    x = _mm256_blendv_epi8(decoded, _mm256_or_si256(_mm256_slli_epi32(decoded, 16), words), need);
    next += 2 * static_cast<unsigned>(_mm_popcnt_u32(mask));
    return entry;
}

inline __m256i symbols_of(__m256i entry) noexcept { return _mm256_srli_epi32(entry, 24); }

// The sixteen symbols of a group (lanes 0-7 in `low`, 8-15 in `high`, one a 32-bit lane) as
// bytes in lane order.
inline __m128i symbol_bytes(__m256i low, __m256i high) noexcept {
    const __m256i words = _mm256_packus_epi32(low, high);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words), order));
}

// Head values of eight elements from their symbols (one per 32-bit lane), shifted into place:
// computed for the symbols of the head's run (most of them), looked up for the others, with the
// raw low bits of those that have them put in, in element order. Built in registers (a vector
// reloaded from lanes stored one by one would wait for the stores). False when the raw bits
// run out.
inline bool head_values(const std::uint32_t* symbols, const FusedHead& head, bits::Reader& raw, __m256i& values) noexcept {
    const __m256i s = _mm256_load_si256(reinterpret_cast<const __m256i*>(symbols));
    const __m256i from_first = _mm256_sub_epi32(s, _mm256_set1_epi32(static_cast<int>(head.run_first)));
    const __m256i in_run = _mm256_cmpeq_epi32(
        _mm256_min_epu32(from_first, _mm256_set1_epi32(static_cast<int>(head.run_last))), from_first);
    const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(head.shift));
    values = _mm256_sll_epi32(_mm256_add_epi32(s, _mm256_set1_epi32(static_cast<int>(head.run_delta))), shift);
    unsigned others = ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(in_run))) & 0xFFu;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    while (others != 0) {
        const unsigned at = static_cast<unsigned>(__builtin_ctz(others));
        std::uint32_t value = head.value[symbols[at]];
        if (value >> 31) {
            std::uint32_t low = 0;
            if (!raw.read(head.raw_bits[symbols[at]], low)) return false;
            value = (value & 0x7FFFFFFFu) | (low << head.shift);
        }
        const __m256i here = _mm256_cmpeq_epi32(lane, _mm256_set1_epi32(static_cast<int>(at)));
        values = _mm256_blendv_epi8(values, _mm256_set1_epi32(static_cast<int>(value)), here);
        others &= others - 1;
    }
    return true;
}

inline __m256i widen8(const std::uint8_t* bytes) noexcept {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
}

// For a mask of eight lanes, the byte shuffle that moves the low words of the set lanes (eight
// words, lane order) to the top of a vector, still in lane order; the bytes below are zeroed.
constexpr std::array<std::array<std::uint8_t, 16>, 256> make_compress() {
    std::array<std::array<std::uint8_t, 16>, 256> table{};
    for (unsigned mask = 0; mask < 256; ++mask) {
        unsigned n = 0;
        for (unsigned lane = 0; lane < 8; ++lane) n += mask >> lane & 1u;
        unsigned at = 0;
        for (; at < 16 - 2 * n; ++at) table[mask][at] = 0x80;
        for (unsigned lane = 0; lane < 8; ++lane) {
            if (!(mask >> lane & 1u)) continue;
            table[mask][at++] = static_cast<std::uint8_t>(2 * lane);
            table[mask][at++] = static_cast<std::uint8_t>(2 * lane + 1);
        }
    }
    return table;
}

alignas(16) constexpr auto kCompress = make_compress();

// x / freq for states x < freq << 20 (so quotients below 2^20), estimated in single precision
// and made exact, as the AVX-512 loop does with AVX2's instructions. The estimate's relative
// error is below 2^-21: 1 / freq from vrcpps (at most 1.5 * 2^-12) and one Newton step (then
// 2^-22.8, plus its two roundings of 2^-24), x converted as two 16-bit halves whose sum is
// rounded once (2^-24; AVX2 converts only signed integers), and the product's rounding. So it
// lies within half a unit of x / freq, its truncation is q, q - 1 or q + 1, and one correction
// each way makes it exact. (Two double-precision divisions per eight lanes had bound the AVX2
// encoder: vdivpd issues one every 5 cycles or so on a Zen 3.) The remainder goes to `r`.
inline __m256i quotient(__m256i x, __m256i freq, __m256i& r) noexcept {
    const __m256 f = _mm256_cvtepi32_ps(freq);  // freq < 2^12: exact
    const __m256 r12 = _mm256_rcp_ps(f);
    const __m256 rcp = _mm256_mul_ps(r12, _mm256_sub_ps(_mm256_set1_ps(2.0F), _mm256_mul_ps(f, r12)));
    const __m256 high = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 16)), _mm256_set1_ps(65536.0F));
    const __m256 value = _mm256_add_ps(high, _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF))));
    __m256i q = _mm256_cvttps_epi32(_mm256_mul_ps(value, rcp));
    r = _mm256_sub_epi32(x, _mm256_mullo_epi32(q, freq));  // in [-freq, 2 freq)
    const __m256i below = _mm256_cmpgt_epi32(_mm256_setzero_si256(), r);
    q = _mm256_add_epi32(q, below);  // -1 where below
    r = _mm256_add_epi32(r, _mm256_and_si256(below, freq));
    const __m256i above = _mm256_xor_si256(_mm256_cmpgt_epi32(freq, r), _mm256_set1_epi32(-1));
    r = _mm256_sub_epi32(r, _mm256_and_si256(above, freq));
    return _mm256_sub_epi32(q, above);
}

// One encoding step of eight lanes (their symbols' table entries given), their emitted words
// stored below `out` in lane order.
inline void encode_step(__m256i& x, __m256i entry, std::uint8_t*& out) noexcept {
    const __m256i freq = _mm256_and_si256(entry, _mm256_set1_epi32(0xFFFF));
    const __m256i start = _mm256_srli_epi32(entry, 16);
    // Lanes at or above freq << 20 emit their low word first.
    const __m256i x_max = _mm256_slli_epi32(freq, 32 - kScaleBits);
    const __m256i emit = _mm256_cmpeq_epi32(_mm256_max_epu32(x, x_max), x);
    const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(emit)));
    const __m256i low_words = _mm256_shuffle_epi8(
        x, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                            0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m128i words = _mm256_castsi256_si128(_mm256_permute4x64_epi64(low_words, 0x08));
    const __m128i kept = _mm_shuffle_epi8(words, _mm_load_si128(reinterpret_cast<const __m128i*>(kCompress[mask].data())));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out - 16), kept);
    out -= 2 * static_cast<unsigned>(_mm_popcnt_u32(mask));
    x = _mm256_blendv_epi8(x, _mm256_srli_epi32(x, 16), emit);
    __m256i r;
    const __m256i q = quotient(x, freq, r);
    x = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(q, kScaleBits), r), start);
}

}  // namespace

void encode_groups_avx2(const std::uint8_t* symbols, std::size_t groups, const EncodeTable& table, std::uint32_t* x,
                        std::uint8_t*& p) noexcept {
    __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8));
    std::uint8_t* out = p;
    const auto* packed = reinterpret_cast<const int*>(table.packed);
    for (std::size_t g = groups; g-- > 0;) {
        // Lanes 15 to 8 first, as the scalar loop takes them, then 7 to 0.
        const std::uint8_t* group = symbols + g * kLanes;
        const __m256i entry_hi = _mm256_i32gather_epi32(packed, widen8(group + 8), 4);
        const __m256i entry_lo = _mm256_i32gather_epi32(packed, widen8(group), 4);
        encode_step(hi, entry_hi, out);
        encode_step(lo, entry_lo, out);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8), hi);
    p = out;
}

void encode_group_pairs_avx2(const std::uint8_t* symbols_a, const std::uint8_t* symbols_b, std::size_t groups,
                             const EncodeTable& table, std::uint32_t* x_a, std::uint8_t*& p_a, std::uint32_t* x_b,
                             std::uint8_t*& p_b) noexcept {
    // Four chains in flight instead of two (each stream's lanes 15-8 and 7-0): 1.25-1.35x the
    // encoder's speed with this loop on an AVX-512 Xeon running it (float32 and bfloat16).
    __m256i lo_a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_a));
    __m256i hi_a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_a + 8));
    __m256i lo_b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b));
    __m256i hi_b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b + 8));
    const auto* packed = reinterpret_cast<const int*>(table.packed);
    for (std::size_t g = groups; g-- > 0;) {
        const std::uint8_t* a = symbols_a + g * kLanes;
        const std::uint8_t* b = symbols_b + g * kLanes;
        encode_step(hi_a, _mm256_i32gather_epi32(packed, widen8(a + 8), 4), p_a);
        encode_step(hi_b, _mm256_i32gather_epi32(packed, widen8(b + 8), 4), p_b);
        encode_step(lo_a, _mm256_i32gather_epi32(packed, widen8(a), 4), p_a);
        encode_step(lo_b, _mm256_i32gather_epi32(packed, widen8(b), 4), p_b);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x_a), lo_a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x_a + 8), hi_a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x_b), lo_b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x_b + 8), hi_b);
}

void quotients_avx2(const std::uint32_t* x, const std::uint32_t* freq, std::size_t n, std::uint32_t* q) noexcept {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i r;
        const __m256i quotients = quotient(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)),
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(freq + i)), r);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), quotients);
    }
    for (; i < n; ++i) q[i] = x[i] / freq[i];
}

std::size_t decode_groups_avx2(Decoder& d, const DecodeTable& table, std::size_t groups, std::uint8_t* out) noexcept {
    Lanes x = load_states(d);
    const std::uint8_t* next = d.next;
    std::size_t g = 0;
    for (; g < groups && d.end - next >= kGroupBytes; ++g) {
        const __m256i low = symbols_of(step(x.lo, table, next));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * kLanes), symbol_bytes(low, symbols_of(step(x.hi, table, next))));
    }
    store_states(d, x);
    d.next = next;
    return g;
}

void step_streams_avx2(StreamSteps* streams, std::size_t count) noexcept {
    step_streams<kGroupBytes, Lanes>(
        streams, count, [](const Decoder& d) { return load_states(d); },
        [](Decoder& d, const Lanes& x) { store_states(d, x); },
        [](Lanes& x, const DecodeTable& table, const std::uint8_t*& next, std::uint8_t* out) {
            const __m256i low = symbols_of(step(x.lo, table, next));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out), symbol_bytes(low, symbols_of(step(x.hi, table, next))));
        });
}

namespace {

// Groups of a block: the rANS steps of a block run first, into its symbols, and the head
// values, raw bits and other fields after, so that the branch on rare raw bits never stalls
// the chains of states (each step waits on a gather).
constexpr std::size_t kBlockGroups = 32;

// The rANS steps of one block for `kCount` chunks: up to `block` groups, fewer when a chunk's
// words run short. Returns the groups stepped. A function of its own, so that the compiler keeps
// the states in registers: inside the whole loop it kept them on the stack, each step waiting on
// a store forwarded to the next one's load. (On an AMD Zen 3, one thread, best of 60 decodes:
// the steps alone of the battery set's bfloat16 chunks 1350-1440 -> 1520-1800 MB/s.)
template <unsigned kCount>
[[gnu::noinline]] std::size_t step_block(Lanes* states, const std::uint8_t** next, const std::uint8_t* const* ends,
                                         const DecodeTable* const* tables, std::size_t block,
                                         std::uint32_t (*symbols)[kBlockGroups * kLanes]) noexcept {
    return step_groups<kCount, kGroupBytes>(
        states, next, ends, block, [&](unsigned k, Lanes& x, const std::uint8_t*& at, std::size_t g) {
            auto* out = reinterpret_cast<__m256i*>(symbols[k] + g * kLanes);
            _mm256_store_si256(out, symbols_of(step(x.lo, *tables[k], at)));
            _mm256_store_si256(out + 1, symbols_of(step(x.hi, *tables[k], at)));
        });
}

// The loop shared by both element types, over `kCount` chunks stepping together (their chains
// overlap), each with its own head's tables (the chunks may be of different tensors).
// Emit(stream, first element, head values of elements 0-7, of elements 8-15) writes a group's
// sixteen elements of one chunk (one store of 16-bit elements, not two of eight). A chunk whose
// raw bits run out is marked failed; the others finish the block, so every chunk not failed has
// the returned groups done.
template <unsigned kCount, typename Emit>
std::size_t fused_groups(FusedStream* streams, std::size_t groups, bool* ok, Emit emit) noexcept {
    Lanes x[kCount];
    const std::uint8_t* next[kCount];
    const std::uint8_t* ends[kCount];
    for (unsigned k = 0; k < kCount; ++k) {
        x[k] = load_states(*streams[k].decoder);
        next[k] = streams[k].decoder->next;
        ends[k] = streams[k].decoder->end;
        ok[k] = true;
    }
    // The symbols as 32-bit lanes, ready to index the value table.
    alignas(32) std::uint32_t symbols[kCount][kBlockGroups * kLanes];
    const DecodeTable* tables[kCount];
    for (unsigned k = 0; k < kCount; ++k) tables[k] = streams[k].head->table;
    std::size_t g = 0;
    bool failed = false;
    bool room = true;
    while (g < groups && room && !failed) {
        const std::size_t block = std::min(kBlockGroups, groups - g);
        const std::size_t stepped = step_block<kCount>(x, next, ends, tables, block, symbols);
        room = stepped == block;
        for (unsigned k = 0; k < kCount; ++k) {
            const FusedHead& head = *streams[k].head;
            // A copy, so that the reader's state stays in registers across the block.
            bits::Reader raw = *streams[k].raw;
            for (std::size_t i = 0; i < stepped; ++i) {
                const std::uint32_t* group = symbols[k] + i * kLanes;
                __m256i low, high;
                if (!head_values(group, head, raw, low) || !head_values(group + 8, head, raw, high)) {
                    ok[k] = false;
                    failed = true;
                    break;
                }
                emit(streams[k], (g + i) * kLanes, low, high);
            }
            *streams[k].raw = raw;
        }
        g += stepped;
    }
    for (unsigned k = 0; k < kCount; ++k) {
        store_states(*streams[k].decoder, x[k]);
        streams[k].decoder->next = next[k];
    }
    return g;
}

template <typename Emit>
std::size_t fused(FusedStream* streams, unsigned count, std::size_t groups, bool* ok, Emit emit) noexcept {
    return with_chunk_count(count, [&](auto n) { return fused_groups<decltype(n)::value>(streams, groups, ok, emit); });
}

}  // namespace

std::size_t decode_float32_groups_avx2(FusedStream* streams, unsigned count, std::size_t groups, bool* ok) noexcept {
    const __m256i low3 = _mm256_set1_epi32(7);
    return fused(streams, count, groups, ok, [&](const FusedStream& s, std::size_t at, __m256i low, __m256i high) {
        const __m128i nib = nibble_bytes(s.tails[0] + at / 2);
        const auto element = [&](__m128i q8, std::size_t i, __m256i value) {
            const __m256i q = _mm256_cvtepu8_epi32(q8);
            const __m256i tail = _mm256_or_si256(
                _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(q, low3), 16), _mm256_slli_epi32(_mm256_srli_epi32(q, 3), 31)),
                _mm256_or_si256(_mm256_slli_epi32(widen8(s.tails[1] + i), 8), widen8(s.tails[2] + i)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.out + 4 * i), _mm256_or_si256(value, tail));
        };
        element(nib, at, low);
        element(_mm_srli_si128(nib, 8), at + 8, high);
    });
}

std::size_t decode_float16_groups_avx2(FusedStream* streams, unsigned count, bool half_layout, std::size_t groups,
                                       bool* ok) noexcept {
    const __m256i low = _mm256_set1_epi16(half_layout ? 0x7F : 7);
    const __m128i sign_shift = _mm_cvtsi32_si128(half_layout ? 7 : 3);
    return fused(streams, count, groups, ok, [&](const FusedStream& s, std::size_t at, __m256i first, __m256i second) {
        // Sixteen 16-bit elements: the head values (< 2^16) packed to 16-bit lanes, in order.
        const __m256i values = _mm256_permute4x64_epi64(_mm256_packus_epi32(first, second), 0xD8);
        const __m128i q8 = half_layout ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.tails[0] + at))
                                       : nibble_bytes(s.tails[0] + at / 2);
        const __m256i q = _mm256_cvtepu8_epi16(q8);
        const __m256i sign = _mm256_slli_epi16(_mm256_srl_epi16(q, sign_shift), 15);
        const __m256i element = _mm256_or_si256(values, _mm256_or_si256(_mm256_and_si256(q, low), sign));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.out + 2 * at), element);
    });
}

}  // namespace mmpack::rans
