// Plain CUDA C++ interface of the CUDA cov_update kernel (no torch headers, so nvcc alone
// compiles cov_update_cuda.cu; csrc/bindings.cpp calls the launcher with raw pointers).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace eva_kernels {

enum class XDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// In place on `stream`, for the kept rows y_r = float32(x[r, :]) - shift (r < n, mask[r]):
//   cov[i, j] += sum_r y_r[i] y_r[j]  for i <= j (upper triangle only; lower untouched)
//   colsum[j] += sum_r y_r[j]
//   *count    += #kept rows           (only when mask != nullptr; the caller fills count = n
//                                      itself when there is no mask)
// cov: (d, d) fp32 row-major contiguous; colsum: (d,) fp32; x: (n, d) with element strides
// (sr, sc), dtype `dtype`; mask: (n,) bool contiguous or nullptr; shift: (d,) fp32 contiguous
// or nullptr; count: one zero-initialised int64 (as unsigned long long) or unused.
// Masked-out rows are never read. On sm_80 and newer, bf16/fp16 input uses tensor cores (WMMA,
// fp32 accumulation): without a shift the 16-bit values as they are (products exact in fp32);
// with a shift y = float32(x) - shift as a bf16 hi/lo split, three MMAs, each product within a
// relative 3 * 2^-18 (eva_kernels.ops.cov_update.SPLIT_PRODUCT_ERROR); colsum always from the
// exact fp32 y. fp32 input, and every input below sm_80, uses an exact fp32 FMA kernel (no TF32,
// no fast-math). Loads are 128-bit when x has unit column stride and 16-byte aligned rows.
// Returns the launch status (cudaSuccess or the error).
cudaError_t cov_update_cuda_launch(float* cov, float* colsum, unsigned long long* count,
                                   const void* x, XDType dtype, int64_t n, int64_t d,
                                   int64_t sr, int64_t sc, const bool* mask, const float* shift,
                                   cudaStream_t stream);

}  // namespace eva_kernels
