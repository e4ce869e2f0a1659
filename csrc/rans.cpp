#include "mmpack/rans.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>

#include "rans_internal.hpp"

namespace mmpack::rans {

void build_decode_table(const std::uint16_t* freqs, unsigned n, DecodeTable& table) noexcept {
    // A 16 KiB table per field of every tensor a call decodes: for a small tensor's chunk, more
    // stores than its decoding (16-byte stores here, 64-byte ones there).
    if (simd() == Simd::avx512) {
        build_decode_table_avx512(freqs, n, table);
        return;
    }
    // slot's entry is base + slot << 12, with base = freq | symbol << 24 - start << 12 taken
    // modulo 2^32, so a symbol's slots are filled by whole blocks of kFillBlock: a block
    // overrunning its symbol is overwritten by the next symbol, the last one's by the slack.
    // Most symbols of a trained tensor's field are rare, and an element-by-element loop
    // spent its time on its own set-up (a set of small tensors builds a table per field).
    std::uint32_t start = 0;
    for (unsigned s = 0; s < n; ++s) {
        const std::uint32_t f = freqs[s];
        const std::uint32_t base = f + (s << 24) - (start << 12);
        for (std::size_t k = start; k < start + f; k += DecodeTable::kFillBlock) {
            std::uint32_t* const block = table.slot + k;
            const std::uint32_t first = base + static_cast<std::uint32_t>(k << 12);
            for (std::uint32_t j = 0; j < DecodeTable::kFillBlock; ++j) block[j] = first + (j << 12);
        }
        start += f;
    }
}

void build_encode_table(const std::uint16_t* freqs, unsigned n, EncodeTable& table) noexcept {
    std::uint32_t start = 0;
    for (unsigned s = 0; s < n; ++s) {
        const std::uint32_t f = freqs[s];
        table.packed[s] = f | start << 16;
        EncodeSymbol& e = table.symbol[s];
        e.x_max = f << (32 - kScaleBits);  // ((kLow >> kScaleBits) << 16) * f
        e.freq = static_cast<std::uint16_t>(f);
        e.start = static_cast<std::uint16_t>(start);
        // x / f = (x * rcp) >> (32 + shift), exact for every x < 2^32 (a 33-bit reciprocal
        // rounded up; the 32-bit one of rans_byte.h is exact only below 2^31, and states
        // here reach 2^32 - 1).
        std::uint32_t shift = 0;
        while ((std::uint32_t{1} << shift) < f) ++shift;
        e.shift = static_cast<std::uint16_t>(shift);
        e.rcp = ((std::uint64_t{1} << (32 + shift)) + f - 1) / f;
        table.plane[0][s] = static_cast<std::uint8_t>(f);
        table.plane[1][s] = static_cast<std::uint8_t>(f >> 8 | (start & 0xF) << 4);
        table.plane[2][s] = static_cast<std::uint8_t>(start >> 4);
        start += f;
    }
}

namespace {

// (x * rcp) >> 32 for a 32-bit x and a reciprocal of up to 45 bits, without 128-bit integers.
inline std::uint64_t mul_high(std::uint32_t x, std::uint64_t rcp) noexcept {
    const std::uint64_t low = static_cast<std::uint64_t>(x) * static_cast<std::uint32_t>(rcp);
    const std::uint64_t high = static_cast<std::uint64_t>(x) * (rcp >> 32);
    return high + (low >> 32);
}

inline void encode_one(std::uint32_t& x, const EncodeSymbol& s, std::uint8_t*& p) noexcept {
    // Branch-free renormalisation (about 40 % of steps emit a word): the word is stored in
    // any case, and kept only when the pointer moves past it. The scratch buffer holds a
    // word per symbol and the states in front, so p - 2 never leaves it.
    const unsigned emit = x >= s.x_max;
    const auto word = static_cast<std::uint16_t>(x);  // little-endian hosts (the Python layer checks)
    std::memcpy(p - 2, &word, 2);
    p -= 2 * emit;
    x >>= 16 * emit;
    const auto q = static_cast<std::uint32_t>(mul_high(x, s.rcp) >> s.shift);
    x = (q << kScaleBits) + (x - q * s.freq) + s.start;
}

// One stream being encoded. Words are produced last symbol first, so they are written
// backwards from the end of a scratch buffer: at most one word per symbol, then the states in
// front. Left uninitialised: only the bytes from the final p on are copied out, all written.
struct Encoding {
    const std::uint8_t* symbols;
    std::unique_ptr<std::uint8_t[]> scratch;
    std::uint8_t* end;
    std::uint8_t* p;
    std::uint32_t x[kLanes];
    std::size_t groups;  // whole groups not yet encoded: the first ones

    // Starts with the last, partial group (its symbols sit on lanes 0..r-1): what remains is
    // whole groups, for the vector loops.
    Encoding(const std::uint8_t* symbols_, std::size_t count, const EncodeSymbol* table)
        : symbols(symbols_), scratch(new std::uint8_t[2 * count + kStateBytes]),
          end(scratch.get() + 2 * count + kStateBytes), p(end), groups(count / kLanes) {
        for (auto& v : x) v = kLow;
        std::size_t i = count;
        for (std::size_t r = count % kLanes; r > 0; --r) {
            --i;
            encode_one(x[r - 1], table[symbols[i]], p);
        }
    }

    // Groups [first, groups) with this CPU's vector loop (none without one), the last first.
    void vector_groups(std::size_t first, const EncodeTable& table) noexcept {
        const Simd level = simd();
        if (level == Simd::scalar || first >= groups) return;
        const std::uint8_t* from = symbols + first * kLanes;
        if (level == Simd::avx512) {
            encode_groups_avx512(from, groups - first, table, x, p);
        } else {
            encode_groups_avx2(from, groups - first, table, x, p);
        }
        groups = first;
    }

    // The whole groups that the vector loops left, then the states; appends the stream to out.
    void finish(const EncodeSymbol* table, std::vector<std::uint8_t>& out) {
        for (std::size_t g = groups; g-- > 0;) {
            const std::uint8_t* group = symbols + g * kLanes;
            for (unsigned lane = kLanes; lane-- > 0;) encode_one(x[lane], table[group[lane]], p);
        }
        p -= kStateBytes;
        for (unsigned lane = 0; lane < kLanes; ++lane) {
            for (unsigned b = 0; b < 4; ++b) p[4 * lane + b] = static_cast<std::uint8_t>(x[lane] >> (8 * b));
        }
        out.insert(out.end(), p, end);
    }
};

}  // namespace

void encoder_quotients(const std::uint32_t* x, const std::uint32_t* freq, std::size_t n, std::uint32_t* q) noexcept {
    if (simd() == Simd::avx512) {
        quotients_avx512(x, freq, n, q);
        return;
    }
    if (simd() == Simd::avx2) {
        quotients_avx2(x, freq, n, q);
        return;
    }
    for (std::size_t i = 0; i < n; ++i) q[i] = x[i] / freq[i];  // the scalar loop divides exactly
}

void encode(const std::uint8_t* symbols, std::size_t count, const EncodeTable& table, std::vector<std::uint8_t>& out) {
    if (count == 0) return;
    Encoding e(symbols, count, table.symbol);
    e.vector_groups(0, table);
    e.finish(table.symbol, out);
}

void encode_two(const std::uint8_t* const symbols[2], const std::size_t counts[2], const EncodeTable& table,
                std::vector<std::uint8_t>* const outs[2]) {
    const Simd level = simd();
    if (counts[0] == 0 || counts[1] == 0 || level == Simd::scalar) {
        for (unsigned k = 0; k < 2; ++k) encode(symbols[k], counts[k], table, *outs[k]);
        return;
    }
    Encoding a(symbols[0], counts[0], table.symbol), b(symbols[1], counts[1], table.symbol);
    // The longer stream's extra groups (its last ones) alone, then both chains side by side.
    const std::size_t common = std::min(a.groups, b.groups);
    (a.groups > common ? a : b).vector_groups(common, table);
    if (level == Simd::avx512) {
        encode_group_pairs_avx512(a.symbols, b.symbols, common, table, a.x, a.p, b.x, b.p);
    } else {
        encode_group_pairs_avx2(a.symbols, b.symbols, common, table, a.x, a.p, b.x, b.p);
    }
    a.groups = b.groups = 0;
    a.finish(table.symbol, *outs[0]);
    b.finish(table.symbol, *outs[1]);
}

bool Decoder::start(ConstBytes stream) noexcept {
    const auto* bytes = reinterpret_cast<const std::uint8_t*>(stream.data);
    if (stream.size < kStateBytes || stream.size % 2 != 0) return false;
    for (unsigned lane = 0; lane < kLanes; ++lane) {
        std::uint32_t v = 0;
        for (unsigned b = 0; b < 4; ++b) v |= static_cast<std::uint32_t>(bytes[4 * lane + b]) << (8 * b);
        if (v < kLow) return false;
        x[lane] = v;
    }
    next = bytes + kStateBytes;
    end = bytes + stream.size;
    lane = 0;
    return true;
}

bool Decoder::decode(const DecodeTable& table, std::size_t count, std::uint8_t* out) noexcept {
    std::size_t i = 0;
    while (i < count && lane != 0) {
        if (!decode_step(*this, table, out[i])) return false;
        ++i;
    }
    const Simd level = simd();
    if (level == Simd::avx512) {
        i += kLanes * decode_groups_avx512(*this, table, (count - i) / kLanes, out + i);
    } else if (level == Simd::avx2) {
        i += kLanes * decode_groups_avx2(*this, table, (count - i) / kLanes, out + i);
    }
    for (; i < count; ++i) {
        if (!decode_step(*this, table, out[i])) return false;
    }
    return true;
}

bool Decoder::finished() const noexcept {
    for (const std::uint32_t v : x) {
        if (v != kLow) return false;
    }
    return next == end;
}

namespace {

std::atomic<int> g_simd_limit{static_cast<int>(Simd::avx512)};

Simd cpu_simd() noexcept {
#if defined(MMPACK_HAVE_AVX2_TU)
    // __builtin_cpu_supports also checks that the OS saves the registers' state (XGETBV).
    static const Simd supported = [] {
        __builtin_cpu_init();
        if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
              __builtin_cpu_supports("popcnt"))) {
            return Simd::scalar;
        }
        const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vbmi");
        return avx512 ? Simd::avx512 : Simd::avx2;
    }();
    return supported;
#else
    return Simd::scalar;
#endif
}

}  // namespace

Simd best_simd() noexcept { return cpu_simd(); }

Simd simd() noexcept {
    return static_cast<Simd>(std::min(static_cast<int>(cpu_simd()), g_simd_limit.load(std::memory_order_relaxed)));
}

void limit_simd(Simd most) noexcept { g_simd_limit.store(static_cast<int>(most)); }

const char* simd_name(Simd level) noexcept {
    switch (level) {
        case Simd::avx512: return "avx512";
        case Simd::avx2: return "avx2";
        case Simd::scalar: break;
    }
    return "scalar";
}

#if !defined(MMPACK_HAVE_AVX2_TU)
// No vector translation units on this architecture: simd() is Simd::scalar, so these never run.
std::size_t decode_groups_avx2(Decoder&, const DecodeTable&, std::size_t, std::uint8_t*) noexcept { return 0; }
void step_streams_avx2(StreamSteps*, std::size_t) noexcept {}
void quotients_avx2(const std::uint32_t*, const std::uint32_t*, std::size_t, std::uint32_t*) noexcept {}
std::size_t decode_float32_groups_avx2(FusedStream*, unsigned, std::size_t, bool*) noexcept { return 0; }
std::size_t decode_float16_groups_avx2(FusedStream*, unsigned, bool, std::size_t, bool*) noexcept { return 0; }
void encode_groups_avx2(const std::uint8_t*, std::size_t, const EncodeTable&, std::uint32_t*, std::uint8_t*&) noexcept {}
std::size_t decode_groups_avx512(Decoder&, const DecodeTable&, std::size_t, std::uint8_t*) noexcept { return 0; }
void build_decode_table_avx512(const std::uint16_t*, unsigned, DecodeTable&) noexcept {}
void step_streams_avx512(StreamSteps*, std::size_t) noexcept {}
void quotients_avx512(const std::uint32_t*, const std::uint32_t*, std::size_t, std::uint32_t*) noexcept {}
void encode_groups_avx512(const std::uint8_t*, std::size_t, const EncodeTable&, std::uint32_t*, std::uint8_t*&) noexcept {}
void encode_group_pairs_avx512(const std::uint8_t*, const std::uint8_t*, std::size_t, const EncodeTable&, std::uint32_t*,
                               std::uint8_t*&, std::uint32_t*, std::uint8_t*&) noexcept {}
void encode_group_pairs_avx2(const std::uint8_t*, const std::uint8_t*, std::size_t, const EncodeTable&, std::uint32_t*,
                             std::uint8_t*&, std::uint32_t*, std::uint8_t*&) noexcept {}
std::size_t decode_float32_groups_avx512(FusedStream*, unsigned, std::size_t, bool*) noexcept { return 0; }
std::size_t decode_float16_groups_avx512(FusedStream*, unsigned, bool, std::size_t, bool*) noexcept { return 0; }
#endif


}  // namespace mmpack::rans
