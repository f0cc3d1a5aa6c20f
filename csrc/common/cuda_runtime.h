#pragma once
// Thin helpers over the (statically linked) CUDA runtime. Only compiled when DANLU_WITH_CUDA is set.
#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>

namespace danlu {

// Number of usable CUDA devices; 0 when there is no driver or no GPU (never throws).
int cuda_device_count();

inline void cuda_check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::ostringstream msg;
  msg << "danlu._C: " << what << ": " << cudaGetErrorString(err);
  throw std::runtime_error(msg.str());
}

// Makes `device` current for the runtime of this module and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace danlu
