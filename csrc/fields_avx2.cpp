// The field loops with AVX2 (-mavx2 -mpopcnt): the encoder's head symbols,
// eight elements' head values to symbols per gather, with the lanes whose
// symbols have raw bits, so that the scalar pass writing raw bits visits only
// them; the decoder's tail values put in element order.
#include <immintrin.h>

#include <array>
#include <cstdint>

#include "fields_internal.hpp"

namespace mmpack::fields {

bool head_symbols_avx2(const std::uint8_t* bytes, std::size_t groups, unsigned width, unsigned shift, unsigned mask,
                       const std::uint16_t* lookup, std::uint8_t* symbols, std::uint16_t* raw_lanes) noexcept {
    const __m128i count = _mm_cvtsi32_si128(static_cast<int>(shift));
    const __m256i value_mask = _mm256_set1_epi32(static_cast<int>(mask));
    const __m256i low16 = _mm256_set1_epi32(0xFFFF);
    const __m256i raw_flag = _mm256_set1_epi32(kHasRawBits);
    // Symbol bytes of eight lanes: byte 0 of each lane to the low bytes of each 128-bit half.
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const auto* table = reinterpret_cast<const int*>(lookup);
    __m256i missing = _mm256_setzero_si256();
    for (std::size_t g = 0; g < groups; ++g) {
        unsigned raw = 0;
        for (unsigned half = 0; half < 2; ++half) {
            const std::uint8_t* at = bytes + width * (16 * g + 8 * half);
            const __m256i elements =
                width == 4 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))
                           : _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
            const __m256i value = _mm256_and_si256(_mm256_srl_epi32(elements, count), value_mask);
            const __m256i entry = _mm256_and_si256(_mm256_i32gather_epi32(table, value, 2), low16);
            missing = _mm256_or_si256(missing, _mm256_cmpeq_epi32(entry, low16));
            const __m256i flagged = _mm256_cmpeq_epi32(_mm256_and_si256(entry, raw_flag), raw_flag);
            raw |= static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(flagged))) << (8 * half);
            // Then the two halves' four bytes side by side, stored as eight.
            const __m256i bytes_of = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(entry, pick),
                                                                 _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
            _mm_storel_epi64(reinterpret_cast<__m128i*>(symbols + 16 * g + 8 * half), _mm256_castsi256_si128(bytes_of));
        }
        raw_lanes[g] = static_cast<std::uint16_t>(raw);
    }
    return _mm256_testz_si256(missing, missing) != 0;
}

namespace {

// For a mask of eight elements (bit set: not zero), the byte shuffle that moves the next compact
// values to the set elements, in order, and zeroes the others.
constexpr std::array<std::array<std::uint8_t, 8>, 256> make_expand() {
    std::array<std::array<std::uint8_t, 8>, 256> table{};
    for (unsigned mask = 0; mask < 256; ++mask) {
        std::uint8_t taken = 0;
        for (unsigned lane = 0; lane < 8; ++lane) table[mask][lane] = mask >> lane & 1u ? taken++ : 0x80;
    }
    return table;
}

alignas(64) constexpr auto kExpand = make_expand();

}  // namespace

std::size_t expand_nonzero_avx2(const std::uint8_t* compact, std::size_t compact_count, const std::uint8_t* zero,
                                std::size_t count, std::uint8_t* out, std::size_t& taken) noexcept {
    // Eight elements per shuffle, their compact values read by an 8-byte load: only while eight
    // remain, so that no load reads past them.
    std::size_t at = taken;
    std::size_t i = 0;
    for (; i + 8 <= count && at + 8 <= compact_count; i += 8) {
        const __m128i flags = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero + i));
        const unsigned keep = static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(flags, _mm_setzero_si128()))) & 0xFFu;
        const __m128i values = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(compact + at));
        const __m128i shuffle = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpand[keep].data()));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_shuffle_epi8(values, shuffle));
        at += static_cast<unsigned>(_mm_popcnt_u32(keep));
    }
    taken = at;
    return i;
}

}  // namespace mmpack::fields
