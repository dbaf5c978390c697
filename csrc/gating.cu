// Device-side skip decisions: nothing here reads a value back to the host, so both ops can be
// captured in a CUDA graph and replayed with decisions that change between replays.

#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "common.cuh"
#include "ops.h"

namespace adaskip {
namespace {

// One block per token. A sequence whose gate is not SKIP returns at once; otherwise its
// residual becomes scale * residual (the compensation that stands in for the sublayer), or with
// a per-channel table row `channel` ([hidden], read with the row's vector index)
// residual[h] * (scale * channel[h]): product and multiply in fp32, rounded once.
template <typename T, int VEC>
__global__ void __launch_bounds__(1024)
skip_or_scale_kernel(T* __restrict__ residual, Rows rows, int hidden, int seq,
                     const uint8_t* __restrict__ gates, const float* __restrict__ scales,
                     const float* __restrict__ channel) {
  const int64_t token = blockIdx.x;
  const int64_t b = token / seq;
  if (gates[b] != GATE_SKIP) return;
  const float scale = scales[b];
  T* row = residual + row_offset(rows, b, token % seq);
  for (int i = threadIdx.x; i < hidden / VEC; i += blockDim.x) {
    Vec<T, VEC> v = load_vec<T, VEC>(row + i * VEC);
    if (channel != nullptr) {
      const Vec<float, VEC> c = load_vec<float, VEC>(channel + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        v.v[j] = static_cast<T>(static_cast<float>(v.v[j]) * (scale * c.v[j]));
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = static_cast<T>(static_cast<float>(v.v[j]) * scale);
    }
    store_vec<T, VEC>(row + i * VEC, v);
  }
}

// One thread per sublayer, looping over its sequences. An UNDECIDED gate whose statistics
// cover at least `window` tokens is decided once: SKIP (with the window's mean norm ratio as its
// scale) when the window's mean cosine similarity reaches beta, RUN otherwise. With `running`,
// the thread also notes whether any sequence still runs the sublayer.
__global__ void update_gates_kernel(const float* __restrict__ stats, uint8_t* __restrict__ gates,
                                    float* __restrict__ scales, int64_t sublayers, int64_t batch,
                                    float window, float beta, bool* __restrict__ running) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= sublayers) return;
  bool any_runs = false;
  for (int64_t i = s * batch; i < (s + 1) * batch; ++i) {
    uint8_t gate = gates[i];
    const float count = stats[3 * i + 2];
    if (gate == GATE_UNDECIDED && count >= window) {
      const float mean_cos = stats[3 * i] / count;
      if (mean_cos >= beta) {
        gate = GATE_SKIP;
        scales[i] = stats[3 * i + 1] / count;
      } else {
        gate = GATE_RUN;
      }
      gates[i] = gate;
    }
    any_runs |= gate != GATE_SKIP;
  }
  if (running != nullptr) running[s] = any_runs;
}

}  // namespace

void skip_or_scale(at::Tensor& residual, const at::Tensor& gates, const at::Tensor& scales,
                   int64_t sublayer, const std::optional<at::Tensor>& channel_scales) {
  const at::Device device = residual.device();
  check_cuda(residual, "residual", device);
  check_float_dtype(residual, "residual");
  const RowShape rs = row_shape(residual, "residual");
  check_gates_scales(gates, scales, device);
  ADASKIP_CHECK(gates.size(1) == rs.batch, "adaskip: 'gates' holds ", gates.size(1),
                    " sequences but 'residual' has batch ", rs.batch);
  ADASKIP_CHECK(sublayer >= 0 && sublayer < gates.size(0), "adaskip: 'sublayer' ", sublayer,
                    " is out of range for 'gates' with ", gates.size(0), " sublayers");
  if (channel_scales.has_value())
    check_channel_scales(*channel_scales, gates.size(0), rs.hidden, device);
  const int64_t tokens = rs.batch * rs.seq;
  if (tokens == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* g = gates.data_ptr<uint8_t>() + sublayer * rs.batch;
  const float* sc = scales.data_ptr<float>() + sublayer * rs.batch;
  const float* ch = channel_scales.has_value()
                        ? channel_scales->data_ptr<float>() + sublayer * rs.hidden
                        : nullptr;
  const int hidden = static_cast<int>(rs.hidden);
  const int seq = static_cast<int>(rs.seq);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "skip_or_scale", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    const bool vectorize = rs.hidden % kVec == 0 && rs.rows.stride_batch % kVec == 0 &&
                           rs.rows.stride_seq % kVec == 0 && aligned16(residual.data_ptr()) &&
                           channel_aligned(ch, kVec);
    const int threads = static_cast<int>(std::min<int64_t>(
        1024, std::max<int64_t>(32, ((rs.hidden / (vectorize ? kVec : 1)) + 31) / 32 * 32)));
    if (vectorize) {
      skip_or_scale_kernel<T, kVec><<<tokens, threads, 0, stream>>>(residual.data_ptr<T>(), rs.rows,
                                                                    hidden, seq, g, sc, ch);
    } else {
      skip_or_scale_kernel<T, 1><<<tokens, threads, 0, stream>>>(residual.data_ptr<T>(), rs.rows,
                                                                 hidden, seq, g, sc, ch);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void update_gates(const at::Tensor& stats, at::Tensor& gates, at::Tensor& scales, int64_t window,
                  double beta, const std::optional<at::Tensor>& running) {
  const at::Device device = gates.device();
  check_gates_scales(gates, scales, device);
  check_stats(stats, gates.size(1), 0, device);
  ADASKIP_CHECK(stats.size(0) == gates.size(0), "adaskip: 'stats' has ", stats.size(0),
                    " sublayers but 'gates' has ", gates.size(0));
  ADASKIP_CHECK(window >= 1, "adaskip: 'window' must be at least 1 token, got ", window);
  ADASKIP_CHECK(std::isfinite(beta) && beta >= -1.0 && beta <= 1.0,
                    "adaskip: 'beta' is a cosine-similarity threshold in [-1, 1], got ", beta);
  const int64_t sublayers = gates.size(0), batch = gates.size(1);
  if (running.has_value()) {
    check_cuda(*running, "running", device);
    ADASKIP_CHECK(running->scalar_type() == at::kBool, "adaskip: 'running' must be bool, got ",
                      running->scalar_type());
    ADASKIP_CHECK(running->dim() == 1 && running->size(0) == sublayers,
                      "adaskip: 'running' must be [num_sublayers] = [", sublayers, "], got shape ",
                      running->sizes());
    ADASKIP_CHECK(running->is_contiguous(), "adaskip: 'running' must be contiguous");
  }
  if (sublayers == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 128;
  update_gates_kernel<<<(sublayers + threads - 1) / threads, threads, 0, stream>>>(
      stats.data_ptr<float>(), gates.data_ptr<uint8_t>(), scales.data_ptr<float>(), sublayers, batch,
      static_cast<float>(window), static_cast<float>(beta),
      running.has_value() ? running->data_ptr<bool>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace adaskip
