// rANS: the entropy coder of format version 3 (docs/FORMAT.md, "The rANS
// stream"). Sixteen interleaved 32-bit states, 16-bit renormalisation and a
// 12-bit probability scale: symbol i of a stream is coded by state i mod 16,
// so a decoder keeps sixteen independent dependency chains in flight (or two
// AVX2 vectors of eight lanes), and every decoding step reads at most one
// 16-bit word.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "mmpack/span.hpp"

namespace mmpack::rans {

inline constexpr unsigned kScaleBits = 12;
inline constexpr std::uint32_t kScale = 1u << kScaleBits;
inline constexpr unsigned kLanes = 16;
inline constexpr std::uint32_t kLow = 1u << 16;  // states live in [kLow, 2^32)
inline constexpr std::size_t kStateBytes = kLanes * 4;
inline constexpr unsigned kMaxSymbols = 256;
// Chunks of one tensor the vector loops decode together (their chains of states overlap).
inline constexpr unsigned kMaxTogether = 4;

// slot -> freq | (slot - start) << 12 | symbol << 24, for the 4096 slots, then a slack that
// build_decode_table writes over.
struct DecodeTable {
    static constexpr unsigned kFillBlock = 16;
    alignas(64) std::uint32_t slot[kScale + kFillBlock];
};

// freqs[0..n) >= 1 summing to kScale, 2 <= n <= kMaxSymbols (callers validate).
void build_decode_table(const std::uint16_t* freqs, unsigned n, DecodeTable& table) noexcept;

// Division-free encoding of one symbol: x / freq as a multiplication by a
// reciprocal, exact for every 32-bit state.
struct EncodeSymbol {
    std::uint32_t x_max = 0;  // states at or above it emit a word first
    std::uint64_t rcp = 0;
    std::uint16_t freq = 0;
    std::uint16_t start = 0;
    std::uint16_t shift = 0;
};

// A field's encoding table: per symbol the scalar loop's entry, the AVX2
// loop's (freq | start << 16), and the same 24 bits as three byte planes for
// the AVX-512 loop's byte permutes: freq's low byte; freq's high nibble with
// start's low one above it; start's high byte. Entries past the alphabet
// stay zero.
struct EncodeTable {
    EncodeSymbol symbol[kMaxSymbols];
    alignas(64) std::uint32_t packed[kMaxSymbols] = {};
    alignas(64) std::uint8_t plane[3][kMaxSymbols] = {};
};

// freqs[0..n) as for build_decode_table.
void build_encode_table(const std::uint16_t* freqs, unsigned n, EncodeTable& table) noexcept;

// x[i] / freq[i] for the states the encoder divides (1 <= freq[i] < kScale, x[i] < freq[i] <<
// 20), as the vector encoding loops compute it when simd() is Simd::avx512 or Simd::avx2 (they
// start from a single-precision estimate, and tests check it against exact division); else
// exactly.
void encoder_quotients(const std::uint32_t* x, const std::uint32_t* freq, std::size_t n, std::uint32_t* q) noexcept;

// Appends the stream coding symbols[0..count) (indices into the table's
// alphabet) to out: the sixteen final states, then the words. Nothing for
// count == 0. Every loop (simd()) writes the same bytes.
void encode(const std::uint8_t* symbols, std::size_t count, const EncodeTable& table, std::vector<std::uint8_t>& out);

// encode() of two symbol sequences with one table, appending stream k to
// *outs[k]: the same bytes as two calls, their state chains side by side in
// the vector loops (one chain waits on each step's latency).
void encode_two(const std::uint8_t* const symbols[2], const std::size_t counts[2], const EncodeTable& table,
                std::vector<std::uint8_t>* const outs[2]);

// Decodes one stream. Reads never pass `end`: a stream that runs out of
// words, or whose states do not return to kLow, is reported as corrupt.
struct Decoder {
    std::uint32_t x[kLanes] = {};
    const std::uint8_t* next = nullptr;  // next 16-bit word
    const std::uint8_t* end = nullptr;
    std::size_t lane = 0;  // lane of the next symbol

    // False when the stream is shorter than its states, has an odd length or
    // a state below kLow.
    bool start(ConstBytes stream) noexcept;
    // Decodes count symbols into out; false when the words run out.
    bool decode(const DecodeTable& table, std::size_t count, std::uint8_t* out) noexcept;
    // True when every state is back at kLow and every word was read.
    bool finished() const noexcept;
};

// One scalar decoding step of lane `lane`; false when a word is needed past end.
inline bool decode_step(Decoder& d, const DecodeTable& table, std::uint8_t& symbol) noexcept {
    std::uint32_t& x = d.x[d.lane];
    const std::uint32_t e = table.slot[x & (kScale - 1)];
    x = (e & 0xFFF) * (x >> kScaleBits) + ((e >> 12) & 0xFFF);
    if (x < kLow) {
        if (d.end - d.next < 2) return false;
        x = (x << 16) | (static_cast<std::uint32_t>(d.next[0]) | static_cast<std::uint32_t>(d.next[1]) << 8);
        d.next += 2;
    }
    symbol = static_cast<std::uint8_t>(e >> 24);
    d.lane = (d.lane + 1) % kLanes;
    return true;
}

// The decoding loops, from the portable ones up; each vector level decodes
// exactly what the portable loops decode (tests compare them all).
enum class Simd : int { scalar = 0, avx2 = 1, avx512 = 2 };

// The best loops this CPU (and its OS, for the vector registers) can run.
Simd best_simd() noexcept;
// The loops in use: best_simd(), capped by limit_simd.
Simd simd() noexcept;
// Caps the loops in use at `most` (Simd::avx512, the default, lets the CPU's
// best run); tests and benchmarks compare the levels.
void limit_simd(Simd most) noexcept;
// "scalar", "avx2" or "avx512".
const char* simd_name(Simd level) noexcept;

}  // namespace mmpack::rans
