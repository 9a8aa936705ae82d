// Torch bindings of the C++/CUDA backend: adds compiled kernels to the one op
//   eva_kernels::cov_update(Tensor(a!) cov, Tensor(b!) colsum, Tensor x, Tensor? mask,
//                           Tensor? shift) -> Tensor
// whose schema, fake and default (torch) kernel are declared in Python
// (eva_kernels/ops/cov_update.py). CPU kernel always; CUDA kernel when built with
// EVA_WITH_CUDA. Importing the Python module eva_kernels._C performs the registration.
// How to add a kernel: csrc/README.md.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/cov_update_cpu.h"

#ifdef EVA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cov_update_cuda.cuh"
#endif

namespace eva_kernels {
namespace {

void check_args(const at::Tensor& cov, const at::Tensor& colsum, const at::Tensor& x,
                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(x.dim() == 2, "cov_update: x must be 2-D (n, d), got ", x.sizes());
  const int64_t n = x.size(0), d = x.size(1);
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
              "cov_update: x must be float32, float16 or bfloat16, got ", xt);
  TORCH_CHECK(cov.dim() == 2 && cov.size(0) == d && cov.size(1) == d && cov.scalar_type() == at::kFloat &&
                  cov.is_contiguous(),
              "cov_update: cov must be a contiguous float32 (", d, ", ", d, ") tensor, got ",
              cov.scalar_type(), " ", cov.sizes());
  TORCH_CHECK(colsum.dim() == 1 && colsum.size(0) == d && colsum.scalar_type() == at::kFloat &&
                  colsum.is_contiguous(),
              "cov_update: colsum must be a contiguous float32 (", d, ",) tensor, got ",
              colsum.scalar_type(), " ", colsum.sizes());
  TORCH_CHECK(cov.device() == x.device() && colsum.device() == x.device(),
              "cov_update: cov, colsum and x must be on one device");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == n && mask->scalar_type() == at::kBool &&
                    mask->device() == x.device(),
                "cov_update: mask must be a bool (", n, ",) tensor on x's device");
  }
  if (shift.has_value()) {
    TORCH_CHECK(shift->dim() == 1 && shift->size(0) == d && shift->scalar_type() == at::kFloat &&
                    shift->device() == x.device(),
                "cov_update: shift must be a float32 (", d, ",) tensor on x's device");
  }
}

at::Tensor cov_update_cpu_kernel(at::Tensor& cov, at::Tensor& colsum, const at::Tensor& x,
                              const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& shift) {
  check_args(cov, colsum, x, mask, shift);
  const int64_t count = cov_update_cpu(cov, colsum, x, mask, shift);
  return at::full({}, count, x.options().dtype(at::kLong));
}

#ifdef EVA_WITH_CUDA
at::Tensor cov_update_cuda_kernel(at::Tensor& cov, at::Tensor& colsum, const at::Tensor& x,
                               const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& shift) {
  check_args(cov, colsum, x, mask, shift);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor count;
  at::Tensor m, s;
  if (mask.has_value()) {
    m = mask->contiguous();
    count = at::zeros({}, x.options().dtype(at::kLong));
  } else {
    count = at::full({}, n, x.options().dtype(at::kLong));
  }
  if (shift.has_value()) s = shift->contiguous();
  XDType dt = XDType::kFloat32;
  if (x.scalar_type() == at::kHalf) dt = XDType::kFloat16;
  if (x.scalar_type() == at::kBFloat16) dt = XDType::kBFloat16;
  const cudaError_t err = cov_update_cuda_launch(
      cov.data_ptr<float>(), colsum.data_ptr<float>(),
      m.defined() ? reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()) : nullptr,
      x.data_ptr(), dt, n, d, x.stride(0), x.stride(1), m.defined() ? m.data_ptr<bool>() : nullptr,
      s.defined() ? s.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "cov_update: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return count;
}
#endif

}  // namespace
}  // namespace eva_kernels

TORCH_LIBRARY_IMPL(eva_kernels, CPU, m) { m.impl("cov_update", &eva_kernels::cov_update_cpu_kernel); }

#ifdef EVA_WITH_CUDA
TORCH_LIBRARY_IMPL(eva_kernels, CUDA, m) { m.impl("cov_update", &eva_kernels::cov_update_cuda_kernel); }
#endif

// ---- Python module eva_kernels._C: importing it loads the library and registers the op.
extern "C" {

static PyObject* eva_has_cuda(PyObject*, PyObject*) {
#ifdef EVA_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject* eva_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(eva_kernels::cov_update_cpu_isa());
}

static PyMethodDef eva_methods[] = {
    {"has_cuda", eva_has_cuda, METH_NOARGS, "True when the extension was built with the CUDA kernel."},
    {"cpu_isa", eva_cpu_isa, METH_NOARGS, "Micro-kernel the CPU path was compiled with."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef eva_module = {PyModuleDef_HEAD_INIT, "_C",
                                        "Compiled C++/CUDA backend of eva_kernels (registers "
                                        "the compiled kernels of torch.ops.eva_kernels.cov_update).",
                                        -1, eva_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&eva_module); }

}  // extern "C"
