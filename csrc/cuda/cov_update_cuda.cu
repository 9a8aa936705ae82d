// CUDA kernels of eva_kernels::cov_update (plain CUDA C++; see cov_update_cuda.cuh).
//
// One kernel launch does everything:
//   grid.x enumerates the upper-triangular pairs (bi <= bj) of 64 x 64 tiles of cov,
//   grid.y splits the n rows into chunks (so small d / large n still fills the GPU; partial
//   tiles are then combined with fp32 atomicAdd into cov).
// Each block walks its row chunk in steps of BK = 32 rows. Per step, every one of the 256
// threads owns one 8-column segment of one row of the step's 32 x 64 operand panels
// (row krow = tid / 8, columns 8 (tid % 8) .. + 8) and loads it with one 128-bit load per
// operand (two for fp32) when x is unit-stride along columns and 16-byte aligned (scalar loads
// otherwise, and at the ragged right edge). Rows that are masked out or past the chunk are never
// read: their values are exactly 0. On diagonal tiles (bi == bj) the A panel is loaded once and
// used as B too, and the block also sums its columns (from the exact fp32 values, per thread,
// reduced in a fixed order at the end); block (0, 0) of each chunk counts the mask.
//
// Pipeline (register-staged double buffering): the global loads of step s + 1 are issued into
// registers before the tensor-core / FMA work of step s, which reads shared-memory buffer s % 2;
// the registers are converted and stored into the other buffer at the top of step s + 1. One
// barrier per step (two buffers make the barrier of step s + 1 also the end of step s's reads).
//
// Arithmetic, three kernels (the launcher picks one; see the .cuh for the accuracy contract):
//   * cov_tc_kernel    (bf16/fp16, no shift, sm_80+): WMMA 16x16x16 tensor-core MMAs on the
//     16-bit values as they are (products exact in fp32), fp32 accumulators; 8 warps each own a
//     16 x 32 strip of the 64 x 64 tile; accumulators are staged through shared memory.
//   * cov_split_kernel (bf16/fp16 with a shift, sm_80+): y = float(x) - shift is exact in fp32
//     but not in 16 bits, so it is split into bf16 parts hi = rn(y), lo = rn(y - hi) and
//     y_a^T y_b ~= lo_a^T hi_b + hi_a^T lo_b + hi_a^T hi_b: three bf16 WMMAs (relative error of
//     each product <= 3 * 2^-18; the dropped lo_a^T lo_b is below that).
//   * cov_fma_kernel   (fp32 input, and every input below sm_80): exact fp32 FMAs, 16 x 16
//     threads each accumulating a 4 x 4 register tile.
#include "cov_update_cuda.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

// How a kernel is launched; the CPU emulation of the tests (tests/cuda_emu) replaces it.
#ifndef EVA_CUDA_LAUNCH
#define EVA_CUDA_LAUNCH(kernel, grid, block, stream, arg) kernel<<<(grid), (block), 0, (stream)>>>(arg)
#endif

namespace eva_kernels {
namespace {

constexpr int BT = 64;                   // tile edge (cov tile is BT x BT)
constexpr int BK = 32;                   // rows per step
constexpr int NTHREADS = 256;
constexpr int VEC = 8;                   // columns of one row a thread loads per operand per step
constexpr int SEGS = BT / VEC;           // threads per panel row
static_assert(BK * SEGS == NTHREADS, "one 8-column segment per thread per operand per step");
constexpr int LDS16 = BT + 8;            // 16-bit panel row stride: 144 B (16 B aligned rows,
                                         // WMMA ldm a multiple of 8, fewer bank conflicts)
constexpr int LDC = BT + 4;              // fp32 accumulator staging row stride
constexpr int PANEL16 = BK * LDS16 * 2;  // bytes of one 16-bit panel (4608 = 144 x 32)
constexpr int STAGE_C = BT * LDC * 4;    // bytes of the accumulator staging tile
constexpr int CSUM_RED = BK * BT * 4;    // bytes of the column-sum partials (one per panel row)

__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }

// The 16-bit element with bit pattern `bits`, widened to fp32 (exact).
__device__ __forceinline__ float bits_to_float(unsigned int bits, const __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ float bits_to_float(unsigned int bits, const __nv_bfloat16*) {
  return __uint_as_float(bits << 16);
}

// fp32 -> 16-bit storage type (exact for values that came from that type).
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Tile pair (bi, bj), bi <= bj, from the linear index t = bj (bj + 1) / 2 + bi.
__device__ __forceinline__ void decode_pair(long long t, int& bi, int& bj) {
  long long j = static_cast<long long>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (j * (j + 1) / 2 > t) --j;
  while ((j + 1) * (j + 2) / 2 <= t) ++j;
  bj = static_cast<int>(j);
  bi = static_cast<int>(t - j * (j + 1) / 2);
}

struct Args {
  float* cov;
  float* colsum;
  unsigned long long* count;
  const void* x;
  long long n, d, sr, sc;
  const bool* mask;
  const float* shift;
  long long rows_per_split;
  int atomic;  // combine into cov with atomicAdd (several row chunks)
  int vec;     // 128-bit loads allowed: sc == 1, rows and x 16-byte aligned
};

// ------------------------------------------------------------------ loads
// Bit pattern of a 16-bit element.
__device__ __forceinline__ unsigned int bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned int bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// One thread's 8-column segment of one panel row, as loaded (the registers a step's global loads
// land in while the previous step computes): 16-bit elements stay packed, two per register.
template <typename T>
struct Seg {
  unsigned int w[4];
  __device__ __forceinline__ float at(int j) const {
    return bits_to_float((w[j / 2] >> (16 * (j % 2))) & 0xffffu, static_cast<const T*>(nullptr));
  }
  __device__ __forceinline__ void clear() { w[0] = w[1] = w[2] = w[3] = 0u; }
  // 8 elements at p (16-byte aligned), one 128-bit load
  __device__ __forceinline__ void load_vec(const T* p) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = raw.x; w[1] = raw.y; w[2] = raw.z; w[3] = raw.w;
  }
  __device__ __forceinline__ void set(int j, T v) {
    w[j / 2] = (w[j / 2] & (0xffffu << (16 * (1 - j % 2)))) | (bits_of(v) << (16 * (j % 2)));
  }
};
template <>
struct Seg<float> {
  float v[VEC];
  __device__ __forceinline__ float at(int j) const { return v[j]; }
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = 0.f;
  }
  __device__ __forceinline__ void load_vec(const float* p) {  // two 128-bit loads
    const float4 lo = __ldg(reinterpret_cast<const float4*>(p));
    const float4 hi = __ldg(reinterpret_cast<const float4*>(p + 4));
    v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
    v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
  }
  __device__ __forceinline__ void set(int j, float x) { v[j] = x; }
};

// Columns c0 .. c0 + 7 of row r of x; 0 for columns >= d.
template <typename T>
__device__ __forceinline__ void load8(const Args& a, const T* x, long long r, long long c0, Seg<T>& seg) {
  const T* row = x + r * a.sr;
  if (a.vec && c0 + VEC <= a.d) {
    seg.load_vec(row + c0);
  } else {
    seg.clear();
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (c0 + j < a.d) seg.set(j, row[(c0 + j) * a.sc]);
  }
}

// What one thread does in every step: its panel row and column segment, its block's tile and
// row chunk.
struct Slot {
  int bi, bj;
  bool diag;
  long long i0, j0, r_begin, r_end;
  int krow, c0;                 // panel row and first column of this thread's segment
};

// Also fills s_shift (shared, 2 x BT: the shift of the tile's A columns, then its B columns;
// 0 past d) when HAS_SHIFT, followed by a barrier.
template <bool HAS_SHIFT>
__device__ __forceinline__ void make_slot(const Args& a, Slot& s, float* s_shift) {
  decode_pair(static_cast<long long>(blockIdx.x), s.bi, s.bj);
  s.diag = s.bi == s.bj;
  s.i0 = static_cast<long long>(s.bi) * BT;
  s.j0 = static_cast<long long>(s.bj) * BT;
  s.r_begin = static_cast<long long>(blockIdx.y) * a.rows_per_split;
  s.r_end = min(a.n, s.r_begin + a.rows_per_split);
  s.krow = threadIdx.x / SEGS;
  s.c0 = (threadIdx.x % SEGS) * VEC;
  if (HAS_SHIFT) {
    const int t = threadIdx.x;
    if (t < 2 * BT) {
      const long long c = (t < BT ? s.i0 : s.j0 - BT) + t;
      s_shift[t] = c < a.d ? a.shift[c] : 0.f;
    }
    __syncthreads();
  }
}

// This thread's segments of the step starting at row r0 (the global loads of a step); returns
// whether the row is kept. Dropped rows are never read (their segments are cleared).
template <typename T>
__device__ __forceinline__ bool load_step(const Args& a, const T* x, const Slot& s, long long r0,
                                          Seg<T>& sa, Seg<T>& sb) {
  const long long r = r0 + s.krow;
  const bool kept = r < s.r_end && (a.mask == nullptr || a.mask[r]);
  if (kept) {
    load8(a, x, r, s.i0 + s.c0, sa);
    if (!s.diag) load8(a, x, r, s.j0 + s.c0, sb);
  } else {
    sa.clear();
    sb.clear();
  }
  return kept;
}

// y = float(x) - shift of the loaded segments for a kept row; exactly 0 for a dropped row and
// for columns past d (whose loaded value and shift are both 0). Adds the A segment to csum8.
template <bool HAS_SHIFT, typename T>
__device__ __forceinline__ void shift_step(const Slot& s, bool kept, const float* s_shift, const Seg<T>& sa,
                                           const Seg<T>& sb, float ya[VEC], float yb[VEC], float csum8[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    ya[j] = kept ? (HAS_SHIFT ? sa.at(j) - s_shift[s.c0 + j] : sa.at(j)) : 0.f;
    yb[j] = (kept && !s.diag) ? (HAS_SHIFT ? sb.at(j) - s_shift[BT + s.c0 + j] : sb.at(j)) : 0.f;
    csum8[j] += ya[j];
  }
}

// The pipelined main loop of every kernel (register-staged double buffering, see the top of the
// file): per step, stage(buf, ya, yb) stores the step's shifted values (fp32, ya for the A panel,
// yb for B) into shared buffer `buf`; after the step's one barrier the next step's global loads
// are issued into registers, then compute(buf) multiplies buffer `buf` while they are in flight.
template <bool HAS_SHIFT, typename T, typename Stage, typename Compute>
__device__ __forceinline__ void pipelined_steps(const Args& a, const T* x, const Slot& s, const float* s_shift,
                                                float csum8[VEC], Stage stage, Compute compute) {
  Seg<T> seg_a, seg_b;
  int buf = 0;
  bool kept = s.r_begin < s.r_end && load_step(a, x, s, s.r_begin, seg_a, seg_b);
  for (long long r0 = s.r_begin; r0 < s.r_end; r0 += BK, buf ^= 1) {
    float ya[VEC], yb[VEC];
    shift_step<HAS_SHIFT>(s, kept, s_shift, seg_a, seg_b, ya, yb, csum8);
    stage(buf, ya, yb);
    __syncthreads();
    if (r0 + BK < s.r_end) kept = load_step(a, x, s, r0 + BK, seg_a, seg_b);
    compute(buf);
  }
}

// ------------------------------------------------------------------ epilogue
__device__ __forceinline__ void count_rows(const Args& a, long long r_begin, long long r_end) {
  __shared__ unsigned int s_cnt;
  if (threadIdx.x == 0) s_cnt = 0;
  __syncthreads();
  unsigned int c = 0;
  for (long long r = r_begin + threadIdx.x; r < r_end; r += NTHREADS) c += a.mask[r] ? 1u : 0u;
  if (c) atomicAdd(&s_cnt, c);
  __syncthreads();
  if (threadIdx.x == 0 && s_cnt) atomicAdd(a.count, static_cast<unsigned long long>(s_cnt));
}

__device__ __forceinline__ void add_to_cov(const Args& a, long long gi, long long gj, float v) {
  if (gi < a.d && gj < a.d && gi <= gj) {
    float* p = a.cov + gi * a.d + gj;
    if (a.atomic) atomicAdd(p, v); else *p += v;
  }
}

// Column sums of a diagonal block: every thread's partial sums of its 8 columns (over its panel
// row in every step) go through shared memory `red` and are added in a fixed order (so a single
// chunk is deterministic); thread tid < BT then adds column j0 + tid into colsum. The block
// (0, 0) of every chunk also counts the kept rows. Call after the main loop, by all threads.
__device__ __forceinline__ void finish_sums(const Args& a, const Slot& s, const float csum8[VEC], float* red) {
  __syncthreads();  // the main loop's last reads of shared memory are done
  if (s.diag) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) red[s.krow * BT + s.c0 + j] = csum8[j];
  }
  __syncthreads();
  const int tid = threadIdx.x;
  if (s.diag && tid < BT && s.j0 + tid < a.d && s.r_begin < s.r_end) {
    float c = 0.f;
    for (int k = 0; k < BK; ++k) c += red[k * BT + tid];
    atomicAdd(a.colsum + s.j0 + tid, c);
  }
  if (s.bi == 0 && s.bj == 0 && a.mask != nullptr) count_rows(a, s.r_begin, s.r_end);
  __syncthreads();  // `red` may be reused by the caller
}

// ------------------------------------------------------------------ tensor-core kernels
// SPLIT == false: T (bf16/fp16) panels as they are, one WMMA per fragment pair.
// SPLIT == true:  bf16 hi and lo panels of y = float(x) - shift, three WMMAs.
template <typename T, bool SPLIT>
__device__ __forceinline__ void mma_tile(const Args& a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using S = typename std::conditional<SPLIT, __nv_bfloat16, T>::type;  // what the tensor cores read
  constexpr int PARTS = SPLIT ? 2 : 1;                                   // hi (and lo)
  constexpr int OPERANDS = 2 * 2 * PARTS * PANEL16;                      // [buffer][A/B][part]
  __shared__ __align__(128) unsigned char smem[cmax(OPERANDS, cmax(STAGE_C, CSUM_RED))];
  __shared__ float s_shift[SPLIT ? 2 * BT : 1];
  auto panel = [&](int buf, int op, int part) {
    return reinterpret_cast<S*>(smem + ((buf * 2 + op) * PARTS + part) * PANEL16);
  };

  Slot s;
  make_slot<SPLIT>(a, s, s_shift);
  const T* x = static_cast<const T*>(a.x);
  const int warp = threadIdx.x / 32;
  const int wr = warp / 2, wc = warp % 2;  // warp strip: rows 16 wr .. + 16, cols 32 wc .. + 32

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  float csum8[VEC] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};

  auto stage = [&](int buf, const float* ya, const float* yb) {
    const int off = s.krow * LDS16 + s.c0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (SPLIT) {
        const __nv_bfloat16 ha = __float2bfloat16_rn(ya[j]);
        panel(buf, 0, 0)[off + j] = reinterpret_cast<const S&>(ha);
        const __nv_bfloat16 la = __float2bfloat16_rn(ya[j] - __bfloat162float(ha));
        panel(buf, 0, PARTS - 1)[off + j] = reinterpret_cast<const S&>(la);
        if (!s.diag) {
          const __nv_bfloat16 hb = __float2bfloat16_rn(yb[j]);
          panel(buf, 1, 0)[off + j] = reinterpret_cast<const S&>(hb);
          const __nv_bfloat16 lb = __float2bfloat16_rn(yb[j] - __bfloat162float(hb));
          panel(buf, 1, PARTS - 1)[off + j] = reinterpret_cast<const S&>(lb);
        }
      } else {
        panel(buf, 0, 0)[off + j] = from_float<S>(ya[j]);
        if (!s.diag) panel(buf, 1, 0)[off + j] = from_float<S>(yb[j]);
      }
    }
  };
  auto compute = [&](int buf) {
    const int op_b = s.diag ? 0 : 1;
#pragma unroll 1  // one k-slice of fragments live at a time (registers: 2 blocks per SM)
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::col_major> fa_hi, fa_lo;
      wmma::load_matrix_sync(fa_hi, panel(buf, 0, 0) + ks * LDS16 + wr * 16, LDS16);
      if (SPLIT) wmma::load_matrix_sync(fa_lo, panel(buf, 0, PARTS - 1) + ks * LDS16 + wr * 16, LDS16);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        const int col = ks * LDS16 + wc * 32 + f * 16;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::row_major> fb_hi, fb_lo;
        wmma::load_matrix_sync(fb_hi, panel(buf, op_b, 0) + col, LDS16);
        if (SPLIT) {
          wmma::load_matrix_sync(fb_lo, panel(buf, op_b, PARTS - 1) + col, LDS16);
          wmma::mma_sync(acc[f], fa_lo, fb_hi, acc[f]);  // small terms first
          wmma::mma_sync(acc[f], fa_hi, fb_lo, acc[f]);
        }
        wmma::mma_sync(acc[f], fa_hi, fb_hi, acc[f]);
      }
    }
  };
  pipelined_steps<SPLIT>(a, x, s, s_shift, csum8, stage, compute);

  float* staged = reinterpret_cast<float*>(smem);
  finish_sums(a, s, csum8, staged);
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(staged + (wr * 16) * LDC + wc * 32 + f * 16, acc[f], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < BT * BT; e += NTHREADS) {
    const int rr = e / BT, cc = e % BT;
    add_to_cov(a, s.i0 + rr, s.j0 + cc, staged[rr * LDC + cc]);
  }
#else
  __trap();  // unreachable: below sm_80 the launcher picks cov_fma_kernel
#endif
}

// 2 resident blocks per SM at least: at most 128 registers per thread.
template <typename T>
__global__ void __launch_bounds__(NTHREADS, 2) cov_tc_kernel(Args a) { mma_tile<T, false>(a); }

template <typename T>
__global__ void __launch_bounds__(NTHREADS, 2) cov_split_kernel(Args a) { mma_tile<T, true>(a); }

// ------------------------------------------------------------------ exact fp32 FMA kernel
// sP: [buffer][A/B] fp32 panels of y (shared memory of the kernel), reused for the sums.
template <bool HAS_SHIFT, typename T>
__device__ __forceinline__ void fma_tile(const Args& a, float (*sP)[2][BK * BT], float* s_shift) {
  static_assert(sizeof(float) * BK * BT * 4 >= CSUM_RED, "column-sum partials fit the panels");

  Slot s;
  make_slot<HAS_SHIFT>(a, s, s_shift);
  const T* x = static_cast<const T*>(a.x);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  float acc[4][4];
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[p][q] = 0.f;
  float csum8[VEC] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};

  auto stage = [&](int buf, const float* ya, const float* yb) {
    float* pa = sP[buf][0] + s.krow * BT + s.c0;
    float* pb = sP[buf][1] + s.krow * BT + s.c0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      pa[j] = ya[j];
      if (!s.diag) pb[j] = yb[j];
    }
  };
  auto compute = [&](int buf) {
    const float* A = sP[buf][0];
    const float* B = s.diag ? sP[buf][0] : sP[buf][1];
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(A + kk * BT + ty * 4);
      const float4 bv = *reinterpret_cast<const float4*>(B + kk * BT + tx * 4);
      const float ar[4] = {av.x, av.y, av.z, av.w};
      const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = fmaf(ar[p], br[q], acc[p][q]);
    }
  };
  pipelined_steps<HAS_SHIFT>(a, x, s, s_shift, csum8, stage, compute);

  finish_sums(a, s, csum8, &sP[0][0][0]);
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) add_to_cov(a, s.i0 + ty * 4 + p, s.j0 + tx * 4 + q, acc[p][q]);
}

template <typename T>
__global__ void __launch_bounds__(NTHREADS, 2) cov_fma_kernel(Args a) {
  __shared__ __align__(16) float sP[2][2][BK * BT];
  __shared__ float s_shift[2 * BT];
  if (a.shift != nullptr) fma_tile<true, T>(a, sP, s_shift); else fma_tile<false, T>(a, sP, s_shift);
}

}  // namespace

cudaError_t cov_update_cuda_launch(float* cov, float* colsum, unsigned long long* count,
                                   const void* x, XDType dtype, int64_t n, int64_t d,
                                   int64_t sr, int64_t sc, const bool* mask, const float* shift,
                                   cudaStream_t stream) {
  if (n <= 0 || d <= 0) return cudaSuccess;
  const long long tiles = (d + BT - 1) / BT;
  const long long pairs = tiles * (tiles + 1) / 2;
  if (pairs > 0x7fffffffLL) return cudaErrorInvalidValue;

  int dev = 0, sms = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;

  // The kernel: on sm_80+ tensor cores for 16-bit input (as is without a shift, the bf16 split
  // with one); exact fp32 FMAs for fp32 input and for every input below sm_80 (no trap there:
  // WMMA bf16 needs sm_80).
  const bool tc = dtype != XDType::kFloat32 && major >= 8;
  const bool split = tc && shift != nullptr;
  void (*kernel)(Args) = nullptr;
  size_t esize = 2;
  switch (dtype) {
    case XDType::kFloat32: kernel = cov_fma_kernel<float>; esize = 4; break;
    case XDType::kFloat16:
      kernel = !tc ? cov_fma_kernel<__half> : (split ? cov_split_kernel<__half> : cov_tc_kernel<__half>);
      break;
    case XDType::kBFloat16:
      kernel = !tc ? cov_fma_kernel<__nv_bfloat16>
                   : (split ? cov_split_kernel<__nv_bfloat16> : cov_tc_kernel<__nv_bfloat16>);
      break;
    default: return cudaErrorInvalidValue;
  }

  // Enough blocks to fill the GPU (every SM holds as many as this kernel's registers and shared
  // memory allow, from the occupancy calculator), but at least 256 rows per chunk.
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, NTHREADS, 0);
  if (err != cudaSuccess) return err;
  const long long target = static_cast<long long>(per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  long long nsplit = (target + pairs - 1) / pairs;
  const long long max_split = (n + 255) / 256;
  if (nsplit > max_split) nsplit = max_split;
  if (nsplit > 65535) nsplit = 65535;
  if (nsplit < 1) nsplit = 1;
  long long rows = (n + nsplit - 1) / nsplit;
  rows = (rows + BK - 1) / BK * BK;
  nsplit = (n + rows - 1) / rows;

  Args a;
  a.cov = cov;
  a.colsum = colsum;
  a.count = count;
  a.x = x;
  a.n = n;
  a.d = d;
  a.sr = sr;
  a.sc = sc;
  a.mask = mask;
  a.shift = shift;
  a.rows_per_split = rows;
  a.atomic = nsplit > 1 ? 1 : 0;
  a.vec = (sc == 1 && (static_cast<unsigned long long>(sr) * esize) % 16 == 0 &&
           reinterpret_cast<std::uintptr_t>(x) % 16 == 0) ? 1 : 0;

  const dim3 grid(static_cast<unsigned int>(pairs), static_cast<unsigned int>(nsplit));
  EVA_CUDA_LAUNCH(kernel, grid, dim3(NTHREADS), stream, a);
  return cudaGetLastError();
}

}  // namespace eva_kernels
