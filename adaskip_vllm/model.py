"""AdaskipForCausalLM: the DeciLM (nemotron-nas) model of vLLM with adaskip's fitted stand-ins.

What `adaskip export --format adaskip` writes is a DeciLM checkpoint: per layer, `block_configs`
say which attention / FFN is a no-op (vLLM builds no module for it, and no KV cache for a no-op
attention); scalar compensations are already folded into the weights. A skipped sublayer may
also carry `stand_in: {kind: linear, rank}` (its low-rank map and its input norm are in the
weights) or `{kind: channel}` (its per-channel scales). This class is vLLM's DeciLM with a
decoder layer that runs those stand-ins where vLLM would pass the stream through.

Tensor parallelism: the running attention and FFN are vLLM's (QKVParallelLinear,
MergedColumnParallelLinear, RowParallelLinear; VocabParallelEmbedding / ParallelLMHead), sharded
as in any LLaMA. The stand-ins are replicated on every rank (ReplicatedLinear, a plain
parameter): they read and write the residual stream, which every rank holds whole after the row
parallel all-reduce, so a replicated map needs no communication, while a sharded one would add an
all-reduce per stand-in for a matmul of 2 * rank * hidden multiply-adds per token (rank hidden / 8
by default), cheaper than that collective; their weights are small (2 * rank * hidden each).
"""
from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.nemotron_nas import DeciLMDecoderLayer, DeciLMForCausalLM, DeciModel

from .stand_ins import apply_channel, stand_in_of


class LinearStandIn(nn.Module):
    """h + U (D x + e) on the normed input x: `down` (D, e), `up` (U), replicated on every rank."""

    def __init__(self, hidden: int, rank: int, prefix: str):
        super().__init__()
        self.down = ReplicatedLinear(hidden, rank, bias=True, prefix=f"{prefix}.down")
        self.up = ReplicatedLinear(rank, hidden, bias=False, prefix=f"{prefix}.up")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.down(x)
        y, _ = self.up(y)
        return y


class ChannelStandIn(nn.Module):
    """The residual stream times per-channel scales (float32 whatever the model's dtype)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.channel = nn.Parameter(torch.empty(hidden, dtype=torch.float32), requires_grad=False)

    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        return apply_channel(stream, self.channel)


class AdaskipDecoderLayer(DeciLMDecoderLayer):
    """A DeciLM layer whose no-op sublayers may hold a stand-in (`attn_stand_in`, `mlp_stand_in`)."""

    def __init__(self, config, layer_idx: int, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__(config, layer_idx, cache_config, quant_config=quant_config, prefix=prefix)
        block = config.block_configs[layer_idx]
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self._stand_in_kinds = []
        for part, name, norm in (("attention", "attn_stand_in", "input_layernorm"),
                                 ("ffn", "mlp_stand_in", "post_attention_layernorm")):
            found = stand_in_of(getattr(block, part), f"layer {layer_idx}'s {part}")
            self._stand_in_kinds.append(None if found is None else found[0])
            if found is None:
                continue
            kind, rank = found
            if kind == "linear":
                setattr(self, name, LinearStandIn(hidden, rank, f"{prefix}.{name}"))
                # The map reads the skipped sublayer's normed input: its norm, under the usual name.
                setattr(self, norm, RMSNorm(hidden, eps=eps))
            else:
                setattr(self, name, ChannelStandIn(hidden))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual):
        # The stream is residual + hidden_states: vLLM leaves each sublayer's add to the next norm.
        for index, (no_op, stand_in, norm) in enumerate((
                (self._is_no_op_attention, "attn_stand_in", "input_layernorm"),
                (self._is_no_op_ffn, "mlp_stand_in", "post_attention_layernorm"))):
            kind = self._stand_in_kinds[index]
            if no_op and kind is None:
                continue  # skipped; its scalar compensation is folded into the later weights
            if kind == "channel":
                stream = hidden_states if residual is None else hidden_states + residual
                residual = getattr(self, stand_in)(stream)
                # Nothing pending: the next norm adds these zeros, which changes no bit.
                hidden_states = torch.zeros_like(residual)
                continue
            if residual is None:  # the first sublayer that runs
                residual = hidden_states
                x = getattr(self, norm)(hidden_states)
            else:
                x, residual = getattr(self, norm)(hidden_states, residual)
            if kind == "linear":
                hidden_states = getattr(self, stand_in)(x)
            elif index == 0:
                hidden_states = self.self_attn(positions=positions, hidden_states=x)
            else:
                hidden_states = self.mlp(x)
        return hidden_states, residual


class AdaskipForCausalLM(DeciLMForCausalLM):
    """DeciLMForCausalLM built from AdaskipDecoderLayer; loading, sharding, logits and the
    no-op bookkeeping (HasNoOps: KV cache only for the attention that runs) are DeciLM's."""

    def _init_model(self, vllm_config: VllmConfig, prefix: str = ""):
        return DeciModel(vllm_config=vllm_config, prefix=prefix, layer_type=AdaskipDecoderLayer)
