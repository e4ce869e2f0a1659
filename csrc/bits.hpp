// LSB-first bit streams (docs/FORMAT.md: bit k of a stream is bit k % 8 of
// its byte k / 8), for raw fields and the raw low bits of rANS symbols.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mmpack::bits {

class Reader {
public:
    Reader() = default;
    Reader(const std::uint8_t* data, std::size_t size) noexcept : next_(data), end_(data + size) {}

    // Reads n <= 16 bits into v; false when the stream ends first.
    bool read(unsigned n, std::uint32_t& v) noexcept {
        if (have_ < n && !refill(n)) return false;
        v = static_cast<std::uint32_t>(buffer_ & ((std::uint64_t{1} << n) - 1));
        buffer_ >>= n;
        have_ -= n;
        return true;
    }

    // True when every byte was read and the bits left of the last one are zero.
    bool finished() const noexcept { return next_ == end_ && have_ < 8 && buffer_ == 0; }

private:
    // Tops the buffer up to 56-63 bits with one 8-byte load while 8 bytes are left (the
    // byte-by-byte loop was a chain of dependent shifts per byte, and streams dense in raw bits
    // read one value per element). The load's bits above `have_` belong to the next byte, which
    // the next load ORs in again unchanged; past the stream's end nothing is loaded, so those
    // bits are zero there and `finished` sees only real ones.
    bool refill(unsigned n) noexcept {
        if (end_ - next_ >= 8) {
            std::uint64_t word;
            std::memcpy(&word, next_, 8);  // little-endian hosts only (the Python layer checks)
            buffer_ |= word << have_;
            next_ += (63 - have_) >> 3;
            have_ |= 56;
            return true;
        }
        while (have_ < n) {
            if (next_ == end_) return false;
            buffer_ |= static_cast<std::uint64_t>(*next_++) << have_;
            have_ += 8;
        }
        return true;
    }

    const std::uint8_t* next_ = nullptr;
    const std::uint8_t* end_ = nullptr;
    std::uint64_t buffer_ = 0;
    unsigned have_ = 0;
};

class Writer {
public:
    explicit Writer(std::vector<std::uint8_t>& out) noexcept : out_(out) {}

    // Writes the n <= 16 low bits of v (its other bits zero); n = 0 writes nothing. Whole 32-bit
    // words go out at once: a loop writing most values with 0 bits (the rare symbols' raw bits)
    // then tests one branch per value, not a byte loop.
    void write(unsigned n, std::uint32_t v) {
        buffer_ |= static_cast<std::uint64_t>(v) << have_;
        have_ += n;
        if (have_ >= 32) {
            const std::size_t at = out_.size();
            out_.resize(at + 4);
            const auto word = static_cast<std::uint32_t>(buffer_);
            std::memcpy(out_.data() + at, &word, 4);  // little-endian hosts only (the Python layer checks)
            buffer_ >>= 32;
            have_ -= 32;
        }
    }

    // Writes the bits left, the last byte's unused bits zero.
    void flush() {
        for (; have_ > 0; have_ = have_ > 8 ? have_ - 8 : 0) {
            out_.push_back(static_cast<std::uint8_t>(buffer_));
            buffer_ >>= 8;
        }
        buffer_ = 0;
    }

private:
    std::vector<std::uint8_t>& out_;
    std::uint64_t buffer_ = 0;
    unsigned have_ = 0;
};

inline std::size_t packed_bytes(std::size_t count, unsigned bits) noexcept { return (count * bits + 7) / 8; }

}  // namespace mmpack::bits
