// The encoder's head symbols with AVX-512 (-mavx512f -mavx512bw): sixteen
// elements' head values to symbols per gather, with the lanes whose symbols
// have raw bits, so that the scalar pass writing raw bits visits only them.
#include <immintrin.h>

#include "fields_internal.hpp"

namespace mmpack::fields {

bool head_symbols_avx512(const std::uint8_t* bytes, std::size_t groups, unsigned width, unsigned shift, unsigned mask,
                         const std::uint16_t* lookup, std::uint8_t* symbols, std::uint16_t* raw_lanes) noexcept {
    const __m128i count = _mm_cvtsi32_si128(static_cast<int>(shift));
    const __m512i value_mask = _mm512_set1_epi32(static_cast<int>(mask));
    const __m512i low16 = _mm512_set1_epi32(0xFFFF);
    __mmask16 missing = 0;
    for (std::size_t g = 0; g < groups; ++g) {
        const __m512i elements =
            width == 4 ? _mm512_loadu_si512(bytes + 64 * g)
                       : _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32 * g)));
        const __m512i value = _mm512_and_si512(_mm512_srl_epi32(elements, count), value_mask);
        const __m512i entry = _mm512_and_si512(_mm512_i32gather_epi32(value, lookup, 2), low16);
        missing |= _mm512_cmpeq_epi32_mask(entry, low16);
        raw_lanes[g] = _mm512_test_epi32_mask(entry, _mm512_set1_epi32(kHasRawBits));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(symbols + 16 * g), _mm512_cvtepi32_epi8(entry));
    }
    return missing == 0;
}

}  // namespace mmpack::fields
