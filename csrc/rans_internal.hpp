// Between the portable and the vector translation units of the coder; not
// part of the kernels' interface. The vector loops are called only when
// rans::simd() names their level, and only on whole groups of kLanes symbols
// starting at lane 0; the portable code finishes whatever they leave.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "bits.hpp"
#include "mmpack/rans.hpp"

namespace mmpack::rans {

// Decodes up to `groups` groups of kLanes symbols while at least 32 bytes of
// words remain (so the vector loads stay inside the stream). Returns the
// groups decoded.
std::size_t decode_groups_avx2(Decoder& d, const DecodeTable& table, std::size_t groups, std::uint8_t* out) noexcept;

// Encodes `groups` whole groups of symbols, the last first, from the states x (updated) into
// the words below p (moved down past them): the same words as the scalar loop. Needs 16
// writable bytes below p's final place (the scratch's room for the states).
void encode_groups_avx2(const std::uint8_t* symbols, std::size_t groups, const EncodeTable& table, std::uint32_t* x,
                        std::uint8_t*& p) noexcept;
// The same for the first `groups` groups of two streams at once, step by step side by side.
void encode_group_pairs_avx2(const std::uint8_t* symbols_a, const std::uint8_t* symbols_b, std::size_t groups,
                             const EncodeTable& table, std::uint32_t* x_a, std::uint8_t*& p_a, std::uint32_t* x_b,
                             std::uint8_t*& p_b) noexcept;

// Calls body(std::integral_constant<unsigned, n>{}) with n = count (1 to kMaxTogether; 1 below):
// the vector loops take the number of chunks stepping together as a compile-time constant, so
// that their states stay in registers. (Instantiated in each vector translation unit with its
// own body: no two units share an instantiation built for different instruction sets.)
template <typename Body>
auto with_chunk_count(unsigned count, Body body) {
    static_assert(kMaxTogether == 4, "one case per count");
    switch (count) {
        case 4: return body(std::integral_constant<unsigned, 4>{});
        case 3: return body(std::integral_constant<unsigned, 3>{});
        case 2: return body(std::integral_constant<unsigned, 2>{});
        default: return body(std::integral_constant<unsigned, 1>{});
    }
}

// A floating-point head field prepared for the fused loops: per symbol, the
// head value already shifted into place with bit 31 set when the symbol has
// raw low bits (then raw_bits says how many, read from the bit stream).
struct FusedHead {
    const DecodeTable* table = nullptr;
    const std::uint32_t* value = nullptr;  // kMaxSymbols entries
    const std::uint8_t* raw_bits = nullptr;  // kMaxSymbols entries
    // The unshifted values as bytes (64-byte aligned, kMaxSymbols each): the low byte, and
    // the high bits with bit 7 set when the symbol has raw low bits.
    const std::uint8_t* value_low = nullptr;
    const std::uint8_t* value_high = nullptr;
    unsigned shift = 0;
    // Symbols run_first to run_first + run_last have no raw bits and the values symbol +
    // run_delta (before the shift): the AVX2 loop computes those instead of gathering them.
    // run_first = kMaxSymbols when there is no such run.
    std::uint32_t run_first = kMaxSymbols;
    std::uint32_t run_last = 0;
    std::uint32_t run_delta = 0;
};

// One chunk in a fused loop: its head's decoder and raw bits, its other fields as plain
// bytes (nibbles packed two to a byte), and where its elements go (any alignment).
struct FusedStream {
    Decoder* decoder = nullptr;
    const FusedHead* head = nullptr;
    bits::Reader* raw = nullptr;
    const std::uint8_t* tails[3] = {};  // fields 1, 2, 3
    std::uint8_t* out = nullptr;
};

// float32 chunks whose head is rANS-coded: element i = head | nibble's low 3 bits << 16 |
// nibble's bit 3 << 31 | tails[1][i] << 8 | tails[2][i]. `count` (1 to kMaxTogether) chunks of
// one layout (each with its own head's tables) advance together, so that their dependency chains
// overlap (each state update waits on a gather). A chunk whose raw bits run out gets ok[k]
// false, and every other chunk has the returned groups decoded.
std::size_t decode_float32_groups_avx2(FusedStream* streams, unsigned count, std::size_t groups, bool* ok) noexcept;

// 16-bit floats the same way. bfloat16 (half false): element i = head | nibble's low 3 bits |
// nibble's bit 3 << 15; float16 (half true): head | tails[0][i]'s low 7 bits | its bit 7 << 15.
std::size_t decode_float16_groups_avx2(FusedStream* streams, unsigned count, bool half, std::size_t groups,
                                       bool* ok) noexcept;

// The same loops with AVX-512 (a chunk's sixteen states are one vector), called only when
// rans::simd() is Simd::avx512.
//
// Encodes `groups` whole groups of symbols, the last first, from the states x (updated) into
// the words below p (moved down past them): the same words as the scalar loop. Needs 32
// writable bytes below p's final place (the scratch's room for the states).
void encode_groups_avx512(const std::uint8_t* symbols, std::size_t groups, const EncodeTable& table, std::uint32_t* x,
                          std::uint8_t*& p) noexcept;
// The same for the first `groups` groups of two streams at once, step by step side by side.
void encode_group_pairs_avx512(const std::uint8_t* symbols_a, const std::uint8_t* symbols_b, std::size_t groups,
                               const EncodeTable& table, std::uint32_t* x_a, std::uint8_t*& p_a, std::uint32_t* x_b,
                               std::uint8_t*& p_b) noexcept;
// encoder_quotients with the AVX-512 encoder's division.
void quotients_avx512(const std::uint32_t* x, const std::uint32_t* freq, std::size_t n, std::uint32_t* q) noexcept;
// The same with the AVX2 encoder's division.
void quotients_avx2(const std::uint32_t* x, const std::uint32_t* freq, std::size_t n, std::uint32_t* q) noexcept;
std::size_t decode_groups_avx512(Decoder& d, const DecodeTable& table, std::size_t groups, std::uint8_t* out) noexcept;
// A stream stepped beside others (step_streams_avx2, _avx512): up to `groups` whole groups of
// its symbols go to out + 16 * done.
struct StreamSteps {
    Decoder* decoder = nullptr;
    const DecodeTable* table = nullptr;
    std::uint8_t* out = nullptr;
    std::size_t groups = 0;  // wanted
    std::size_t done = 0;    // stepped
    bool short_of_words = false;
};
// Steps `count` streams (of any tables, each at a group boundary: lane 0) up to four side by
// side, so that their chains of states overlap, each until its groups are done or its words
// run short (its last words are then Decoder::decode's to read): the symbols Decoder::decode
// would give.
void step_streams_avx512(StreamSteps* streams, std::size_t count) noexcept;
// The same with AVX2 (two 8-lane steps a group).
void step_streams_avx2(StreamSteps* streams, std::size_t count) noexcept;
// build_decode_table's fill, a block of 16 slots a store (the same entries).
void build_decode_table_avx512(const std::uint16_t* freqs, unsigned n, DecodeTable& table) noexcept;
std::size_t decode_float32_groups_avx512(FusedStream* streams, unsigned count, std::size_t groups, bool* ok) noexcept;
std::size_t decode_float16_groups_avx512(FusedStream* streams, unsigned count, bool half, std::size_t groups,
                                         bool* ok) noexcept;

}  // namespace mmpack::rans
