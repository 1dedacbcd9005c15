// Fused elementwise steps of a decoder layer, for CPUs. Each reads its input once and writes its
// output once, where the PyTorch expression takes several passes over the activation (and
// allocates a temporary for each). Rows are independent tasks, so results do not depend on how
// many tokens share a step. Arithmetic is in float32 whatever the storage type.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu_math.h"

namespace {

template <typename T>
inline float f32(T value) { return static_cast<float>(value); }

// Rows per parallel task: enough work per task to amortize scheduling.
inline int64_t grain(int64_t row_width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_width, 1)); }

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be a 2-D tensor with contiguous rows");
}

template <typename T>
void rms_norm_row(const T* __restrict__ in, const T* __restrict__ weight, T* __restrict__ out, int64_t n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += f32(in[i]) * f32(in[i]);
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  // Matches the reference order: normalize, round to the storage type, then scale by the weight.
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(f32(weight[i]) * f32(static_cast<T>(f32(in[i]) * inv)));
}

template <typename T>
void add_rms_norm_row(T* __restrict__ x, T* __restrict__ residual, const T* __restrict__ weight, int64_t n, float eps) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) residual[i] = static_cast<T>(f32(residual[i]) + f32(x[i]));
  rms_norm_row(residual, weight, x, n, eps);
}

template <typename T>
void silu_and_mul_row(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = f32(gate[i]);
    // Rounded to the storage type between the two steps, as the reference computes them.
    out[i] = static_cast<T>(f32(static_cast<T>(g / (1.f + lmserve::exp_f32(-g)))) * f32(up[i]));
  }
}

template <typename T>
void rotate_head(T* __restrict__ x, const float* __restrict__ c, const float* __restrict__ s, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    // cos/sin are rounded to the storage type first, as the reference does.
    const float ci = f32(static_cast<T>(c[i])), si = f32(static_cast<T>(s[i]));
    const float x1 = f32(x[i]), x2 = f32(x[i + half]);
    x[i] = static_cast<T>(x1 * ci - x2 * si);
    x[i + half] = static_cast<T>(x2 * ci + x1 * si);
  }
}

}  // namespace

// out = x / rms(x) * weight, row by row. x [T, H] (rows may be strided); returns a new [T, H].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be contiguous [H]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight dtypes differ");
  auto out = torch::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(in + r * stride, w, o + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

// In place: residual += x, then x = residual / rms(residual) * weight. x, residual contiguous [T, H].
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes(),
              "x and residual must be contiguous [T, H] tensors of one shape");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be contiguous [H]");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(), "dtypes differ");
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* xs = x.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) add_rms_norm_row(xs + r * n, res + r * n, w, n, static_cast<float>(eps));
    });
  });
}

// x [T, 2I] = [gate | up] -> silu(gate) * up, a new [T, I].
torch::Tensor silu_and_mul(torch::Tensor x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) % 2 == 0, "x must hold gate and up halves");
  const int64_t rows = x.size(0), n = x.size(1) / 2, stride = x.stride(0);
  auto out = torch::empty({rows, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_and_mul_row(in + r * stride, in + r * stride + n, o + r * n, n);
    });
  });
  return out;
}

// In place, the non-interleaved ("neox") convention: within each head's first `rotary_dim`
// values, x1 = first half, x2 = second half -> (x1 cos - x2 sin, x2 cos + x1 sin).
// positions [T] int64; query [T, Hq * D], key [T, Hk * D] (rows may be strided);
// cos, sin [max_positions, rotary_dim / 2] float32.
void rotary_embedding(torch::Tensor positions, torch::Tensor query, torch::Tensor key, torch::Tensor cos,
                      torch::Tensor sin, int64_t head_dim, int64_t rotary_dim) {
  check_rows(query, "query");
  check_rows(key, "key");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), "query and key dtypes differ");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(1) * 2 == rotary_dim,
              "cos and sin must be contiguous float32 [positions, rotary_dim / 2]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.numel() == query.size(0) &&
                  key.size(0) == query.size(0),
              "positions must be int64 [T]");
  TORCH_CHECK(query.size(1) % head_dim == 0 && key.size(1) % head_dim == 0 && rotary_dim <= head_dim, "bad head_dim");
  positions = positions.contiguous();
  const int64_t tokens = query.size(0), half = rotary_dim / 2, max_pos = cos.size(0);
  const int64_t hq = query.size(1) / head_dim, hk = key.size(1) / head_dim;
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position out of range");
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, query.scalar_type(), "rotary", [&] {
    scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* k = key.data_ptr<scalar_t>();
    const int64_t qs = query.stride(0), ks = key.stride(0);
    at::parallel_for(0, tokens, grain((hq + hk) * head_dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cs + pos[t] * half;
        const float* s = sn + pos[t] * half;
        for (int64_t h = 0; h < hq + hk; ++h) {
          rotate_head(h < hq ? q + t * qs + h * head_dim : k + t * ks + (h - hq) * head_dim, c, s, half);
        }
      }
    });
  });
}
