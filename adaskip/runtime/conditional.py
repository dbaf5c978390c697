"""CUDA-graph conditional nodes: work captured inside `only_if(predicate)` becomes the body of an
IF node, which a replay runs only while the device bool `predicate` is true, with no host
involved. This is how cuBLAS GEMMs (which cannot read a device flag themselves) are skipped from
the device. Needs a torch whose CUDAGraph has begin_capture_to_if_node and CUDA >= 12.4.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def supported() -> bool:
    """Whether this torch build can capture conditional nodes."""
    if not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node") or torch.version.cuda is None:
        return False
    major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    return (major, minor) >= (12, 4)


def check_supported() -> None:
    if not supported():
        raise ValueError(f"adaskip: CUDA-graph conditional nodes need torch with "
                         f"CUDAGraph.begin_capture_to_if_node and CUDA >= 12.4; this is torch {torch.__version__} "
                         f"(CUDA {torch.version.cuda})")


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without a GPU)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@contextmanager
def only_if(predicate: torch.Tensor):
    """While a CUDA graph is being captured: put the work of the block in an IF node on
    `predicate` (a one-element bool CUDA tensor, read at every replay). Outside a capture the
    block simply runs. Tensors the code after the block reads must be allocated before it: a
    skipped body writes nothing."""
    if predicate.dtype != torch.bool or predicate.numel() != 1:
        raise ValueError(f"adaskip: a conditional node's predicate must be one bool, got {predicate.dtype} "
                         f"of shape {tuple(predicate.shape)}")
    if not capturing():
        yield
        return
    if not predicate.is_cuda:
        raise ValueError(f"adaskip: a conditional node's predicate must be on the GPU, got {predicate.device}")
    check_supported()
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(predicate)
    try:
        yield
    finally:
        graph.end_capture_to_conditional_node()
