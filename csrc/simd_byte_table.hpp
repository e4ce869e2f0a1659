// Shared by the AVX-512 translation units (compiled with -mavx512f -mavx512bw
// -mavx512vbmi; include it nowhere else): a 256-entry byte table looked up
// for 64 indices at once, where a gather would take 16 lanes at a time.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace mmpack {

// A 256-entry byte table (64-byte aligned) in four vectors, and its lookup: two two-vector
// byte permutes (vpermi2b), chosen by each index's top bit.
struct ByteTable {
    __m512i part[4];
    explicit ByteTable(const std::uint8_t* table) noexcept {
        for (unsigned k = 0; k < 4; ++k) part[k] = _mm512_load_si512(table + 64 * k);
    }
    __m512i operator()(__m512i index) const noexcept {
        const __m512i low = _mm512_permutex2var_epi8(part[0], index, part[1]);
        const __m512i high = _mm512_permutex2var_epi8(part[2], index, part[3]);
        return _mm512_mask_blend_epi8(_mm512_movepi8_mask(index), low, high);
    }
};

}  // namespace mmpack
