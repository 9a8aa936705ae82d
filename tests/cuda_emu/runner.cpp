// C entry point of the emulated CUDA cov_update kernel (see include/cuda_emu.h), for ctypes.
#include <cstring>

#include "cuda/cov_update_cuda.cuh"

extern "C" {

// Runs cov_update_cuda_launch on an emulated GPU with `sms` SMs of compute capability `major`
// (`blocks_per_sm` resident blocks per SM, as the occupancy query reports). Returns the launch
// status (0 = success); on failure `message` holds why (alignment, ...).
int eva_emu_cov_update(float* cov, float* colsum, unsigned long long* count, const void* x, int dtype,
                       long long n, long long d, long long sr, long long sc, const bool* mask,
                       const float* shift, int sms, int major, int blocks_per_sm, char* message,
                       int message_len) {
  eva_emu::sms = sms;
  eva_emu::major = major;
  eva_emu::blocks_per_sm = blocks_per_sm;
  eva_emu::failure.clear();
  const cudaError_t err = eva_kernels::cov_update_cuda_launch(
      cov, colsum, count, x, static_cast<eva_kernels::XDType>(dtype), n, d, sr, sc, mask, shift, nullptr);
  if (message_len > 0) {
    std::strncpy(message, eva_emu::failure.c_str(), static_cast<size_t>(message_len - 1));
    message[message_len - 1] = '\0';
  }
  return static_cast<int>(err);
}

// 128-bit loads done since the last reset (which path the kernel took).
long long eva_emu_vector_loads(int reset) {
  const long long v = eva_emu::vector_loads.load();
  if (reset) eva_emu::vector_loads = 0;
  return v;
}
}
