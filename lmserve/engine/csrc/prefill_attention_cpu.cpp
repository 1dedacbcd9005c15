// Prefill attention over a paged KV cache, for CPUs (the cache layout of paged_attention_cpu.cpp).
//
// Every prefill slice of a step (a whole prompt, or a chunk of one after earlier chunks) is
// attended in one call, straight from the cache blocks: no gathered copy of the context, no mask
// tensor. A task is a tile of up to kRows query rows of one sequence and one KV head, a row being
// one (position, query head) pair; rows sharing a KV head share each key and value they load.
// The tile walks the sequence's blocks with an online softmax (flash attention): scores of a
// 16-key block for every row, a running maximum and sum per row, and the weighted values added
// to per-row accumulators that stay in cache. Per row, the operations and their order depend
// only on that row's position, never on the other rows of its tile or on the rest of the batch.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

constexpr int64_t kBlock = lmserve::kVec;  // the one cache block size this kernel handles
using lmserve::vfloat;
using lmserve::vint;

#ifdef __AVX512F__
constexpr int64_t kRows = 16;  // 16 score vectors in registers, 32 registers in all
#else
constexpr int64_t kRows = 8;
#endif

struct Slice {
  int64_t query_start, query_len, context_len;
  const int64_t* table;
};

struct Task {
  int64_t slice, kv_head, first_row, cost;
};

// The rows [first_row, first_row + kRows) of (position, head) pairs of one slice and KV head.
template <typename T, int64_t DIM>
void attend_tile(const T* __restrict__ query, T* __restrict__ out, const T* __restrict__ k_head,
                 const T* __restrict__ v_head, const Slice& s, int64_t query_stride, int64_t num_heads, int64_t group,
                 int64_t kv_head, int64_t first_row, int64_t window, float scale) {
  constexpr int64_t kVecs = DIM / kBlock;              // vectors per value row
  constexpr int64_t kGroup = std::max<int64_t>(1, 16 / kVecs);  // rows accumulated at once
  constexpr int64_t block_elems = kBlock * DIM;
  static_assert(kRows % kGroup == 0, "row groups must tile the rows");
  const int64_t rows = std::min(kRows, s.query_len * group - first_row);
  const int64_t first_pos = s.context_len - s.query_len;

  alignas(64) float q[kRows][DIM];
  int64_t pos[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = first_row + std::min(r, rows - 1);  // rows past the end repeat the last one
    const int64_t t = row / group, head = kv_head * group + row % group;
    pos[r] = first_pos + t;
    const T* src = query + (s.query_start + t) * query_stride + head * DIM;
    for (int64_t d = 0; d < DIM; ++d) q[r][d] = static_cast<float>(src[d]) * scale;
  }
  const int64_t lo_pos = pos[0], hi_pos = pos[kRows - 1];
  const int64_t start = window > 0 ? std::max<int64_t>(0, lo_pos - window + 1) : 0;

  // Each row's scores are shifted by a peak that moves only when a score passes it by more than
  // kSlack: exp(score - peak) then stays below e^kSlack, far inside float's range, and most blocks
  // need neither the largest of their scores nor a rescale of the accumulators (the shift cancels
  // in the final division, whichever it is). The sum of the weights is kept per lane until the end.
  constexpr float kSlack = 8.f;
  alignas(64) vfloat acc[kRows][kVecs] = {};
  alignas(64) vfloat total[kRows] = {};
  alignas(64) float p[kRows][kBlock];
  float peak[kRows];
  std::fill(peak, peak + kRows, -std::numeric_limits<float>::infinity());

  for (int64_t b = start / kBlock; b <= hi_pos / kBlock; ++b) {
    const int64_t first_key = b * kBlock;
    const T* kt = k_head + s.table[b] * block_elems;  // [DIM][kBlock]
    const T* vb = v_head + s.table[b] * block_elems;  // [kBlock][DIM]
    vfloat scores[kRows] = {};
    for (int64_t d = 0; d < DIM; ++d) {
      const vfloat krow = lmserve::load16(kt + d * kBlock);
#pragma GCC unroll 16
      for (int64_t r = 0; r < kRows; ++r) scores[r] += q[r][d] * krow;
    }
    // A block every row sees whole: below the first row's position and inside every row's window.
    const bool whole = first_key + kBlock - 1 <= lo_pos && (window <= 0 || first_key > hi_pos - window);
    const vint keys = vint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + static_cast<int32_t>(first_key);
    for (int64_t r = 0; r < kRows; ++r) {
      vint seen = keys == keys;  // all lanes: the keys of this block that row r attends
      if (!whole) {
        seen = keys <= static_cast<int32_t>(pos[r]);
        if (window > 0) seen &= keys > static_cast<int32_t>(pos[r] - window);
      }
      const vfloat masked = seen ? scores[r] : vfloat{} - std::numeric_limits<float>::infinity();
      if (lmserve::any_lane(masked > peak[r] + kSlack)) {  // the first key the row sees, or a far larger score
        const float new_peak = lmserve::max_lanes(masked);
        const float rescale = peak[r] == -std::numeric_limits<float>::infinity() ? 0.f : lmserve::exp_f32(peak[r] - new_peak);
        for (int64_t v = 0; v < kVecs; ++v) acc[r][v] *= rescale;
        total[r] *= rescale;
        peak[r] = new_peak;
      }
      const vfloat e = seen ? lmserve::exp_vec(scores[r] - peak[r]) : vfloat{};
      std::memcpy(p[r], &e, sizeof(e));
      total[r] += e;
    }
    // The weighted values, a 16-column slice of the accumulators at a time: like the scores, one
    // vector load per key and one multiply-add per row with the row's weight broadcast.
    for (int64_t v = 0; v < kVecs; ++v) {
      vfloat a[kRows];
      for (int64_t r = 0; r < kRows; ++r) a[r] = acc[r][v];
      for (int64_t j = 0; j < kBlock; ++j) {
        const vfloat vrow = lmserve::load16(vb + j * DIM + v * kBlock);
#pragma GCC unroll 16
        for (int64_t r = 0; r < kRows; ++r) a[r] += p[r][j] * vrow;
      }
      for (int64_t r = 0; r < kRows; ++r) acc[r][v] = a[r];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = first_row + r;
    const int64_t t = row / group, head = kv_head * group + row % group;
    T* dst = out + ((s.query_start + t) * num_heads + head) * DIM;
    lmserve::store_scaled<T, DIM>(acc[r], 1.f / lmserve::sum_lanes(total[r]), dst);
  }
}

template <typename T, int64_t DIM>
void prefill(const torch::Tensor& query, const torch::Tensor& cache, const std::vector<Slice>& slices,
             double scale, int64_t window, torch::Tensor& out) {
  const int64_t query_stride = query.stride(0);
  const int64_t num_heads = query.size(1), num_kv_heads = cache.size(1), num_blocks = cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(slices.size()); ++i) {
    const Slice& s = slices[i];
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      for (int64_t row = 0; row < s.query_len * group; row += kRows) {
        const int64_t last_pos = s.context_len - s.query_len + std::min(row + kRows, s.query_len * group) / group;
        tasks.push_back({i, h, row, window > 0 ? std::min(last_pos, window) : last_pos});
      }
    }
  }
  // Longest first, handed out one at a time: causal tiles differ in cost by the length of their
  // context, and a static split would leave one thread waiting for the other.
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const T* q = query.data_ptr<T>();
  const T* kc = cache.data_ptr<T>();
  const T* vc = kc + num_kv_heads * num_blocks * kBlock * DIM;
  T* o = out.data_ptr<T>();
  const int64_t count = static_cast<int64_t>(tasks.size());
  const float fscale = static_cast<float>(scale);
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < count; ++i) {
    const Task& task = tasks[i];
    const int64_t head_offset = task.kv_head * num_blocks * kBlock * DIM;
    attend_tile<T, DIM>(q, o, kc + head_offset, vc + head_offset, slices[task.slice], query_stride, num_heads,
                        group, task.kv_head, task.first_row, window, fscale);
  }
}

}  // namespace

// Whether paged_prefill_attention handles this head size and cache block size.
bool prefill_attention_supports(int64_t head_dim, int64_t block_size) {
  return block_size == kBlock && (head_dim == 64 || head_dim == 128 || head_dim == 32);
}

// query [T, H, D] (rows may be strided): the prefill rows of a step; cache [2, Hkv, blocks, 16 * D];
// layout [P, 3] int64, per slice (first row in query, number of rows, context length: its rows are
// the positions [context - rows, context)); block_tables [P, width] int64. The keys and values of
// every row must already be in the cache. Writes the rows of each slice in out, contiguous [T, H * D].
void paged_prefill_attention(torch::Tensor query, torch::Tensor cache, torch::Tensor layout,
                             torch::Tensor block_tables, double scale, int64_t window, torch::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2),
              "query must be [tokens, heads, head_dim] with contiguous rows");
  TORCH_CHECK(out.is_contiguous() && out.numel() == query.numel() && out.size(0) == query.size(0) &&
                  out.scalar_type() == query.scalar_type(),
              "out must be a contiguous [tokens, heads * head_dim] tensor of the query's dtype");
  const int64_t dim = query.size(2);
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == 2 && cache.is_contiguous(),
              "cache must be a contiguous [2, kv_heads, blocks, block_size * head_dim] tensor");
  TORCH_CHECK(cache.size(3) % dim == 0 && prefill_attention_supports(dim, cache.size(3) / dim),
              "unsupported head_dim or block size");
  TORCH_CHECK(query.size(1) % cache.size(1) == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(query.scalar_type() == cache.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(layout.scalar_type() == torch::kInt64 && block_tables.scalar_type() == torch::kInt64 &&
                  layout.dim() == 2 && layout.size(1) == 3 && block_tables.dim() == 2 &&
                  block_tables.size(0) == layout.size(0),
              "layout must be int64 [slices, 3] and block_tables int64 [slices, width]");
  layout = layout.contiguous();
  block_tables = block_tables.contiguous();
  const int64_t* lay = layout.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t width = block_tables.size(1), num_blocks = cache.size(2);
  std::vector<Slice> slices;
  for (int64_t i = 0; i < layout.size(0); ++i) {
    const Slice s{lay[3 * i], lay[3 * i + 1], lay[3 * i + 2], tables + i * width};
    TORCH_CHECK(s.query_len > 0 && s.query_start >= 0 && s.query_start + s.query_len <= query.size(0) &&
                    s.context_len >= s.query_len && (s.context_len + kBlock - 1) / kBlock <= width,
                "slice ", i, " does not fit the query rows or its block table");
    for (int64_t b = 0; b < (s.context_len + kBlock - 1) / kBlock; ++b) {
      TORCH_CHECK(s.table[b] >= 0 && s.table[b] < num_blocks, "block id out of range");
    }
    slices.push_back(s);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, query.scalar_type(),
                                  "paged_prefill_attention", [&] {
                                    if (dim == 32) prefill<scalar_t, 32>(query, cache, slices, scale, window, out);
                                    if (dim == 64) prefill<scalar_t, 64>(query, cache, slices, scale, window, out);
                                    if (dim == 128) prefill<scalar_t, 128>(query, cache, slices, scale, window, out);
                                  });
}
