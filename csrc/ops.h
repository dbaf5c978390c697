// Host entry points of the CUDA kernels. Schemas: registration.cpp.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace adaskip {

// gates / scales (both or neither): a sequence whose gate of `sublayer` is SKIP gets
// residual *= scale instead of residual += x (x is not read there). channel_scales (optional,
// only with gates; float32 [num_sublayers, hidden]): residual[h] *= scale * channel_scales[h].
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps,
                        const std::optional<at::Tensor>& stats, int64_t sublayer,
                        const std::optional<at::Tensor>& seq_lens,
                        const std::optional<at::Tensor>& gates,
                        const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& channel_scales);

// A sublayer skipped for every sequence: residual *= scale, x = RMSNorm(residual) * weight; x is
// only written. channel_scales (optional, float32 [hidden]): residual[h] *= scale *
// channel_scales[h] instead, the product formed in fp32.
void scale_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps,
                    double scale, const std::optional<at::Tensor>& channel_scales);

void io_similarity_stats(const at::Tensor& before, const at::Tensor& after, at::Tensor& stats,
                         int64_t sublayer, const std::optional<at::Tensor>& seq_lens);

// channel_scales (optional, float32 [num_sublayers, hidden]): as in fused_add_rms_norm.
void skip_or_scale(at::Tensor& residual, const at::Tensor& gates, const at::Tensor& scales,
                   int64_t sublayer, const std::optional<at::Tensor>& channel_scales);

// running (optional, bool [num_sublayers]): afterwards, whether any sequence's gate of each
// sublayer is not SKIP (the predicate of a CUDA-graph conditional node around that sublayer).
void update_gates(const at::Tensor& stats, at::Tensor& gates, at::Tensor& scales, int64_t window,
                  double beta, const std::optional<at::Tensor>& running);

// Gated decode GEMVs (1..8 tokens, fp16/bf16): out = x W^T, and out = silu(x Wg^T) * (x Wu^T).
void gated_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& gates,
                  int64_t sublayer, at::Tensor& out);

void gated_swiglu_up(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                     const std::optional<at::Tensor>& gates, int64_t sublayer, at::Tensor& out);

// Attention of one query token per sequence (q [batch, heads, head_dim], fp16/bf16, head_dim 64
// or 128, at most 8 query heads per KV head) over the first kv_lens[b] slots of a static cache
// [batch, kv_heads, capacity, head_dim] (the last `window` of them when window > 0), read on the
// device; out [batch, heads, head_dim]. A sequence with no keys gets zeros. num_splits: blocks per
// (sequence, KV head) over the length; 0 chooses as many as fill the GPU once.
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& kv_lens, double scale, int64_t window, at::Tensor& out,
                      int64_t num_splits);

// One decode token per sequence: q [batch, heads, head_dim] rotated in place; k [batch, kv_heads,
// head_dim] rotated and v copied into k_cache / v_cache [batch, kv_heads, capacity, head_dim] at
// slot positions[b] (int64; a position outside the cache is not written). cos, sin [batch,
// head_dim]: the rotary table at each sequence's position. fp32 / fp16 / bf16.
void rotary_kv_write(at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions);

}  // namespace adaskip
