// Shared pieces of the XXH3-64 implementation. Everything here has internal
// linkage on purpose: xxh3.cpp and xxh3_avx2.cpp are compiled with different
// instruction sets, and an inline function with external linkage would let the
// linker pick the AVX2 copy for the portable path (an ODR trap).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace mmpack::xxh3_detail {
namespace {

constexpr std::uint64_t kPrime32_1 = 0x9E3779B1U;
constexpr std::uint64_t kPrime32_2 = 0x85EBCA77U;
constexpr std::uint64_t kPrime32_3 = 0xC2B2AE3DU;
constexpr std::uint64_t kPrime64_1 = 0x9E3779B185EBCA87ULL;
constexpr std::uint64_t kPrime64_2 = 0xC2B2AE3D27D4EB4FULL;
constexpr std::uint64_t kPrime64_3 = 0x165667B19E3779F9ULL;
constexpr std::uint64_t kPrime64_4 = 0x85EBCA77C2B2AE63ULL;
constexpr std::uint64_t kPrime64_5 = 0x27D4EB2F165667C5ULL;
constexpr std::uint64_t kPrimeMx1 = 0x165667919E3779F9ULL;
constexpr std::uint64_t kPrimeMx2 = 0x9FB21C651E98DF25ULL;

constexpr std::size_t kSecretSize = 192;
constexpr std::size_t kStripeLen = 64;
constexpr std::size_t kSecretConsumeRate = 8;
constexpr std::size_t kStripesPerBlock = (kSecretSize - kStripeLen) / kSecretConsumeRate;
constexpr std::size_t kBlockLen = kStripeLen * kStripesPerBlock;
constexpr std::size_t kSecretLastAccStart = 7;
constexpr std::size_t kSecretMergeAccsStart = 11;

// The default secret of the specification.
alignas(64) constexpr unsigned char kSecret[kSecretSize] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

// The hash is defined on little-endian words; memcpy keeps unaligned reads
// legal and compiles to a single load on the targets we build for.
inline std::uint64_t read64(const void* p) noexcept {
    std::uint64_t v;
    std::memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

inline std::uint32_t read32(const void* p) noexcept {
    std::uint32_t v;
    std::memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

inline void write64(void* p, std::uint64_t v) noexcept {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    std::memcpy(p, &v, sizeof v);
}

// The reference's scalar stripe step; the SIMD variants compute the same sums.
inline void accumulate_512_scalar(std::uint64_t* acc, const unsigned char* input,
                                  const unsigned char* secret) noexcept {
    for (std::size_t i = 0; i < 8; ++i) {
        const std::uint64_t data = read64(input + 8 * i);
        const std::uint64_t key = data ^ read64(secret + 8 * i);
        acc[i ^ 1] += data;
        acc[i] += (key & 0xFFFFFFFFULL) * (key >> 32);
    }
}

inline void scramble_scalar(std::uint64_t* acc, const unsigned char* secret) noexcept {
    for (std::size_t i = 0; i < 8; ++i) {
        std::uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= read64(secret + 8 * i);
        a *= kPrime32_1;
        acc[i] = a;
    }
}

// The long-input loop of the specification, parameterised by the stripe and
// scramble steps so each instruction set instantiates it once.
template <typename Accumulate, typename Scramble>
inline void hash_long_loop(std::uint64_t* acc, const unsigned char* input, std::size_t len,
                           const unsigned char* secret, Accumulate accumulate,
                           Scramble scramble) noexcept {
    const std::size_t nb_blocks = (len - 1) / kBlockLen;
    for (std::size_t n = 0; n < nb_blocks; ++n) {
        const unsigned char* block = input + n * kBlockLen;
        for (std::size_t s = 0; s < kStripesPerBlock; ++s) {
            accumulate(acc, block + s * kStripeLen, secret + s * kSecretConsumeRate);
        }
        scramble(acc, secret + kSecretSize - kStripeLen);
    }
    const std::size_t nb_stripes = ((len - 1) - kBlockLen * nb_blocks) / kStripeLen;
    const unsigned char* tail = input + nb_blocks * kBlockLen;
    for (std::size_t s = 0; s < nb_stripes; ++s) {
        accumulate(acc, tail + s * kStripeLen, secret + s * kSecretConsumeRate);
    }
    accumulate(acc, input + len - kStripeLen, secret + kSecretSize - kStripeLen - kSecretLastAccStart);
}

}  // namespace
}  // namespace mmpack::xxh3_detail
