#include "mmpack/fields.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>

#include "bits.hpp"
#include "mmpack/parallel.hpp"
#include "fields_internal.hpp"
#include "rans_internal.hpp"

namespace mmpack::fields {

namespace {

using std::size_t;
using std::uint16_t;
using std::uint32_t;
using std::uint64_t;
using std::uint8_t;

constexpr unsigned kNoSymbol = 0xFFFF;
constexpr size_t kBlock = 2048;  // elements decoded per round: the scratch stays in L1

// -- elements and their fields ---------------------------------------------------

// The unsigned integer of W bytes: loops over elements compute fields in it, which the compiler
// vectorises at the element's width (a field of bfloat16 elements taken through 64-bit values
// cost four times as long: 0.44 against 0.11 ns an element).
template <unsigned W>
struct Element;
template <>
struct Element<1> { using type = uint8_t; };
template <>
struct Element<2> { using type = uint16_t; };
template <>
struct Element<4> { using type = uint32_t; };
template <>
struct Element<8> { using type = uint64_t; };

template <unsigned W>
inline typename Element<W>::type load_element(const uint8_t* p) noexcept {
    typename Element<W>::type v;
    std::memcpy(&v, p, W);  // little-endian hosts only (the Python layer checks)
    return v;
}

inline void store_element(uint8_t* p, unsigned width, uint64_t v) noexcept { std::memcpy(p, &v, width); }

template <typename V>
inline unsigned field_of(const Layout& layout, V v, unsigned f) noexcept {
    const unsigned b = 8 * layout.width;
    if (layout.family == Family::half) {
        return static_cast<unsigned>(f == 0 ? (v >> 7) & 0xFF : ((v >> 15) << 7) | (v & 0x7F));
    }
    if (layout.family == Family::floating) {
        if (f == 0) return static_cast<unsigned>(v >> (b - 13)) & 0xFFF;
        if (f == 1) return static_cast<unsigned>(((v >> (b - 1)) << 3) | ((v >> (b - 16)) & 7));
    }
    return static_cast<unsigned>(v >> (b - 8 - 8 * f)) & 0xFF;
}

inline uint64_t head_part(const Layout& layout, unsigned head) noexcept {
    const unsigned b = 8 * layout.width;
    if (layout.family == Family::half) return static_cast<uint64_t>(head) << 7;
    return static_cast<uint64_t>(head) << (layout.family == Family::floating ? b - 13 : b - 8);
}

inline uint64_t tail_part(const Layout& layout, unsigned f, unsigned value) noexcept {
    const unsigned b = 8 * layout.width;
    if (layout.family == Family::half) return (static_cast<uint64_t>(value >> 7) << 15) | (value & 0x7F);
    if (layout.family == Family::floating && f == 1) {
        return (static_cast<uint64_t>(value >> 3) << (b - 1)) | (static_cast<uint64_t>(value & 7) << (b - 16));
    }
    return static_cast<uint64_t>(value) << (b - 8 - 8 * f);
}

// Field f (of at most 8 bits) of n elements, one byte each. The pointers are restrict so that
// the compiler vectorises the loop (a byte pointer may otherwise alias the elements).
template <unsigned W, Family F, unsigned f>
void take_field(const uint8_t* __restrict bytes, size_t n, uint8_t* __restrict out) noexcept {
    constexpr Layout layout{W, F};
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(field_of(layout, load_element<W>(bytes + i * W), f));
}

// Calls body(std::integral_constant<unsigned, f>{}) for f = 1 .. W - 1: a loop over one field's
// values then sees which field it takes, and the compiler vectorises it.
template <unsigned W, typename Body, unsigned... I>
void for_tail_fields(Body&& body, std::integer_sequence<unsigned, I...>) {
    (body(std::integral_constant<unsigned, I + 1>{}), ...);
}

template <unsigned W, typename Body>
void for_tail_fields(Body&& body) {
    for_tail_fields<W>(body, std::make_integer_sequence<unsigned, W - 1>{});
}

// Calls body(width, family) with both as compile-time constants (std::integral_constant).
template <typename Body>
auto dispatch_layout(const Layout& layout, Body body) {
    using F = Family;
    switch (layout.family) {
        case F::half: return body(std::integral_constant<unsigned, 2>{}, std::integral_constant<F, F::half>{});
        case F::floating:
            if (layout.width == 2) return body(std::integral_constant<unsigned, 2>{}, std::integral_constant<F, F::floating>{});
            if (layout.width == 4) return body(std::integral_constant<unsigned, 4>{}, std::integral_constant<F, F::floating>{});
            return body(std::integral_constant<unsigned, 8>{}, std::integral_constant<F, F::floating>{});
        case F::integer: break;
    }
    if (layout.width == 1) return body(std::integral_constant<unsigned, 1>{}, std::integral_constant<F, F::integer>{});
    if (layout.width == 2) return body(std::integral_constant<unsigned, 2>{}, std::integral_constant<F, F::integer>{});
    if (layout.width == 4) return body(std::integral_constant<unsigned, 4>{}, std::integral_constant<F, F::integer>{});
    return body(std::integral_constant<unsigned, 8>{}, std::integral_constant<F, F::integer>{});
}

// -- fixed-point logarithms (decisions must not depend on the C library) --------

// log2(x) * 2^16, rounded down (up to the squarings' truncation), for x >= 1.
uint64_t log2_q16(uint64_t x) noexcept {
    const unsigned whole = 63u - static_cast<unsigned>(__builtin_clzll(x));
    // y = x / 2^whole in [1, 2) as m / 2^31.
    uint64_t m = whole >= 31 ? x >> (whole - 31) : x << (31 - whole);
    uint64_t result = static_cast<uint64_t>(whole) << 16;
    for (int bit = 15; bit >= 0; --bit) {
        m = (m * m) >> 31;  // y^2 in [1, 4); m < 2^32 keeps the product below 2^64
        if (m >= (uint64_t{1} << 32)) {
            result |= uint64_t{1} << bit;
            m >>= 1;
        }
    }
    return result;
}

const std::array<uint32_t, rans::kScale + 1>& small_logs() noexcept {
    static const auto table = [] {
        std::array<uint32_t, rans::kScale + 1> t{};
        for (uint32_t f = 1; f <= rans::kScale; ++f) t[f] = static_cast<uint32_t>(log2_q16(f));
        return t;
    }();
    return table;
}

// -- choosing a field's code -------------------------------------------------------

struct Candidate {
    Field field;
    double cost_bits = 0;  // estimated stored bits, tables and per-chunk costs included
};

struct Block {
    uint32_t value;
    unsigned raw_bits;
    uint64_t count;
};

// Frequencies >= 1 summing to kScale that keep sum(count * log2(1 / freq)) near its least.
std::vector<uint16_t> quantize(const std::vector<uint64_t>& counts) {
    const auto& logs = small_logs();
    uint64_t total = 0;
    for (const uint64_t c : counts) total += c;
    std::vector<uint32_t> f(counts.size());
    uint64_t sum = 0;
    for (size_t k = 0; k < counts.size(); ++k) {
        const uint64_t scaled = counts[k] * rans::kScale / total;  // counts stay far below 2^52
        f[k] = static_cast<uint32_t>(std::max<uint64_t>(1, scaled));
        sum += f[k];
    }
    while (sum < rans::kScale) {  // give a slot where it saves the most
        size_t best = 0;
        uint64_t gain = 0;
        for (size_t k = 0; k < f.size(); ++k) {
            const uint64_t g = counts[k] * (logs[f[k] + 1] - logs[f[k]]);
            if (g > gain) gain = g, best = k;
        }
        ++f[best];
        ++sum;
    }
    while (sum > rans::kScale) {  // take a slot where it costs the least
        size_t best = 0;
        uint64_t loss = std::numeric_limits<uint64_t>::max();
        for (size_t k = 0; k < f.size(); ++k) {
            if (f[k] < 2) continue;
            const uint64_t l = counts[k] * (logs[f[k]] - logs[f[k] - 1]);
            if (l < loss) loss = l, best = k;
        }
        --f[best];
        --sum;
    }
    return {f.begin(), f.end()};
}

// In 2^-16 bits per element (1 bit): what the slower decoding of a symbol with raw bits is
// worth. Symbols with raw bits then cover only rare values, and the vector loops rarely leave
// their fast path. (An element whose symbol has raw bits costs the fused loops 15-20 cycles, one
// without about 1.5. Measured on the CNN's bfloat16 weights with 1/16, 1/4, 1/2, 1 and 2 bits:
// 64.47 / 64.51 / 64.54 / 64.58 / 64.66 % of raw, decoded at 1982 / 2288 / 2382 / 2514 / 2580
// MB/s on one core; zipnn stores 65.24 %.)
constexpr double kRawBitsPenalty = 65536.0;

// log2_q16 of a count: small ones, most nodes of a tree, from the table (the function's 16
// squarings per call were a third of choosing a small tensor's model).
inline uint64_t log2_count(uint64_t c) noexcept { return c <= rans::kScale ? small_logs()[c] : log2_q16(c); }

// The aligned blocks of a field's values (node i of level r holds values [i << r, (i + 1) << r)),
// with their counts and the ideal cost of coding each as one symbol. Only blocks holding values
// are kept: a 12-bit head has 8191 blocks, and a small tensor's values fill few of them.
class ValueTree {
public:
    // values: the field's values that occur, ascending, with their counts; total: all of them
    // (with the head's zero elements).
    ValueTree(const std::vector<std::pair<uint32_t, uint64_t>>& values, unsigned bits, uint64_t total)
        : levels_(bits + 1) {
        const double log_total = static_cast<double>(log2_count(total));
        levels_[0].reserve(values.size());
        for (const auto& [value, count] : values) levels_[0].push_back({value, 0, count, 0.0});
        for (unsigned r = 1; r <= bits; ++r) {  // a block's children are adjacent in the level below
            const std::vector<Node>& below = levels_[r - 1];
            std::vector<Node>& level = levels_[r];
            for (size_t k = 0; k < below.size(); ++k) {
                const uint32_t parent = below[k].index >> 1;
                if (level.empty() || level.back().index != parent) {
                    level.push_back({parent, static_cast<uint32_t>(k), 0, 0.0});
                }
                level.back().count += below[k].count;
            }
        }
        for (unsigned r = 0; r <= bits; ++r) {
            for (Node& node : levels_[r]) {
                // A block with raw bits also pays kRawBitsPenalty per element: decoders take a
                // slower path for its symbols, so only rare values should share a symbol.
                const double per_element = log_total - static_cast<double>(log2_count(node.count)) +
                                           (r == 0 ? 0.0 : static_cast<double>(r) * 65536.0 + kRawBitsPenalty);
                node.cost = static_cast<double>(node.count) * per_element;
            }
        }
    }

    // The partition that minimises cost + entry_cost per symbol (in 2^-16 bits), ascending.
    std::vector<Block> blocks(double entry_cost) const {
        const unsigned bits = static_cast<unsigned>(levels_.size() - 1);
        std::vector<std::vector<double>> best(bits + 1);
        std::vector<std::vector<uint8_t>> whole(bits + 1);
        for (unsigned r = 0; r <= bits; ++r) {
            const std::vector<Node>& level = levels_[r];
            best[r].resize(level.size());
            whole[r].resize(level.size());
            for (size_t k = 0; k < level.size(); ++k) {
                const double alone = level[k].cost + entry_cost;
                double split = alone;
                if (r > 0) {
                    const uint32_t c = level[k].first_child;
                    split = best[r - 1][c];
                    if (has_second_child(r, k)) split += best[r - 1][c + 1];
                }
                whole[r][k] = r == 0 || alone <= split;
                best[r][k] = std::min(alone, split);
            }
        }
        std::vector<Block> blocks;
        if (levels_[bits].empty()) return blocks;
        std::vector<std::pair<unsigned, size_t>> stack{{bits, 0}};  // depth first, left child first
        while (!stack.empty()) {
            const auto [r, k] = stack.back();
            stack.pop_back();
            const Node& node = levels_[r][k];
            if (whole[r][k]) {
                blocks.push_back({node.index << r, r, node.count});
            } else {
                if (has_second_child(r, k)) stack.push_back({r - 1, node.first_child + 1});
                stack.push_back({r - 1, node.first_child});
            }
        }
        // One block holding more than one value: split it, so that a table has two
        // symbols (one value alone is a constant instead).
        while (blocks.size() == 1 && blocks[0].raw_bits > 0) {
            const unsigned r = blocks[0].raw_bits;
            const auto at = std::lower_bound(levels_[r].begin(), levels_[r].end(), blocks[0].value >> r,
                                             [](const Node& node, uint32_t index) { return node.index < index; });
            const size_t k = static_cast<size_t>(at - levels_[r].begin());
            blocks.clear();
            for (size_t c = levels_[r][k].first_child; c <= levels_[r][k].first_child + (has_second_child(r, k) ? 1 : 0);
                 ++c) {
                const Node& child = levels_[r - 1][c];
                blocks.push_back({child.index << (r - 1), r - 1, child.count});
            }
        }
        return blocks;
    }

private:
    struct Node {
        uint32_t index;        // the block's values are [index << r, (index + 1) << r)
        uint32_t first_child;  // in the level below (level r > 0)
        uint64_t count;
        double cost;
    };

    bool has_second_child(unsigned r, size_t k) const noexcept {
        const std::vector<Node>& below = levels_[r - 1];
        const size_t c = levels_[r][k].first_child + 1;
        return c < below.size() && below[c].index >> 1 == levels_[r][k].index;
    }

    std::vector<std::vector<Node>> levels_;  // per level r, its non-empty blocks by index
};

// The best rANS code of a field with histogram hist (plus `zeros` zero elements when the
// head has the zero symbol), or nothing (cost infinite) when a table cannot describe it.
Candidate rans_candidate(const std::vector<std::pair<uint32_t, uint64_t>>& values, uint64_t total, unsigned bits,
                         uint64_t zeros, size_t chunks) {
    total += zeros;
    Candidate none;
    none.cost_bits = std::numeric_limits<double>::infinity();
    if (total == 0) return none;
    const unsigned cap = rans::kMaxSymbols - (zeros > 0 ? 1 : 0);
    constexpr double kEntryBits = 32.0;
    const ValueTree tree(values, bits, total);
    const double entry = kEntryBits * 65536.0;
    std::vector<Block> blocks = tree.blocks(entry);
    if (blocks.size() > cap) {
        // A price per symbol that makes the table fit (fewer, wider blocks): double it until
        // it does, then bisect.
        double low = 0, high = 65536.0;
        while (tree.blocks(entry + high).size() > cap) high *= 2;
        for (int iteration = 0; iteration < 40; ++iteration) {
            const double middle = (low + high) / 2;
            (tree.blocks(entry + middle).size() > cap ? low : high) = middle;
        }
        blocks = tree.blocks(entry + high);
    }
    std::vector<uint64_t> counts;
    Field field;
    field.mode = Mode::rans;
    if (zeros > 0) {
        field.symbols.push_back({0, static_cast<uint8_t>(kZeroCode), 0});
        counts.push_back(zeros);
    }
    for (const Block& b : blocks) {
        field.symbols.push_back({static_cast<uint16_t>(b.value), static_cast<uint8_t>(b.raw_bits), 0});
        counts.push_back(b.count);
    }
    if (field.symbols.size() < 2 || field.symbols.size() > rans::kMaxSymbols) return none;
    const std::vector<uint16_t> freqs = quantize(counts);
    const auto& logs = small_logs();
    double code = 0;
    for (size_t k = 0; k < counts.size(); ++k) {
        field.symbols[k].freq = freqs[k];
        const double raw = field.symbols[k].zero() ? 0.0 : field.symbols[k].raw_bits;
        code += static_cast<double>(counts[k]) * ((12.0 * 65536.0 - logs[freqs[k]]) / 65536.0 + raw);
    }
    Candidate c;
    c.field = std::move(field);
    c.cost_bits = 8 + 16 + kEntryBits * static_cast<double>(counts.size()) + code +
                  static_cast<double>(chunks) * (64 + 8 * rans::kStateBytes);
    return c;
}

// The cheapest code of one field (hist over its values, `zeros` zero elements coded by the head).
Candidate choose_field(const std::vector<uint64_t>& hist, unsigned bits, uint64_t zeros, size_t chunks) {
    // The values that occur, in one pass over the histogram (4096 entries for a head, and a
    // small tensor's model is chosen in microseconds: each pass counted).
    std::vector<std::pair<uint32_t, uint64_t>> values;
    uint64_t total = 0;
    const uint64_t* const counts = hist.data();
    for (size_t v = 0, n = hist.size(); v < n; ++v) {
        if (counts[v] == 0) continue;
        values.emplace_back(static_cast<uint32_t>(v), counts[v]);
        total += counts[v];
    }
    const size_t distinct = values.size();
    const auto only = static_cast<uint16_t>(values.empty() ? 0 : values.back().first);
    Candidate best;
    best.field.mode = Mode::raw;
    best.cost_bits = 8 + static_cast<double>(total) * bits + 32.0 * static_cast<double>(chunks);
    if (zeros == 0 && distinct <= 1) {
        Candidate constant;
        constant.field.mode = Mode::constant;
        constant.field.constant = only;
        constant.cost_bits = 8 + 16;
        return constant;
    }
    Candidate coded = rans_candidate(values, total, bits, zeros, chunks);
    if (coded.cost_bits < best.cost_bits) return coded;
    if (zeros > 0) best.cost_bits = std::numeric_limits<double>::infinity();  // zeros need the head's table
    return best;
}

struct Histograms {
    std::vector<std::vector<uint64_t>> fields;  // per field, over every element
    std::vector<char> noise;  // per field: a sample found its (non-zero elements') values uniform: coded raw, not counted
    uint64_t zeros = 0;       // elements whose every bit is zero
};

Histograms empty_histograms(const Layout& layout) {
    Histograms h;
    for (unsigned f = 0; f < layout.width; ++f) h.fields.emplace_back(size_t{1} << layout.bits(f), 0);
    h.noise.assign(layout.width, 0);
    return h;
}

// Counts field f of elements [begin, end) into hist; returns how many elements are zero when f
// is the head (0), else 0. Short ranges (the noise sample's runs) count straight into hist:
// clearing and summing tables would cost more than the run. Longer ones count into four
// interleaved tables, summed at the end: runs of one value (an exponent, the zero bytes of XOR
// deltas) then do not wait on their own increments (a tail field counted into one table, with a
// run-time field index, was a quarter of the deltas' encoding time).
template <unsigned W, Family F, unsigned f>
uint64_t count_field(const uint8_t* bytes, size_t begin, size_t end, std::vector<uint64_t>& hist) {
    constexpr Layout layout{W, F};
    constexpr size_t values = size_t{1} << layout.bits(f);
    uint64_t zeros = 0;
    const auto count = [&](size_t i, auto* counters) {
        const auto v = load_element<W>(bytes + i * W);
        if constexpr (f == 0) zeros += v == 0;
        ++counters[field_of(layout, v, f)];
    };
    if (end - begin < 16 * values) {
        for (size_t i = begin; i < end; ++i) count(i, hist.data());
        return zeros;
    }
    std::vector<uint32_t> tables(4 * values, 0);
    for (size_t start = begin; start < end; start += size_t{1} << 30) {  // 32-bit counters
        const size_t stop = std::min(end, start + (size_t{1} << 30));
        size_t i = start;
        for (; i + 4 <= stop; i += 4) {
            for (unsigned k = 0; k < 4; ++k) count(i + k, tables.data() + k * values);
        }
        for (; i < stop; ++i) count(i, tables.data());
        for (size_t v = 0; v < values; ++v) {
            hist[v] += uint64_t{tables[v]} + tables[values + v] + tables[2 * values + v] + tables[3 * values + v];
        }
        std::fill(tables.begin(), tables.end(), 0);
    }
    return zeros;
}

// Counts elements [begin, end): zeros and field 0 always, the other fields unless noise.
template <unsigned W, Family F>
void count_fields(const uint8_t* bytes, size_t begin, size_t end, const std::vector<char>& noise, Histograms& h) {
    const Layout layout{W, F};
    uint64_t zeros = 0;
    // Fields 0 and 1 of every layout wider than a byte are taken from the element's top 16 bits:
    // on long ranges one count of those gives both histograms (measured on trained float32
    // weights: 0.53 ns an element, against 1.2 for field 0 and then field 1 in its own pass).
    constexpr size_t kJointMin = size_t{1} << 18;  // clearing and summing the tables costs 2^17 steps
    const bool joint = W >= 2 && end - begin >= kJointMin;
    if (!joint) {
        zeros = count_field<W, F, 0>(bytes, begin, end, h.fields[0]);
    } else {
        constexpr unsigned shift = W >= 2 ? 8 * W - 16 : 0;  // (W = 1 never counts jointly)
        // Two tables, alternate elements: runs of one value then do not wait on their own increments.
        std::vector<uint32_t> top(2 << 16, 0);
        uint32_t* const even = top.data();
        uint32_t* const odd = even + (1 << 16);
        const bool count_1 = !noise[1];
        for (size_t start = begin; start < end; start += size_t{1} << 31) {  // 32-bit counters
            const size_t stop = std::min(end, start + (size_t{1} << 31));
            size_t i = start;
            // Two-byte elements are their own table index, so entry 0 counts their zeros: no
            // test per element (0.30 against 0.38 ns an element on bfloat16 weights).
            constexpr bool test_zeros = W > 2;
            for (; i + 2 <= stop; i += 2) {
                const auto a = load_element<W>(bytes + i * W), b = load_element<W>(bytes + (i + 1) * W);
                if constexpr (test_zeros) zeros += (a == 0) + (b == 0);
                ++even[a >> shift];
                ++odd[b >> shift];
            }
            if (i < stop) {
                const auto a = load_element<W>(bytes + i * W);
                if constexpr (test_zeros) zeros += a == 0;
                ++even[a >> shift];
            }
            if constexpr (!test_zeros) zeros += uint64_t{even[0]} + odd[0];
            for (uint64_t u = 0; u < (1 << 16); ++u) {
                const uint64_t count = uint64_t{even[u]} + odd[u];
                if (count == 0) continue;
                h.fields[0][field_of(layout, u << shift, 0)] += count;
                if (count_1) h.fields[1][field_of(layout, u << shift, 1)] += count;
            }
            std::fill(top.begin(), top.end(), 0);
        }
    }
    for_tail_fields<W>([&](auto field) {
        constexpr unsigned f = decltype(field)::value;
        if (!noise[f] && !(f == 1 && joint)) count_field<W, F, f>(bytes, begin, end, h.fields[f]);
    });
    h.zeros += zeros;
}

void count_fields(const Layout& layout, const uint8_t* bytes, size_t begin, size_t end, const std::vector<char>& noise,
                  Histograms& h) {
    dispatch_layout(layout, [&](auto w, auto family) {
        count_fields<decltype(w)::value, decltype(family)::value>(bytes, begin, end, noise, h);
        return 0;
    });
}

// Counts fields 1 and up of elements [begin, end): the noise sample, which needs no head.
void count_tail_fields(const Layout& layout, const uint8_t* bytes, size_t begin, size_t end, Histograms& h) {
    dispatch_layout(layout, [&](auto w, auto family) {
        constexpr unsigned W = decltype(w)::value;
        for_tail_fields<W>([&](auto field) {
            constexpr unsigned f = decltype(field)::value;
            count_field<W, decltype(family)::value, f>(bytes, begin, end, h.fields[f]);
        });
        return 0;
    });
}

// Empirical entropy of a histogram, in bits per value (a decision aid only: the choice of
// raw over rANS for a field never depends on it alone being exact).
double entropy_bits(const std::vector<uint64_t>& hist) {
    uint64_t total = 0;
    for (const uint64_t c : hist) total += c;
    if (total == 0) return 0;
    const double log_total = static_cast<double>(log2_q16(total));
    double sum = 0;
    for (const uint64_t c : hist) {
        if (c) sum += static_cast<double>(c) * (log_total - static_cast<double>(log2_q16(c)));
    }
    return sum / static_cast<double>(total) / 65536.0;
}

// Fields 1 and up whose values a sample (every 16th run of 256 elements) finds uniform to
// within the sample's own bias, over all its elements or over its non-zero ones: the low
// mantissa bytes of trained weights, and of XOR deltas, whose zero elements (coded by the
// head's zero symbol) would otherwise make them look coded. They are coded raw without being
// counted, which spares most of the counting pass on float data.
std::vector<char> noise_fields(const Layout& layout, const uint8_t* bytes, size_t n) {
    std::vector<char> noise(layout.width, 0);
    constexpr size_t kRun = 256, kEvery = 16;
    if (n < 16 * kRun * kEvery) return noise;  // small tensors: count everything
    Histograms sample = empty_histograms(layout);
    const unsigned w = layout.width;
    uint64_t sampled = 0;
    uint64_t zeros = 0;
    for (size_t begin = 0; begin < n; begin += kRun * kEvery) {
        const size_t end = std::min(n, begin + kRun);
        count_tail_fields(layout, bytes, begin, end, sample);
        sampled += end - begin;
        for (size_t i = begin; i < end; ++i) {
            bool zero = true;
            for (unsigned b = 0; b < w; ++b) zero = zero && bytes[i * w + b] == 0;
            zeros += zero;
        }
    }
    const auto uniform = [&](const std::vector<uint64_t>& hist, unsigned f, uint64_t count) {
        const double k = layout.bits(f);
        const double bias = (std::exp2(k) - 1) / (2.0 * static_cast<double>(count) * 0.6931471805599453);
        return entropy_bits(hist) > k - std::max(0.02, 2 * bias);
    };
    for (unsigned f = 1; f < w; ++f) {
        noise[f] = uniform(sample.fields[f], f, sampled);
        if (!noise[f] && zeros > 0 && zeros < sampled) {
            std::vector<uint64_t> nonzero = sample.fields[f];
            nonzero[0] -= zeros;  // a zero element has every field 0
            noise[f] = uniform(nonzero, f, sampled - zeros);
        }
    }
    return noise;
}

Histograms histograms(ConstBytes data, const Layout& layout) {
    const unsigned w = layout.width;
    const size_t n = data.size / w;
    const auto* bytes = reinterpret_cast<const uint8_t*>(data.data);
    constexpr size_t kPiece = 1 << 16;
    const size_t pieces = (n + kPiece - 1) / kPiece;
    Histograms total = empty_histograms(layout);
    total.noise = noise_fields(layout, bytes, n);
    std::mutex lock;
    std::atomic<bool> out_of_memory{false};
    parallel_by_weight(
        pieces, [&](size_t p) { return static_cast<uint64_t>(std::min(p * kPiece, n)) * w; },
        [&](size_t first, size_t last) {
            try {  // nothing may escape a worker thread
                Histograms h = empty_histograms(layout);
                count_fields(layout, bytes, first * kPiece, std::min(n, last * kPiece), total.noise, h);
                const std::lock_guard<std::mutex> guard(lock);  // sums: the order does not matter
                total.zeros += h.zeros;
                for (unsigned f = 0; f < w; ++f) {
                    for (size_t v = 0; v < h.fields[f].size(); ++v) total.fields[f][v] += h.fields[f][v];
                }
            } catch (const std::bad_alloc&) {
                out_of_memory = true;
            }
        });
    if (out_of_memory) throw std::bad_alloc();
    return total;
}

}  // namespace

bool valid_layout(unsigned width, Family family) noexcept {
    if (family == Family::half) return width == 2;
    if (family == Family::floating) return width == 2 || width == 4 || width == 8;
    return width == 1 || width == 2 || width == 4 || width == 8;
}

bool Model::has_zero() const noexcept {
    return !fields.empty() && fields[0].mode == Mode::rans && !fields[0].symbols.empty() && fields[0].symbols[0].zero();
}

Model choose_model(ConstBytes data, Layout layout, size_t chunk_elements) {
    const unsigned w = layout.width;
    const size_t n = data.size / w;
    const size_t chunks = chunk_elements == 0 ? 1 : (n + chunk_elements - 1) / chunk_elements;
    Histograms h = histograms(data, layout);
    Model model;
    model.layout = layout;
    // Without a zero symbol: every field codes every element.
    double plain_cost = 0;
    std::vector<Field> plain;
    const auto raw_field = [&](size_t count, unsigned f) {
        Candidate c;
        c.cost_bits = 8 + static_cast<double>(count) * layout.bits(f) + 32.0 * static_cast<double>(chunks);
        return c;
    };
    for (unsigned f = 0; f < w; ++f) {
        Candidate c = h.noise[f] ? raw_field(n, f) : choose_field(h.fields[f], layout.bits(f), 0, chunks);
        plain_cost += c.cost_bits;
        plain.push_back(std::move(c.field));
    }
    model.fields = std::move(plain);
    if (h.zeros == 0 || h.zeros == n) return model;
    // With one: zero elements cost one head symbol, and the other fields skip them.
    double zero_cost = 0;
    std::vector<Field> with_zero;
    for (unsigned f = 0; f < w; ++f) {
        if (h.noise[f]) {
            Candidate c = raw_field(n - h.zeros, f);
            zero_cost += c.cost_bits;
            with_zero.push_back(std::move(c.field));
            continue;
        }
        std::vector<uint64_t> nonzero = h.fields[f];
        nonzero[0] -= h.zeros;  // a zero element has every field 0
        Candidate c = choose_field(nonzero, layout.bits(f), f == 0 ? h.zeros : 0, chunks);
        zero_cost += c.cost_bits;
        with_zero.push_back(std::move(c.field));
    }
    if (zero_cost < plain_cost) model.fields = std::move(with_zero);
    return model;
}

// -- the table block --------------------------------------------------------------

namespace {

void put16(std::vector<uint8_t>& out, unsigned v) {
    out.push_back(static_cast<uint8_t>(v));
    out.push_back(static_cast<uint8_t>(v >> 8));
}

void put32(std::vector<uint8_t>& out, size_t v) {
    for (unsigned b = 0; b < 4; ++b) out.push_back(static_cast<uint8_t>(v >> (8 * b)));
}

inline unsigned get16(const uint8_t* p) noexcept { return p[0] | (static_cast<unsigned>(p[1]) << 8); }

inline uint32_t get32(const uint8_t* p) noexcept {
    return p[0] | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
           (static_cast<uint32_t>(p[3]) << 24);
}

}  // namespace

void write_model(const Model& model, std::vector<uint8_t>& out) {
    for (const Field& field : model.fields) {
        out.push_back(static_cast<uint8_t>(field.mode));
        if (field.mode == Mode::constant) put16(out, field.constant);
        if (field.mode != Mode::rans) continue;
        put16(out, static_cast<unsigned>(field.symbols.size()));
        for (const Symbol& s : field.symbols) {
            put16(out, s.value | (static_cast<unsigned>(s.raw_bits) << 12));
            put16(out, s.freq);
        }
    }
}

const char* read_model(ConstBytes block, Layout layout, Model& out) {
    if (!valid_layout(layout.width, layout.family)) return "unsupported element layout";
    const auto* p = reinterpret_cast<const uint8_t*>(block.data);
    const uint8_t* const end = p + block.size;
    out = Model{};
    out.layout = layout;
    for (unsigned f = 0; f < layout.n_fields(); ++f) {
        const unsigned bits = layout.bits(f);
        if (p == end) return "a table block ends before its fields";
        Field field;
        const unsigned mode = *p++;
        if (mode > static_cast<unsigned>(Mode::rans)) return "a field has an unknown mode";
        field.mode = static_cast<Mode>(mode);
        if (field.mode == Mode::constant) {
            if (end - p < 2) return "a table block ends inside a constant";
            field.constant = static_cast<uint16_t>(get16(p));
            p += 2;
            if (field.constant >> bits) return "a field's constant does not fit the field";
        } else if (field.mode == Mode::rans) {
            if (end - p < 2) return "a table block ends inside a symbol count";
            const unsigned n = get16(p);
            p += 2;
            if (n < 2 || n > rans::kMaxSymbols) return "a symbol table has fewer than 2 or more than 256 symbols";
            if (static_cast<size_t>(end - p) < 4 * static_cast<size_t>(n)) return "a table block ends inside a symbol table";
            uint32_t sum = 0;
            uint32_t next_free = 0;  // the lowest value a further symbol may start at
            for (unsigned k = 0; k < n; ++k) {
                const unsigned word = get16(p);
                Symbol s;
                s.value = static_cast<uint16_t>(word & 0xFFF);
                s.raw_bits = static_cast<uint8_t>(word >> 12);
                s.freq = static_cast<uint16_t>(get16(p + 2));
                p += 4;
                if (s.freq == 0) return "a symbol has frequency 0";
                sum += s.freq;
                if (s.zero()) {
                    if (f != 0 || k != 0 || s.value != 0) return "a zero-element symbol is not the first symbol of a head";
                    field.symbols.push_back(s);
                    continue;
                }
                if (s.raw_bits > bits || (s.value >> bits) != 0) return "a symbol does not fit its field";
                const uint32_t span = uint32_t{1} << s.raw_bits;
                if (s.value % span != 0) return "a symbol's value is not a multiple of its range";
                if (s.value < next_free) return "symbols are not in ascending order of disjoint ranges";
                next_free = s.value + span;
                if (next_free > (uint32_t{1} << bits)) return "a symbol does not fit its field";
                field.symbols.push_back(s);
            }
            if (sum != rans::kScale) return "symbol frequencies do not sum to 4096";
        }
        out.fields.push_back(std::move(field));
    }
    if (p != end) return "a table block has bytes after its fields";
    return nullptr;
}

// -- encoding ---------------------------------------------------------------------

struct Encoder::Impl {
    Model model;
    struct Coded {
        std::unique_ptr<rans::EncodeTable> table;
        std::vector<uint16_t> symbol_of;  // field value -> symbol, kNoSymbol where none covers it
        std::vector<uint16_t> head_lookup;  // the same for the vector head_symbols loops (fields_internal.hpp)
        std::unique_ptr<HeadRows> head_rows;  // the same in two levels (floating-point heads)
        unsigned zero_symbol = kNoSymbol;
    };
    std::vector<Coded> coded;  // per field
    // The common case (head_only_parts): the head rANS-coded without the zero symbol, every
    // other field raw.
    bool head_only = false;
};

namespace {

// The head lookup (kNoHeadSymbol past the values) as HeadRows: tops of sixteen values each with
// a low, else of one. Not usable when more than kMaxSplitTops tops are split.
std::unique_ptr<HeadRows> head_rows(const std::vector<uint16_t>& lookup, bool has_low) {
    auto rows = std::make_unique<HeadRows>();
    const unsigned lows = has_low ? 16 : 1;
    const auto flags = [](uint16_t entry) -> uint8_t {
        if (entry == kNoHeadSymbol) return kRowMissing;
        return entry & kHasRawBits ? kRowRaw : 0;
    };
    unsigned split = 0;
    for (unsigned top = 0; top < 256; ++top) {
        const uint16_t* entries = lookup.data() + top * lows;
        if (std::all_of(entries, entries + lows, [&](uint16_t e) { return e == entries[0]; })) {
            rows->top_symbol[top] = static_cast<uint8_t>(entries[0]);
            rows->top_flags[top] = flags(entries[0]);
            continue;
        }
        if (split == kMaxSplitTops) return rows;
        rows->top_symbol[top] = static_cast<uint8_t>(split);
        rows->top_flags[top] = kRowSplit;
        for (unsigned low = 0; low < lows; ++low) {
            rows->row_symbol[split * 16 + low] = static_cast<uint8_t>(entries[low]);
            rows->row_flags[split * 16 + low] = flags(entries[low]);
        }
        ++split;
    }
    rows->usable = true;
    return rows;
}

}  // namespace

Encoder::Encoder(const Model& model) : impl_(std::make_unique<Impl>()) {
    impl_->model = model;
    impl_->coded.resize(model.fields.size());
    impl_->head_only = model.fields[0].mode == Mode::rans && !model.has_zero();
    for (size_t f = 1; f < model.fields.size(); ++f) impl_->head_only &= model.fields[f].mode == Mode::raw;
    for (size_t f = 0; f < model.fields.size(); ++f) {
        const Field& field = model.fields[f];
        if (field.mode != Mode::rans) continue;
        Impl::Coded& c = impl_->coded[f];
        std::vector<uint16_t> freqs;
        for (const Symbol& s : field.symbols) freqs.push_back(s.freq);
        c.table = std::make_unique<rans::EncodeTable>();
        rans::build_encode_table(freqs.data(), static_cast<unsigned>(freqs.size()), *c.table);
        c.symbol_of.assign(size_t{1} << model.layout.bits(static_cast<unsigned>(f)), kNoSymbol);
        for (size_t k = 0; k < field.symbols.size(); ++k) {
            const Symbol& s = field.symbols[k];
            if (s.zero()) {
                c.zero_symbol = static_cast<unsigned>(k);
                continue;
            }
            for (uint32_t v = s.value; v < s.value + (uint32_t{1} << s.raw_bits); ++v) c.symbol_of[v] = static_cast<uint16_t>(k);
        }
        if (f != 0) continue;  // only the head has a vector lookup
        c.head_lookup.assign(c.symbol_of.size() + 1, kNoHeadSymbol);
        for (size_t v = 0; v < c.symbol_of.size(); ++v) {
            const unsigned k = c.symbol_of[v];
            if (k != kNoSymbol) c.head_lookup[v] = static_cast<uint16_t>(k | (field.symbols[k].raw_bits ? kHasRawBits : 0));
        }
        c.head_rows = head_rows(c.head_lookup, model.layout.bits(0) == 12);
    }
}

Encoder::~Encoder() = default;

namespace {

// Every field's values in element order: the head in head[0..n), field f >= 1 in
// tails[(f - 1) * n ...]; with `skip_zero`, the other fields skip zero elements (zero[i] = 1).
// Returns the number of elements the other fields hold.
template <unsigned W, Family F>
size_t split_fields(const uint8_t* bytes, size_t n, bool skip_zero, uint16_t* head, uint8_t* tails, uint8_t* zero) {
    const Layout layout{W, F};
    size_t m = 0;
    if (!skip_zero) {
        for (size_t i = 0; i < n; ++i) {
            const auto v = load_element<W>(bytes + i * W);
            head[i] = static_cast<uint16_t>(field_of(layout, v, 0));
            for (unsigned f = 1; f < W; ++f) tails[(f - 1) * n + i] = static_cast<uint8_t>(field_of(layout, v, f));
        }
        return n;
    }
    // The float layouts of XOR deltas with AVX-512 first (whole groups of sixteen elements).
    size_t i = 0;
    constexpr bool vector_layout = (W == 4 && F == Family::floating) || (W == 2 && F != Family::integer);
    if (vector_layout && rans::simd() == rans::Simd::avx512) {
        i = split_nonzero_avx512(bytes, n, W, F == Family::half, head, tails, zero, m);
    }
    // A zero's tail values are written and then overwritten by the next element's (m <= i < n,
    // so in bounds): a store instead of a branch on each zero.
    for (; i < n; ++i) {
        const auto v = load_element<W>(bytes + i * W);
        head[i] = static_cast<uint16_t>(field_of(layout, v, 0));
        zero[i] = v == 0;
        for (unsigned f = 1; f < W; ++f) tails[(f - 1) * n + m] = static_cast<uint8_t>(field_of(layout, v, f));
        m += v != 0;
    }
    return m;
}

size_t split_fields(const Layout& layout, const uint8_t* bytes, size_t n, bool skip_zero, uint16_t* head,
                    uint8_t* tails, uint8_t* zero) {
    return dispatch_layout(layout, [&](auto w, auto family) {
        return split_fields<decltype(w)::value, decltype(family)::value>(bytes, n, skip_zero, head, tails, zero);
    });
}

// Calls visit(i), in order, for the symbols i of symbols[0..count) whose raw_bits[s] (a 64-byte
// aligned table) is not 0, for a loop that reads or writes their raw bits: with AVX-512 the
// vector loop lists them (5-50 % of an XOR delta's head symbols); the rest, and every symbol
// without it, are visited whatever their raw bits (visit then reads or writes 0 bits), so that
// no branch depends on the data. `listed` is scratch for the list.
template <typename Visit>
void visit_raw_symbols(const uint8_t* symbols, size_t count, const uint8_t* raw_bits, std::vector<uint32_t>& listed,
                       Visit visit) {
    size_t i = 0;
    if (rans::simd() == rans::Simd::avx512) {
        listed.resize(count + 16);
        size_t n_listed = 0;
        i = raw_symbols_avx512(symbols, count, raw_bits, listed.data(), n_listed);
        for (size_t k = 0; k < n_listed; ++k) visit(listed[k]);
    }
    for (; i < count; ++i) visit(i);
}

// Appends count values of `bits` bits, LSB first.
template <typename T>
void pack(const T* values, size_t count, unsigned bits, std::vector<uint8_t>& out) {
    const size_t at = out.size();
    out.resize(at + bits::packed_bytes(count, bits), 0);
    uint8_t* p = out.data() + at;
    if (bits == 8) {
        for (size_t i = 0; i < count; ++i) p[i] = static_cast<uint8_t>(values[i]);
    } else if (bits == 4) {
        for (size_t i = 0; i < count; ++i) p[i >> 1] |= static_cast<uint8_t>((values[i] & 0xF) << ((i & 1) * 4));
    } else {
        bits::Writer writer(out);
        out.resize(at);
        for (size_t i = 0; i < count; ++i) writer.write(bits, values[i]);
        writer.flush();
    }
}

}  // namespace

// The common case: the head rANS-coded without the zero symbol, every other field raw (trained
// floating-point weights). A chunk's head symbols, the raw bits of the rare ones and the other
// fields' streams, ready for the head's rANS stream (head_only_parts), then written out with
// it (write_head_only).
struct HeadOnlyParts {
    size_t n = 0;
    std::unique_ptr<uint8_t[]> symbols;
    std::vector<uint8_t> raw_bits;
    std::unique_ptr<uint8_t[]> tail;  // fields 1 and up, one stream after the other
    size_t tail_length[8] = {};
    size_t tails = 0;
};

namespace {

template <unsigned W, Family F>
const char* head_only_parts(const uint8_t* bytes, size_t n, const Field& head, const std::uint16_t* symbol_of,
                            const std::uint16_t* head_lookup, const HeadRows& rows, HeadOnlyParts& parts) {
    const Layout layout{W, F};
    // Every byte of these is written before it is read: left uninitialised.
    parts.n = n;
    parts.symbols.reset(new uint8_t[n]);
    uint8_t* const symbols = parts.symbols.get();
    std::vector<uint8_t>& raw_bits = parts.raw_bits;
    uint8_t raw_count[rans::kMaxSymbols] = {};
    bool any_raw = false;
    for (size_t k = 0; k < head.symbols.size(); ++k) {
        raw_count[k] = head.symbols[k].raw_bits;
        any_raw = any_raw || raw_count[k] > 0;
    }
    const auto head_value = [&](size_t i) { return field_of(layout, load_element<W>(bytes + i * W), 0); };
    bits::Writer writer(raw_bits);
    const auto write_raw = [&](size_t i) {
        const unsigned s = symbols[i];
        writer.write(raw_count[s], head_value(i) - head.symbols[s].value);
    };
    // The symbols first (a lookup per element), then the rare values' low bits in element order.
    size_t vector_done = 0;
    constexpr bool vector_layout = (W == 4 && F == Family::floating) || (W == 2 && F != Family::integer);
    const rans::Simd level = rans::simd();
    if (vector_layout && level != rans::Simd::scalar) {
        const size_t groups = n / rans::kLanes;
        const std::unique_ptr<uint16_t[]> raw_lanes(new uint16_t[groups + 1]);
        constexpr unsigned shift = F == Family::half ? 7 : 8 * W - 13;
        constexpr unsigned mask = F == Family::half ? 0xFF : 0xFFF;
        const auto head_symbols = [&] {
            if (level == rans::Simd::avx512 && rows.usable) {
                return head_symbols_rows_avx512(bytes, groups, W, shift, F != Family::half, rows, symbols, raw_lanes.get());
            }
            const auto gathering = level == rans::Simd::avx512 ? head_symbols_avx512 : head_symbols_avx2;
            return gathering(bytes, groups, W, shift, mask, head_lookup, symbols, raw_lanes.get());
        };
        if (!head_symbols()) {
            return "data does not fit the model (a value no symbol covers)";
        }
        vector_done = groups * rans::kLanes;
        for (size_t g = 0; g < groups && any_raw; ++g) {
            for (unsigned lanes = raw_lanes[g]; lanes != 0; lanes &= lanes - 1) {
                write_raw(g * rans::kLanes + static_cast<unsigned>(__builtin_ctz(lanes)));
            }
        }
    }
    for (size_t i = vector_done; i < n; ++i) {
        const unsigned s = symbol_of[head_value(i)];
        if (s == kNoSymbol) return "data does not fit the model (a value no symbol covers)";
        symbols[i] = static_cast<uint8_t>(s);
    }
    if (any_raw) {
        for (size_t i = vector_done; i < n; ++i) {
            if (raw_count[symbols[i]]) write_raw(i);
        }
        writer.flush();
    }
    // The other fields as their streams: plain loops the compiler vectorises.
    size_t tail_start[8] = {};
    for (unsigned f = 1; f < W; ++f) {
        tail_start[f] = parts.tails;
        parts.tail_length[f] = bits::packed_bytes(n, layout.bits(f));
        parts.tails += parts.tail_length[f];
    }
    parts.tail.reset(new uint8_t[parts.tails]);  // every byte written below
    // Whole blocks of 64 elements with AVX-512 (this file is built for any x86-64, so its own
    // loops are SSE2), the rest below.
    size_t first = 0;
    if (vector_layout && level == rans::Simd::avx512) {
        uint8_t* planes[3] = {};
        for (unsigned f = 1; f < W; ++f) planes[f - 1] = parts.tail.get() + tail_start[f];
        first = tail_fields_avx512(bytes, n, W, F == Family::half, planes);
    }
    for_tail_fields<W>([&](auto field) {
        constexpr unsigned f = decltype(field)::value;
        uint8_t* plane = parts.tail.get() + tail_start[f];
        if (layout.bits(f) == 4) {
            // The values first, then packed two to a byte: two loops the compiler vectorises,
            // where one loop over pairs of elements was not (0.45 against 0.8 ns an element).
            uint8_t values[kBlock];
            for (size_t done = first; done < n; done += kBlock) {
                const size_t b = std::min(kBlock, n - done);
                take_field<W, F, f>(bytes + done * W, b, values);
                uint8_t* to = plane + done / 2;  // kBlock is even: blocks start on whole bytes
                for (size_t k = 0; k < b / 2; ++k) to[k] = static_cast<uint8_t>(values[2 * k] | values[2 * k + 1] << 4);
                if (b % 2) to[b / 2] = values[b - 1];
            }
        } else {
            take_field<W, F, f>(bytes + first * W, n - first, plane + first);
        }
    });
    return nullptr;
}

const char* write_head_only(const HeadOnlyParts& parts, unsigned width, const std::vector<uint8_t>& stream,
                            std::vector<uint8_t>& out) {
    const size_t sizes[] = {stream.size(), parts.raw_bits.size()};
    for (const size_t length : sizes) {
        if (length > std::numeric_limits<uint32_t>::max()) return "a chunk's stream exceeds 4 GiB";
        put32(out, length);
    }
    for (unsigned f = 1; f < width; ++f) {
        if (parts.tail_length[f] > std::numeric_limits<uint32_t>::max()) return "a chunk's stream exceeds 4 GiB";
        put32(out, parts.tail_length[f]);
    }
    out.insert(out.end(), stream.begin(), stream.end());
    out.insert(out.end(), parts.raw_bits.begin(), parts.raw_bits.end());
    out.insert(out.end(), parts.tail.get(), parts.tail.get() + parts.tails);
    return nullptr;
}

}  // namespace

const char* Encoder::head_only_parts(ConstBytes data, HeadOnlyParts& parts) const {
    const Model& model = impl_->model;
    const Impl::Coded& c = impl_->coded[0];
    return dispatch_layout(model.layout, [&](auto width, auto family) {
        return fields::head_only_parts<decltype(width)::value, decltype(family)::value>(
            reinterpret_cast<const uint8_t*>(data.data), data.size / model.layout.width, model.fields[0],
            c.symbol_of.data(), c.head_lookup.data(), *c.head_rows, parts);
    });
}

const char* Encoder::encode_two(const ConstBytes* data, std::vector<uint8_t>& out, size_t* lengths) const {
    if (!impl_->head_only) {
        for (unsigned k = 0; k < 2; ++k) {
            const size_t before = out.size();
            if (const char* error = encode(data[k], out)) return error;
            lengths[k] = out.size() - before;
        }
        return nullptr;
    }
    HeadOnlyParts parts[2];
    std::vector<uint8_t> streams[2];
    const uint8_t* symbols[2];
    size_t counts[2];
    std::vector<uint8_t>* outs[2] = {&streams[0], &streams[1]};
    for (unsigned k = 0; k < 2; ++k) {
        if (const char* error = head_only_parts(data[k], parts[k])) return error;
        symbols[k] = parts[k].symbols.get();
        counts[k] = parts[k].n;
        streams[k].reserve(2 * parts[k].n + rans::kStateBytes);
    }
    rans::encode_two(symbols, counts, *impl_->coded[0].table, outs);
    for (unsigned k = 0; k < 2; ++k) {
        const size_t before = out.size();
        if (const char* error = write_head_only(parts[k], impl_->model.layout.width, streams[k], out)) return error;
        lengths[k] = out.size() - before;
    }
    return nullptr;
}

const char* Encoder::encode(ConstBytes data, std::vector<uint8_t>& out) const {
    const Model& model = impl_->model;
    const Layout& layout = model.layout;
    const unsigned w = layout.width;
    const size_t n = data.size / w;
    const bool zero = model.has_zero();
    if (impl_->head_only) {
        HeadOnlyParts parts;
        if (const char* error = head_only_parts(data, parts)) return error;
        std::vector<uint8_t> stream;
        stream.reserve(2 * n + rans::kStateBytes);
        rans::encode(parts.symbols.get(), n, *impl_->coded[0].table, stream);
        return write_head_only(parts, w, stream, out);
    }
    std::vector<uint16_t> head(n);
    std::vector<uint8_t> tails((w - 1) * n);
    std::vector<uint8_t> is_zero(zero ? n : 0);
    const size_t m = split_fields(layout, reinterpret_cast<const uint8_t*>(data.data), n, zero, head.data(),
                                  tails.data(), is_zero.data());
    std::vector<size_t> directory;
    std::vector<uint8_t> streams;
    streams.reserve(data.size + data.size / 8 + 256);
    std::vector<uint8_t> symbols(n);
    std::vector<uint8_t> raw_bits;
    std::vector<uint32_t> listed;
    for (unsigned f = 0; f < w; ++f) {
        const Field& field = model.fields[f];
        const size_t count = f == 0 ? n : m;
        const unsigned bits = layout.bits(f);
        const uint8_t* tail = f == 0 ? nullptr : tails.data() + (f - 1) * n;
        auto value = [&](size_t i) -> unsigned { return f == 0 ? head[i] : tail[i]; };
        if (field.mode == Mode::constant) {
            for (size_t i = 0; i < count; ++i) {
                if (value(i) != field.constant) return "data does not fit the model (a constant field varies)";
            }
            continue;
        }
        const size_t before = streams.size();
        if (field.mode == Mode::raw) {
            if (f == 0) {
                pack(head.data(), count, bits, streams);
            } else {
                pack(tail, count, bits, streams);
            }
            directory.push_back(streams.size() - before);
            continue;
        }
        const Impl::Coded& c = impl_->coded[f];
        raw_bits.clear();
        bits::Writer writer(raw_bits);
        alignas(64) uint8_t raw_count[rans::kMaxSymbols] = {};  // (a byte table of the vector loop too)
        uint16_t base[rans::kMaxSymbols] = {};
        for (size_t k = 0; k < field.symbols.size(); ++k) {
            raw_count[k] = field.symbols[k].zero() ? 0 : field.symbols[k].raw_bits;
            base[k] = field.symbols[k].value;
        }
        // One loop per source (the head's 16-bit values or a tail's bytes), the zero test only
        // where the head has the zero symbol: no per-element branch on which field this is. The
        // symbols first, then the raw bits (a symbol without any, the zero symbol too, has a
        // value equal to its base, so writing its 0 bits writes nothing).
        const auto code = [&](const auto* values, bool zero_head) {
            const uint16_t* const symbol_of = c.symbol_of.data();
            bool fits = true;
            for (size_t i = 0; i < count; ++i) {
                unsigned s = symbol_of[values[i]];
                if (zero_head) s = is_zero[i] ? c.zero_symbol : s;
                fits &= s != kNoSymbol;
                symbols[i] = static_cast<uint8_t>(s);
            }
            if (!fits) return false;
            visit_raw_symbols(symbols.data(), count, raw_count, listed, [&](size_t i) {
                const unsigned s = symbols[i];
                writer.write(raw_count[s], values[i] - base[s]);
            });
            return true;
        };
        const bool fits = f == 0 ? (zero ? code(head.data(), true) : code(head.data(), false)) : code(tail, false);
        if (!fits) return "data does not fit the model (a value no symbol covers)";
        writer.flush();
        rans::encode(symbols.data(), count, *c.table, streams);
        directory.push_back(streams.size() - before);
        streams.insert(streams.end(), raw_bits.begin(), raw_bits.end());
        directory.push_back(raw_bits.size());
    }
    for (const size_t length : directory) {
        if (length > std::numeric_limits<uint32_t>::max()) return "a chunk's stream exceeds 4 GiB";
        put32(out, length);
    }
    out.insert(out.end(), streams.begin(), streams.end());
    return nullptr;
}

// -- decoding ---------------------------------------------------------------------

namespace {

struct Coded {
    std::unique_ptr<rans::DecodeTable> table;
    std::array<uint16_t, rans::kMaxSymbols> value{};
    alignas(64) std::array<uint8_t, rans::kMaxSymbols> raw_bits{};  // (a byte table of the vector loops too)
    std::array<uint32_t, rans::kMaxSymbols> fused{};  // floating heads: value << shift, bit 31: raw bits follow
    // The same as bytes for the AVX-512 loop's byte permutes: the value's low byte, and its
    // high bits with bit 7 set when raw bits follow.
    alignas(64) std::array<uint8_t, rans::kMaxSymbols> fused_low{};
    alignas(64) std::array<uint8_t, rans::kMaxSymbols> fused_high{};
    // `value` as two byte tables, for the generic loops' byte permutes.
    alignas(64) std::array<uint8_t, rans::kMaxSymbols> value_low{};
    alignas(64) std::array<uint8_t, rans::kMaxSymbols> value_high{};
    // The run of symbols without raw bits whose values count up by one, the one coding the most
    // elements: symbols run_first to run_first + run_last have the values symbol + run_delta.
    // (Symbols ascend by value, so trained weights' common heads form one long run.) No run:
    // run_first = kMaxSymbols.
    uint32_t run_first = rans::kMaxSymbols;
    uint32_t run_last = 0;
    uint32_t run_delta = 0;
    int zero_symbol = -1;
    bool any_raw_bits = false;
    // Every symbol has this many raw bits (0: not so): a nearly uniform field whose values
    // differ only in a few high bits.
    unsigned uniform_raw_bits = 0;
};

// Sets c's run: of the runs of symbols it describes, the one whose frequencies sum highest.
void find_value_run(const std::vector<Symbol>& symbols, Coded& c) noexcept {
    uint32_t best = 0;
    for (size_t first = 0; first < symbols.size();) {
        if (symbols[first].zero() || symbols[first].raw_bits != 0) {
            ++first;
            continue;
        }
        size_t last = first;
        uint32_t weight = symbols[first].freq;
        while (last + 1 < symbols.size() && !symbols[last + 1].zero() && symbols[last + 1].raw_bits == 0 &&
               symbols[last + 1].value == symbols[last].value + 1u) {
            weight += symbols[++last].freq;
        }
        if (weight > best) {
            best = weight;
            c.run_first = static_cast<uint32_t>(first);
            c.run_last = static_cast<uint32_t>(last - first);
            c.run_delta = static_cast<uint32_t>(symbols[first].value) - static_cast<uint32_t>(first);
        }
        first = last + 1;
    }
}

// Reads `count` values of `bits` bits from a raw field at a cursor, bounds-checked.
struct RawCursor {
    const uint8_t* data = nullptr;
    size_t size = 0;
    size_t index = 0;  // values read so far

    template <typename T>
    bool take(unsigned bits, size_t count, T* out) noexcept {
        if (count > size * 8 / bits - index) return false;  // (index + count) * bits <= size * 8
        if (bits == 8) {
            if constexpr (sizeof(T) == 1) {
                std::memcpy(out, data + index, count);
            } else {
                for (size_t k = 0; k < count; ++k) out[k] = data[index + k];
            }
        } else if (bits == 4) {
            for (size_t k = 0; k < count; ++k) {
                const size_t i = index + k;
                out[k] = static_cast<T>((data[i >> 1] >> ((i & 1) * 4)) & 0xF);
            }
        } else {  // 12 bits: two bytes hold every value (its first bit is at 0 or 4)
            for (size_t k = 0; k < count; ++k) {
                const size_t bit = (index + k) * 12;
                const size_t at = bit >> 3;
                const unsigned pair = data[at] | (at + 1 < size ? static_cast<unsigned>(data[at + 1]) << 8 : 0u);
                out[k] = static_cast<T>((pair >> (bit & 7)) & 0xFFF);
            }
        }
        index += count;
        return true;
    }

    bool finished(unsigned bits) const noexcept {
        if (bits::packed_bytes(index, bits) != size) return false;
        const unsigned used = static_cast<unsigned>((index * bits) % 8);
        return used == 0 || (data[size - 1] >> used) == 0;
    }
};

const char* const kCorrupt = "a chunk's streams do not decode to its elements";

struct FieldReader {
    Mode mode = Mode::raw;
    RawCursor raw;
    rans::Decoder stream;
    bool started = false;
    bits::Reader low_bits;
    // The stream's next symbols, stepped ahead beside other streams (Decoder::step_ahead).
    const uint8_t* ready = nullptr;
    size_t ready_count = 0;
};

}  // namespace

struct Decoder::Impl {
    Model model;
    std::vector<Coded> coded;
    unsigned directory_entries = 0;
    bool fast_float32 = false;
    bool fast_float16 = false;
};

Decoder::Decoder(const Model& model) : impl_(std::make_unique<Impl>()) {
    Impl& m = *impl_;
    m.model = model;
    m.coded.resize(model.fields.size());
    const Layout& layout = model.layout;
    for (size_t f = 0; f < model.fields.size(); ++f) {
        const Field& field = model.fields[f];
        if (field.mode == Mode::raw) m.directory_entries += 1;
        if (field.mode != Mode::rans) continue;
        m.directory_entries += 2;
        Coded& c = m.coded[f];
        c.table.reset(new rans::DecodeTable);  // not zeroed: build_decode_table writes every slot
        std::vector<uint16_t> freqs;
        for (const Symbol& s : field.symbols) freqs.push_back(s.freq);
        rans::build_decode_table(freqs.data(), static_cast<unsigned>(freqs.size()), *c.table);
        const bool fusable_width = (layout.family == Family::floating && layout.width <= 4) || layout.family == Family::half;
        const unsigned shift = !fusable_width ? 0 : layout.family == Family::half ? 7 : 8 * layout.width - 13;
        for (size_t k = 0; k < field.symbols.size(); ++k) {
            const Symbol& s = field.symbols[k];
            c.value[k] = s.value;
            c.value_low[k] = static_cast<uint8_t>(s.value);
            c.value_high[k] = static_cast<uint8_t>(s.value >> 8);
            if (s.zero()) {
                c.zero_symbol = static_cast<int>(k);
                continue;
            }
            c.raw_bits[k] = s.raw_bits;
            c.any_raw_bits |= s.raw_bits > 0;
            if (fusable_width) {
                c.fused[k] = (static_cast<uint32_t>(s.value) << shift) | (s.raw_bits ? 0x80000000u : 0u);
                c.fused_low[k] = static_cast<uint8_t>(s.value);
                c.fused_high[k] = static_cast<uint8_t>((s.value >> 8) | (s.raw_bits ? 0x80u : 0u));
            }
        }
        if (fusable_width) find_value_run(field.symbols, c);
        const unsigned first_bits = field.symbols.front().raw_bits;
        const bool uniform = c.zero_symbol < 0 && std::all_of(field.symbols.begin(), field.symbols.end(),
                                                              [&](const Symbol& s) { return s.raw_bits == first_bits; });
        c.uniform_raw_bits = uniform ? first_bits : 0;
    }
    // The fused loops need every other field as plain bytes or nibbles: raw fields are read in
    // place, the others decoded to scratch first.
    const bool fusable = layout.family != Family::integer && model.fields[0].mode == Mode::rans && !model.has_zero();
    m.fast_float32 = fusable && layout.width == 4;
    m.fast_float16 = fusable && layout.width == 2;
}

Decoder::~Decoder() = default;

namespace {

// Decodes `count` symbols of a rANS field and maps them to values (raw low bits added);
// zero[i] = 1 for the zero-element symbol (heads only).
template <typename T>
bool rans_values(FieldReader& r, const Coded& c, size_t count, uint8_t* symbols, T* values, uint8_t* zero) noexcept {
    if (count == 0) return true;
    if (!r.started) return false;  // symbols wanted from an empty stream
    const size_t ready = std::min(count, r.ready_count);
    if (ready != 0) {  // (r.ready is null when nothing was stepped ahead: memcpy must not see it)
        std::memcpy(symbols, r.ready, ready);
        r.ready += ready;
        r.ready_count -= ready;
    }
    if (!r.stream.decode(*c.table, count - ready, symbols + ready)) return false;
    // Loops of one job each, none with a branch on the data: the values, the raw bits, the
    // zero flags (a branch per symbol with raw bits missed on a fraction of them).
    size_t looked_up = 0;  // values (and zero flags) done by the vector loop
    if (rans::simd() == rans::Simd::avx512) {
        looked_up = symbol_values_avx512(symbols, count, c.value_low.data(),
                                         sizeof(T) == 2 ? c.value_high.data() : nullptr, c.zero_symbol, values, zero);
    }
    for (size_t i = looked_up; i < count; ++i) values[i] = static_cast<T>(c.value[symbols[i]]);
    if (c.uniform_raw_bits != 0) {
        if (!r.low_bits.read_many(c.uniform_raw_bits, count, [&](size_t i, uint32_t low) {
                values[i] = static_cast<T>(values[i] | low);
            })) {
            return false;
        }
    } else if (c.any_raw_bits) {
        thread_local std::vector<uint32_t> listed;
        bits::Reader low_bits = r.low_bits;  // a copy, so that its state stays in registers
        bool ok = true;
        visit_raw_symbols(symbols, count, c.raw_bits.data(), listed, [&](size_t i) {
            uint32_t low = 0;
            ok &= low_bits.read(c.raw_bits[symbols[i]], low);
            values[i] = static_cast<T>(values[i] | low);
        });
        r.low_bits = low_bits;
        if (!ok) return false;
    }
    if (zero != nullptr) {
        const int zero_symbol = c.zero_symbol;
        for (size_t i = looked_up; i < count; ++i) zero[i] = static_cast<int>(symbols[i]) == zero_symbol;
    }
    return true;
}

template <typename T>
bool field_values(FieldReader& r, const Field& field, const Coded& c, unsigned bits, size_t count, uint8_t* symbols,
                  T* values, uint8_t* zero) noexcept {
    switch (r.mode) {
        case Mode::constant:
            std::fill(values, values + count, static_cast<T>(field.constant));
            if (zero != nullptr) std::fill(zero, zero + count, uint8_t{0});
            return true;
        case Mode::raw:
            if (zero != nullptr) std::fill(zero, zero + count, uint8_t{0});
            return r.raw.take(bits, count, values);
        case Mode::rans:
            return rans_values(r, c, count, symbols, values, zero);
    }
    return false;
}

// The scalar tail of a fused run (and the whole run without AVX2): elements [i, n).
bool fused_scalar(FieldReader* readers, const Coded& head, const uint8_t* const* tails, const Layout& layout,
                  size_t i, size_t n, uint8_t* out) noexcept {
    rans::Decoder& d = readers[0].stream;
    bits::Reader& raw = readers[0].low_bits;
    const unsigned shift = layout.width == 4 ? 19 : layout.family == Family::half ? 7 : 3;
    for (; i < n; ++i) {
        uint8_t s;
        if (!rans::decode_step(d, *head.table, s)) return false;
        uint32_t v = head.fused[s];
        if (v >> 31) {
            uint32_t low = 0;
            if (!raw.read(head.raw_bits[s], low)) return false;
            v = (v & 0x7FFFFFFFu) | (low << shift);
        }
        if (layout.width == 4) {
            const unsigned q = (tails[1][i >> 1] >> ((i & 1) * 4)) & 0xF;
            const uint32_t element = v | ((q & 7u) << 16) | (static_cast<uint32_t>(q >> 3) << 31) |
                                     (static_cast<uint32_t>(tails[2][i]) << 8) | tails[3][i];
            std::memcpy(out + 4 * i, &element, 4);  // any alignment: the AVX2 loop stores unaligned too
        } else {
            const bool half = layout.family == Family::half;
            const unsigned q = half ? tails[1][i] : (tails[1][i >> 1] >> ((i & 1) * 4)) & 0xF;
            const unsigned rest = half ? (q & 0x7Fu) | ((q >> 7) << 15) : (q & 7u) | ((q >> 3) << 15);
            const auto element = static_cast<uint16_t>(v | rest);
            std::memcpy(out + 2 * i, &element, 2);
        }
    }
    return true;
}

enum class Planes { ready, not_fusable, corrupt, no_memory };

// Fields 1 and up of a chunk as the fused loops read them: raw fields in place, the others
// decoded into this thread's scratch for `slot` (nibble fields packed two to a byte; chunks
// decoded together each have a slot), the first n of the chunk's `total` elements. not_fusable
// when a raw field's stream has the wrong length for `total` (the generic loop then reports the
// chunk corrupt); nothing is consumed in that case.
Planes tail_planes(FieldReader* readers, const Model& model, const std::vector<Coded>& coded, size_t n,
                   size_t total, unsigned slot, const uint8_t** tails) noexcept {
    thread_local std::vector<uint8_t> slots[rans::kMaxTogether][3];
    std::vector<uint8_t>* const scratch = slots[slot];
    thread_local std::vector<uint8_t> values;
    const Layout& layout = model.layout;
    for (unsigned f = 1; f < layout.width; ++f) {
        if (readers[f].mode == Mode::raw && readers[f].raw.size != bits::packed_bytes(total, layout.bits(f))) {
            return Planes::not_fusable;
        }
    }
    for (unsigned f = 1; f < layout.width; ++f) {
        FieldReader& r = readers[f];
        const unsigned bits = layout.bits(f);
        if (r.mode == Mode::raw) {
            tails[f] = r.raw.data;
            r.raw.index = n;
            continue;
        }
        std::vector<uint8_t>& plane = scratch[f - 1];
        try {
            plane.resize(bits::packed_bytes(n, bits) + 16);
            if (bits == 4) values.resize(n);
        } catch (const std::bad_alloc&) {
            return Planes::no_memory;
        }
        uint8_t* target = bits == 4 ? values.data() : plane.data();
        uint8_t symbols[kBlock];
        for (size_t done = 0; done < n; done += kBlock) {
            const size_t b = std::min(kBlock, n - done);
            if (!field_values(r, model.fields[f], coded[f], bits, b, symbols, target + done, static_cast<uint8_t*>(nullptr))) {
                return Planes::corrupt;
            }
        }
        if (bits == 4) {
            // By pairs, which the compiler vectorises (element by element it did not).
            const uint8_t* v = values.data();
            uint8_t* out = plane.data();
            for (size_t i = 0; i < n / 2; ++i) out[i] = static_cast<uint8_t>(v[2 * i] | v[2 * i + 1] << 4);
            std::fill(plane.begin() + static_cast<std::ptrdiff_t>(n / 2), plane.end(), uint8_t{0});
            if (n % 2 != 0) out[n / 2] = v[n - 1];
        }
        tails[f] = plane.data();
    }
    return Planes::ready;
}

// Elements from their head values and the tail values of the `nonzero` elements not zero; the
// tails arrays hold at least nonzero + 1 values (the last one read, never used, when the block
// ends in zeros).
template <unsigned W, Family F>
void assemble(const uint16_t* head, const uint8_t* zero, const uint8_t (*tails)[kBlock + 1], size_t count,
              size_t nonzero, uint8_t* dst) {
    constexpr Layout layout{W, F};
    using V = typename Element<W>::type;
    if (nonzero == count) {  // a loop the compiler vectorises
        for (size_t i = 0; i < count; ++i) {
            V v = static_cast<V>(head_part(layout, head[i]));
            for (unsigned f = 1; f < W; ++f) v |= static_cast<V>(tail_part(layout, f, tails[f - 1][i]));
            std::memcpy(dst + i * W, &v, W);
        }
        return;
    }
    // Zeros take no tail values, so a zero's slot is filled by a select, not a branch (the
    // zeros of XOR deltas fall at random).
    size_t k = 0;
    for (size_t i = 0; i < count; ++i) {
        uint64_t v = head_part(layout, head[i]);
        for (unsigned f = 1; f < W; ++f) v |= tail_part(layout, f, tails[f - 1][k]);
        const bool is_zero = zero[i] != 0;
        store_element(dst + i * W, W, is_zero ? 0 : v);
        k += !is_zero;
    }
}

}  // namespace

// One chunk being decoded: its directory's streams, and how far the elements are done.
struct Decoder::Chunk {
    FieldReader readers[8];
    const uint8_t* tails[4] = {};
    rans::FusedHead fused;
    size_t n = 0;      // elements to decode
    size_t total = 0;  // elements in the chunk: more than n for a prefix
    size_t done = 0;   // elements written by a fused loop
    uint8_t* dst = nullptr;
    bool is_fused = false;
    bool failed = false;  // a fused loop stopped on corrupt raw bits
};

const char* Decoder::open(ConstBytes chunk, MutableBytes out, size_t elements, unsigned slot, Chunk& c) const noexcept {
    const Impl& m = *impl_;
    const Model& model = m.model;
    const Layout& layout = model.layout;
    const unsigned w = layout.width;
    if (out.size % w != 0) return "a chunk's output is not whole elements";
    c.n = out.size / w;
    if (c.n > elements) return "a chunk's output is longer than its elements";
    c.total = elements;
    c.dst = reinterpret_cast<uint8_t*>(out.data);
    const auto* bytes = reinterpret_cast<const uint8_t*>(chunk.data);
    // The directory, then every stream where it says.
    const size_t directory_bytes = 4 * static_cast<size_t>(m.directory_entries);
    if (chunk.size < directory_bytes) return "a chunk is shorter than its directory";
    size_t position = directory_bytes;
    size_t entry = 0;
    auto next_stream = [&](size_t& start, size_t& length) {
        length = get32(bytes + 4 * entry++);
        start = position;
        if (length > chunk.size - position) return false;
        position += length;
        return true;
    };
    for (unsigned f = 0; f < w; ++f) {
        FieldReader& r = c.readers[f];
        r.mode = model.fields[f].mode;
        size_t start = 0, length = 0;
        if (r.mode == Mode::raw) {
            if (!next_stream(start, length)) return "a chunk's directory points past its end";
            r.raw = RawCursor{bytes + start, length, 0};
        } else if (r.mode == Mode::rans) {
            if (!next_stream(start, length)) return "a chunk's directory points past its end";
            if (length > 0) {
                if (!r.stream.start(ConstBytes{chunk.data + start, length})) return "a rANS stream has a malformed start";
                r.started = true;
            }
            if (!next_stream(start, length)) return "a chunk's directory points past its end";
            r.low_bits = bits::Reader(bytes + start, length);
        }
    }
    if (position != chunk.size) return "a chunk has bytes its directory does not account for";
    if (m.fast_float32 || m.fast_float16) {
        switch (tail_planes(c.readers, model, m.coded, c.n, c.total, slot, c.tails)) {
            case Planes::corrupt: return kCorrupt;
            case Planes::no_memory: return "out of memory for a chunk's scratch";
            case Planes::not_fusable: break;
            case Planes::ready:
                if (c.n > 0 && !c.readers[0].started) return kCorrupt;
                c.is_fused = true;
                const Coded& head = m.coded[0];
                c.fused = rans::FusedHead{head.table.get(), head.fused.data(), head.raw_bits.data(),
                                          head.fused_low.data(), head.fused_high.data(),
                                          layout.width == 4 ? 19u : layout.family == Family::half ? 7u : 3u,
                                          head.run_first, head.run_last, head.run_delta};
        }
    }
    return nullptr;
}

// The vector fused loop over the whole groups of `count` chunks of one layout, stepping
// together, from where each chunk is done; marks a chunk failed on corrupt raw bits.
size_t Decoder::run_fused(Chunk* const* chunks, unsigned count, const Layout& layout) noexcept {
    const rans::Simd level = rans::simd();
    if (level == rans::Simd::scalar) return 0;
    const bool half = layout.family == Family::half;
    rans::FusedStream streams[rans::kMaxTogether];
    size_t groups = SIZE_MAX;
    for (unsigned k = 0; k < count; ++k) {
        Chunk& c = *chunks[k];
        rans::FusedStream& s = streams[k];
        s.decoder = &c.readers[0].stream;
        s.head = &c.fused;
        s.raw = &c.readers[0].low_bits;
        // Fields 1-3 of float32 (a nibble, two bytes), or field 1 of 16-bit floats (a nibble
        // for bfloat16, a byte for float16); c.done is a multiple of the group size.
        const bool nibbles = layout.width == 4 || !half;
        s.tails[0] = c.tails[1] + (nibbles ? c.done / 2 : c.done);
        if (layout.width == 4) {
            s.tails[1] = c.tails[2] + c.done;
            s.tails[2] = c.tails[3] + c.done;
        }
        s.out = c.dst + c.done * layout.width;
        groups = std::min(groups, (c.n - c.done) / rans::kLanes);
    }
    if (groups == 0) return 0;
    size_t done = 0;
    bool ok[rans::kMaxTogether] = {true, true, true, true};
    if (level == rans::Simd::avx512) {
        done = layout.width == 4 ? rans::decode_float32_groups_avx512(streams, count, groups, ok)
                                 : rans::decode_float16_groups_avx512(streams, count, half, groups, ok);
    } else {
        done = layout.width == 4 ? rans::decode_float32_groups_avx2(streams, count, groups, ok)
                                 : rans::decode_float16_groups_avx2(streams, count, half, groups, ok);
    }
    for (unsigned k = 0; k < count; ++k) {
        chunks[k]->failed = !ok[k];
        chunks[k]->done += done * rans::kLanes;
    }
    return done;
}

const char* Decoder::finish(Chunk& c) const noexcept {
    const Impl& m = *impl_;
    const Model& model = m.model;
    const Layout& layout = model.layout;
    const unsigned w = layout.width;
    const size_t n = c.n;
    FieldReader* readers = c.readers;
    uint8_t* dst = c.dst;
    size_t nonzero_total = n;  // values of fields 1 and up
    if (c.is_fused) {
        Chunk* const self = &c;
        if (!c.failed) run_fused(&self, 1, layout);
        if (c.failed || !fused_scalar(readers, m.coded[0], c.tails, layout, c.done, n, dst)) return kCorrupt;
    } else {
        alignas(64) uint16_t head[kBlock];
        alignas(64) uint8_t zero[kBlock];
        alignas(64) uint8_t tails[7][kBlock + 1];
        alignas(64) uint8_t expanded[7][kBlock + 1];
        alignas(64) uint8_t symbols[kBlock];
        for (size_t done = 0; done < n;) {
            const size_t b = std::min(kBlock, n - done);
            if (!field_values(readers[0], model.fields[0], m.coded[0], layout.bits(0), b, symbols, head, zero)) {
                return kCorrupt;
            }
            size_t nonzero = b;
            for (size_t i = 0; i < b; ++i) nonzero -= zero[i];
            nonzero_total -= b - nonzero;
            for (unsigned f = 1; f < w; ++f) {
                if (!field_values(readers[f], model.fields[f], m.coded[f], layout.bits(f), nonzero, symbols, tails[f - 1],
                                  static_cast<uint8_t*>(nullptr))) {
                    return kCorrupt;
                }
                tails[f - 1][nonzero] = 0;
            }
            const uint8_t(*placed)[kBlock + 1] = tails;
            size_t placed_nonzero = nonzero;  // the tail values placed holds
            const rans::Simd level = rans::simd();
            if (nonzero < b && level != rans::Simd::scalar) {
                // Tail values put in element order first (0 for the zeros, whose head value is
                // 0 too): the assembly is then the loop without zeros, which vectorises.
                for (unsigned f = 1; f < w; ++f) {
                    size_t taken = 0;
                    size_t i = level == rans::Simd::avx512
                                   ? expand_nonzero_avx512(tails[f - 1], zero, b, expanded[f - 1], taken)
                                   : expand_nonzero_avx2(tails[f - 1], nonzero, zero, b, expanded[f - 1], taken);
                    for (; i < b; ++i) {
                        expanded[f - 1][i] = zero[i] ? 0 : tails[f - 1][taken];
                        taken += !zero[i];
                    }
                }
                placed = expanded;
                placed_nonzero = b;
            }
            dispatch_layout(layout, [&](auto width, auto family) {
                assemble<decltype(width)::value, decltype(family)::value>(head, zero, placed, b, placed_nonzero, dst + done * w);
                return 0;
            });
            done += b;
        }
    }
    if (n < c.total) return nullptr;  // a prefix: the streams go on past it
    for (unsigned f = 0; f < w; ++f) {
        const FieldReader& r = readers[f];
        if (r.mode == Mode::raw && !r.raw.finished(layout.bits(f))) return kCorrupt;
        if (r.mode != Mode::rans) continue;
        // A field without values has an empty stream; one with values ends where it began.
        const bool has_values = (f == 0 ? n : nonzero_total) > 0;
        if (r.started != has_values || (r.started && !r.stream.finished()) || !r.low_bits.finished()) return kCorrupt;
    }
    return nullptr;
}

const char* Decoder::decode(ConstBytes chunk, MutableBytes out, size_t elements) const noexcept {
    Chunk c;
    const char* error = open(chunk, out, elements, 0, c);
    return error != nullptr ? error : finish(c);
}

const Layout& Decoder::layout() const noexcept { return impl_->model.layout; }

void Decoder::step_ahead(const Decoder* const* decoders, Chunk* chunks, const char* const* errors,
                         unsigned count) noexcept {
    const rans::Simd level = rans::simd();
    if (level == rans::Simd::scalar) return;
    const auto step_streams = level == rans::Simd::avx512 ? rans::step_streams_avx512 : rans::step_streams_avx2;
    // A stream's symbols stepped ahead: up to this many (a chunk of 64 KiB holds at most 64 Ki
    // elements), so that a thread's buffers stay small whatever the chunks.
    constexpr size_t kMostAhead = size_t{1} << 16;
    thread_local std::vector<uint8_t> buffers[rans::kMaxTogether][8];
    const auto step = [&](unsigned f, auto wanted) {
        rans::StreamSteps steps[rans::kMaxTogether];
        unsigned k_of[rans::kMaxTogether];
        unsigned n = 0;
        for (unsigned k = 0; k < count; ++k) {
            FieldReader& r = chunks[k].readers[f];
            if (errors[k] != nullptr || chunks[k].is_fused || f >= decoders[k]->layout().width || r.mode != Mode::rans ||
                !r.started) {
                continue;
            }
            const size_t groups = std::min(wanted(k), kMostAhead) / rans::kLanes;
            if (groups == 0) continue;
            std::vector<uint8_t>& buffer = buffers[k][f];
            try {
                buffer.resize(groups * rans::kLanes);
            } catch (const std::bad_alloc&) {
                continue;  // stepped one at a time later, as without this
            }
            steps[n] = rans::StreamSteps{&r.stream, decoders[k]->impl_->coded[f].table.get(), buffer.data(), groups};
            k_of[n++] = k;
        }
        step_streams(steps, n);
        for (unsigned i = 0; i < n; ++i) {
            FieldReader& r = chunks[k_of[i]].readers[f];
            r.ready = steps[i].out;
            r.ready_count = steps[i].done * rans::kLanes;
        }
    };
    step(0, [&](unsigned k) { return chunks[k].n; });
    // The other fields code the elements that are not zero: as many as the head symbols
    // stepped ahead hold.
    size_t nonzero[rans::kMaxTogether] = {};
    for (unsigned k = 0; k < count; ++k) {
        const FieldReader& head = chunks[k].readers[0];
        const int zero_symbol = errors[k] == nullptr ? decoders[k]->impl_->coded[0].zero_symbol : -1;
        size_t zeros = 0;
        for (size_t i = 0; i < head.ready_count; ++i) zeros += head.ready[i] == zero_symbol;
        nonzero[k] = head.ready_count - zeros;
    }
    for (unsigned f = 1; f < 8; ++f) step(f, [&](unsigned k) { return nonzero[k]; });
}

void Decoder::decode_together(const Decoder* const* decoders, const ConstBytes* chunks, const MutableBytes* outs,
                              const size_t* elements, unsigned count, const char** errors) noexcept {
    Chunk c[rans::kMaxTogether];
    for (unsigned k = 0; k < count; ++k) errors[k] = decoders[k]->open(chunks[k], outs[k], elements[k], k, c[k]);
    // Chunks the fused loops do not take (heads with the zero symbol: XOR deltas) decode field
    // by field, each rANS stream alone a chain of dependent steps: their streams' whole groups
    // are stepped side by side first.
    if (count > 1) step_ahead(decoders, c, errors, count);
    // The chunks step together while two or more have whole groups left: when the shortest
    // is done (a prefix, a tensor's last chunk, a smaller tensor), the others go on without it.
    for (;;) {
        Chunk* fused[rans::kMaxTogether];
        unsigned n_fused = 0;
        for (unsigned k = 0; k < count; ++k) {
            if (errors[k] == nullptr && c[k].is_fused && !c[k].failed && c[k].n - c[k].done >= rans::kLanes) {
                fused[n_fused++] = &c[k];
            }
        }
        // None done: a stream near its end (its last words are read by the scalar loop).
        if (n_fused < 2 || run_fused(fused, n_fused, decoders[0]->layout()) == 0) break;
    }
    for (unsigned k = 0; k < count; ++k) {
        if (errors[k] == nullptr) errors[k] = decoders[k]->finish(c[k]);
    }
}

#if !defined(MMPACK_HAVE_AVX2_TU)
// No vector translation units on this architecture: rans::simd() is Simd::scalar, so these never run.
size_t tail_fields_avx512(const uint8_t*, size_t, unsigned, bool, uint8_t* const*) noexcept { return 0; }
size_t expand_nonzero_avx512(const uint8_t*, const uint8_t*, size_t, uint8_t*, size_t&) noexcept { return 0; }
size_t expand_nonzero_avx2(const uint8_t*, size_t, const uint8_t*, size_t, uint8_t*, size_t&) noexcept { return 0; }
size_t symbol_values_avx512(const uint8_t*, size_t, const uint8_t*, const uint8_t*, int, void*, uint8_t*) noexcept {
    return 0;
}
size_t raw_symbols_avx512(const uint8_t*, size_t, const uint8_t*, uint32_t*, size_t&) noexcept { return 0; }
size_t split_nonzero_avx512(const uint8_t*, size_t, unsigned, bool, uint16_t*, uint8_t*, uint8_t*, size_t&) noexcept {
    return 0;
}
bool head_symbols_avx512(const uint8_t*, size_t, unsigned, unsigned, unsigned, const uint16_t*, uint8_t*, uint16_t*) noexcept {
    return false;
}
bool head_symbols_avx2(const uint8_t*, size_t, unsigned, unsigned, unsigned, const uint16_t*, uint8_t*, uint16_t*) noexcept {
    return false;
}
#endif

}  // namespace mmpack::fields
