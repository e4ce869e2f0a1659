// The XXH3 long-input loop with AVX2. This file alone is compiled with
// -mavx2; xxh3.cpp calls it only after the CPU reported AVX2 support.
#include <immintrin.h>

#include "xxh3_internal.hpp"

namespace mmpack {

namespace {

using namespace xxh3_detail;

inline void accumulate_512_avx2(std::uint64_t* acc, const unsigned char* input,
                                const unsigned char* secret) noexcept {
    auto* xacc = reinterpret_cast<__m256i*>(acc);
    for (int i = 0; i < 2; ++i) {
        const __m256i data = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(input) + i);
        const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(secret) + i);
        const __m256i data_key = _mm256_xor_si256(data, key);
        const __m256i key_hi = _mm256_shuffle_epi32(data_key, _MM_SHUFFLE(0, 3, 0, 1));
        const __m256i product = _mm256_mul_epu32(data_key, key_hi);
        const __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        xacc[i] = _mm256_add_epi64(product, _mm256_add_epi64(xacc[i], swapped));
    }
}

inline void scramble_avx2(std::uint64_t* acc, const unsigned char* secret) noexcept {
    auto* xacc = reinterpret_cast<__m256i*>(acc);
    const __m256i prime = _mm256_set1_epi32(static_cast<int>(kPrime32_1));
    for (int i = 0; i < 2; ++i) {
        __m256i a = xacc[i];
        a = _mm256_xor_si256(a, _mm256_srli_epi64(a, 47));
        a = _mm256_xor_si256(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(secret) + i));
        const __m256i a_hi = _mm256_shuffle_epi32(a, _MM_SHUFFLE(0, 3, 0, 1));
        const __m256i lo = _mm256_mul_epu32(a, prime);
        const __m256i hi = _mm256_mul_epu32(a_hi, prime);
        xacc[i] = _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
    }
}

}  // namespace

void xxh3_long_loop_avx2(std::uint64_t* acc, const unsigned char* input, std::size_t len,
                         const unsigned char* secret) noexcept {
    hash_long_loop(acc, input, len, secret, accumulate_512_avx2, scramble_avx2);
}

}  // namespace mmpack
