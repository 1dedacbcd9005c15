// Small float helpers shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace lmserve {

// exp(x) to float precision (relative error < 2e-7) in a form loops vectorize (std::exp does not
// without -ffast-math): x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n through
// the exponent bits. Inputs are clamped to [-87, 88], where float exp is finite and normal.
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::nearbyint(x * 1.44269504089f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// A vector of 16 floats (one row of a 16-token cache block), as a GCC vector extension: the
// compiler lowers it to what the target has (one AVX-512 register, two AVX2 registers, ...).
constexpr int64_t kVec = 16;
typedef float vfloat __attribute__((vector_size(kVec * sizeof(float))));

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

typedef int32_t vint __attribute__((vector_size(kVec * sizeof(int32_t))));

// exp_f32 on each lane, the same operations in the same order (n rounded to nearest even by the
// 1.5 * 2^23 trick, exact for |n| < 2^22, as nearbyint is in the default rounding mode).
inline vfloat exp_vec(vfloat x) {
  x = x < -87.f ? vfloat{} - 87.f : x;
  x = x > 88.f ? vfloat{} + 88.f : x;
  const vfloat n = (x * 1.44269504089f + 12582912.f) - 12582912.f;
  const vfloat r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vfloat p = vfloat{} + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The largest lane and the sum of the lanes, by halving.
inline float max_lanes(vfloat v) {
  v = v > __builtin_shuffle(v, vint{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}) ? v : __builtin_shuffle(v, vint{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  return std::max(std::max(std::max(v[0], v[1]), std::max(v[2], v[3])), std::max(std::max(v[4], v[5]), std::max(v[6], v[7])));
}

inline float sum_lanes(vfloat v) {
  v = v + __builtin_shuffle(v, vint{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v = v + __builtin_shuffle(v, vint{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  return (v[0] + v[1]) + (v[2] + v[3]);
}

}  // namespace lmserve
