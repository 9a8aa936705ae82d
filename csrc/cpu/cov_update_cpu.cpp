// CPU kernel of eva_kernels::cov_update: cov (upper) += Y^T Y, colsum += sum rows of Y,
// Y = float32(x[kept rows]) - shift.
//
// Structure (GotoBLAS-like, specialised to the symmetric rank-k update):
//   * The kept rows are processed in panels of KC rows (EVA_CPP_KC, default 256). Masked-out
//     rows are never read (row indices are gathered from the mask first), so NaN/Inf in them
//     cannot leak.
//   * Each panel is packed into a small fp32 scratch laid out as column tiles of NR = 24
//     columns: tile jb holds kc x 24 floats, row k contiguous (96 bytes). Packing widens
//     bf16/fp16 on the fly, subtracts the shift, zero-pads past d, and adds the column sums
//     of the tile into colsum (same pass, fp32).
//   * The update of C tile rows [4g, 4g+4) x cols [24jb, 24jb+24) is a 4 x 24 register-blocked
//     micro-kernel (12 AVX2 accumulators, 3 vector loads + 4 broadcasts per 12 FMAs). Both
//     operands come from the same packed buffer: the 4 rows of group g live inside column
//     tile g / 6 at offset 4 * (g % 6). Only groups with 4g < 24jb + 24 (tiles touching the
//     upper triangle) are computed.
//   * Threads (at::parallel_for pool) take the panel's packing by column tile and the update by
//     work items (jb, group range) of bounded size from an atomic counter (dynamic schedule),
//     which balances the triangular workload.
#include "cov_update_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && !defined(EVA_FORCE_GENERIC)
#include <immintrin.h>
#define EVA_CPU_AVX2 1
#endif

namespace eva_kernels {
namespace {

constexpr int64_t NR = 24;                    // columns per packed tile / micro-kernel width
constexpr int64_t MR = 4;                     // rows per micro-kernel
constexpr int64_t GROUPS_PER_TILE = NR / MR;  // 6
constexpr int64_t MAX_GROUPS_PER_ITEM = 24;   // work-item size (96 rows x 24 cols)

int64_t panel_rows() {
  static const int64_t kc = [] {
    const char* s = std::getenv("EVA_CPP_KC");
    const long v = s ? std::atol(s) : 0;
    return (v >= 8 && v <= 8192) ? static_cast<int64_t>(v) : int64_t{256};
  }();
  return kc;
}

inline float to_f32(float v) { return v; }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }

#ifdef EVA_CPU_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
#ifdef __F16C__
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float t[8];
  for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(t);
#endif
}
#endif

// Pack columns [j0, j0 + 24) of the kc kept rows `rows` into dst (kc x 24, zero past d),
// subtract the shift, and add the packed column sums into colsum[j0 : j0 + w].
template <typename T>
void pack_tile(const T* x, int64_t sr, int64_t sc, const int64_t* rows, int64_t kc, int64_t d,
               const float* shift, int64_t j0, float* dst, float* colsum) {
  const int64_t w = std::min<int64_t>(NR, d - j0);
  alignas(32) float sh[NR];
  for (int64_t c = 0; c < NR; ++c) sh[c] = (c < w && shift != nullptr) ? shift[j0 + c] : 0.f;

  if (sc == 1 && w == NR) {
#ifdef EVA_CPU_AVX2
    const __m256 s0 = _mm256_load_ps(sh), s1 = _mm256_load_ps(sh + 8), s2 = _mm256_load_ps(sh + 16);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; ++k) {
      const T* p = x + rows[k] * sr + j0;
      const __m256 v0 = _mm256_sub_ps(load8(p), s0);
      const __m256 v1 = _mm256_sub_ps(load8(p + 8), s1);
      const __m256 v2 = _mm256_sub_ps(load8(p + 16), s2);
      float* q = dst + k * NR;
      _mm256_store_ps(q, v0);
      _mm256_store_ps(q + 8, v1);
      _mm256_store_ps(q + 16, v2);
      a0 = _mm256_add_ps(a0, v0);
      a1 = _mm256_add_ps(a1, v1);
      a2 = _mm256_add_ps(a2, v2);
    }
    float* cs = colsum + j0;
    _mm256_storeu_ps(cs, _mm256_add_ps(_mm256_loadu_ps(cs), a0));
    _mm256_storeu_ps(cs + 8, _mm256_add_ps(_mm256_loadu_ps(cs + 8), a1));
    _mm256_storeu_ps(cs + 16, _mm256_add_ps(_mm256_loadu_ps(cs + 16), a2));
    return;
#else
    for (int64_t k = 0; k < kc; ++k) {
      const T* p = x + rows[k] * sr + j0;
      float* q = dst + k * NR;
      for (int64_t c = 0; c < NR; ++c) q[c] = to_f32(p[c]) - sh[c];
    }
#endif
  } else if (sc == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      const T* p = x + rows[k] * sr + j0;
      float* q = dst + k * NR;
      for (int64_t c = 0; c < w; ++c) q[c] = to_f32(p[c]) - sh[c];
      for (int64_t c = w; c < NR; ++c) q[c] = 0.f;
    }
  } else {
    // Non-unit column stride (e.g. a transposed view): walk down each column.
    for (int64_t c = 0; c < NR; ++c) {
      if (c < w) {
        const T* p = x + (j0 + c) * sc;
        const float s = sh[c];
        for (int64_t k = 0; k < kc; ++k) dst[k * NR + c] = to_f32(p[rows[k] * sr]) - s;
      } else {
        for (int64_t k = 0; k < kc; ++k) dst[k * NR + c] = 0.f;
      }
    }
  }
  float acc[NR] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t c = 0; c < NR; ++c) acc[c] += dst[k * NR + c];
  for (int64_t c = 0; c < w; ++c) colsum[j0 + c] += acc[c];
}

// C[r, c] += sum_k A[k*NR + r] * B[k*NR + c] for r < mr (<= 4), c < nr (<= 24); ldc = row stride.
inline void micro_4x24(int64_t kc, const float* __restrict A, const float* __restrict B,
                       float* __restrict C, int64_t ldc, int64_t mr, int64_t nr) {
#ifdef EVA_CPU_AVX2
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(), c12 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c22 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c32 = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = B + k * NR;
    const float* a = A + k * NR;
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8), b2 = _mm256_load_ps(b + 16);
    __m256 av = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01); c02 = _mm256_fmadd_ps(av, b2, c02);
    av = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11); c12 = _mm256_fmadd_ps(av, b2, c12);
    av = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21); c22 = _mm256_fmadd_ps(av, b2, c22);
    av = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31); c32 = _mm256_fmadd_ps(av, b2, c32);
  }
  if (mr == MR && nr == NR) {
#define EVA_ADD_ROW(r, x0, x1, x2)                                               \
  {                                                                              \
    float* cr = C + (r) * ldc;                                                   \
    _mm256_storeu_ps(cr, _mm256_add_ps(_mm256_loadu_ps(cr), x0));                \
    _mm256_storeu_ps(cr + 8, _mm256_add_ps(_mm256_loadu_ps(cr + 8), x1));        \
    _mm256_storeu_ps(cr + 16, _mm256_add_ps(_mm256_loadu_ps(cr + 16), x2));      \
  }
    EVA_ADD_ROW(0, c00, c01, c02)
    EVA_ADD_ROW(1, c10, c11, c12)
    EVA_ADD_ROW(2, c20, c21, c22)
    EVA_ADD_ROW(3, c30, c31, c32)
#undef EVA_ADD_ROW
    return;
  }
  alignas(32) float t[MR][NR];
  _mm256_store_ps(t[0], c00); _mm256_store_ps(t[0] + 8, c01); _mm256_store_ps(t[0] + 16, c02);
  _mm256_store_ps(t[1], c10); _mm256_store_ps(t[1] + 8, c11); _mm256_store_ps(t[1] + 16, c12);
  _mm256_store_ps(t[2], c20); _mm256_store_ps(t[2] + 8, c21); _mm256_store_ps(t[2] + 16, c22);
  _mm256_store_ps(t[3], c30); _mm256_store_ps(t[3] + 8, c31); _mm256_store_ps(t[3] + 16, c32);
#else
  float t[MR][NR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = B + k * NR;
    const float* a = A + k * NR;
    for (int64_t r = 0; r < MR; ++r) {
      const float ar = a[r];
      for (int64_t c = 0; c < NR; ++c) t[r][c] += ar * b[c];
    }
  }
#endif
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t c = 0; c < nr; ++c) C[r * ldc + c] += t[r][c];
}

// Runs f(i) for i in [0, count) on the at::parallel_for thread pool, handing out indices
// dynamically (an atomic counter): robust to unequal item costs and to cores shared with other
// processes. Inside an already-parallel region at::parallel_for runs inline (one worker).
template <typename F>
void dynamic_for(int64_t count, const F& f) {
  if (count <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  if (workers <= 1) {
    for (int64_t i = 0; i < count; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
         i = next.fetch_add(1, std::memory_order_relaxed))
      f(i);
  });
}

struct WorkItem {
  int64_t jb, g0, g1;  // column tile, row-group range [g0, g1)
};

template <typename T>
void run(float* cov, float* colsum, const T* x, int64_t sr, int64_t sc, int64_t d,
         const int64_t* kept, int64_t count, const float* shift) {
  const int64_t kcmax = std::min<int64_t>(panel_rows(), count);
  const int64_t nt = (d + NR - 1) / NR;
  const int64_t tile_floats = kcmax * NR;
  at::Tensor scratch = at::empty({nt * tile_floats}, at::TensorOptions().dtype(at::kFloat));
  float* buf = scratch.data_ptr<float>();

  std::vector<WorkItem> items;
  for (int64_t jb = 0; jb < nt; ++jb) {
    const int64_t row_end = std::min<int64_t>(d, (jb + 1) * NR);  // rows i < row_end touch row <= col
    const int64_t ng = (row_end + MR - 1) / MR;
    for (int64_t g = 0; g < ng; g += MAX_GROUPS_PER_ITEM)
      items.push_back({jb, g, std::min<int64_t>(ng, g + MAX_GROUPS_PER_ITEM)});
  }
  const int64_t nitems = static_cast<int64_t>(items.size());

  std::vector<int64_t> iota_rows;
  if (kept == nullptr) iota_rows.resize(kcmax);

  for (int64_t p0 = 0; p0 < count; p0 += kcmax) {
    const int64_t kc = std::min<int64_t>(kcmax, count - p0);
    const int64_t* rows;
    if (kept != nullptr) {
      rows = kept + p0;
    } else {
      for (int64_t k = 0; k < kc; ++k) iota_rows[k] = p0 + k;
      rows = iota_rows.data();
    }
    dynamic_for(nt, [&](int64_t jb) {
      pack_tile<T>(x, sr, sc, rows, kc, d, shift, jb * NR, buf + jb * tile_floats, colsum);
    });
    dynamic_for(nitems, [&](int64_t it) {
      {
        const WorkItem& w = items[it];
        const int64_t j0 = w.jb * NR;
        const int64_t nr = std::min<int64_t>(NR, d - j0);
        const float* B = buf + w.jb * tile_floats;
        for (int64_t g = w.g0; g < w.g1; ++g) {
          const int64_t i0 = g * MR;
          const float* A = buf + (g / GROUPS_PER_TILE) * tile_floats + (g % GROUPS_PER_TILE) * MR;
          micro_4x24(kc, A, B, cov + i0 * d + j0, d, std::min<int64_t>(MR, d - i0), nr);
        }
      }
    });
  }
}

}  // namespace

const char* cov_update_cpu_isa() {
#ifdef EVA_CPU_AVX2
  return "avx2-fma";
#else
  return "generic";
#endif
}

int64_t cov_update_cpu(at::Tensor& cov, at::Tensor& colsum, const at::Tensor& x,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& shift) {
  const int64_t n = x.size(0), d = x.size(1);
  std::vector<int64_t> kept;
  int64_t count = n;
  if (mask.has_value()) {
    const at::Tensor m = mask->contiguous();
    const bool* mp = m.data_ptr<bool>();
    kept.reserve(n);
    for (int64_t i = 0; i < n; ++i)
      if (mp[i]) kept.push_back(i);
    count = static_cast<int64_t>(kept.size());
  }
  if (count == 0 || d == 0) return count;
  at::Tensor sh;
  const float* shp = nullptr;
  if (shift.has_value()) {
    sh = shift->contiguous();
    shp = sh.data_ptr<float>();
  }
  const int64_t* kp = mask.has_value() ? kept.data() : nullptr;
  float* cp = cov.data_ptr<float>();
  float* sp = colsum.data_ptr<float>();
  const int64_t sr = x.stride(0), sc = x.stride(1);
  switch (x.scalar_type()) {
    case at::kFloat:
      run<float>(cp, sp, x.data_ptr<float>(), sr, sc, d, kp, count, shp);
      break;
    case at::kHalf:
      run<c10::Half>(cp, sp, x.data_ptr<c10::Half>(), sr, sc, d, kp, count, shp);
      break;
    case at::kBFloat16:
      run<c10::BFloat16>(cp, sp, x.data_ptr<c10::BFloat16>(), sr, sc, d, kp, count, shp);
      break;
    default:
      TORCH_CHECK(false, "cov_update: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return count;
}

}  // namespace eva_kernels
