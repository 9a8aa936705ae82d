// CPU kernel of eva_kernels::cov_update: cov (upper) += Y^T Y, colsum += sum rows of Y,
// Y = float32(x[kept rows]) - shift.
//
// Structure (GotoBLAS-like, specialised to the symmetric rank-k update):
//   * The kept rows are processed in panels of KC rows (EVA_CPP_KC, default 256). Masked-out
//     rows are never read (row indices are gathered from the mask first), so NaN/Inf in them
//     cannot leak.
//   * Each panel is packed into a small fp32 scratch laid out as column tiles of NR = 24 (48 with
//     AVX-512)
//     columns: tile jb holds kc x 24 floats, row k contiguous (96 bytes). Packing widens
//     bf16/fp16 on the fly, subtracts the shift, zero-pads past d, and adds the column sums
//     of the tile into colsum (same pass, fp32).
//   * The update of C tile rows [4g, 4g+4) x cols [NR jb, NR jb + NR) is a 4 x NR register-blocked
//     micro-kernel: 12 accumulators, 3 vector loads + 4 broadcasts per 12 FMAs, of 8 floats
//     (AVX2, NR = 24) or 16 floats (AVX-512, NR = 48), chosen at run time by CPU feature
//     detection; a portable one (NR = 24) elsewhere. Both
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

// Run-time ISA dispatch: on x86-64 the AVX-512 and AVX2/FMA/F16C micro-kernels are compiled into
// every build with function-level target attributes (internal linkage, so no other code of this
// library is built for them) and chosen at run time by CPU feature detection; the generic,
// auto-vectorised kernels run everywhere else. EVA_CPU_ISA=generic|avx2 caps the choice (how a
// CPU without AVX-512 or AVX2 is simulated in the tests). EVA_FORCE_GENERIC at compile time
// leaves the vector ones out.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(EVA_FORCE_GENERIC)
#include <immintrin.h>
#define EVA_CPU_AVX2 1
#define EVA_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define EVA_AVX512_FN __attribute__((target("avx512f,avx2,fma,f16c")))
#endif
#include <cstring>
#include <string>

namespace eva_kernels {
namespace {

constexpr int64_t MR = 4;                     // rows per micro-kernel (AVX2 and generic)
constexpr int64_t MAX_GROUPS_PER_ITEM = 24;   // work-item size (96 rows x NR cols)
constexpr int64_t NR_AVX2 = 24;               // packed tile width of the AVX2 and generic kernels
constexpr int64_t NR_AVX512 = 48;             // ... and of the AVX-512 one
constexpr int64_t MR_AVX512 = 8;              // rows of the AVX-512 micro-kernel

enum class Isa { generic, avx2, avx512 };

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

// The micro-kernel family for this process: the best the CPU runs, capped by EVA_CPU_ISA.
Isa chosen_isa() {
#ifdef EVA_CPU_AVX2
  static const Isa isa = [] {
    const char* want = std::getenv("EVA_CPU_ISA");
    const std::string cap = want ? want : "";
    if (cap == "generic") return Isa::generic;
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && cap != "avx2" && __builtin_cpu_supports("avx512f")) return Isa::avx512;
    return avx2 ? Isa::avx2 : Isa::generic;
  }();
  return isa;
#else
  return Isa::generic;
#endif
}

#ifdef EVA_CPU_AVX2
EVA_AVX2_FN inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
EVA_AVX2_FN inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
EVA_AVX2_FN inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// pack_tile's full-width, unit-stride case with AVX2: widen, subtract the shift, store, and
// sum the columns into colsum[j0 : j0 + 24].
template <typename T>
EVA_AVX2_FN void pack_full_avx2(const T* x, int64_t sr, const int64_t* rows, int64_t kc, const float* sh,
                                int64_t j0, float* dst, float* colsum) {
  const __m256 s0 = _mm256_load_ps(sh), s1 = _mm256_load_ps(sh + 8), s2 = _mm256_load_ps(sh + 16);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const T* p = x + rows[k] * sr + j0;
    const __m256 v0 = _mm256_sub_ps(load8(p), s0);
    const __m256 v1 = _mm256_sub_ps(load8(p + 8), s1);
    const __m256 v2 = _mm256_sub_ps(load8(p + 16), s2);
    float* q = dst + k * NR_AVX2;
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
}

EVA_AVX512_FN inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
EVA_AVX512_FN inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
EVA_AVX512_FN inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The same for the 48-wide tiles of the AVX-512 kernel (3 x 16 floats per row).
template <typename T>
EVA_AVX512_FN void pack_full_avx512(const T* x, int64_t sr, const int64_t* rows, int64_t kc, const float* sh,
                                    int64_t j0, float* dst, float* colsum) {
  const __m512 s0 = _mm512_loadu_ps(sh), s1 = _mm512_loadu_ps(sh + 16), s2 = _mm512_loadu_ps(sh + 32);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const T* p = x + rows[k] * sr + j0;
    const __m512 v0 = _mm512_sub_ps(load16(p), s0);
    const __m512 v1 = _mm512_sub_ps(load16(p + 16), s1);
    const __m512 v2 = _mm512_sub_ps(load16(p + 32), s2);
    float* q = dst + k * NR_AVX512;
    _mm512_store_ps(q, v0);
    _mm512_store_ps(q + 16, v1);
    _mm512_store_ps(q + 32, v2);
    a0 = _mm512_add_ps(a0, v0);
    a1 = _mm512_add_ps(a1, v1);
    a2 = _mm512_add_ps(a2, v2);
  }
  float* cs = colsum + j0;
  _mm512_storeu_ps(cs, _mm512_add_ps(_mm512_loadu_ps(cs), a0));
  _mm512_storeu_ps(cs + 16, _mm512_add_ps(_mm512_loadu_ps(cs + 16), a1));
  _mm512_storeu_ps(cs + 32, _mm512_add_ps(_mm512_loadu_ps(cs + 32), a2));
}
#endif

// Pack columns [j0, j0 + 24) of the kc kept rows `rows` into dst (kc x 24, zero past d),
// subtract the shift, and add the packed column sums into colsum[j0 : j0 + w].
template <typename T, int64_t NR>
void pack_tile(const T* x, int64_t sr, int64_t sc, const int64_t* rows, int64_t kc, int64_t d,
               const float* shift, int64_t j0, float* dst, float* colsum, Isa isa) {
  const int64_t w = std::min<int64_t>(NR, d - j0);
  alignas(64) float sh[NR];
  for (int64_t c = 0; c < NR; ++c) sh[c] = (c < w && shift != nullptr) ? shift[j0 + c] : 0.f;

  if (sc == 1 && w == NR) {
#ifdef EVA_CPU_AVX2
    if (NR == NR_AVX2 && isa == Isa::avx2) {
      pack_full_avx2<T>(x, sr, rows, kc, sh, j0, dst, colsum);
      return;
    }
    if (NR == NR_AVX512 && isa == Isa::avx512) {
      pack_full_avx512<T>(x, sr, rows, kc, sh, j0, dst, colsum);
      return;
    }
#endif
    for (int64_t k = 0; k < kc; ++k) {
      const T* p = x + rows[k] * sr + j0;
      float* q = dst + k * NR;
      for (int64_t c = 0; c < NR; ++c) q[c] = to_f32(p[c]) - sh[c];
    }
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
// AVX2/FMA: 12 accumulators, 3 vector loads + 4 broadcasts per 12 FMAs.
#ifdef EVA_CPU_AVX2
EVA_AVX2_FN void micro_4x24_avx2(int64_t kc, const float* __restrict A, const float* __restrict B,
                                 float* __restrict C, int64_t ldc, int64_t mr, int64_t nr) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(), c12 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c22 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c32 = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = B + k * NR_AVX2;
    const float* a = A + k * NR_AVX2;
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
  if (mr == MR && nr == NR_AVX2) {
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
  alignas(32) float t[MR][NR_AVX2];
  _mm256_store_ps(t[0], c00); _mm256_store_ps(t[0] + 8, c01); _mm256_store_ps(t[0] + 16, c02);
  _mm256_store_ps(t[1], c10); _mm256_store_ps(t[1] + 8, c11); _mm256_store_ps(t[1] + 16, c12);
  _mm256_store_ps(t[2], c20); _mm256_store_ps(t[2] + 8, c21); _mm256_store_ps(t[2] + 16, c22);
  _mm256_store_ps(t[3], c30); _mm256_store_ps(t[3] + 8, c31); _mm256_store_ps(t[3] + 16, c32);
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t c = 0; c < nr; ++c) C[r * ldc + c] += t[r][c];
}
#endif

#ifdef EVA_CPU_AVX2
// The AVX-512 micro-kernel: 8 x 48 (24 accumulators of 16 floats; 3 loads + 8 broadcasts per
// 24 FMAs), the rows of a group being 8 consecutive columns of the packed tile (MR_AVX512).
EVA_AVX512_FN void micro_8x48_avx512(int64_t kc, const float* __restrict A, const float* __restrict B,
                                     float* __restrict C, int64_t ldc, int64_t mr, int64_t nr) {
  __m512 acc[MR_AVX512][3];
  for (int r = 0; r < MR_AVX512; ++r) acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = B + k * NR_AVX512;
    const float* a = A + k * NR_AVX512;
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16), b2 = _mm512_load_ps(b + 32);
#pragma GCC unroll 8
    for (int r = 0; r < MR_AVX512; ++r) {
      const __m512 av = _mm512_set1_ps(a[r]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
    }
  }
  if (mr == MR_AVX512 && nr == NR_AVX512) {
#pragma GCC unroll 8
    for (int r = 0; r < MR_AVX512; ++r) {
      float* cr = C + r * ldc;
      _mm512_storeu_ps(cr, _mm512_add_ps(_mm512_loadu_ps(cr), acc[r][0]));
      _mm512_storeu_ps(cr + 16, _mm512_add_ps(_mm512_loadu_ps(cr + 16), acc[r][1]));
      _mm512_storeu_ps(cr + 32, _mm512_add_ps(_mm512_loadu_ps(cr + 32), acc[r][2]));
    }
    return;
  }
  alignas(64) float t[MR_AVX512][NR_AVX512];
  for (int r = 0; r < MR_AVX512; ++r) {
    _mm512_store_ps(t[r], acc[r][0]);
    _mm512_store_ps(t[r] + 16, acc[r][1]);
    _mm512_store_ps(t[r] + 32, acc[r][2]);
  }
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t c = 0; c < nr; ++c) C[r * ldc + c] += t[r][c];
}
#endif

// The same, portable (the compiler vectorises it for the build's target).
template <int64_t NR, int64_t MRv>
inline void micro_generic(int64_t kc, const float* __restrict A, const float* __restrict B,
                          float* __restrict C, int64_t ldc, int64_t mr, int64_t nr) {
  float t[MRv][NR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const float* b = B + k * NR;
    const float* a = A + k * NR;
    for (int64_t r = 0; r < MRv; ++r) {
      const float ar = a[r];
      for (int64_t c = 0; c < NR; ++c) t[r][c] += ar * b[c];
    }
  }
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t c = 0; c < nr; ++c) C[r * ldc + c] += t[r][c];
}

template <int64_t NR, int64_t MRv>
inline void micro(int64_t kc, const float* __restrict A, const float* __restrict B, float* __restrict C,
                  int64_t ldc, int64_t mr, int64_t nr, Isa isa) {
#ifdef EVA_CPU_AVX2
  if (NR == NR_AVX2 && MRv == MR && isa == Isa::avx2) {
    micro_4x24_avx2(kc, A, B, C, ldc, mr, nr);
    return;
  }
  if (NR == NR_AVX512 && MRv == MR_AVX512 && isa == Isa::avx512) {
    micro_8x48_avx512(kc, A, B, C, ldc, mr, nr);
    return;
  }
#endif
  micro_generic<NR, MRv>(kc, A, B, C, ldc, mr, nr);
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

template <typename T, int64_t NR, int64_t MR>
void run(float* cov, float* colsum, const T* x, int64_t sr, int64_t sc, int64_t d,
         const int64_t* kept, int64_t count, const float* shift, Isa isa) {
  static_assert(NR % MR == 0, "a micro-kernel's rows are columns of one packed tile");
  constexpr int64_t GROUPS_PER_TILE = NR / MR;
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
      pack_tile<T, NR>(x, sr, sc, rows, kc, d, shift, jb * NR, buf + jb * tile_floats, colsum, isa);
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
          micro<NR, MR>(kc, A, B, cov + i0 * d + j0, d, std::min<int64_t>(MR, d - i0), nr, isa);
        }
      }
    });
  }
}

}  // namespace

const char* cov_update_cpu_isa() {
  switch (chosen_isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2-fma";
    default: return "generic";
  }
}

template <typename T>
void run_for_isa(float* cov, float* colsum, const T* x, int64_t sr, int64_t sc, int64_t d,
                 const int64_t* kept, int64_t count, const float* shift) {
  const Isa isa = chosen_isa();
  if (isa == Isa::avx512)
    run<T, NR_AVX512, MR_AVX512>(cov, colsum, x, sr, sc, d, kept, count, shift, isa);
  else
    run<T, NR_AVX2, MR>(cov, colsum, x, sr, sc, d, kept, count, shift, isa);
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
      run_for_isa<float>(cp, sp, x.data_ptr<float>(), sr, sc, d, kp, count, shp);
      break;
    case at::kHalf:
      run_for_isa<c10::Half>(cp, sp, x.data_ptr<c10::Half>(), sr, sc, d, kp, count, shp);
      break;
    case at::kBFloat16:
      run_for_isa<c10::BFloat16>(cp, sp, x.data_ptr<c10::BFloat16>(), sr, sc, d, kp, count, shp);
      break;
    default:
      TORCH_CHECK(false, "cov_update: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return count;
}

}  // namespace eva_kernels
