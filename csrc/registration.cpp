// The one place where the adaskip operator schemas live. CUDA kernels are registered here;
// adaskip/ops/__init__.py registers the pure-PyTorch reference as the CPU kernel and the fake
// (meta) implementations. (a!) marks an argument the op writes in place.

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(adaskip, m) {
  m.def(
      "fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, "
      "Tensor(c!)? stats=None, int sublayer=0, Tensor? seq_lens=None, Tensor? gates=None, "
      "Tensor? scales=None, Tensor? channel_scales=None) -> ()");
  m.def(
      "scale_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, float scale, "
      "Tensor? channel_scales=None) -> ()");
  m.def(
      "io_similarity_stats(Tensor before, Tensor after, Tensor(a!) stats, int sublayer, "
      "Tensor? seq_lens=None) -> ()");
  m.def(
      "skip_or_scale(Tensor(a!) residual, Tensor gates, Tensor scales, int sublayer, "
      "Tensor? channel_scales=None) -> ()");
  m.def(
      "update_gates(Tensor stats, Tensor(a!) gates, Tensor(b!) scales, int window, float beta, "
      "Tensor(c!)? running=None) -> ()");
  m.def(
      "gated_linear(Tensor x, Tensor weight, Tensor? gates, int sublayer, Tensor(a!) out) -> ()");
  m.def(
      "gated_swiglu_up(Tensor x, Tensor w_gate, Tensor w_up, Tensor? gates, int sublayer, "
      "Tensor(a!) out) -> ()");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_lens, float scale, "
      "int window, Tensor(a!) out, int num_splits=0) -> ()");
  m.def(
      "rotary_kv_write(Tensor(a!) q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, Tensor positions) -> ()");
}

TORCH_LIBRARY_IMPL(adaskip, CUDA, m) {
  m.impl("fused_add_rms_norm", &adaskip::fused_add_rms_norm);
  m.impl("scale_rms_norm", &adaskip::scale_rms_norm);
  m.impl("io_similarity_stats", &adaskip::io_similarity_stats);
  m.impl("skip_or_scale", &adaskip::skip_or_scale);
  m.impl("update_gates", &adaskip::update_gates);
  m.impl("gated_linear", &adaskip::gated_linear);
  m.impl("gated_swiglu_up", &adaskip::gated_swiglu_up);
  m.impl("decode_attention", &adaskip::decode_attention);
  m.impl("rotary_kv_write", &adaskip::rotary_kv_write);
}
