// Small float helpers shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace lmserve {

// A vector of 16 floats (one row of a 16-token cache block), as a GCC vector extension: the
// compiler lowers it to what the target has (one AVX-512 register, two AVX2 registers, ...).
constexpr int64_t kVec = 16;
typedef float vfloat __attribute__((vector_size(kVec * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kVec * sizeof(int32_t))));

inline int32_t to_int32(float x) { return static_cast<int32_t>(x); }
inline vint to_int32(vfloat x) { return __builtin_convertvector(x, vint); }

// exp(x) to float precision (relative error < 2e-7) for a float or each lane of a vfloat, in a
// form loops vectorize (std::exp does not without -ffast-math): x = n ln2 + r, |r| <= ln2/2, exp(r)
// by a degree-6 polynomial, 2^n through the exponent bits. Inputs are clamped to [-87, 88], where
// float exp is finite and normal; n is rounded to nearest even by adding and taking away
// 1.5 * 2^23, exact there.
template <typename V>
inline V exp_lanes(V x) {
  const V lo = V{} - 87.f, hi = V{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V n = (x * 1.44269504089f + 12582912.f) - 12582912.f;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const auto bits = (to_int32(n) + 127) << 23;
  V scale;
  static_assert(sizeof(bits) == sizeof(scale), "exponent bits and value differ in size");
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float exp_f32(float x) { return exp_lanes(x); }
inline vfloat exp_vec(vfloat x) { return exp_lanes(x); }

template <typename T>
inline vfloat load16(const T* p) {
  float tmp[kVec];
  for (int64_t j = 0; j < kVec; ++j) tmp[j] = static_cast<float>(p[j]);
  vfloat v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

template <>
inline vfloat load16<float>(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// dst[0, DIM) = the lanes of acc[0, DIM / 16) times `scale`, stored as T.
template <typename T, int64_t DIM>
inline void store_scaled(const vfloat* acc, float scale, T* dst) {
  alignas(64) float values[DIM];
  std::memcpy(values, acc, sizeof(values));
  for (int64_t d = 0; d < DIM; ++d) dst[d] = static_cast<T>(values[d] * scale);
}

// Whether any lane of a comparison's result is set.
inline bool any_lane(vint mask) {
#ifdef __AVX512F__
  const __m512i bits = reinterpret_cast<__m512i>(mask);
  return _mm512_test_epi32_mask(bits, bits) != 0;
#else
  int32_t any = 0;
  for (int64_t j = 0; j < kVec; ++j) any |= mask[j];
  return any != 0;
#endif
}

// The largest lane and the sum of the lanes, by halving.
inline vfloat swap_halves(vfloat v) { return __builtin_shuffle(v, vint{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}); }
inline vfloat swap_quarters(vfloat v) { return __builtin_shuffle(v, vint{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}); }

inline float max_lanes(vfloat v) {
  vfloat other = swap_halves(v);
  v = v > other ? v : other;
  other = swap_quarters(v);
  v = v > other ? v : other;
  return std::max(std::max(v[0], v[1]), std::max(v[2], v[3]));
}

inline float sum_lanes(vfloat v) {
  v = v + swap_halves(v);
  v = v + swap_quarters(v);
  return (v[0] + v[1]) + (v[2] + v[3]);
}

}  // namespace lmserve
