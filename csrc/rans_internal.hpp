// Between the portable and the AVX2 translation units of the decoder; not
// part of the kernels' interface. The AVX2 loops are called only when
// rans::have_avx2(), and only on whole groups of kLanes symbols starting at
// lane 0; the portable code finishes whatever they leave.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bits.hpp"
#include "mmpack/rans.hpp"

namespace mmpack::rans {

// Decodes up to `groups` groups of kLanes symbols while at least 32 bytes of
// words remain (so the vector loads stay inside the stream). Returns the
// groups decoded.
std::size_t decode_groups_avx2(Decoder& d, const DecodeTable& table, std::size_t groups, std::uint8_t* out) noexcept;

// A floating-point head field prepared for the fused loops: per symbol, the
// head value already shifted into place with bit 31 set when the symbol has
// raw low bits (then raw_bits says how many, read from the bit stream).
struct FusedHead {
    const DecodeTable* table = nullptr;
    const std::uint32_t* value = nullptr;  // kMaxSymbols entries
    const std::uint8_t* raw_bits = nullptr;  // kMaxSymbols entries
    unsigned shift = 0;
};

// float32 chunks whose head is rANS-coded and whose other fields are raw:
// element i = head | nibble's low 3 bits << 16 | nibble's bit 3 << 31 |
// hi[i] << 8 | lo[i]. `nibbles` holds 8 bytes per group, hi and lo 16.
// Returns the groups decoded; ok becomes false when the raw bits run out.
std::size_t decode_float32_groups_avx2(Decoder& d, const FusedHead& head, bits::Reader& raw,
                                       const std::uint8_t* nibbles, const std::uint8_t* hi, const std::uint8_t* lo,
                                       std::size_t groups, std::uint32_t* out, bool& ok) noexcept;

// 16-bit floats the same way. bfloat16 (half false): element i = head | nibble's low 3
// bits | nibble's bit 3 << 15, 8 bytes of nibbles per group; float16 (half true): head |
// tail's low 7 bits | tail's bit 7 << 15, 16 tail bytes per group.
std::size_t decode_float16_groups_avx2(Decoder& d, const FusedHead& head, bits::Reader& raw, const std::uint8_t* tail,
                                       bool half, std::size_t groups, std::uint16_t* out, bool& ok) noexcept;

}  // namespace mmpack::rans
