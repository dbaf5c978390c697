"""Host checks of token ids given straight to the model (model(input_ids, plan=...)): an id
outside the vocabulary must not reach the embedding kernel, where on a GPU it is a device-side
assert that ends the process."""
from __future__ import annotations

import torch


def check_input_ids(input_ids, vocab_size: int, read_device: bool = False) -> None:
    """Refuses `input_ids` that are not a [batch, tokens] integer tensor of ids in [0,
    vocab_size). Ids on the GPU are read (one host sync) only with `read_device`: the decode
    loop's own ids, and requests already checked on the host, pass unread."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"adaskip: input_ids must be a [batch, tokens] tensor of token ids, got "
                         f"{type(input_ids).__name__} (e.g. torch.tensor([ids]) for one sequence)")
    if input_ids.dim() != 2:
        raise ValueError(f"adaskip: input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)} (e.g. "
                         "ids[None] for one sequence)")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"adaskip: input_ids must hold integer token ids, got {input_ids.dtype}")
    if (input_ids.device.type != "cpu" and not read_device) or input_ids.numel() == 0:
        return
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)].cpu()
    if bad.numel():
        raise ValueError(f"adaskip: input_ids hold token ids outside the vocabulary [0, {vocab_size}): "
                         f"{bad[:5].tolist()}{' ...' if bad.numel() > 5 else ''}")
