#include "mmpack/xxh3.hpp"

#include "xxh3_internal.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define MMPACK_HAVE_SSE2 1
#endif

namespace mmpack {

#if defined(MMPACK_HAVE_AVX2_TU)
// Defined in xxh3_avx2.cpp, the only file compiled with -mavx2.
void xxh3_long_loop_avx2(std::uint64_t* acc, const unsigned char* input, std::size_t len,
                         const unsigned char* secret) noexcept;
#endif

namespace {

using namespace xxh3_detail;

std::uint64_t rotl64(std::uint64_t x, int r) noexcept { return (x << r) | (x >> (64 - r)); }

std::uint64_t mul128_fold64(std::uint64_t lhs, std::uint64_t rhs) noexcept {
    const unsigned __int128 product = static_cast<unsigned __int128>(lhs) * rhs;
    return static_cast<std::uint64_t>(product) ^ static_cast<std::uint64_t>(product >> 64);
}

std::uint64_t xxh64_avalanche(std::uint64_t h) noexcept {
    h ^= h >> 33;
    h *= kPrime64_2;
    h ^= h >> 29;
    h *= kPrime64_3;
    h ^= h >> 32;
    return h;
}

std::uint64_t xxh3_avalanche(std::uint64_t h) noexcept {
    h ^= h >> 37;
    h *= kPrimeMx1;
    h ^= h >> 32;
    return h;
}

std::uint64_t rrmxmx(std::uint64_t h, std::uint64_t len) noexcept {
    h ^= rotl64(h, 49) ^ rotl64(h, 24);
    h *= kPrimeMx2;
    h ^= (h >> 35) + len;
    h *= kPrimeMx2;
    h ^= h >> 28;
    return h;
}

std::uint64_t len_1to3(const unsigned char* input, std::size_t len, const unsigned char* secret,
                       std::uint64_t seed) noexcept {
    const std::uint32_t c1 = input[0];
    const std::uint32_t c2 = input[len >> 1];
    const std::uint32_t c3 = input[len - 1];
    const std::uint32_t combined = (c1 << 16) | (c2 << 24) | c3 | (static_cast<std::uint32_t>(len) << 8);
    const std::uint64_t bitflip = (read32(secret) ^ read32(secret + 4)) + seed;
    return xxh64_avalanche(static_cast<std::uint64_t>(combined) ^ bitflip);
}

std::uint64_t len_4to8(const unsigned char* input, std::size_t len, const unsigned char* secret,
                       std::uint64_t seed) noexcept {
    seed ^= static_cast<std::uint64_t>(__builtin_bswap32(static_cast<std::uint32_t>(seed))) << 32;
    const std::uint64_t first = read32(input);
    const std::uint64_t last = read32(input + len - 4);
    const std::uint64_t bitflip = (read64(secret + 8) ^ read64(secret + 16)) - seed;
    const std::uint64_t keyed = (last + (first << 32)) ^ bitflip;
    return rrmxmx(keyed, len);
}

std::uint64_t len_9to16(const unsigned char* input, std::size_t len, const unsigned char* secret,
                        std::uint64_t seed) noexcept {
    const std::uint64_t bitflip1 = (read64(secret + 24) ^ read64(secret + 32)) + seed;
    const std::uint64_t bitflip2 = (read64(secret + 40) ^ read64(secret + 48)) - seed;
    const std::uint64_t lo = read64(input) ^ bitflip1;
    const std::uint64_t hi = read64(input + len - 8) ^ bitflip2;
    const std::uint64_t acc = len + __builtin_bswap64(lo) + hi + mul128_fold64(lo, hi);
    return xxh3_avalanche(acc);
}

std::uint64_t len_0to16(const unsigned char* input, std::size_t len, const unsigned char* secret,
                        std::uint64_t seed) noexcept {
    if (len > 8) return len_9to16(input, len, secret, seed);
    if (len >= 4) return len_4to8(input, len, secret, seed);
    if (len > 0) return len_1to3(input, len, secret, seed);
    return xxh64_avalanche(seed ^ (read64(secret + 56) ^ read64(secret + 64)));
}

std::uint64_t mix16(const unsigned char* input, const unsigned char* secret, std::uint64_t seed) noexcept {
    return mul128_fold64(read64(input) ^ (read64(secret) + seed),
                         read64(input + 8) ^ (read64(secret + 8) - seed));
}

std::uint64_t len_17to128(const unsigned char* input, std::size_t len, const unsigned char* secret,
                          std::uint64_t seed) noexcept {
    std::uint64_t acc = len * kPrime64_1;
    if (len > 32) {
        if (len > 64) {
            if (len > 96) {
                acc += mix16(input + 48, secret + 96, seed);
                acc += mix16(input + len - 64, secret + 112, seed);
            }
            acc += mix16(input + 32, secret + 64, seed);
            acc += mix16(input + len - 48, secret + 80, seed);
        }
        acc += mix16(input + 16, secret + 32, seed);
        acc += mix16(input + len - 32, secret + 48, seed);
    }
    acc += mix16(input, secret, seed);
    acc += mix16(input + len - 16, secret + 16, seed);
    return xxh3_avalanche(acc);
}

constexpr std::size_t kMidSizeMax = 240;
constexpr std::size_t kMidSizeStartOffset = 3;
constexpr std::size_t kMidSizeLastOffset = 17;
constexpr std::size_t kSecretSizeMin = 136;

std::uint64_t len_129to240(const unsigned char* input, std::size_t len, const unsigned char* secret,
                           std::uint64_t seed) noexcept {
    const std::size_t rounds = len / 16;
    std::uint64_t acc = len * kPrime64_1;
    for (std::size_t i = 0; i < 8; ++i) acc += mix16(input + 16 * i, secret + 16 * i, seed);
    acc = xxh3_avalanche(acc);
    for (std::size_t i = 8; i < rounds; ++i) {
        acc += mix16(input + 16 * i, secret + 16 * (i - 8) + kMidSizeStartOffset, seed);
    }
    acc += mix16(input + len - 16, secret + kSecretSizeMin - kMidSizeLastOffset, seed);
    return xxh3_avalanche(acc);
}

#if defined(MMPACK_HAVE_SSE2)
inline void accumulate_512_sse2(std::uint64_t* acc, const unsigned char* input,
                                const unsigned char* secret) noexcept {
    auto* xacc = reinterpret_cast<__m128i*>(acc);
    for (int i = 0; i < 4; ++i) {
        const __m128i data = _mm_loadu_si128(reinterpret_cast<const __m128i*>(input) + i);
        const __m128i key = _mm_loadu_si128(reinterpret_cast<const __m128i*>(secret) + i);
        const __m128i data_key = _mm_xor_si128(data, key);
        // lo32(key) * hi32(key) in each 64-bit lane.
        const __m128i key_hi = _mm_shuffle_epi32(data_key, _MM_SHUFFLE(0, 3, 0, 1));
        const __m128i product = _mm_mul_epu32(data_key, key_hi);
        // The input word goes to the neighbouring lane.
        const __m128i swapped = _mm_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        xacc[i] = _mm_add_epi64(product, _mm_add_epi64(xacc[i], swapped));
    }
}

inline void scramble_sse2(std::uint64_t* acc, const unsigned char* secret) noexcept {
    auto* xacc = reinterpret_cast<__m128i*>(acc);
    const __m128i prime = _mm_set1_epi32(static_cast<int>(kPrime32_1));
    for (int i = 0; i < 4; ++i) {
        __m128i a = xacc[i];
        a = _mm_xor_si128(a, _mm_srli_epi64(a, 47));
        a = _mm_xor_si128(a, _mm_loadu_si128(reinterpret_cast<const __m128i*>(secret) + i));
        const __m128i a_hi = _mm_shuffle_epi32(a, _MM_SHUFFLE(0, 3, 0, 1));
        const __m128i lo = _mm_mul_epu32(a, prime);
        const __m128i hi = _mm_mul_epu32(a_hi, prime);
        xacc[i] = _mm_add_epi64(lo, _mm_slli_epi64(hi, 32));
    }
}
#endif

enum class LongPath { scalar, sse2, avx2 };

LongPath detect_long_path() noexcept {
#if defined(MMPACK_HAVE_AVX2_TU)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) return LongPath::avx2;
#endif
#if defined(MMPACK_HAVE_SSE2)
    return LongPath::sse2;
#else
    return LongPath::scalar;
#endif
}

const LongPath kLongPath = detect_long_path();

std::uint64_t hash_long(const unsigned char* input, std::size_t len, const unsigned char* secret) noexcept {
    alignas(32) std::uint64_t acc[8] = {kPrime32_3, kPrime64_1, kPrime64_2, kPrime64_3,
                                        kPrime64_4, kPrime32_2, kPrime64_5, kPrime32_1};
    switch (kLongPath) {
#if defined(MMPACK_HAVE_AVX2_TU)
        case LongPath::avx2:
            xxh3_long_loop_avx2(acc, input, len, secret);
            break;
#endif
#if defined(MMPACK_HAVE_SSE2)
        case LongPath::sse2:
            hash_long_loop(acc, input, len, secret, accumulate_512_sse2, scramble_sse2);
            break;
#endif
        default:
            hash_long_loop(acc, input, len, secret, accumulate_512_scalar, scramble_scalar);
            break;
    }
    std::uint64_t result = len * kPrime64_1;
    const unsigned char* merge = secret + kSecretMergeAccsStart;
    for (std::size_t i = 0; i < 4; ++i) {
        result += mul128_fold64(acc[2 * i] ^ read64(merge + 16 * i), acc[2 * i + 1] ^ read64(merge + 16 * i + 8));
    }
    return xxh3_avalanche(result);
}

}  // namespace

std::uint64_t xxh3_64(const void* data, std::size_t size, std::uint64_t seed) noexcept {
    const auto* input = static_cast<const unsigned char*>(data);
    if (size <= 16) return len_0to16(input, size, kSecret, seed);
    if (size <= 128) return len_17to128(input, size, kSecret, seed);
    if (size <= kMidSizeMax) return len_129to240(input, size, kSecret, seed);
    if (seed == 0) return hash_long(input, size, kSecret);
    // A seeded long hash uses a secret derived from the seed.
    alignas(64) unsigned char derived[kSecretSize];
    for (std::size_t i = 0; i < kSecretSize / 16; ++i) {
        write64(derived + 16 * i, read64(kSecret + 16 * i) + seed);
        write64(derived + 16 * i + 8, read64(kSecret + 16 * i + 8) - seed);
    }
    return hash_long(input, size, derived);
}

const char* xxh3_simd_path() noexcept {
    switch (kLongPath) {
        case LongPath::avx2: return "avx2";
        case LongPath::sse2: return "sse2";
        default: return "scalar";
    }
}

}  // namespace mmpack
