// Paged attention kernels for CPUs.
//
// Cache layout per layer: [2, num_kv_heads, num_blocks, block_size * head_dim]. A key block is
// stored transposed ([head_dim][block_size]) so that the scores of a whole block are vertical
// multiply-adds over positions; a value block is stored as [block_size][head_dim].
//
// Decode runs one task per (sequence, KV head): the query heads sharing that KV head are scored
// against every key of the sequence read straight from its blocks (no gathered copy, no padding),
// softmaxed, and used to weight the values. A task is computed in the same order whatever else is
// in the batch, so results do not depend on batching.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

template <typename T>
inline float to_float(T value) { return static_cast<float>(value); }

// Asks for the `count` values from `p` on to be brought into the cache, a 64-byte line at a time.
template <typename T>
inline void prefetch(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < count * static_cast<int64_t>(sizeof(T)); i += 64) __builtin_prefetch(c + i);
}

struct Shape {
  int64_t num_blocks, block_size, head_dim, group;
};

// Scores of `group` heads ([group][span]) -> unnormalized softmax weights exp(s - max) over
// positions [lo, hi); total[g] gets each head's sum.
inline void softmax(float* scores, int64_t group, int64_t span, int64_t lo, int64_t hi, float* total) {
  for (int64_t g = 0; g < group; ++g) {
    float* sc = scores + g * span;
    float peak = std::numeric_limits<float>::lowest();
#pragma omp simd reduction(max : peak)
    for (int64_t i = lo; i < hi; ++i) peak = std::max(peak, sc[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = lo; i < hi; ++i) {
      sc[i] = lmserve::exp_f32(sc[i] - peak);
      sum += sc[i];
    }
    total[g] = sum;
  }
}

template <typename T, int64_t BS>
void decode_task(const float* __restrict__ q, const T* __restrict__ key_cache, const T* __restrict__ value_cache,
                 const int64_t* __restrict__ table, int64_t context_len, int64_t window, const Shape& s,
                 int64_t kv_head, float* __restrict__ scores, float* __restrict__ acc, T* __restrict__ out) {
  const int64_t bs = BS > 0 ? BS : s.block_size, dim = s.head_dim, group = s.group;
  const int64_t block_elems = bs * dim;
  const int64_t start = window > 0 ? std::max<int64_t>(0, context_len - window) : 0;
  const int64_t first_block = start / bs, last_block = (context_len - 1) / bs;
  const int64_t span = (last_block - first_block + 1) * bs;  // scores cover whole blocks
  const T* k_head = key_cache + kv_head * s.num_blocks * block_elems;
  const T* v_head = value_cache + kv_head * s.num_blocks * block_elems;

  for (int64_t b = first_block; b <= last_block; ++b) {
    const T* kt = k_head + table[b] * block_elems;  // [dim][bs]
    for (int64_t g = 0; g < group; ++g) {
      float* out_scores = scores + g * span + (b - first_block) * bs;
      const float* qg = q + g * dim;
      for (int64_t j = 0; j < bs; ++j) out_scores[j] = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float qd = qg[d];
        const T* row = kt + d * bs;
#pragma omp simd
        for (int64_t j = 0; j < bs; ++j) out_scores[j] += qd * to_float(row[j]);
      }
    }
  }
  // Positions outside [start, context_len) in the first and last block get no weight.
  const int64_t lo = start - first_block * bs, hi = context_len - first_block * bs;
  std::vector<float> total(group);
  softmax(scores, group, span, lo, hi, total.data());
  std::fill(acc, acc + group * dim, 0.f);
  for (int64_t pos = lo; pos < hi; ++pos) {
    const int64_t b = first_block + pos / bs;
    const T* v = v_head + table[b] * block_elems + (pos % bs) * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float weight = scores[g * span + pos];
      float* a = acc + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += weight * to_float(v[d]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / total[g];
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = static_cast<T>(acc[g * dim + d] * inv);
  }
}

// The same computation for the common shapes (block size 16, head size and group size known at
// compile time) in vectors of 16 floats: each key row and value row is loaded once for all heads
// of the group, and the accumulators stay in registers. Each head sees the same operations in the
// same order as in decode_task.
template <typename T, int64_t DIM, int64_t GROUP>
void decode_task_fixed(const float* __restrict__ q, const T* __restrict__ key_cache,
                       const T* __restrict__ value_cache, const int64_t* __restrict__ table, int64_t context_len,
                       int64_t window, const Shape& s, int64_t kv_head, float* __restrict__ scores,
                       T* __restrict__ out) {
  using lmserve::kVec;
  using lmserve::vfloat;
  constexpr int64_t block_elems = kVec * DIM;
  constexpr int64_t kVecs = DIM / kVec;  // vectors per value row
  constexpr int64_t kHeads = std::min<int64_t>(GROUP, std::max<int64_t>(1, 16 / kVecs));  // heads per value pass
  static_assert(GROUP % kHeads == 0, "value passes must cover the group");
  const int64_t start = window > 0 ? std::max<int64_t>(0, context_len - window) : 0;
  const int64_t first_block = start / kVec, last_block = (context_len - 1) / kVec;
  const int64_t span = (last_block - first_block + 1) * kVec;
  const T* k_head = key_cache + kv_head * s.num_blocks * block_elems;
  const T* v_head = value_cache + kv_head * s.num_blocks * block_elems;

  for (int64_t b = first_block; b <= last_block; ++b) {
    const T* kt = k_head + table[b] * block_elems;  // [DIM][16]
    // Blocks are scattered and the hardware prefetchers stop at each one's end: the next key block
    // (after the last, the first value block) is asked for a row at a time while this one is scored.
    const char* next = reinterpret_cast<const char*>(
        b < last_block ? k_head + table[b + 1] * block_elems : v_head + table[first_block] * block_elems);
    vfloat block_scores[GROUP] = {};
    for (int64_t d = 0; d < DIM; ++d) {
      __builtin_prefetch(next + d * kVec * sizeof(T));
      const vfloat krow = lmserve::load16(kt + d * kVec);
#pragma GCC unroll 8
      for (int64_t g = 0; g < GROUP; ++g) block_scores[g] += q[g * DIM + d] * krow;
    }
    for (int64_t g = 0; g < GROUP; ++g) {
      std::memcpy(scores + g * span + (b - first_block) * kVec, &block_scores[g], sizeof(vfloat));
    }
  }
  const int64_t lo = start - first_block * kVec, hi = context_len - first_block * kVec;
  float total[GROUP];
  softmax(scores, GROUP, span, lo, hi, total);
  for (int64_t g0 = 0; g0 < GROUP; g0 += kHeads) {
    vfloat acc[kHeads][kVecs] = {};
    for (int64_t pos = lo; pos < hi; ++pos) {
      const int64_t b = first_block + pos / kVec;
      if (b < last_block) prefetch(v_head + table[b + 1] * block_elems + (pos % kVec) * DIM, DIM);
      const T* v = v_head + table[b] * block_elems + (pos % kVec) * DIM;
      vfloat vrow[kVecs];
      for (int64_t i = 0; i < kVecs; ++i) vrow[i] = lmserve::load16(v + i * kVec);
#pragma GCC unroll 8
      for (int64_t g = 0; g < kHeads; ++g) {
        const float weight = scores[(g0 + g) * span + pos];
        for (int64_t i = 0; i < kVecs; ++i) acc[g][i] += weight * vrow[i];
      }
    }
    for (int64_t g = 0; g < kHeads; ++g) {
      lmserve::store_scaled<T, DIM>(acc[g], 1.f / total[g0 + g], out + (g0 + g) * DIM);
    }
  }
}

// One (sequence, KV head) task: the fixed-shape version where one is compiled for this shape.
template <typename T>
void run_task(const float* q, const T* kc, const T* vc, const int64_t* table, int64_t context_len, int64_t window,
              const Shape& s, int64_t h, float* scores, float* acc, T* out) {
#define LMSERVE_FIXED(DIM, GROUP)                                                                      \
  if (s.head_dim == DIM && s.group == GROUP) {                                                         \
    return decode_task_fixed<T, DIM, GROUP>(q, kc, vc, table, context_len, window, s, h, scores, out); \
  }
  if (s.block_size == 16) {
    LMSERVE_FIXED(64, 1) LMSERVE_FIXED(64, 2) LMSERVE_FIXED(64, 4) LMSERVE_FIXED(64, 8)
    LMSERVE_FIXED(128, 1) LMSERVE_FIXED(128, 2) LMSERVE_FIXED(128, 4) LMSERVE_FIXED(128, 8)
    return decode_task<T, 16>(q, kc, vc, table, context_len, window, s, h, scores, acc, out);
  }
#undef LMSERVE_FIXED
  decode_task<T, 0>(q, kc, vc, table, context_len, window, s, h, scores, acc, out);
}

template <typename T>
void decode(const torch::Tensor& query, const torch::Tensor& cache, const torch::Tensor& block_tables,
            const torch::Tensor& context_lens, double scale, int64_t window, torch::Tensor& out) {
  const int64_t batch = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t num_kv_heads = cache.size(1), num_blocks = cache.size(2);
  const int64_t block_size = cache.size(3) / dim;
  const Shape s{num_blocks, block_size, dim, num_heads / num_kv_heads};
  const int64_t width = block_tables.size(1);
  const T* q = query.data_ptr<T>();
  const T* kc = cache.data_ptr<T>();
  const T* vc = kc + num_kv_heads * num_blocks * block_size * dim;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  const int64_t longest = *std::max_element(lens, lens + batch);
  const int64_t max_span = (longest / block_size + 2) * block_size;
  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(s.group * max_span), acc(s.group * dim), qf(s.group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t offset = (b * num_heads + h * s.group) * dim;
      for (int64_t i = 0; i < s.group * dim; ++i) qf[i] = to_float(q[offset + i]) * static_cast<float>(scale);
      run_task<T>(qf.data(), kc, vc, tables + b * width, lens[b], window, s, h, scores.data(), acc.data(),
                  o + offset);
    }
  });
}

void check_cache(const torch::Tensor& cache, int64_t dim) {
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == 2 && cache.is_contiguous(),
              "cache must be a contiguous [2, kv_heads, blocks, block_size * head_dim] tensor");
  TORCH_CHECK(cache.size(3) % dim == 0, "cache block does not hold whole head_dim vectors");
}

}  // namespace

// query [B, H, D]; cache [2, Hkv, blocks, block_size * D]; block_tables [B, width] int64;
// context_lens [B] int64. Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(query.dim() == 3, "query must be [batch, heads, head_dim]");
  check_cache(cache, query.size(2));
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "block tables and context lengths must be int64");
  TORCH_CHECK(query.size(1) % cache.size(1) == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(query.scalar_type() == cache.scalar_type(), "query and cache dtypes differ");
  query = query.contiguous();
  block_tables = block_tables.contiguous();
  auto out = torch::empty_like(query);
  if (query.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, query.scalar_type(),
                                  "paged_decode_attention", [&] {
                                    decode<scalar_t>(query, cache, block_tables, context_lens, scale, window, out);
                                  });
  return out;
}

// Writes key/value [T, Hkv, D] of each token into its slot (block * block_size + offset).
void write_kv(torch::Tensor key, torch::Tensor value, torch::Tensor cache, torch::Tensor slot_mapping) {
  const int64_t tokens = key.size(0), heads = key.size(1), dim = key.size(2);
  check_cache(cache, dim);
  TORCH_CHECK(key.scalar_type() == cache.scalar_type(), "key and cache dtypes differ");
  key = key.contiguous();
  value = value.contiguous();
  slot_mapping = slot_mapping.contiguous();
  const int64_t num_blocks = cache.size(2), bs = cache.size(3) / dim;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, key.scalar_type(), "write_kv", [&] {
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    scalar_t* kc = cache.data_ptr<scalar_t>();
    scalar_t* vc = kc + heads * num_blocks * bs * dim;
    at::parallel_for(0, tokens * heads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task / heads, h = task % heads;
        const int64_t block = slots[t] / bs, off = slots[t] % bs;
        const int64_t base = (h * num_blocks + block) * bs * dim;
        const scalar_t* kt = k + task * dim;
        const scalar_t* vt = v + task * dim;
        for (int64_t d = 0; d < dim; ++d) kc[base + d * bs + off] = kt[d];
        std::copy(vt, vt + dim, vc + base + off * dim);
      }
    });
  });
}

// The first `context_len` keys and values of a sequence, as contiguous [Hkv, context_len, D] tensors.
std::vector<torch::Tensor> gather_kv(torch::Tensor cache, torch::Tensor block_ids, int64_t context_len,
                                     int64_t head_dim) {
  check_cache(cache, head_dim);
  const int64_t heads = cache.size(1), num_blocks = cache.size(2), bs = cache.size(3) / head_dim;
  auto keys = torch::empty({heads, context_len, head_dim}, cache.options());
  auto values = torch::empty({heads, context_len, head_dim}, cache.options());
  const int64_t* ids = block_ids.contiguous().data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, cache.scalar_type(), "gather_kv", [&] {
    const scalar_t* kc = cache.data_ptr<scalar_t>();
    const scalar_t* vc = kc + heads * num_blocks * bs * head_dim;
    scalar_t* ko = keys.data_ptr<scalar_t>();
    scalar_t* vo = values.data_ptr<scalar_t>();
    at::parallel_for(0, heads * context_len, 256, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h = task / context_len, pos = task % context_len;
        const int64_t base = (h * num_blocks + ids[pos / bs]) * bs * head_dim;
        const int64_t off = pos % bs;
        for (int64_t d = 0; d < head_dim; ++d) ko[task * head_dim + d] = kc[base + d * bs + off];
        std::copy(vc + base + off * head_dim, vc + base + (off + 1) * head_dim, vo + task * head_dim);
      }
    });
  });
  return {keys, values};
}

// Defined in prefill_attention_cpu.cpp.
bool prefill_attention_supports(int64_t head_dim, int64_t block_size);
void paged_prefill_attention(torch::Tensor query, torch::Tensor cache, torch::Tensor layout,
                             torch::Tensor block_tables, double scale, int64_t window, torch::Tensor out);

// Defined in cpu_ops.cpp.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_and_mul(torch::Tensor x);
void rotary_embedding(torch::Tensor positions, torch::Tensor query, torch::Tensor key, torch::Tensor cos,
                      torch::Tensor sin, int64_t head_dim, int64_t rotary_dim);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Decode attention over a paged KV cache (CPU)");
  m.def("paged_prefill_attention", &paged_prefill_attention, "Prefill attention over a paged KV cache (CPU)");
  m.def("prefill_attention_supports", &prefill_attention_supports, "Head size and block size the prefill kernel handles");
  m.def("write_kv", &write_kv, "Write keys and values into their cache slots (CPU)");
  m.def("gather_kv", &gather_kv, "Contiguous keys and values of one sequence (CPU)");
  m.def("rms_norm", &rms_norm, "RMS norm of each row (CPU)");
  m.def("add_rms_norm", &add_rms_norm, "In place: residual += x; x = rms_norm(residual) (CPU)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of [gate | up] rows (CPU)");
  m.def("rotary_embedding", &rotary_embedding, "Rotary embedding of queries and keys in place (CPU)");
}
