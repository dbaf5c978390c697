// Host side of programmatic dependent launch (see common.cuh).
#pragma once

#include <atomic>

#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>

namespace adaskip {

constexpr int kCachedDevices = 64;

// A per-device value read once: `table` is the caller's static table (zero: not read yet), `read`
// returns the value (never zero). Launches from several host threads may fill a slot at once; they
// store the same value, and the slots are atomics so that this is not a data race. Devices past
// the table are read every time.
template <typename Read>
int once_per_device(std::atomic<int> (&table)[kCachedDevices], int device, Read read) {
  if (device < 0 || device >= kCachedDevices) return read();
  int v = table[device].load(std::memory_order_relaxed);
  if (v == 0) {
    v = read();
    table[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Whether `device` supports programmatic dependent launch (compute capability 9.0 or newer).
// cudaDeviceGetAttribute does not synchronize.
inline bool supports_dependent_launch(int device) {
  static std::atomic<int> cached[kCachedDevices] = {};  // 1 no, 2 yes
  return once_per_device(cached, device, [device] {
           int major = 0;
           C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
           return major >= 9 ? 2 : 1;
         }) == 2;
}

// The number of multiprocessors of `device` (kernels that size their grid to one wave ask for it
// on every launch).
inline int multiprocessor_count(int device) {
  static std::atomic<int> cached[kCachedDevices] = {};
  return once_per_device(cached, device, [device] {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  });
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
