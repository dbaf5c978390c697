// Host side of programmatic dependent launch (see common.cuh).
#pragma once

#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>

namespace adaskip {

// Whether `device` supports programmatic dependent launch (compute capability 9.0 or newer).
// Read once per device; cudaDeviceGetAttribute does not synchronize.
inline bool supports_dependent_launch(int device) {
  static int cached[64] = {};  // 0 unknown, 1 no, 2 yes
  if (device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    cached[device] = major >= 9 ? 2 : 1;
  }
  return cached[device] == 2;
}

// The number of multiprocessors of `device`, read once per device (kernels that size their grid
// to one wave ask for it on every launch).
inline int multiprocessor_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }
  if (cached[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device));
  }
  return cached[device];
}

// Launches `kernel` so that it may overlap the tail of the previous kernel on `stream`.
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), int device, dim3 grid, dim3 block, size_t smem_bytes,
                      cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = supports_dependent_launch(device) ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

}  // namespace adaskip
