// A CPU emulation of the slice of CUDA that csrc/cuda/*.cu uses, for tests on machines without a
// GPU (tests/backends/test_cuda_emulated.py). The .cu file is compiled as C++ with g++ against
// this header (the fake <cuda_runtime.h>, <cuda_bf16.h>, <cuda_fp16.h> and <mma.h> next to it
// include it) and run: every block of a launch in turn, its threads as std::threads.
//
// What it models, and so what the tests can catch:
//   * threads and barriers: one std::thread per CUDA thread of a block, __syncthreads() as a
//     std::barrier, __shared__ variables as function statics (shared by the block's threads;
//     blocks run one after another). A missing barrier shows as a data race (wrong results,
//     or ThreadSanitizer reports with EVA_EMU_TSAN=1).
//   * memory: __ldg of 128-bit vectors and WMMA loads/stores check the alignment the hardware
//     requires (16 B; 32 B and ldm multiple of 16 B for WMMA) and fail the launch otherwise;
//     128-bit loads are counted (eva_emu_vector_loads), so tests can see which path ran.
//   * WMMA 16x16x16: warp-collective fragments emulated per thread (each holds the whole
//     16 x 16 tile; a store is done by lane 0 only), products of 16-bit values exact in fp32
//     and fp32 accumulation, as on tensor cores.
//   * bf16 / fp16 conversions with the rounding of the CUDA intrinsics (nearest even).
//   * device attributes (SM count, compute capability) and the occupancy query: set by the test.
// What it does not model: timing, memory coalescing, bank conflicts, register limits.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned int x, y, z; };
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorLaunchFailure = 719;
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 };

namespace eva_emu {
inline int sms = 4, major = 9, blocks_per_sm = 2;
inline thread_local uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
inline std::barrier<>* block_barrier = nullptr;
inline std::atomic<long long> vector_loads{0};
inline std::mutex fail_mutex;
inline std::string failure;  // first failure of the current launch ("" = none)

inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(fail_mutex);
  if (failure.empty()) failure = what;
}
inline void check_aligned(const void* p, std::uintptr_t align, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % align != 0)
    fail(std::string(what) + ": address not " + std::to_string(align) + "-byte aligned");
}

// Runs every block of the grid in turn (y outer, x inner), each with block.x threads.
template <typename Arg>
void launch(void (*kernel)(Arg), dim3 grid, dim3 block, const Arg& arg) {
  const unsigned int nt = block.x;
  for (unsigned int by = 0; by < grid.y; ++by) {
    for (unsigned int bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(nt);
      block_barrier = &bar;
      std::vector<std::thread> threads;
      threads.reserve(nt);
      for (unsigned int t = 0; t < nt; ++t) {
        threads.emplace_back([=] {
          thread_idx = uint3{t, 0, 0};
          block_idx = uint3{bx, by, 0};
          kernel(arg);
        });
      }
      for (auto& th : threads) th.join();
      block_barrier = nullptr;
    }
  }
}
}  // namespace eva_emu

#define threadIdx (eva_emu::thread_idx)
#define blockIdx (eva_emu::block_idx)
#define EVA_CUDA_LAUNCH(kernel, grid, block, stream, arg) eva_emu::launch(kernel, grid, block, arg)

inline void __syncthreads() { eva_emu::block_barrier->arrive_and_wait(); }
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "cuda_emu: __trap()\n");
  std::abort();
}
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }

inline cudaError_t cudaGetDevice(int* dev) { *dev = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? eva_emu::sms : eva_emu::major;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = eva_emu::blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  return eva_emu::failure.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}
inline const char* cudaGetErrorString(cudaError_t) { return eva_emu::failure.c_str(); }

// ------------------------------------------------------------------ atomics, loads, bits
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  return std::atomic_ref<unsigned int>(*p).fetch_add(v);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
namespace eva_emu {
template <typename V>
inline V ldg128(const V* p, const char* what) {  // a 128-bit read-only load: aligned, counted
  static_assert(sizeof(V) == 16, "128-bit vectors only");
  check_aligned(p, 16, what);
  ++vector_loads;
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
}  // namespace eva_emu
inline uint4 __ldg(const uint4* p) { return eva_emu::ldg128(p, "__ldg(uint4)"); }
inline float4 __ldg(const float4* p) { return eva_emu::ldg128(p, "__ldg(float4)"); }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ------------------------------------------------------------------ 16-bit types
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };

inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned int>(b.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  unsigned int u = __float_as_uint(v);
  if (std::isnan(v)) return __nv_bfloat16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline float emu_to_float(__half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float emu_to_float(float v) { return v; }

// ------------------------------------------------------------------ WMMA 16x16x16
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu models 16x16x16 WMMA only");
  float v[16 * 16];  // element (i, j) at v[16 i + j]: the whole tile, in every lane
};

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned int ldm) {
  eva_emu::check_aligned(p, 32, "wmma::load_matrix_sync");
  if ((ldm * sizeof(T)) % 16 != 0) eva_emu::fail("wmma::load_matrix_sync: ldm not a multiple of 16 bytes");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.v[16 * i + j] = emu_to_float(std::is_same<Layout, row_major>::value ? p[i * ldm + j] : p[i + j * ldm]);
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (float& e : f.v) e = value;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[16 * i + j];
      for (int k = 0; k < 16; ++k) s += a.v[16 * i + k] * b.v[16 * k + j];  // exact products
      out[16 * i + j] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned int ldm,
                              layout_t layout) {
  eva_emu::check_aligned(p, 32, "wmma::store_matrix_sync");
  if ((ldm * sizeof(float)) % 16 != 0) eva_emu::fail("wmma::store_matrix_sync: ldm not a multiple of 16 bytes");
  if (threadIdx.x % 32 != 0) return;  // the warp's store, done once
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      p[layout == mem_row_major ? i * ldm + j : i + j * ldm] = f.v[16 * i + j];
}
}  // namespace wmma
}  // namespace nvcuda
