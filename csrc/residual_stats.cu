// Fused residual add + RMSNorm with IO-similarity statistics, and the statistics alone.
//
// One block per token. For a sublayer with input residual a and output x:
//   b = a + x                      (rounded to the storage dtype, as torch's a + x is)
//   residual <- b,  x <- weight * (b / rms(b))   (HF LlamaRMSNorm rounding order)
// and, when statistics are on, cos(a, b) and |b| / |a| of the token, from one fused block
// reduction of (a.a, b.b, a.b); b.b is the same sum the norm needs.
//
// With gates (online decode learning), a sequence whose gate of this sublayer says SKIP takes
// b = a * scale instead: the sublayer was not run, x holds nothing (it is not read), and the
// compensation is folded into the same pass, so a gated-off FFN costs no extra kernel. A
// sublayer that a plan skips for every sequence takes the same path with one host scale
// (scale_rms_norm): its compensation and the next norm are one launch. With a per-channel table
// (channel_scales), a skipped row takes b[h] = a[h] * (scale * channel_scales[h]) instead: the
// product formed in fp32, the multiply in fp32, rounded once to the storage dtype; the table is
// read with the row's vector index.
//
// Statistics are deterministic: each token's values go to a scratch buffer and a second kernel
// sums each sequence's tokens in a fixed order (no float atomics). With one token per sequence
// (decode) the token block adds its values directly: it is the only writer of its slot.

#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "common.cuh"
#include "launch.h"
#include "ops.h"

namespace adaskip {
namespace {

struct StatsArgs {
  const int* seq_lens;  // [batch] valid lengths, or null: every token counts
  float* token_stats;   // [tokens, 2] (cos, ratio) scratch, or null: add straight into `slot`
  float* slot;          // stats[sublayer] : [batch, 3]
};

struct GateArgs {
  const uint8_t* gates;  // gates[sublayer] : [batch], or null: every sequence ran the sublayer
  const float* scales;   // scales[sublayer] : [batch]
  bool skip_all;         // every sequence skips the sublayer, with scale_all (gates unused)
  float scale_all;
  const float* channel_scales;  // [hidden] table row of this sublayer, or null: scale alone
};

// Per-token cosine and norm ratio from the three sums; both are 0 for a zero `a`.
__device__ __forceinline__ void token_similarity(float aa, float bb, float ab, float& cos,
                                                 float& ratio) {
  const float na = sqrtf(aa), nb = sqrtf(bb);
  cos = ab / (fmaxf(na, kNormFloor) * fmaxf(nb, kNormFloor));
  ratio = nb / fmaxf(na, kNormFloor);
}

// ADD_NORM: `first` is the sublayer output x (overwritten with the normalized b), `second` the
// residual a (overwritten with b). Otherwise: `first` is a, `second` is b, both only read.
template <typename T, int VEC, bool ADD_NORM, bool STATS>
__global__ void __launch_bounds__(1024)
residual_rows_kernel(T* __restrict__ first, Rows first_rows, T* __restrict__ second,
                     Rows second_rows, const T* __restrict__ weight, int hidden, int seq,
                     float eps, StatsArgs st, GateArgs gate) {
  const int64_t token = blockIdx.x;
  const int64_t b_idx = token / seq;
  const int64_t s_idx = token % seq;
  T* first_row = first + row_offset(first_rows, b_idx, s_idx);
  T* second_row = second + row_offset(second_rows, b_idx, s_idx);
  const int num_vec = hidden / VEC;
  // Uniform per block: one token belongs to one sequence.
  const bool skipped =
      ADD_NORM && (gate.skip_all || (gate.gates != nullptr && gate.gates[b_idx] == GATE_SKIP));
  const float scale = !skipped ? 1.f : gate.skip_all ? gate.scale_all : gate.scales[b_idx];
  const float* channel = skipped ? gate.channel_scales : nullptr;  // uniform per block too

  float sums[3] = {0.f, 0.f, 0.f};  // a.a, b.b, a.b
  for (int i = threadIdx.x; i < num_vec; i += blockDim.x) {
    Vec<T, VEC> fv;
    if (!skipped) fv = load_vec<T, VEC>(first_row + i * VEC);
    Vec<T, VEC> sv = load_vec<T, VEC>(second_row + i * VEC);
    Vec<float, VEC> cv;
    if (channel != nullptr) cv = load_vec<float, VEC>(channel + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float a, b;
      if constexpr (ADD_NORM) {
        a = static_cast<float>(sv.v[j]);
        const float factor = channel != nullptr ? scale * cv.v[j] : scale;
        // Rounded like torch's a + x, and like skip_or_scale's a * scale (* channel).
        sv.v[j] = static_cast<T>(skipped ? a * factor : a + static_cast<float>(fv.v[j]));
        b = static_cast<float>(sv.v[j]);
      } else {
        a = static_cast<float>(fv.v[j]);
        b = static_cast<float>(sv.v[j]);
      }
      sums[1] += b * b;
      if constexpr (STATS) {
        sums[0] += a * a;
        sums[2] += a * b;
      }
    }
    if constexpr (ADD_NORM) store_vec<T, VEC>(second_row + i * VEC, sv);
  }

  if constexpr (STATS) {
    block_sum<3>(sums);
  } else {
    float bb[1] = {sums[1]};
    block_sum<1>(bb);
    sums[1] = bb[0];
  }

  if constexpr (STATS) {
    if (threadIdx.x == 0) {
      float cos, ratio;
      token_similarity(sums[0], sums[1], sums[2], cos, ratio);
      const bool valid = st.seq_lens == nullptr || s_idx < st.seq_lens[b_idx];
      if (st.token_stats != nullptr) {
        reinterpret_cast<float2*>(st.token_stats)[token] =
            valid ? make_float2(cos, ratio) : make_float2(0.f, 0.f);
      } else if (valid) {
        float* out = st.slot + 3 * b_idx;
        out[0] += cos;
        out[1] += ratio;
        out[2] += 1.f;
      }
    }
    allow_dependent_launch();
  }

  if constexpr (ADD_NORM) {
    const float inv_rms = rsqrtf(sums[1] / static_cast<float>(hidden) + eps);
    // Each thread re-reads the b values it wrote itself (served from L2 / L1).
    for (int i = threadIdx.x; i < num_vec; i += blockDim.x) {
      const Vec<T, VEC> bv = load_vec<T, VEC>(second_row + i * VEC);
      const Vec<T, VEC> wv = load_vec<T, VEC>(weight + i * VEC);
      Vec<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const T normed = static_cast<T>(static_cast<float>(bv.v[j]) * inv_rms);
        out.v[j] = static_cast<T>(static_cast<float>(normed) * static_cast<float>(wv.v[j]));
      }
      store_vec<T, VEC>(first_row + i * VEC, out);
    }
  }
}

// One block per sequence: adds the sequence's valid token values, in a fixed order, to its slot.
// Each thread issues kReduceUnroll loads before adding any: a plain strided loop would be one
// dependent memory round trip per step, and this kernel sits on the critical path of the op.
constexpr int kReduceThreads = 1024;
constexpr int kReduceUnroll = 8;

__global__ void __launch_bounds__(kReduceThreads)
reduce_token_stats_kernel(const float* __restrict__ token_stats, int seq,
                          const int* __restrict__ seq_lens, float* __restrict__ slot) {
  wait_for_primary_grid();
  const int b = blockIdx.x;
  const int len = seq_lens == nullptr ? seq : min(max(seq_lens[b], 0), seq);
  const float2* ts = reinterpret_cast<const float2*>(token_stats) + static_cast<int64_t>(b) * seq;
  float sums[2] = {0.f, 0.f};
  for (int base = 0; base < len; base += kReduceThreads * kReduceUnroll) {
    float2 v[kReduceUnroll];
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      const int s = base + u * kReduceThreads + threadIdx.x;
      v[u] = s < len ? ts[s] : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      sums[0] += v[u].x;
      sums[1] += v[u].y;
    }
  }
  block_sum<2>(sums);
  if (threadIdx.x == 0) {
    slot[3 * b] += sums[0];
    slot[3 * b + 1] += sums[1];
    slot[3 * b + 2] += static_cast<float>(len);
  }
}

int threads_for(int64_t num_vec) {
  int64_t t = ((num_vec + 31) / 32) * 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(t, 32), 1024));
}

template <typename T, bool ADD_NORM, bool STATS>
void launch_rows(T* first, const RowShape& fs, T* second, const RowShape& ss, const T* weight,
                 float eps, const StatsArgs& st, const GateArgs& gate, bool vectorize,
                 cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t tokens = fs.batch * fs.seq;
  const int hidden = static_cast<int>(fs.hidden);
  const int seq = static_cast<int>(fs.seq);
  if (vectorize) {
    residual_rows_kernel<T, kVec, ADD_NORM, STATS>
        <<<tokens, threads_for(hidden / kVec), 0, stream>>>(first, fs.rows, second, ss.rows,
                                                           weight, hidden, seq, eps, st, gate);
  } else {
    residual_rows_kernel<T, 1, ADD_NORM, STATS><<<tokens, threads_for(hidden), 0, stream>>>(
        first, fs.rows, second, ss.rows, weight, hidden, seq, eps, st, gate);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte accesses need every row start 16-byte aligned: hidden, strides and base pointers;
// a per-channel table row, VEC floats at a time, aligned to VEC floats.
bool can_vectorize(const at::Tensor& a, const RowShape& ra, const at::Tensor& b,
                   const RowShape& rb, const at::Tensor* weight, const float* channel) {
  const int64_t vec = 16 / a.element_size();
  auto ok_rows = [vec](const RowShape& r) {
    return r.rows.stride_batch % vec == 0 && r.rows.stride_seq % vec == 0;
  };
  return ra.hidden % vec == 0 && ok_rows(ra) && ok_rows(rb) && aligned16(a.data_ptr()) &&
         aligned16(b.data_ptr()) && (weight == nullptr || aligned16(weight->data_ptr())) &&
         channel_aligned(channel, vec);
}

// Shared body of both ops: checks, scratch, dispatch on dtype / vector width / statistics.
template <bool ADD_NORM>
void run_rows(at::Tensor& first, const char* first_name, at::Tensor& second,
              const char* second_name, const at::Tensor* weight, double eps,
              const std::optional<at::Tensor>& stats, int64_t sublayer,
              const std::optional<at::Tensor>& seq_lens,
              const std::optional<at::Tensor>& gates = std::nullopt,
              const std::optional<at::Tensor>& scales = std::nullopt,
              const std::optional<double> skip_scale = std::nullopt,
              const std::optional<at::Tensor>& channel_scales = std::nullopt) {
  const at::Device device = first.device();
  check_cuda(first, first_name, device);
  check_cuda(second, second_name, device);
  check_float_dtype(first, first_name);
  ADASKIP_CHECK(second.scalar_type() == first.scalar_type(), "adaskip: '", second_name,
                    "' has dtype ", second.scalar_type(), " but '", first_name, "' has ",
                    first.scalar_type());
  const RowShape fs = row_shape(first, first_name);
  const RowShape ss = row_shape(second, second_name);
  ADASKIP_CHECK(first.sizes() == second.sizes(), "adaskip: '", first_name, "' has shape ",
                    first.sizes(), " but '", second_name, "' has shape ", second.sizes());
  if (weight != nullptr) {
    check_cuda(*weight, "weight", device);
    ADASKIP_CHECK(weight->scalar_type() == first.scalar_type(), "adaskip: 'weight' has dtype ",
                      weight->scalar_type(), " but '", first_name, "' has ", first.scalar_type());
    ADASKIP_CHECK(weight->dim() == 1 && weight->size(0) == fs.hidden,
                      "adaskip: 'weight' must be [hidden] = [", fs.hidden, "], got shape ",
                      weight->sizes());
    ADASKIP_CHECK(weight->is_contiguous(), "adaskip: 'weight' must be contiguous");
    ADASKIP_CHECK(eps > 0.0, "adaskip: 'eps' must be positive, got ", eps);
  }
  if constexpr (ADD_NORM) {
    ADASKIP_CHECK(!first.is_same(second) && first.data_ptr() != second.data_ptr(),
                      "adaskip: 'x' and 'residual' must be different tensors");
  }
  ADASKIP_CHECK(fs.hidden <= (int64_t{1} << 24), "adaskip: hidden size ", fs.hidden,
                    " is too large");
  if (stats.has_value()) check_stats(*stats, fs.batch, sublayer, device);
  ADASKIP_CHECK(gates.has_value() == scales.has_value(),
                    "adaskip: pass 'gates' and 'scales' together");
  GateArgs gate{nullptr, nullptr, skip_scale.has_value(),
                static_cast<float>(skip_scale.value_or(1.0)), nullptr};
  if (skip_scale.has_value()) {
    ADASKIP_CHECK(std::isfinite(*skip_scale), "adaskip: 'scale' must be finite, got ",
                      *skip_scale);
    ADASKIP_CHECK(!gates.has_value(), "adaskip: a uniform skip scale takes no gates");
  }
  if (gates.has_value()) {
    check_gates_scales(*gates, *scales, device);
    ADASKIP_CHECK(gates->size(1) == fs.batch, "adaskip: 'gates' holds ", gates->size(1),
                      " sequences but '", second_name, "' has batch ", fs.batch);
    ADASKIP_CHECK(sublayer >= 0 && sublayer < gates->size(0), "adaskip: 'sublayer' ", sublayer,
                      " is out of range for 'gates' with ", gates->size(0), " sublayers");
    gate.gates = gates->data_ptr<uint8_t>() + sublayer * fs.batch;
    gate.scales = scales->data_ptr<float>() + sublayer * fs.batch;
  }
  if (channel_scales.has_value()) {
    if (skip_scale.has_value()) {
      check_channel_scales(*channel_scales, -1, fs.hidden, device);
      gate.channel_scales = channel_scales->data_ptr<float>();
    } else {
      ADASKIP_CHECK(gates.has_value(), "adaskip: 'channel_scales' is only allowed together ",
                        "with 'gates' and 'scales'");
      check_channel_scales(*channel_scales, gates->size(0), fs.hidden, device);
      gate.channel_scales = channel_scales->data_ptr<float>() + sublayer * fs.hidden;
    }
  }
  const std::optional<at::Tensor> lens = prepare_seq_lens(seq_lens, fs.batch, device);

  const int64_t tokens = fs.batch * fs.seq;
  if (tokens == 0) return;
  ADASKIP_CHECK(fs.seq <= INT32_MAX, "adaskip: sequence length ", fs.seq, " is too large");

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  StatsArgs st{nullptr, nullptr, nullptr};
  at::Tensor scratch;
  if (stats.has_value()) {
    st.seq_lens = lens.has_value() ? lens->data_ptr<int>() : nullptr;
    st.slot = stats->data_ptr<float>() + sublayer * fs.batch * 3;
    if (fs.seq > 1) {
      scratch = at::empty({tokens, 2}, first.options().dtype(at::kFloat));
      st.token_stats = scratch.data_ptr<float>();
    }
  }
  const bool vectorize = can_vectorize(first, fs, second, ss, weight, gate.channel_scales);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "adaskip_rows", [&] {
    using T = scalar_t;
    T* f = first.data_ptr<T>();
    T* s = second.data_ptr<T>();
    const T* w = weight != nullptr ? weight->data_ptr<T>() : nullptr;
    if (stats.has_value()) {
      launch_rows<T, ADD_NORM, true>(f, fs, s, ss, w, static_cast<float>(eps), st, gate, vectorize,
                                     stream);
    } else if constexpr (ADD_NORM) {  // the no-statistics variant, to measure what they cost
      launch_rows<T, true, false>(f, fs, s, ss, w, static_cast<float>(eps), st, gate, vectorize,
                                  stream);
    }
  });

  if (st.token_stats != nullptr) {
    launch_dependent(reduce_token_stats_kernel, device.index(), dim3(fs.batch), dim3(kReduceThreads), 0,
                     stream, static_cast<const float*>(st.token_stats), static_cast<int>(fs.seq),
                     static_cast<const int*>(st.seq_lens), st.slot);
  }
}

}  // namespace

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps,
                        const std::optional<at::Tensor>& stats, int64_t sublayer,
                        const std::optional<at::Tensor>& seq_lens,
                        const std::optional<at::Tensor>& gates,
                        const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& channel_scales) {
  run_rows<true>(x, "x", residual, "residual", &weight, eps, stats, sublayer, seq_lens, gates,
                 scales, std::nullopt, channel_scales);
}

void scale_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps,
                    double scale, const std::optional<at::Tensor>& channel_scales) {
  run_rows<true>(x, "x", residual, "residual", &weight, eps, std::nullopt, 0, std::nullopt,
                 std::nullopt, std::nullopt, scale, channel_scales);
}

void io_similarity_stats(const at::Tensor& before, const at::Tensor& after, at::Tensor& stats,
                         int64_t sublayer, const std::optional<at::Tensor>& seq_lens) {
  // The kernel only reads both inputs in this mode.
  at::Tensor a = before, b = after;
  run_rows<false>(a, "before", b, "after", nullptr, 1.0, std::optional<at::Tensor>(stats), sublayer,
                  seq_lens);
}

}  // namespace adaskip
