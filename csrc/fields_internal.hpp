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

// The head symbols of `groups` groups of sixteen elements of `width` bytes (2 or 4), whose head
// is (element >> shift) & mask: symbols[i] from lookup, raw_lanes[g] the lanes of group g whose
// symbols have raw bits. False when a value has no symbol.
bool head_symbols_avx512(const std::uint8_t* bytes, std::size_t groups, unsigned width, unsigned shift, unsigned mask,
                         const std::uint16_t* lookup, std::uint8_t* symbols, std::uint16_t* raw_lanes) noexcept;
bool head_symbols_avx2(const std::uint8_t* bytes, std::size_t groups, unsigned width, unsigned shift, unsigned mask,
                       const std::uint16_t* lookup, std::uint8_t* symbols, std::uint16_t* raw_lanes) noexcept;

}  // namespace mmpack::fields
