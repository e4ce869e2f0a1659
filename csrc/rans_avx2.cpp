// The rANS decoding loops with AVX2: the sixteen states are two vectors of
// eight lanes. This file alone is compiled with -mavx2 -mbmi2; rans.cpp and
// fields.cpp call it only after the CPU reported both.
//
// One step of eight lanes: gather each lane's table entry, x = freq * (x >>
// 12) + bias, then the lanes whose state fell below 2^16 take the next words
// in lane order (a permutation from a table indexed by the lane mask places
// them), exactly as the scalar loop reads them one lane after the other.
#include <immintrin.h>

#include <array>
#include <cstring>

#include "rans_internal.hpp"
#include "simd_nibbles.hpp"

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

// Head values of eight lanes, with the raw low bits of the rare symbols that have them
// added in lane order (element order). False when the raw bits run out.
inline bool head_values(__m256i entry, const FusedHead& head, bits::Reader& raw, __m256i& values) noexcept {
    values = _mm256_i32gather_epi32(reinterpret_cast<const int*>(head.value), symbols_of(entry), 4);
    const unsigned special = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(values)));
    if (special == 0) return true;
    alignas(32) std::uint32_t v[8];
    alignas(32) std::uint32_t e[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), values);
    _mm256_store_si256(reinterpret_cast<__m256i*>(e), entry);
    for (unsigned lane = 0; lane < 8; ++lane) {
        if (!(special >> lane & 1u)) continue;
        std::uint32_t low = 0;
        if (!raw.read(head.raw_bits[e[lane] >> 24], low)) return false;
        v[lane] = (v[lane] & 0x7FFFFFFFu) | (low << head.shift);
    }
    values = _mm256_load_si256(reinterpret_cast<const __m256i*>(v));
    return true;
}

inline __m256i widen8(const std::uint8_t* bytes) noexcept {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
}

}  // namespace

std::size_t decode_groups_avx2(Decoder& d, const DecodeTable& table, std::size_t groups, std::uint8_t* out) noexcept {
    Lanes x = load_states(d);
    const std::uint8_t* next = d.next;
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    std::size_t g = 0;
    for (; g < groups && d.end - next >= kGroupBytes; ++g) {
        const __m256i s0 = symbols_of(step(x.lo, table, next));
        const __m256i s1 = symbols_of(step(x.hi, table, next));
        const __m256i words = _mm256_packus_epi32(s0, s1);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words), order);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * kLanes), _mm256_castsi256_si128(bytes));
    }
    store_states(d, x);
    d.next = next;
    return g;
}

namespace {

constexpr unsigned kMaxStreams = 2;

// The loop shared by both element types: Emit(stream, group base, half, head values) writes
// eight elements of one chunk. Every chunk's two vectors step once per group.
template <typename Emit>
std::size_t fused_groups(FusedStream* streams, unsigned count, std::size_t groups, bool& ok, Emit emit) noexcept {
    Lanes x[kMaxStreams];
    const std::uint8_t* next[kMaxStreams];
    for (unsigned k = 0; k < count; ++k) {
        x[k] = load_states(*streams[k].decoder);
        next[k] = streams[k].decoder->next;
    }
    std::size_t g = 0;
    ok = true;
    for (; g < groups && ok; ++g) {
        bool room = true;
        for (unsigned k = 0; k < count; ++k) room = room && streams[k].decoder->end - next[k] >= kGroupBytes;
        if (!room) break;
        __m256i entry[kMaxStreams][2];
        for (unsigned half = 0; half < 2; ++half) {
            for (unsigned k = 0; k < count; ++k) {
                entry[k][half] = step(half == 0 ? x[k].lo : x[k].hi, *streams[k].head->table, next[k]);
            }
        }
        for (unsigned k = 0; k < count && ok; ++k) {
            for (unsigned half = 0; half < 2; ++half) {
                __m256i value;
                if (!head_values(entry[k][half], *streams[k].head, *streams[k].raw, value)) {
                    ok = false;
                    break;
                }
                emit(streams[k], g * kLanes, half, value);
            }
        }
    }
    for (unsigned k = 0; k < count; ++k) {
        store_states(*streams[k].decoder, x[k]);
        streams[k].decoder->next = next[k];
    }
    return ok ? g : 0;
}

}  // namespace

std::size_t decode_float32_groups_avx2(FusedStream* streams, unsigned count, std::size_t groups, bool& ok) noexcept {
    const __m256i low3 = _mm256_set1_epi32(7);
    return fused_groups(streams, count, groups, ok, [&](const FusedStream& s, std::size_t base, unsigned half,
                                                          __m256i value) {
        const std::size_t at = base + 8 * half;
        const __m128i nib = nibble_bytes(s.tails[0] + base / 2);
        const __m256i q = _mm256_cvtepu8_epi32(half == 0 ? nib : _mm_srli_si128(nib, 8));
        const __m256i tail = _mm256_or_si256(
            _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(q, low3), 16), _mm256_slli_epi32(_mm256_srli_epi32(q, 3), 31)),
            _mm256_or_si256(_mm256_slli_epi32(widen8(s.tails[1] + at), 8), widen8(s.tails[2] + at)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.out + 4 * at), _mm256_or_si256(value, tail));
    });
}

std::size_t decode_float16_groups_avx2(FusedStream* streams, unsigned count, bool half_layout, std::size_t groups,
                                       bool& ok) noexcept {
    const __m256i low = _mm256_set1_epi32(half_layout ? 0x7F : 7);
    const __m128i sign_shift = _mm_cvtsi32_si128(half_layout ? 7 : 3);
    return fused_groups(streams, count, groups, ok, [&](const FusedStream& s, std::size_t base, unsigned half,
                                                          __m256i value) {
        const __m128i q16 = half_layout ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.tails[0] + base))
                                        : nibble_bytes(s.tails[0] + base / 2);
        const __m256i q = _mm256_cvtepu8_epi32(half == 0 ? q16 : _mm_srli_si128(q16, 8));
        const __m256i sign = _mm256_slli_epi32(_mm256_srl_epi32(q, sign_shift), 15);
        const __m256i element = _mm256_or_si256(value, _mm256_or_si256(_mm256_and_si256(q, low), sign));
        // Eight 16-bit elements: pack the lanes (values < 2^16) and store the low half.
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(element, element), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(s.out + 2 * (base + 8 * half)), _mm256_castsi256_si128(packed));
    });
}

}  // namespace mmpack::rans
