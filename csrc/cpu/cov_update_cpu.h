// C++ CPU implementation of eva_kernels::cov_update (the math: eva_kernels/ops/cov_update.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

namespace eva_kernels {

// In place, for the kept rows y_i = float32(x_i) - shift of x (n, d):
//   cov (upper triangle, row <= col) += sum_i y_i^T y_i ;  colsum += sum_i y_i
// Returns the number of kept rows. Inputs are expected validated (see bindings.cpp):
// cov (d, d) float32 contiguous, colsum (d,) float32 contiguous, x (n, d) float32/float16/
// bfloat16 with any strides, mask (n,) bool or none, shift (d,) float32 or none; all on CPU.
int64_t cov_update_cpu(at::Tensor& cov, at::Tensor& colsum, const at::Tensor& x,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& shift);

// Which micro-kernel the CPU path runs in this process ("avx2-fma" or "generic"), chosen at
// run time by CPU feature detection (EVA_CPU_ISA=generic forces "generic").
const char* cov_update_cpu_isa();

}  // namespace eva_kernels
