// Between fields.cpp and its vector translation units; not part of the
// kernels' interface. Called only when rans::simd() is Simd::avx512 (or, for
// the AVX2 one, Simd::avx2).
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmpack::fields {

// The encoder's lookup from a head value to its symbol, for the vector loop: the symbol, with
// bit 8 set when it has raw low bits, or kNoHeadSymbol; one entry past the values (the loop
// reads four bytes at a time).
inline constexpr std::uint16_t kNoHeadSymbol = 0xFFFF;
inline constexpr std::uint16_t kHasRawBits = 0x100;

// The same lookup in two levels, for the AVX-512 loop's byte permutes (64 elements at a time
// where the gather took 16). A head value is top << 4 | low: an 8-bit top (the exponent) and a
// 4-bit low (mantissa bits). float16's 8-bit head (5 exponent and 3 mantissa bits) is a top
// alone. A top whose values all have one entry keeps it in top_symbol and top_flags; the
// others (split, at most kMaxSplitTops) have a row of sixteen entries in row_symbol and
// row_flags, top_symbol naming the row.
inline constexpr std::uint8_t kRowRaw = 0x01;      // the symbol has raw low bits
inline constexpr std::uint8_t kRowMissing = 0x02;  // no symbol covers the value
inline constexpr std::uint8_t kRowSplit = 0x80;    // top_flags: look in the top's row
inline constexpr unsigned kMaxSplitTops = 16;
struct HeadRows {
    bool usable = false;  // false when more tops are split than rows fit
    alignas(64) std::uint8_t top_symbol[256] = {};
    alignas(64) std::uint8_t top_flags[256] = {};
    alignas(64) std::uint8_t row_symbol[kMaxSplitTops * 16] = {};
    alignas(64) std::uint8_t row_flags[kMaxSplitTops * 16] = {};
};

// head_symbols_avx512 through rows (usable) for a head (element >> shift) & 0xFFF with a low
// (has_low), or & 0xFF without (the top alone).
bool head_symbols_rows_avx512(const std::uint8_t* bytes, std::size_t groups, unsigned width, unsigned shift,
                              bool has_low, const HeadRows& rows, std::uint8_t* symbols,
                              std::uint16_t* raw_lanes) noexcept;

// Fields 1 and up of the first whole blocks of 64 elements (the layouts of the vector loops:
// float32, bfloat16, float16 with `half`) into planes[f - 1], nibble fields two to a byte;
// returns the elements done (a multiple of 64).
std::size_t tail_fields_avx512(const std::uint8_t* bytes, std::size_t n, unsigned width, bool half,
                               std::uint8_t* const* planes) noexcept;

// The head symbols of `groups` groups of sixteen elements of `width` bytes (2 or 4), whose head
// is (element >> shift) & mask: symbols[i] from lookup, raw_lanes[g] the lanes of group g whose
// symbols have raw bits. False when a value has no symbol.
bool head_symbols_avx512(const std::uint8_t* bytes, std::size_t groups, unsigned width, unsigned shift, unsigned mask,
                         const std::uint16_t* lookup, std::uint8_t* symbols, std::uint16_t* raw_lanes) noexcept;
bool head_symbols_avx2(const std::uint8_t* bytes, std::size_t groups, unsigned width, unsigned shift, unsigned mask,
                       const std::uint16_t* lookup, std::uint8_t* symbols, std::uint16_t* raw_lanes) noexcept;

// The decoder's tail values of a block with zero elements: the values of the elements whose
// zero[i] is 0 lie in order at `compact`; out[i] gets element i's, 0 for a zero. Does the first
// whole groups of 64 elements, returns how many elements that is and adds the compact values
// used to `taken`.
std::size_t expand_nonzero_avx512(const std::uint8_t* compact, const std::uint8_t* zero, std::size_t count,
                                  std::uint8_t* out, std::size_t& taken) noexcept;
// The same with AVX2, for groups of 8 elements while `compact` (compact_count values) holds 8
// more past `taken`.
std::size_t expand_nonzero_avx2(const std::uint8_t* compact, std::size_t compact_count, const std::uint8_t* zero,
                                std::size_t count, std::uint8_t* out, std::size_t& taken) noexcept;

// The decoder's values of `count` symbols from byte tables (64-byte aligned, 256 entries):
// values[i] = low[s] | high[s] << 8 as 16-bit values, or low[s] as bytes without `high`; and
// zero[i] = (s == zero_symbol) unless zero is null. Does the first whole groups of 64 symbols,
// returns how many that is.
std::size_t symbol_values_avx512(const std::uint8_t* symbols, std::size_t count, const std::uint8_t* low,
                                 const std::uint8_t* high, int zero_symbol, void* values, std::uint8_t* zero) noexcept;

// The positions i, ascending, of the symbols s = symbols[i] with raw_bits[s] > 0 (a 64-byte
// aligned table of 256 entries) into listed[0..n_listed), for the first whole groups of 64 of
// the `count` symbols; returns how many symbols that is. listed holds count + 16 entries.
std::size_t raw_symbols_avx512(const std::uint8_t* symbols, std::size_t count, const std::uint8_t* raw_bits,
                               std::uint32_t* listed, std::size_t& n_listed) noexcept;

// The encoder's fields of a chunk with zero elements, float32 (width 4) or 16-bit floats (width
// 2, float16 with `half`), for the first whole groups of sixteen of the n elements: head[i] and
// zero[i] for every element, the tail fields of the non-zero ones only, field f's at
// tails[(f - 1) * n + m] onwards (m counts them, and is advanced). Returns the elements done.
std::size_t split_nonzero_avx512(const std::uint8_t* bytes, std::size_t n, unsigned width, bool half,
                                 std::uint16_t* head, std::uint8_t* tails, std::uint8_t* zero, std::size_t& m) noexcept;

}  // namespace mmpack::fields
