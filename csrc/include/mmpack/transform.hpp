// Byte planes: the reversible regrouping applied to floating-point data before
// a general-purpose codec. Within one element the bytes differ in nature (the
// top byte of a float32 is sign and exponent, nearly constant across a
// trained tensor; the bottom byte is mantissa noise). Interleaved, they look
// like noise to an LZ/entropy coder; grouped, the exponent plane compresses
// several-fold and the noisy planes are stored almost as they are.
#pragma once

#include <cstddef>

#include "mmpack/span.hpp"

namespace mmpack {

// Largest element width the transforms accept (complex128 components are 8).
inline constexpr std::size_t kMaxPlaneWidth = 16;

// For width w and n = src.size / w whole elements (little-endian values),
// writes dst[p * n + i] = src[i * w + (w - 1 - p)] for p < w and i < n: the
// most significant byte plane first, then the src.size % w trailing bytes
// unchanged. dst.size must equal src.size and the two must not overlap;
// 1 <= w <= kMaxPlaneWidth (callers check both).
void split_byte_planes(ConstBytes src, MutableBytes dst, std::size_t width);

// The inverse of split_byte_planes with the same width.
void merge_byte_planes(ConstBytes src, MutableBytes dst, std::size_t width);

// The same inverse with each plane in its own buffer: planes[p] holds the
// dst.size / width bytes of plane p (a decoder's output, or a plane stored
// raw and read in place), so the planes need not be gathered first.
// dst.size must be a multiple of width (callers check).
void merge_byte_planes_from(const std::byte* const* planes, MutableBytes dst, std::size_t width);

}  // namespace mmpack
