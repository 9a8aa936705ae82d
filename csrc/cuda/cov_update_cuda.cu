// CUDA kernels of eva_kernels::cov_update (plain CUDA C++; see cov_update_cuda.cuh).
//
// One kernel launch does everything:
//   grid.x enumerates the upper-triangular pairs (bi <= bj) of 64 x 64 tiles of cov,
//   grid.y splits the n rows into chunks (so small d / large n still fills the GPU; partial
//   tiles are then combined with fp32 atomicAdd into cov).
//   Each block walks its row chunk in steps of BK = 32 rows: the step's row-validity flags
//   (row < n and mask) go to shared memory first, then the two 32 x 64 operand slices
//   x[rows, 64 bi : 64 bi + 64] and x[rows, 64 bj : ...] are loaded (strided, coalesced along
//   columns for row-major x) into shared memory, with zeros for invalid rows and columns past
//   d: masked rows are never read. On diagonal tiles (bi == bj) the slice is loaded once and
//   the block also accumulates the column sums; block (0, 0) of each chunk counts the mask.
//   * TC path (bf16/fp16, no shift): WMMA 16x16x16 tensor-core MMAs with fp32 accumulators,
//     8 warps each owning a 16 x 32 strip; accumulators are staged through shared memory and
//     added to the upper triangle of cov.
//   * FMA path (fp32 input, or any input with a shift): values widened to fp32, shift
//     subtracted, 16 x 16 threads each accumulating a 4 x 4 register tile with FMAs.
#include "cov_update_cuda.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>

namespace eva_kernels {
namespace {

constexpr int BT = 64;        // tile edge (cov tile is BT x BT)
constexpr int BK = 32;        // rows per step
constexpr int NTHREADS = 256;
constexpr int PAD16 = 8;      // smem row padding (elements) for 16-bit operands
constexpr int LDS16 = BT + PAD16;
constexpr int LDC = BT + 4;   // fp32 staging row stride

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T zero16();
template <> __device__ __forceinline__ __half zero16<__half>() { return __ushort_as_half(0); }
template <> __device__ __forceinline__ __nv_bfloat16 zero16<__nv_bfloat16>() { return __ushort_as_bfloat16(0); }

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
};

// Row-validity flags of rows [r0, r0 + BK) of this chunk; also counts them for the block-level
// count (done only by block (0, 0) of the chunk).
__device__ __forceinline__ void load_valid(const Args& a, long long r0, long long r_end, int* s_valid) {
  const int t = threadIdx.x;
  if (t < BK) {
    const long long r = r0 + t;
    s_valid[t] = (r < r_end) && (a.mask == nullptr || a.mask[r]);
  }
}

// load_valid for the k-step at r0, then a barrier: every thread sees the step's flags.
__device__ __forceinline__ void stage_rows(const Args& a, long long r0, long long r_end, int* s_valid) {
  load_valid(a, r0, r_end, s_valid);
  __syncthreads();
}

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

// What one block works on: the cov tile (bi, bj) decoded from blockIdx.x (i0, j0: its first
// row and column) and the rows [r_begin, r_end) of x of its n-split (blockIdx.y).
// Returns whether the tile is on the diagonal (bi == bj).
__device__ __forceinline__ bool block_work(const Args& a, int& bi, int& bj, long long& i0, long long& j0,
                                           long long& r_begin, long long& r_end) {
  decode_pair(static_cast<long long>(blockIdx.x), bi, bj);
  i0 = static_cast<long long>(bi) * BT;
  j0 = static_cast<long long>(bj) * BT;
  r_begin = static_cast<long long>(blockIdx.y) * a.rows_per_split;
  r_end = min(a.n, r_begin + a.rows_per_split);
  return bi == bj;
}

// Element e of one k-step's BK x BT panel: its row kk in the step (row r = r0 + kk of x), its
// column cc in the tile (column ci = i0 + cc of x for sA, cj = j0 + cc for sB), and whether
// that row is kept (s_valid, filled by stage_rows).
struct PanelElem {
  int kk, cc;
  bool kept;
  long long r, ci, cj;
};

__device__ __forceinline__ PanelElem panel_elem(int e, long long r0, long long i0, long long j0,
                                                const int* s_valid) {
  PanelElem pe;
  pe.kk = e / BT;
  pe.cc = e % BT;
  pe.kept = s_valid[pe.kk] != 0;
  pe.r = r0 + pe.kk;
  pe.ci = i0 + pe.cc;
  pe.cj = j0 + pe.cc;
  return pe;
}

// Epilogue shared by both paths: diagonal blocks add their column sums (thread tid holds column
// j0 + tid), and the blocks of tile (0, 0) count the kept rows of their n-split.
__device__ __forceinline__ void finish_block(const Args& a, int bi, int bj, long long j0, long long r_begin,
                                             long long r_end, int tid, float csum) {
  if (bi == bj && tid < BT && j0 + tid < a.d && r_begin < r_end) atomicAdd(a.colsum + j0 + tid, csum);
  if (bi == 0 && bj == 0 && a.mask != nullptr) count_rows(a, r_begin, r_end);
}

// ---------------------------------------------------------------- tensor-core path (16-bit)
template <typename T>
__global__ void __launch_bounds__(NTHREADS) cov_tc_kernel(Args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ int s_valid[BK];
  __shared__ __align__(32) T sA[BK * LDS16];
  __shared__ __align__(32) T sB[BK * LDS16];
  __shared__ __align__(32) float sC[BT * LDC];

  int bi, bj;
  long long i0, j0, r_begin, r_end;
  const bool diag = block_work(a, bi, bj, i0, j0, r_begin, r_end);
  const T* x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x, warp = tid / 32;
  const int wr = warp / 2, wc = warp % 2;  // warp strip: rows 16 wr, cols 32 wc .. + 32

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  float csum = 0.f;  // column sum of column j0 + tid (diag blocks, tid < BT)
  const T* sBp = diag ? sA : sB;

  for (long long r0 = r_begin; r0 < r_end; r0 += BK) {
    stage_rows(a, r0, r_end, s_valid);
    for (int e = tid; e < BK * BT; e += NTHREADS) {
      const PanelElem pe = panel_elem(e, r0, i0, j0, s_valid);
      sA[pe.kk * LDS16 + pe.cc] = (pe.kept && pe.ci < a.d) ? x[pe.r * a.sr + pe.ci * a.sc] : zero16<T>();
      if (!diag) sB[pe.kk * LDS16 + pe.cc] = (pe.kept && pe.cj < a.d) ? x[pe.r * a.sr + pe.cj * a.sc] : zero16<T>();
    }
    __syncthreads();
    if (diag && tid < BT) {
      for (int kk = 0; kk < BK; ++kk) csum += to_float(sA[kk * LDS16 + tid]);
    }
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, sA + ks * LDS16 + wr * 16, LDS16);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, sBp + ks * LDS16 + wc * 32 + f * 16, LDS16);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();  // before the next step overwrites sA/sB/s_valid
  }

#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(sC + (wr * 16) * LDC + wc * 32 + f * 16, acc[f], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BT * BT; e += NTHREADS) {
    const int rr = e / BT, cc = e % BT;
    add_to_cov(a, i0 + rr, j0 + cc, sC[rr * LDC + cc]);
  }
  finish_block(a, bi, bj, j0, r_begin, r_end, tid, csum);
#else
  __trap();  // unreachable: below sm_80 the launcher picks cov_fma_kernel
#endif
}

// ---------------------------------------------------------------- exact fp32 FMA path
// float32(x[r, c]) - shift[c] for a kept row and an in-range column, else 0 (never read).
template <typename T>
__device__ __forceinline__ float shifted_or_zero(const Args& a, const T* x, bool kept, long long r, long long c) {
  return (kept && c < a.d) ? to_float(x[r * a.sr + c * a.sc]) - (a.shift ? a.shift[c] : 0.f) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(NTHREADS) cov_fma_kernel(Args a) {
  __shared__ __align__(16) float sA[BK * BT];
  __shared__ __align__(16) float sB[BK * BT];
  __shared__ int s_valid[BK];

  const T* x = static_cast<const T*>(a.x);
  int bi, bj;
  long long i0, j0, r_begin, r_end;
  const bool diag = block_work(a, bi, bj, i0, j0, r_begin, r_end);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;

  float csum = 0.f;  // column sum of column j0 + tid (diag blocks, tid < BT)
  float acc[4][4];
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[p][q] = 0.f;
  const float* sBp = diag ? sA : sB;

  for (long long r0 = r_begin; r0 < r_end; r0 += BK) {
    stage_rows(a, r0, r_end, s_valid);
    for (int e = tid; e < BK * BT; e += NTHREADS) {
      const PanelElem pe = panel_elem(e, r0, i0, j0, s_valid);
      sA[pe.kk * BT + pe.cc] = shifted_or_zero(a, x, pe.kept, pe.r, pe.ci);
      if (!diag) sB[pe.kk * BT + pe.cc] = shifted_or_zero(a, x, pe.kept, pe.r, pe.cj);
    }
    __syncthreads();
    if (diag && tid < BT) {
      for (int kk = 0; kk < BK; ++kk) csum += sA[kk * BT + tid];
    }
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(sA + kk * BT + ty * 4);
      const float4 bv = *reinterpret_cast<const float4*>(sBp + kk * BT + tx * 4);
      const float ar[4] = {av.x, av.y, av.z, av.w};
      const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = fmaf(ar[p], br[q], acc[p][q]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) add_to_cov(a, i0 + ty * 4 + p, j0 + tx * 4 + q, acc[p][q]);
  finish_block(a, bi, bj, j0, r_begin, r_end, tid, csum);
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

  // The kernel: tensor cores for 16-bit input without a shift on sm_80+ (WMMA bf16 needs sm_80);
  // the exact fp32 FMA kernel otherwise, which also serves GPUs below sm_80 (no trap there).
  const bool tc = (shift == nullptr) && dtype != XDType::kFloat32 && major >= 8;
  void (*kernel)(Args) = nullptr;
  switch (dtype) {
    case XDType::kFloat32: kernel = cov_fma_kernel<float>; break;
    case XDType::kFloat16: kernel = tc ? cov_tc_kernel<__half> : cov_fma_kernel<__half>; break;
    case XDType::kBFloat16: kernel = tc ? cov_tc_kernel<__nv_bfloat16> : cov_fma_kernel<__nv_bfloat16>; break;
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

  const dim3 grid(static_cast<unsigned int>(pairs), static_cast<unsigned int>(nsplit));
  kernel<<<grid, dim3(NTHREADS), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace eva_kernels
