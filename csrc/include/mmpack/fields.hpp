// The codec of format version 3 (docs/FORMAT.md, "Compressed objects,
// version 3"): every element is cut into *fields* by bit position, each field
// of a tensor is coded one way for all its chunks (stored as it is, one
// constant, or rANS with a table the tensor's chunks share), and a chunk is a
// small directory followed by each field's streams.
//
// Floating-point elements: the head is the 12 bits below the sign (the
// exponent, and the top mantissa bits of float32 and bfloat16), so one symbol
// codes the exponent together with the mantissa bits that depend on it; the
// nibble holds the sign and the next three bits; the low bytes follow as byte
// planes. Integers: the head is the top byte, the other bytes are planes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "mmpack/rans.hpp"
#include "mmpack/span.hpp"

namespace mmpack::fields {

// floating: float32, bfloat16, float64 (head 12 bits, nibble, byte planes);
// half: float16 (head 8 bits: exponent and top 3 mantissa bits; then a byte:
// sign and the low 7 bits); integer: everything else (top byte, byte planes).
enum class Family : std::uint8_t { floating = 0, integer = 1, half = 2 };

struct Layout {
    unsigned width = 1;  // bytes per element (one component of a complex value)
    Family family = Family::integer;

    // One field per byte of the element: head, then nibble (floating) or planes.
    constexpr unsigned n_fields() const noexcept { return width; }
    // Width of a field in bits (inline: the kernels' loops ask for every element).
    constexpr unsigned bits(unsigned field) const noexcept {
        if (family == Family::floating) return field == 0 ? 12 : field == 1 ? 4 : 8;
        return 8;
    }
    constexpr bool operator==(const Layout& other) const noexcept {
        return width == other.width && family == other.family;
    }
    constexpr bool operator!=(const Layout& other) const noexcept { return !(*this == other); }
};

// Floating: widths 2, 4 and 8; integer: 1, 2, 4 and 8.
bool valid_layout(unsigned width, Family family) noexcept;

enum class Mode : std::uint8_t { raw = 0, constant = 1, rans = 2 };

inline constexpr unsigned kZeroCode = 15;  // raw-bits code of the zero-element symbol
inline constexpr unsigned kMaxRawBits = 12;

struct Symbol {
    std::uint16_t value = 0;   // lowest field value the symbol stands for
    std::uint8_t raw_bits = 0;  // its low bits, stored raw; kZeroCode: the zero element
    std::uint16_t freq = 0;
    bool zero() const noexcept { return raw_bits == kZeroCode; }
};

struct Field {
    Mode mode = Mode::raw;
    std::uint16_t constant = 0;
    std::vector<Symbol> symbols;  // rans: table order (the zero symbol first, then ascending values)
};

struct Model {
    Layout layout;
    std::vector<Field> fields;
    bool has_zero() const noexcept;
};

// The table block of a tensor (its fields' modes and tables), as stored.
void write_model(const Model& model, std::vector<std::uint8_t>& out);
// Parses and checks a table block; nullptr when valid, else what is wrong.
const char* read_model(ConstBytes block, Layout layout, Model& out);

// The model an encoder uses for `data` (whole elements of one tensor), which
// will be cut into chunks of `chunk_elements`: per field the smallest of raw,
// constant and rANS by an estimate that counts tables and per-chunk costs.
Model choose_model(ConstBytes data, Layout layout, std::size_t chunk_elements);

struct HeadOnlyParts;  // a chunk's fields before its rANS stream (fields.cpp)

// A model with its encoding tables built.
class Encoder {
public:
    explicit Encoder(const Model& model);
    ~Encoder();
    Encoder(const Encoder&) = delete;
    Encoder& operator=(const Encoder&) = delete;
    // Appends the encoded chunk of data.size / width elements to out; nullptr
    // on success, or why data does not fit the model.
    const char* encode(ConstBytes data, std::vector<std::uint8_t>& out) const;
    // encode() of two chunks, data[0] then data[1], their rANS streams coded
    // side by side; lengths[k] is what chunk k added to out.
    const char* encode_two(const ConstBytes* data, std::vector<std::uint8_t>& out, std::size_t* lengths) const;

private:
    struct Impl;
    const char* head_only_parts(ConstBytes data, HeadOnlyParts& parts) const;
    std::unique_ptr<Impl> impl_;
};

// A model with its decoding tables built; decode() may run on many threads at once.
class Decoder {
public:
    explicit Decoder(const Model& model);
    ~Decoder();
    Decoder(const Decoder&) = delete;
    Decoder& operator=(const Decoder&) = delete;
    // Decodes a chunk of `elements` elements into out: nullptr on success,
    // else why the chunk is corrupt. When out holds fewer elements, only that
    // prefix is decoded: the streams are read as far as it goes, so their
    // ends are not checked (a reader keeping the rows checks them against
    // their stored hashes). Never reads outside chunk or writes outside out.
    const char* decode(ConstBytes chunk, MutableBytes out, size_t elements) const noexcept;
    // Decodes `count` (at most rans::kMaxTogether) chunks at once, chunk k
    // with decoders[k], their dependency chains overlapping in the vector
    // loop: errors[k] is what decoders[k]->decode(chunks[k], outs[k],
    // elements[k]) would return. The decoders may differ (chunks of several
    // tensors go together) but must share one layout.
    static void decode_together(const Decoder* const* decoders, const ConstBytes* chunks, const MutableBytes* outs,
                                const size_t* elements, unsigned count, const char** errors) noexcept;
    const Layout& layout() const noexcept;

private:
    struct Impl;
    struct Chunk;
    // Reads a chunk's directory and streams into c; `slot` (below rans::kMaxTogether) is the
    // thread's scratch for its decoded tail fields, one per chunk decoded together.
    const char* open(ConstBytes chunk, MutableBytes out, size_t elements, unsigned slot, Chunk& c) const noexcept;
    // Runs the vector loop over the whole groups all `count` chunks have left; returns them.
    static size_t run_fused(Chunk* const* chunks, unsigned count, const Layout& layout) noexcept;
    // Steps the rANS streams of the chunks that the fused loops do not take side by side, ahead
    // of finish, which then reads their symbols from the readers.
    static void step_ahead(const Decoder* const* decoders, Chunk* chunks, const char* const* errors,
                           unsigned count) noexcept;
    const char* finish(Chunk& c) const noexcept;
    std::unique_ptr<Impl> impl_;
};

}  // namespace mmpack::fields
