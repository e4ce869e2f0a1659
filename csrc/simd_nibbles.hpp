// Shared by the vector translation units (SSE2, which every x86-64 CPU has):
// nibble fields are stored two to a byte, and the fused loops want bytes.
#pragma once

#include <emmintrin.h>

#include <cstdint>

namespace mmpack::rans {

// The 16 nibbles of a group (8 bytes, low nibble first) as 16 bytes in element order.
inline __m128i nibble_bytes(const std::uint8_t* nibbles) noexcept {
    const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(nibbles));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    return _mm_unpacklo_epi8(_mm_and_si128(packed, low4), _mm_and_si128(_mm_srli_epi16(packed, 4), low4));
}

}  // namespace mmpack::rans
