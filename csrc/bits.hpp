// LSB-first bit streams (docs/FORMAT.md: bit k of a stream is bit k % 8 of
// its byte k / 8), for raw fields and the raw low bits of rANS symbols.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mmpack::bits {

class Reader {
public:
    Reader() = default;
    Reader(const std::uint8_t* data, std::size_t size) noexcept : next_(data), end_(data + size) {}

    // Reads n <= 16 bits into v; false when the stream ends first.
    bool read(unsigned n, std::uint32_t& v) noexcept {
        while (have_ < n) {
            if (next_ == end_) return false;
            buffer_ |= static_cast<std::uint64_t>(*next_++) << have_;
            have_ += 8;
        }
        v = static_cast<std::uint32_t>(buffer_ & ((std::uint64_t{1} << n) - 1));
        buffer_ >>= n;
        have_ -= n;
        return true;
    }

    // True when every byte was read and the bits left of the last one are zero.
    bool finished() const noexcept { return next_ == end_ && have_ < 8 && buffer_ == 0; }

private:
    const std::uint8_t* next_ = nullptr;
    const std::uint8_t* end_ = nullptr;
    std::uint64_t buffer_ = 0;
    unsigned have_ = 0;
};

class Writer {
public:
    explicit Writer(std::vector<std::uint8_t>& out) noexcept : out_(out) {}

    void write(unsigned n, std::uint32_t v) {
        buffer_ |= static_cast<std::uint64_t>(v) << have_;
        have_ += n;
        while (have_ >= 8) {
            out_.push_back(static_cast<std::uint8_t>(buffer_));
            buffer_ >>= 8;
            have_ -= 8;
        }
    }

    // Writes the last partial byte, its unused bits zero.
    void flush() {
        if (have_ > 0) out_.push_back(static_cast<std::uint8_t>(buffer_));
        buffer_ = 0;
        have_ = 0;
    }

private:
    std::vector<std::uint8_t>& out_;
    std::uint64_t buffer_ = 0;
    unsigned have_ = 0;
};

inline std::size_t packed_bytes(std::size_t count, unsigned bits) noexcept { return (count * bits + 7) / 8; }

}  // namespace mmpack::bits
