// LSB-first bit streams (docs/FORMAT.md: bit k of a stream is bit k % 8 of
// its byte k / 8), for raw fields and the raw low bits of rANS symbols.
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
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

    // Reads count values of n bits each (1 <= n <= 16), handing value i to put(i, v); false,
    // reading none, when the stream ends first. Each value's place is known, so the loads do not
    // wait on one another as a loop of read() does (fields whose every symbol has n raw bits).
    template <typename Put>
    bool read_many(unsigned n, std::size_t count, Put put) noexcept {
        // The buffered bits are the stream's own, ending where next_ begins: the next unread bit
        // is bit `offset` of byte `from`.
        const std::uint8_t* from = next_ - (have_ + 7) / 8;
        const std::size_t offset = (have_ + 7) / 8 * 8 - have_;
        const std::size_t bytes = static_cast<std::size_t>(end_ - from);
        const std::size_t last = offset + n * count;  // bits from `from`, past the last value
        if (last > 8 * bytes) return false;
        const std::uint32_t mask = (std::uint32_t{1} << n) - 1;
        // Values whose 32-bit load stays inside the stream (n + 7 <= 23 bits from its byte).
        const std::size_t loaded = bytes < 4 ? 0 : std::min(count, (8 * (bytes - 4) + 7 - offset) / n + 1);
        for (std::size_t i = 0; i < loaded; ++i) {
            const std::size_t bit = offset + n * i;
            std::uint32_t word;
            std::memcpy(&word, from + bit / 8, 4);  // little-endian hosts only (the Python layer checks)
            put(i, (word >> (bit % 8)) & mask);
        }
        for (std::size_t i = loaded; i < count; ++i) {
            const std::size_t bit = offset + n * i;
            std::uint32_t word = 0;
            for (std::size_t k = bit / 8; k < bytes && k < bit / 8 + 4; ++k) word |= std::uint32_t{from[k]} << (8 * (k - bit / 8));
            put(i, (word >> (bit % 8)) & mask);
        }
        next_ = from + last / 8;
        buffer_ = 0;
        have_ = 0;
        if (last % 8 != 0) {
            buffer_ = *next_++ >> (last % 8);
            have_ = 8 - static_cast<unsigned>(last % 8);
        }
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
