// The rANS decoding loops with AVX-512: the sixteen states are one vector.
// This file alone is compiled with -mavx512f -mavx512bw -mavx512vbmi -mbmi -mbmi2 -mpopcnt;
// rans.cpp and fields.cpp call it only after the CPU (and the OS, for the
// vector registers' state) reported them.
//
// One step: gather each lane's table entry, x = freq * (x >> 12) + bias,
// then the lanes whose state fell below 2^16 take the next words in lane
// order (an expand under the lane mask), exactly as the scalar loop reads
// them one lane after the other. With one vector per step instead of two,
// the loop holds everything in registers and issues half the instructions
// of the AVX2 one.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "rans_internal.hpp"
#include "simd_byte_table.hpp"
#include "simd_nibbles.hpp"
#include "simd_steps.hpp"

namespace mmpack::rans {

namespace {

// At least this many bytes of words must remain before a step: the
// unconditional 32-byte load then stays inside the stream.
constexpr std::ptrdiff_t kGroupBytes = 32;

inline __m512i step(__m512i& x, const DecodeTable& table, const std::uint8_t*& next) noexcept {
    const __m512i mask12 = _mm512_set1_epi32(0xFFF);
    const __m512i entry = _mm512_i32gather_epi32(_mm512_and_si512(x, mask12), table.slot, 4);
    const __m512i freq = _mm512_and_si512(entry, mask12);
    const __m512i bias = _mm512_and_si512(_mm512_srli_epi32(entry, 12), mask12);
    const __m512i decoded = _mm512_add_epi32(_mm512_mullo_epi32(freq, _mm512_srli_epi32(x, kScaleBits)), bias);
    const __mmask16 need = _mm512_cmplt_epu32_mask(decoded, _mm512_set1_epi32(static_cast<int>(kLow)));
    const __m512i words = _mm512_maskz_expand_epi32(
        need, _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(next))));
    x = _mm512_mask_or_epi32(decoded, need, _mm512_slli_epi32(decoded, 16), words);
    next += 2 * static_cast<unsigned>(_mm_popcnt_u32(need));
    return entry;
}

inline __m512i symbols_of(__m512i entry) noexcept { return _mm512_srli_epi32(entry, 24); }

// Sixteen lanes' values of group I of four from the looked-up bytes.
template <int I>
inline __m512i group_values(__m512i low, __m512i high) noexcept {
    return _mm512_or_si512(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(low, I)),
                           _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(high, I)), 8));
}

// The value bytes of the 64 elements whose symbols are `symbols` (of which the first `used` are
// decoded ones): the low byte, the high bits, and which elements have raw low bits.
struct HeadBytes {
    __m512i low;
    __m512i high;
    std::uint64_t special;
};

inline HeadBytes head_bytes(const std::uint8_t* symbols, std::size_t used, const ByteTable& low_table,
                            const ByteTable& high_table) noexcept {
    const __m512i index = _mm512_load_si512(symbols);
    const __m512i high = high_table(index);
    std::uint64_t special = _mm512_movepi8_mask(high);
    if (used < 64) special &= (std::uint64_t{1} << used) - 1;
    return {low_table(index), _mm512_and_si512(high, _mm512_set1_epi8(0x7F)), special};
}

// Head values of 64 elements as four vectors of 16 32-bit lanes, shifted into place, without
// the raw low bits of the rare symbols that have them (patch_raw_bits adds those). Returns which
// elements have them.
inline std::uint64_t head_values(const std::uint8_t* symbols, std::size_t used, const ByteTable& low_table,
                                 const ByteTable& high_table, unsigned shift, __m512i* values) noexcept {
    const HeadBytes bytes = head_bytes(symbols, used, low_table, high_table);
    const __m128i count = _mm_cvtsi32_si128(static_cast<int>(shift));
    values[0] = _mm512_sll_epi32(group_values<0>(bytes.low, bytes.high), count);
    values[1] = _mm512_sll_epi32(group_values<1>(bytes.low, bytes.high), count);
    values[2] = _mm512_sll_epi32(group_values<2>(bytes.low, bytes.high), count);
    values[3] = _mm512_sll_epi32(group_values<3>(bytes.low, bytes.high), count);
    return bytes.special;
}

// The same for 16-bit elements, kept 16 bits wide (two vectors of 32 in element order): the
// 32-bit lanes of head_values would be narrowed again on the way out, at twice the work.
inline std::uint64_t half_values(const std::uint8_t* symbols, std::size_t used, const ByteTable& low_table,
                                 const ByteTable& high_table, unsigned shift, __m512i* values) noexcept {
    const HeadBytes bytes = head_bytes(symbols, used, low_table, high_table);
    // Unpacking pairs bytes within each 128-bit lane: quadwords 0-1 of `first` are elements 0-7,
    // of `second` 8-15, and so on; two quadword permutes put them in order.
    const __m512i first = _mm512_unpacklo_epi8(bytes.low, bytes.high);
    const __m512i second = _mm512_unpackhi_epi8(bytes.low, bytes.high);
    const __m128i count = _mm_cvtsi32_si128(static_cast<int>(shift));
    values[0] = _mm512_sll_epi16(_mm512_permutex2var_epi64(first, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second), count);
    values[1] = _mm512_sll_epi16(_mm512_permutex2var_epi64(first, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), second), count);
    return bytes.special;
}

// The raw low bits of the `special` elements, in element order, ORed into the elements already
// written at `out` (T wide, the head at `shift`): after the vector stores, so that building the
// next elements never waits on this chain of reads. (Merged into the vectors first, the raw bits
// went through memory, and the vector loads waited for the reads and a failed store forwarding:
// a quarter of the CNN's bfloat16 decoding on an Intel Xeon.) False when the raw bits run out.
template <typename T>
inline bool patch_raw_bits(const std::uint8_t* symbols, std::uint64_t special, const FusedHead& head, bits::Reader& raw,
                           std::uint8_t* out) noexcept {
    for (; special != 0; special &= special - 1) {
        const unsigned at = static_cast<unsigned>(__builtin_ctzll(special));
        std::uint32_t bits = 0;
        if (!raw.read(head.raw_bits[symbols[at]], bits)) return false;
        T element;
        std::memcpy(&element, out + sizeof(T) * at, sizeof(T));
        element = static_cast<T>(element | (bits << head.shift));
        std::memcpy(out + sizeof(T) * at, &element, sizeof(T));
    }
    return true;
}

inline __m512i widen16(const std::uint8_t* bytes) noexcept {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
}

// Groups of a block: the rANS steps of a block run first, into its symbols, and the head
// values, raw bits and other fields after, so that the branch on rare raw bits never stalls
// the chain of states (each step waits on a gather).
constexpr std::size_t kBlockGroups = 64;

// The rANS steps of one block for `kCount` chunks: up to `block` groups, fewer when a chunk's
// words run short. Returns the groups stepped. Apart from the head and tail work, so that the
// compiler keeps the states in registers: inside the whole loop it kept them on the stack, each
// step then waiting on a store forwarded to the next one's load. (No slower on Zen 4, where the
// gathers bound the loop; measured equal. A CPU with faster gathers would feel it.)
template <unsigned kCount>
[[gnu::noinline]] std::size_t step_block(__m512i* states, const std::uint8_t** next, const std::uint8_t* const* ends,
                                         const DecodeTable* const* tables, std::size_t block,
                                         std::uint8_t (*symbols)[kBlockGroups * kLanes]) noexcept {
    return step_groups<kCount, kGroupBytes>(
        states, next, ends, block, [&](unsigned k, __m512i& x, const std::uint8_t*& at, std::size_t g) {
            const __m512i symbol = symbols_of(step(x, *tables[k], at));
            _mm_store_si128(reinterpret_cast<__m128i*>(symbols[k] + g * kLanes), _mm512_cvtepi32_epi8(symbol));
        });
}

// The loop shared by both element types, over `kCount` chunks stepping together (two chunks'
// chains overlap), each with its own head's tables (the chunks may be of different tensors).
// Finish(stream, symbols, groups, first element, raw bits) writes the elements of a block's
// groups of one chunk, false when the chunk's raw bits run out: that chunk is marked failed, and
// the others finish the block, so every chunk not failed has the returned groups done.
template <unsigned kCount, typename Finish>
std::size_t fused_groups(FusedStream* streams, std::size_t groups, bool* ok, Finish finish) noexcept {
    __m512i x[kCount];
    const std::uint8_t* next[kCount];
    const std::uint8_t* ends[kCount];
    for (unsigned k = 0; k < kCount; ++k) {
        x[k] = _mm512_loadu_si512(streams[k].decoder->x);
        next[k] = streams[k].decoder->next;
        ends[k] = streams[k].decoder->end;
        ok[k] = true;
    }
    // Groups are looked up four at a time, so the last four of a block may hold symbols of an
    // earlier block (looked up, never used); zeroed so that none is ever uninitialised.
    alignas(64) std::uint8_t symbols[kCount][kBlockGroups * kLanes] = {};
    const DecodeTable* tables[kCount];
    for (unsigned k = 0; k < kCount; ++k) tables[k] = streams[k].head->table;
    std::size_t g = 0;
    bool failed = false;
    bool room = true;
    while (g < groups && room && !failed) {
        const std::size_t block = std::min(kBlockGroups, groups - g);
        const std::size_t stepped = step_block<kCount>(x, next, ends, tables, block, symbols);
        room = stepped == block;
        for (unsigned k = 0; k < kCount; ++k) {
            // A copy, so that the reader's state stays in registers across the block.
            bits::Reader raw = *streams[k].raw;
            ok[k] = finish(streams[k], symbols[k], stepped, g * kLanes, raw);
            failed = failed || !ok[k];
            *streams[k].raw = raw;
        }
        g += stepped;
    }
    for (unsigned k = 0; k < kCount; ++k) {
        _mm512_storeu_si512(streams[k].decoder->x, x[k]);
        streams[k].decoder->next = next[k];
    }
    return g;
}

template <typename Finish>
std::size_t fused(FusedStream* streams, unsigned count, std::size_t groups, bool* ok, Finish finish) noexcept {
    return with_chunk_count(count, [&](auto n) { return fused_groups<decltype(n)::value>(streams, groups, ok, finish); });
}

// The encoder looks up its symbols' table entries a block of four groups at a time, with byte
// permutes (vpermi2b over the two 128-entry halves of each of the table's three byte planes),
// not gathers: on Zen 4 a 16-lane gather costs 20-30 cycles, and the gathering loop (the entry
// and two 8-lane reciprocals per group) spent 1.3 ns a symbol against 0.53 for this one in a
// standalone copy fed the same symbols.
constexpr unsigned kEntryGroups = 4;

struct BlockEntries {
    alignas(64) std::uint8_t plane[3][kEntryGroups * kLanes];
};

// The entries of the first `groups` (1 to 4) groups at `symbols`: the other lanes are not read.
inline void look_up(const ByteTable* planes, const std::uint8_t* symbols, unsigned groups, BlockEntries& e) noexcept {
    const __m512i s = _mm512_maskz_loadu_epi8(_bzhi_u64(~std::uint64_t{0}, kLanes * groups), symbols);
    for (unsigned k = 0; k < 3; ++k) _mm512_store_si512(e.plane[k], planes[k](s));
}

// x / freq for states x < freq << 20 (so quotients below 2^20), estimated in single precision
// and made exact. The estimate's relative error is below 2^-21: x rounded to a float (2^-24),
// 1 / freq from vrcp14ps (2^-14) and one Newton step (then 2^-28, plus its two roundings of
// 2^-24), and the product's rounding. So it lies within half a unit of x / freq (below 2^20), and its
// truncation is q, q - 1 or q + 1 whatever the CPU's vrcp14ps returns: one correction each
// way, and the bytes are the scalar loop's. The remainder goes to `r`.
inline __m512i quotient(__m512i x, __m512i freq, __m512i& r) noexcept {
    const __m512 f = _mm512_cvtepu32_ps(freq);
    const __m512 r14 = _mm512_rcp14_ps(f);
    const __m512 rcp = _mm512_mul_ps(r14, _mm512_fnmadd_ps(f, r14, _mm512_set1_ps(2.0F)));
    __m512i q = _mm512_cvttps_epu32(_mm512_mul_ps(_mm512_cvtepu32_ps(x), rcp));
    r = _mm512_sub_epi32(x, _mm512_mullo_epi32(q, freq));  // in [-freq, 2 freq)
    const __m512i one = _mm512_set1_epi32(1);
    const __mmask16 below = _mm512_cmplt_epi32_mask(r, _mm512_setzero_si512());
    q = _mm512_mask_sub_epi32(q, below, q, one);
    r = _mm512_mask_add_epi32(r, below, r, freq);
    const __mmask16 above = _mm512_cmpge_epi32_mask(r, freq);
    r = _mm512_mask_sub_epi32(r, above, r, freq);
    return _mm512_mask_add_epi32(q, above, q, one);
}

// One group of one stream (group j of its block's entries): the sixteen states after coding it
// (the words of the lanes that emit go below `out`, which moves down past them).
inline __m512i encode_group(__m512i state, const BlockEntries& e, unsigned j, std::uint8_t*& out) noexcept {
    const auto widen = [&](unsigned k) {
        return _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(e.plane[k] + kLanes * j)));
    };
    const __m512i b0 = widen(0), b1 = widen(1), b2 = widen(2);
    const __m512i freq = _mm512_or_si512(b0, _mm512_slli_epi32(_mm512_and_si512(b1, _mm512_set1_epi32(0xF)), 8));
    const __m512i start = _mm512_or_si512(_mm512_srli_epi32(b1, 4), _mm512_slli_epi32(b2, 4));
    // Lanes at or above freq << 20 emit their low word first. The words go below `out` in
    // lane order (the decoder reads them so): compressed, then moved to the top lanes, so
    // that a 32-byte store ending at `out` writes them and only scratch below.
    const __mmask16 emit = _mm512_cmpge_epu32_mask(state, _mm512_slli_epi32(freq, 32 - kScaleBits));
    const unsigned n = static_cast<unsigned>(_mm_popcnt_u32(emit));
    const __m512i words = _mm512_maskz_expand_epi32(static_cast<__mmask16>(0xFFFF0000u >> n),
                                                    _mm512_maskz_compress_epi32(emit, state));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out - 32), _mm512_cvtepi32_epi16(words));
    out -= 2 * n;
    state = _mm512_mask_srli_epi32(state, emit, state, 16);
    __m512i r;
    const __m512i q = quotient(state, freq, r);
    return _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(q, kScaleBits), r), start);
}

// `groups` whole groups of kChains streams side by side, the last first (their chains of
// states overlap).
template <unsigned kChains>
void encode_chains(const std::uint8_t* const* symbols, std::size_t groups, const EncodeTable& table,
                   std::uint32_t* const* x, std::uint8_t** p) noexcept {
    __m512i state[kChains];
    for (unsigned k = 0; k < kChains; ++k) state[k] = _mm512_loadu_si512(x[k]);
    const ByteTable planes[3] = {ByteTable(table.plane[0]), ByteTable(table.plane[1]), ByteTable(table.plane[2])};
    BlockEntries entries[kChains];
    for (std::size_t g = groups; g > 0;) {
        const std::size_t first = (g - 1) / kEntryGroups * kEntryGroups;  // the block of group g - 1
        const auto count = static_cast<unsigned>(g - first);
        for (unsigned k = 0; k < kChains; ++k) look_up(planes, symbols[k] + first * kLanes, count, entries[k]);
        for (unsigned j = count; j-- > 0;) {
            for (unsigned k = 0; k < kChains; ++k) state[k] = encode_group(state[k], entries[k], j, p[k]);
        }
        g = first;
    }
    for (unsigned k = 0; k < kChains; ++k) _mm512_storeu_si512(x[k], state[k]);
}

}  // namespace

void quotients_avx512(const std::uint32_t* x, const std::uint32_t* freq, std::size_t n, std::uint32_t* q) noexcept {
    for (std::size_t i = 0; i < n; i += kLanes) {
        const auto lanes = static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<unsigned>(std::min<std::size_t>(kLanes, n - i))));
        __m512i r;
        const __m512i quotients =
            quotient(_mm512_maskz_loadu_epi32(lanes, x + i), _mm512_maskz_loadu_epi32(lanes, freq + i), r);
        _mm512_mask_storeu_epi32(q + i, lanes, quotients);
    }
}

void encode_groups_avx512(const std::uint8_t* symbols, std::size_t groups, const EncodeTable& table, std::uint32_t* x,
                          std::uint8_t*& p) noexcept {
    encode_chains<1>(&symbols, groups, table, &x, &p);
}

void encode_group_pairs_avx512(const std::uint8_t* symbols_a, const std::uint8_t* symbols_b, std::size_t groups,
                               const EncodeTable& table, std::uint32_t* x_a, std::uint8_t*& p_a, std::uint32_t* x_b,
                               std::uint8_t*& p_b) noexcept {
    // Two chains in flight: measured on a standalone copy of the gathering loop, 0.67 against
    // 1.0 ns an element for one chain at a time.
    const std::uint8_t* const symbols[] = {symbols_a, symbols_b};
    std::uint32_t* const x[] = {x_a, x_b};
    std::uint8_t* p[] = {p_a, p_b};
    encode_chains<2>(symbols, groups, table, x, p);
    p_a = p[0];
    p_b = p[1];
}

void step_streams_avx512(StreamSteps* streams, std::size_t count) noexcept {
    step_streams<kGroupBytes, __m512i>(
        streams, count, [](const Decoder& d) { return _mm512_loadu_si512(d.x); },
        [](Decoder& d, __m512i x) { _mm512_storeu_si512(d.x, x); },
        [](__m512i& x, const DecodeTable& table, const std::uint8_t*& next, std::uint8_t* out) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(symbols_of(step(x, table, next))));
        });
}

void build_decode_table_avx512(const std::uint16_t* freqs, unsigned n, DecodeTable& table) noexcept {
    static_assert(DecodeTable::kFillBlock == kLanes);
    const __m512i lanes = _mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 12);
    std::uint32_t start = 0;
    for (unsigned s = 0; s < n; ++s) {
        const std::uint32_t f = freqs[s];
        // Entries base + slot << 12 (mod 2^32), as in build_decode_table: a block overrunning
        // the symbol is overwritten by the next one, the last one's by the table's slack.
        __m512i entry = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(f + (s << 24))), lanes);
        const __m512i step = _mm512_set1_epi32(static_cast<int>(kLanes << 12));
        for (std::size_t k = start; k < start + f; k += kLanes) {
            _mm512_storeu_si512(table.slot + k, entry);
            entry = _mm512_add_epi32(entry, step);
        }
        start += f;
    }
}

std::size_t decode_groups_avx512(Decoder& d, const DecodeTable& table, std::size_t groups, std::uint8_t* out) noexcept {
    __m512i x = _mm512_loadu_si512(d.x);
    const std::uint8_t* next = d.next;
    std::size_t g = 0;
    for (; g < groups && d.end - next >= kGroupBytes; ++g) {
        const __m512i symbols = symbols_of(step(x, table, next));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * kLanes), _mm512_cvtepi32_epi8(symbols));
    }
    _mm512_storeu_si512(d.x, x);
    d.next = next;
    return g;
}

// A block of one chunk, 64 elements at a time: head values built by Values (head_values or
// half_values) with the chunk's tables, Emit(first element, elements, values) writes them, then
// the raw bits go into the T-wide elements written. False when the chunk's raw bits run out.
template <typename T, unsigned kVectors, typename Values, typename Emit>
inline bool finish_block(const FusedStream& s, const std::uint8_t* symbols, std::size_t stepped, std::size_t first,
                         bits::Reader& raw, Values build, Emit emit) noexcept {
    // Loaded once a block (64 groups): eight loads against a thousand elements.
    const ByteTable low_table(s.head->value_low);
    const ByteTable high_table(s.head->value_high);
    for (std::size_t i = 0; i < stepped * kLanes; i += 64) {
        __m512i values[kVectors];
        const std::size_t used = std::min<std::size_t>(64, stepped * kLanes - i);
        const std::uint64_t special = build(symbols + i, used, low_table, high_table, s.head->shift, values);
        emit(first + i, used, values);
        if (special != 0 && !patch_raw_bits<T>(symbols + i, special, *s.head, raw, s.out + sizeof(T) * (first + i))) {
            return false;
        }
    }
    return true;
}

std::size_t decode_float32_groups_avx512(FusedStream* streams, unsigned count, std::size_t groups, bool* ok) noexcept {
    const __m512i low3 = _mm512_set1_epi32(7);
    return fused(streams, count, groups, ok,
                 [&](const FusedStream& s, const std::uint8_t* symbols, std::size_t stepped, std::size_t first,
                     bits::Reader& raw) {
                     return finish_block<std::uint32_t, 4>(s, symbols, stepped, first, raw,
                                                                   [](auto&&... a) { return head_values(a...); },
                                            [&](std::size_t base, std::size_t used, const __m512i* values) {
                         for (std::size_t j = 0; j < used / kLanes; ++j) {
                             const std::size_t at = base + j * kLanes;
                             const __m512i q = _mm512_cvtepu8_epi32(nibble_bytes(s.tails[0] + at / 2));
                             const __m512i tail = _mm512_or_si512(
                                 _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(q, low3), 16),
                                                 _mm512_slli_epi32(_mm512_srli_epi32(q, 3), 31)),
                                 _mm512_or_si512(_mm512_slli_epi32(widen16(s.tails[1] + at), 8), widen16(s.tails[2] + at)));
                             _mm512_storeu_si512(s.out + 4 * at, _mm512_or_si512(values[j], tail));
                         }
                     });
                 });
}

// The first field of 32 16-bit elements (bfloat16: 16 bytes of nibbles; float16: 32 bytes), as
// 16-bit lanes; `bytes` of them (a multiple of 8) are read.
inline __m512i half_tails(const std::uint8_t* field, bool half_layout, std::size_t bytes) noexcept {
    const __mmask64 present = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    const __m512i loaded = _mm512_maskz_loadu_epi8(present, field);
    if (half_layout) return _mm512_cvtepu8_epi16(_mm512_castsi512_si256(loaded));
    const __m128i packed = _mm512_castsi512_si128(loaded);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(packed, low4);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), low4);
    const __m256i bytes32 = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(low, high)),
                                                    _mm_unpackhi_epi8(low, high), 1);
    return _mm512_cvtepu8_epi16(bytes32);
}

std::size_t decode_float16_groups_avx512(FusedStream* streams, unsigned count, bool half_layout, std::size_t groups,
                                         bool* ok) noexcept {
    const __m512i low = _mm512_set1_epi16(half_layout ? 0x7F : 7);
    const __m128i sign_shift = _mm_cvtsi32_si128(half_layout ? 7 : 3);
    return fused(streams, count, groups, ok,
                 [&](const FusedStream& s, const std::uint8_t* symbols, std::size_t stepped, std::size_t first,
                     bits::Reader& raw) {
                     return finish_block<std::uint16_t, 2>(s, symbols, stepped, first, raw,
                                                                   [](auto&&... a) { return half_values(a...); },
                                            [&](std::size_t base, std::size_t used, const __m512i* values) {
                         for (std::size_t h = 0; h < 2 && 32 * h < used; ++h) {
                             const std::size_t at = base + 32 * h;
                             const std::size_t n = std::min<std::size_t>(32, used - 32 * h);
                             const __m512i q = half_layout ? half_tails(s.tails[0] + at, true, n)
                                                           : half_tails(s.tails[0] + at / 2, false, n / 2);
                             const __m512i sign = _mm512_slli_epi16(_mm512_srl_epi16(q, sign_shift), 15);
                             const __m512i element = _mm512_or_si512(values[h], _mm512_or_si512(_mm512_and_si512(q, low), sign));
                             // Whole vectors stored unmasked: the raw bits' patch loads from
                             // them, and a masked store does not forward to a load.
                             if (n == 32) {
                                 _mm512_storeu_si512(s.out + 2 * at, element);
                             } else {
                                 _mm512_mask_storeu_epi16(s.out + 2 * at, (__mmask32{1} << n) - 1, element);
                             }
                         }
                     });
                 });
}

}  // namespace mmpack::rans
