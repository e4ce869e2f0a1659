// Field loops with AVX-512 (-mavx512f -mavx512bw -mavx512vbmi -mbmi2 -mpopcnt).
// The encoder's head symbols, with the lanes whose symbols have raw bits, so
// that the scalar pass writing raw bits visits only them: sixteen elements'
// head values to symbols per gather, or 64 per handful of byte permutes through
// HeadRows. And the generic loops' steps (chunks with zero elements: XOR
// deltas): the fields split with the tails compressed to the non-zero
// elements, symbol values and zero flags by byte permutes, the symbols with
// raw bits listed, and tail values expanded back into element order.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "fields_internal.hpp"
#include "simd_byte_table.hpp"

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

namespace {

// Bytes (v >> shift) & mask of 64 elements of `width` bytes (the first `lanes` of them read).
inline __m512i field_bytes(const std::uint8_t* bytes, unsigned width, __mmask64 lanes, unsigned shift,
                           unsigned mask) noexcept {
    const __m128i count = _mm_cvtsi32_si128(static_cast<int>(shift));
    if (width == 2) {
        const __m512i m = _mm512_set1_epi16(static_cast<short>(mask));
        const auto half = [&](unsigned h) {
            const auto in = static_cast<__mmask32>(lanes >> (32 * h));
            const __m512i v = _mm512_maskz_loadu_epi16(in, bytes + 64 * h);
            return _mm512_cvtepi16_epi8(_mm512_and_si512(_mm512_srl_epi16(v, count), m));
        };
        return _mm512_inserti64x4(_mm512_castsi256_si512(half(0)), half(1), 1);
    }
    const __m512i m = _mm512_set1_epi32(static_cast<int>(mask));
    const auto quarter = [&](unsigned q) {
        const auto in = static_cast<__mmask16>(lanes >> (16 * q));
        const __m512i v = _mm512_maskz_loadu_epi32(in, bytes + 64 * q);
        return _mm512_cvtepi32_epi8(_mm512_and_si512(_mm512_srl_epi32(v, count), m));
    };
    const __m256i low = _mm256_inserti128_si256(_mm256_castsi128_si256(quarter(0)), quarter(1), 1);
    const __m256i high = _mm256_inserti128_si256(_mm256_castsi128_si256(quarter(2)), quarter(3), 1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

}  // namespace

std::size_t tail_fields_avx512(const std::uint8_t* bytes, std::size_t n, unsigned width, bool half,
                               std::uint8_t* const* planes) noexcept {
    constexpr std::size_t kBlock = 64;
    const std::size_t blocks = n / kBlock;
    const auto mask = [](std::uint32_t m) { return _mm512_set1_epi32(static_cast<int>(m)); };
    for (std::size_t b = 0; b < blocks; ++b) {
        const std::uint8_t* block = bytes + b * kBlock * width;
        if (width == 2) {
            for (unsigned h = 0; h < 2; ++h) {  // 32 elements, two to a 32-bit lane
                const __m512i v = _mm512_loadu_si512(block + 64 * h);
                if (half) {  // sign and the low 7 bits: a byte
                    const __m512i t = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 8), _mm512_set1_epi16(0x80)),
                                                      _mm512_and_si512(v, _mm512_set1_epi16(0x7F)));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(planes[0] + b * kBlock + 32 * h), _mm512_cvtepi16_epi8(t));
                    continue;
                }
                // bfloat16: the sign << 3 | the low 3 bits, the odd element's in the high nibble
                const __m512i nibbles = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 12), _mm512_set1_epi16(8)),
                                                        _mm512_and_si512(v, _mm512_set1_epi16(7)));
                const __m512i pairs = _mm512_or_si512(_mm512_and_si512(nibbles, mask(0xF)),
                                                      _mm512_and_si512(_mm512_srli_epi32(nibbles, 12), mask(0xF0)));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(planes[0] + b * kBlock / 2 + 16 * h), _mm512_cvtepi32_epi8(pairs));
            }
            continue;
        }
        for (unsigned q = 0; q < 4; ++q) {  // float32: 16 elements, two to a 64-bit lane
            const __m512i v = _mm512_loadu_si512(block + 64 * q);
            const __m512i nibbles = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(v, 28), mask(8)),
                                                    _mm512_and_si512(_mm512_srli_epi32(v, 16), mask(7)));
            const __m512i pairs = _mm512_or_si512(_mm512_and_si512(nibbles, _mm512_set1_epi64(0xF)),
                                                  _mm512_and_si512(_mm512_srli_epi64(nibbles, 28), _mm512_set1_epi64(0xF0)));
            _mm_storel_epi64(reinterpret_cast<__m128i*>(planes[0] + b * kBlock / 2 + 8 * q), _mm512_cvtepi64_epi8(pairs));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(planes[1] + b * kBlock + 16 * q),
                             _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8)));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(planes[2] + b * kBlock + 16 * q), _mm512_cvtepi32_epi8(v));
        }
    }
    return blocks * kBlock;
}

bool head_symbols_rows_avx512(const std::uint8_t* bytes, std::size_t groups, unsigned width, unsigned shift,
                              bool has_low, const HeadRows& rows, std::uint8_t* symbols,
                              std::uint16_t* raw_lanes) noexcept {
    constexpr std::size_t kBlockGroups = 4;  // 64 elements, one byte each in a vector
    const ByteTable top_symbol(rows.top_symbol), top_flags(rows.top_flags);
    const ByteTable row_symbol(rows.row_symbol), row_flags(rows.row_flags);
    __mmask64 missing = 0;
    for (std::size_t g = 0; g < groups; g += kBlockGroups) {
        const auto count = static_cast<unsigned>(std::min(kBlockGroups, groups - g));
        const __mmask64 lanes = _bzhi_u64(~std::uint64_t{0}, 16 * count);
        const std::uint8_t* block = bytes + g * 16 * width;
        const __m512i top = field_bytes(block, width, lanes, has_low ? shift + 4 : shift, 0xFF);
        __m512i symbol = top_symbol(top);
        __m512i flags = top_flags(top);
        const __mmask64 split = _mm512_movepi8_mask(flags) & lanes;
        if (split != 0) {  // the row (top_symbol) and the low bits: row << 4 | low
            const __m512i low = has_low ? field_bytes(block, width, lanes, shift, 0xF) : _mm512_setzero_si512();
            const __m512i row_index =
                _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi16(symbol, 4), _mm512_set1_epi8(static_cast<char>(0xF0))), low);
            symbol = _mm512_mask_blend_epi8(split, symbol, row_symbol(row_index));
            flags = _mm512_mask_blend_epi8(split, flags, row_flags(row_index));
        }
        missing |= _mm512_test_epi8_mask(flags, _mm512_set1_epi8(kRowMissing)) & lanes;
        const std::uint64_t raw = _mm512_test_epi8_mask(flags, _mm512_set1_epi8(kRowRaw)) & lanes;
        std::memcpy(raw_lanes + g, &raw, 2 * count);  // group g + k: bits 16k to 16k + 15
        _mm512_mask_storeu_epi8(symbols + 16 * g, lanes, symbol);
    }
    return missing == 0;
}

std::size_t symbol_values_avx512(const std::uint8_t* symbols, std::size_t count, const std::uint8_t* low,
                                 const std::uint8_t* high, int zero_symbol, void* values, std::uint8_t* zero) noexcept {
    const ByteTable low_table(low);
    // (An unused table when high is null: the bytes read are the low table's, never stored.)
    const ByteTable high_table(high != nullptr ? high : low);
    // (zero_symbol is -1 when the field has none: then no symbol is flagged.)
    const __m512i zero_code = _mm512_set1_epi8(static_cast<char>(zero_symbol));
    const bool flag_zeros = zero != nullptr;
    const bool any_zero = zero_symbol >= 0;
    // unpacklo/hi interleave within 128-bit lanes; these put the four lanes' halves in order.
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    auto* const bytes = static_cast<std::uint8_t*>(values);
    std::size_t i = 0;
    for (; i + 64 <= count; i += 64) {
        const __m512i s = _mm512_loadu_si512(symbols + i);
        const __m512i lo = low_table(s);
        if (high == nullptr) {
            _mm512_storeu_si512(bytes + i, lo);
        } else {
            const __m512i hi = high_table(s);
            const __m512i a = _mm512_unpacklo_epi8(lo, hi);
            const __m512i b = _mm512_unpackhi_epi8(lo, hi);
            _mm512_storeu_si512(bytes + 2 * i, _mm512_permutex2var_epi64(a, first, b));
            _mm512_storeu_si512(bytes + 2 * i + 64, _mm512_permutex2var_epi64(a, second, b));
        }
        if (flag_zeros) {
            const __mmask64 is_zero = any_zero ? _mm512_cmpeq_epi8_mask(s, zero_code) : 0;
            _mm512_storeu_si512(zero + i, _mm512_maskz_set1_epi8(is_zero, 1));
        }
    }
    return i;
}

std::size_t raw_symbols_avx512(const std::uint8_t* symbols, std::size_t count, const std::uint8_t* raw_bits,
                               std::uint32_t* listed, std::size_t& n_listed) noexcept {
    const ByteTable table(raw_bits);
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    std::size_t n = 0;
    std::size_t i = 0;
    for (; i + 64 <= count; i += 64) {
        const __mmask64 raw = _mm512_test_epi8_mask(table(_mm512_loadu_si512(symbols + i)), _mm512_set1_epi8(-1));
        if (raw == 0) continue;
        for (unsigned q = 0; q < 4; ++q) {
            const auto these = static_cast<__mmask16>(raw >> (16 * q));
            // A compress in registers and a whole store (a compressing store is slow on Zen 4):
            // the lanes past the listed ones are overwritten by the next store or left unused.
            const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(i + 16 * q)));
            _mm512_storeu_si512(listed + n, _mm512_maskz_compress_epi32(these, at));
            n += static_cast<unsigned>(_mm_popcnt_u32(these));
        }
    }
    n_listed = n;
    return i;
}

std::size_t split_nonzero_avx512(const std::uint8_t* bytes, std::size_t n, unsigned width, bool half,
                                 std::uint16_t* head, std::uint8_t* tails, std::uint8_t* zero, std::size_t& m) noexcept {
    // The fields in 32-bit lanes by the formulas of field_of (docs/FORMAT.md), the tail fields
    // compressed to the non-zero lanes; each 16-byte store may run past the values it holds,
    // into bytes the next store overwrites (m + 16 <= i + 16 <= n keeps it inside the field).
    const __m512i low3 = _mm512_set1_epi32(7);
    const __m512i byte = _mm512_set1_epi32(0xFF);
    std::size_t at = m;
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v;
        __m512i h;
        __m512i f1;
        if (width == 4) {
            v = _mm512_loadu_si512(bytes + 4 * i);
            h = _mm512_and_si512(_mm512_srli_epi32(v, 19), _mm512_set1_epi32(0xFFF));
            f1 = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(v, 31), 3),
                                 _mm512_and_si512(_mm512_srli_epi32(v, 16), low3));
        } else {
            v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 2 * i)));
            if (half) {
                h = _mm512_and_si512(_mm512_srli_epi32(v, 7), byte);
                f1 = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(v, 15), 7),
                                     _mm512_and_si512(v, _mm512_set1_epi32(0x7F)));
            } else {
                h = _mm512_and_si512(_mm512_srli_epi32(v, 3), _mm512_set1_epi32(0xFFF));
                f1 = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(v, 15), 3), _mm512_and_si512(v, low3));
            }
        }
        const __mmask16 nonzero = _mm512_test_epi32_mask(v, v);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(head + i), _mm512_cvtepi32_epi16(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(zero + i),
                         _mm512_cvtepi32_epi8(_mm512_maskz_set1_epi32(static_cast<__mmask16>(~nonzero), 1)));
        const auto put = [&](unsigned f, __m512i values) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(tails + (f - 1) * n + at),
                             _mm512_cvtepi32_epi8(_mm512_maskz_compress_epi32(nonzero, values)));
        };
        put(1, f1);
        if (width == 4) {
            put(2, _mm512_and_si512(_mm512_srli_epi32(v, 8), byte));
            put(3, _mm512_and_si512(v, byte));
        }
        at += static_cast<unsigned>(_mm_popcnt_u32(nonzero));
    }
    m = at;
    return i;
}

std::size_t expand_nonzero_avx512(const std::uint8_t* compact, const std::uint8_t* zero, std::size_t count,
                                  std::uint8_t* out, std::size_t& taken) noexcept {
    // Sixteen elements per expand (bytes widened to 32-bit lanes: a byte expand needs VBMI2),
    // their compact values read by a masked load, which reads nothing past the ones used.
    std::size_t at = taken;
    std::size_t i = 0;
    for (; i + 64 <= count; i += 64) {
        const __mmask64 keep = _mm512_cmpeq_epi8_mask(_mm512_loadu_si512(zero + i), _mm512_setzero_si512());
        for (unsigned q = 0; q < 4; ++q) {
            const auto lanes = static_cast<__mmask16>(keep >> (16 * q));
            const unsigned n = static_cast<unsigned>(_mm_popcnt_u32(lanes));
            const __m512i values = _mm512_maskz_loadu_epi8(_bzhi_u64(~std::uint64_t{0}, n), compact + at);
            const __m512i placed = _mm512_maskz_expand_epi32(lanes, _mm512_cvtepu8_epi32(_mm512_castsi512_si128(values)));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16 * q), _mm512_cvtepi32_epi8(placed));
            at += n;
        }
    }
    taken = at;
    return i;
}

}  // namespace mmpack::fields
