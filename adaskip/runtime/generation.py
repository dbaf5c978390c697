"""Generation on the static-cache runtime: chunked prefill, decode, greedy and sampled tokens."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import conditional
from .decode import DecodeState, decode_one_token, decode_state, drop_decode_states
from .driver import DecodeRun, DecodeStep, OnlineLearning, drive, padded_ids, timed
from .model import Transformer
from .request_plan import RequestPlan, check_prompts, resolve_generation, resolve_prefill
from .sampling import SamplingParams, sample

_check_prompts = check_prompts  # the name adaskip.skipping reads it by


@dataclass
class GenerationResult:
    tokens: list  # per sequence: the generated token ids (EOS included when it stopped there)
    prefill_s: float = 0.0  # time to first token (prefill + first sample)
    decode_s: float = 0.0
    decode_steps: int = 0
    kv_cache_bytes: int = 0
    finished: list = field(default_factory=list)  # per sequence: stopped at EOS
    # Online decode learning: per sequence, the FFN sublayers gated off after the window.
    online_skipped: Optional[list] = None
    graphs_captured: int = 0  # CUDA-graph decode: step graphs captured by this call
    graphs_reused: int = 0  # step graphs this call replayed that an earlier call had captured
    graph_capture_s: float = 0.0  # their capture time, not counted in decode_s
    # With step_timing=True: seconds of each decode step (a step that captured a graph includes it).
    step_times_s: Optional[list] = None
    # Speculative decoding (adaskip.runtime.speculative): rounds, drafted / accepted tokens, rates.
    speculative: Optional[dict] = None
    # Tokens the decode phase added to the longest sequence, when a step can add several (a
    # speculative round); None: one per step.
    decode_tokens: Optional[int] = None

    @property
    def time_per_output_token_s(self) -> float:
        tokens = self.decode_tokens if self.decode_tokens is not None else self.decode_steps
        return self.decode_s / tokens if tokens else float("nan")


def eos_tensor(args, eos_token_ids: Optional[Sequence[int]], device) -> torch.Tensor:
    """The ids that end a sequence (the model's own when none are given), on `device`."""
    ids = args.eos_token_ids if eos_token_ids is None else eos_token_ids
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)


def ensure_caches(model: Transformer, batch: int, needed: int, attention_layers) -> None:
    """KV caches for `batch` sequences of `needed` positions in `attention_layers`: the model's
    present ones when they serve, else new ones (the decode graphs that hold the old caches are
    dropped first, to free them)."""
    if (model.cache_batch < batch or model.cache_len < needed
            or model.cached_attention_layers() != attention_layers):
        drop_decode_states(model)
        model.setup_caches(batch, needed, attention_layers)


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: Optional[SamplingParams] = None, eos_token_ids: Optional[Sequence[int]] = None,
             plan=None, stats: Optional[torch.Tensor] = None, prefill_chunk: int = 8192,
             forbid_host_sync: bool = False, cuda_graph: bool = False, graph_conditionals: bool = False,
             step_timing: bool = False, speculative=None) -> GenerationResult:
    """Generates up to max_new_tokens for each prompt (a batch of token-id lists of any lengths).

    Prefill runs in chunks of `prefill_chunk` tokens so long prompts fit; the KV cache is
    (re)allocated for this batch and length, only for the attention layers the plan needs. The
    decode loop does not wait on the device: end-of-sequence is tracked on the device and read
    back without blocking, so generation may run a step or two past the last EOS (those tokens
    are dropped). With a plan that has online learning, its gates are decided on the device.
    forbid_host_sync: on a GPU, make any host synchronisation inside the decode loop an error
    (torch.cuda.set_sync_debug_mode("error")), to check that the loop never waits.
    cuda_graph: on a GPU, capture the decode step (forward, token choice (greedy or sampled, the
    seeded generator's state registered with the graph), EOS bookkeeping, online-learning update)
    in a CUDA graph and replay it per token; attention then reads the
    whole cache under a mask built from device-side positions.
    graph_conditionals: with cuda_graph and online learning, FFNs that the gated GEMVs do not
    serve (more than two sequences, fp32, biases) are captured inside CUDA-graph conditional
    nodes, so that replays skip their cuBLAS GEMMs once every sequence has gated them off (needs
    CUDA >= 12.4 and a torch with conditional-node capture; see adaskip.runtime.conditional).
    step_timing: also time every decode step (CUDA events recorded between steps and read after
    the loop, so the loop still never waits), e.g. to see time per token drop once online
    learning has gated FFNs off.
    speculative: an adaskip.runtime.speculative.SpeculativeConfig: lossless decoding, its plan
    drafting and the full model verifying (`plan` must then be None; with cuda_graph a whole
    round is one graph replay): greedy output is the full model's, sampled output is distributed
    as the full model's (rejection sampling).
    A graph is captured per distinct step: its key is the step's schedule (adaskip.runtime.schedule:
    every sublayer's path, batch, dtype; SkipDecode's ramp and online learning settling change it),
    the KV cache and the sampling settings. Graphs and the buffers they were captured on are kept
    per model (adaskip.runtime.decode), so later calls of the same shape replay them; new caches
    or moved weights drop them.
    """
    if speculative is not None:  # a SpeculativeConfig: its rounds are the steps (adaskip.runtime.speculative)
        _check_speculative(plan, stats, step_timing, graph_conditionals)
        return speculative.generate(model, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                                    prefill_chunk=prefill_chunk, sampling=sampling, cuda_graph=cuda_graph,
                                    forbid_host_sync=forbid_host_sync)
    sampling = sampling or SamplingParams()
    prompts = check_prompts(prompts, model.args.vocab_size)
    request = _resolve(model, prompts, plan, max_new_tokens, prefill_chunk, stats, cuda_graph, graph_conditionals)
    state, online, prefill_s = _prefill(model, request, prompts, sampling, eos_token_ids, stats, max_new_tokens)
    step = TokenStep(model, request, state, prompts, graphs=state.graphs if cuda_graph else None)
    run = drive(step, max_new_tokens - 1, device=state.token.device, online=online,
                forbid_host_sync=forbid_host_sync, step_timing=step_timing)
    return generation_result(model, state, max_new_tokens, online, prefill_s, run)


def _check_speculative(plan, stats, step_timing: bool, graph_conditionals: bool) -> None:
    if plan is not None:
        raise ValueError("adaskip: with speculative decoding the full model decides every token; give the "
                         "drafter's plan in SpeculativeConfig, not plan=")
    if stats is not None or step_timing or graph_conditionals:
        raise ValueError("adaskip: speculative decoding collects no statistics and times rounds, not steps "
                         "(no stats, step_timing or graph_conditionals)")


def _resolve(model: Transformer, prompts: list, plan, max_new_tokens, prefill_chunk, stats,
             cuda_graph: bool, graph_conditionals: bool) -> RequestPlan:
    """The request plan of a generate call (every check on its arguments happens here)."""
    if graph_conditionals:
        if not cuda_graph:
            raise ValueError("adaskip: graph_conditionals puts sublayers in CUDA-graph conditional nodes; "
                             "it needs cuda_graph=True")
        conditional.check_supported()
    request = resolve_generation(model, [len(p) for p in prompts], plan, max_new_tokens=max_new_tokens,
                                 prefill_chunk=prefill_chunk, stats=stats is not None,
                                 conditional=graph_conditionals and model.lm_head.weight.device.type == "cuda")
    ensure_caches(model, len(prompts), request.needed, request.kv_layers)
    return request


def _prefill(model: Transformer, request: RequestPlan, prompts: list, sampling: SamplingParams, eos_token_ids,
             stats, max_new_tokens: int) -> tuple:
    """Fills the caches with the prompts and draws the first token into the decode state (kept per
    model and batch, unless the caller's statistics buffer is written: its address would be
    baked into the graphs). Returns (state, its online learning or None, prefill seconds)."""
    device = model.lm_head.weight.device
    eos = eos_tensor(model.args, eos_token_ids, device)
    state = decode_state(model, len(prompts), eos.numel(), device, reuse=stats is None)
    generator = state.generator_for(sampling.seed)
    token, lens, prefill_s = first_tokens(model, request, prompts, sampling, generator, stats)
    online = OnlineLearning.start(request, len(prompts), device, kept=state)
    state.start(token, lens, max_new_tokens, eos, sampling, generator, stats, online.gates if online else None)
    state.record()
    return state, online, prefill_s


def generation_result(model, state: DecodeState, max_new_tokens: int, online: Optional[OnlineLearning],
                      prefill_s: float, run: DecodeRun) -> GenerationResult:
    """What a token-per-step request gives back, from its decode state and the driver's run."""
    counts = state.generated.tolist()
    tokens = [row[:n] for row, n in zip(state.out_tokens[:, :max_new_tokens].tolist(), counts)]
    return GenerationResult(tokens=tokens, prefill_s=prefill_s, decode_s=run.seconds, decode_steps=run.steps,
                            kv_cache_bytes=model.kv_cache_bytes(), finished=state.finished.tolist(),
                            online_skipped=online.gates.skipped_per_sequence() if online is not None else None,
                            graphs_captured=run.captured, graphs_reused=run.reused, graph_capture_s=run.capture_s,
                            step_times_s=run.step_times_s)


class TokenStep(DecodeStep):
    """A decode step of generate: the next token of every sequence (decode_one_token), recorded
    with its end-of-sequence bookkeeping; its schedule comes from the request plan's phase of
    the step."""

    def __init__(self, model: Transformer, request: RequestPlan, state: DecodeState, prompts: list, graphs):
        self.model, self.request, self.state, self.graphs = model, request, state, graphs
        self.finished, self.generator = state.finished, state.generator
        lengths = {len(p) for p in prompts}
        self.longest = max(lengths)
        self.same_length = len(lengths) == 1  # then attention can take the positions as one host int

    def schedules(self, index: int, capturing: bool) -> tuple:
        phase = self.request.decode_phase(index)
        return (self.request.schedule(phase, batch=self.state.token.shape[0], tokens=1, online=self.state.online,
                                      capturing=capturing),)

    def graph_key(self, schedules: tuple) -> tuple:
        return self.state.graph_key(self.model, schedules[0])

    def launch(self, index: int, schedules: tuple, captured: bool) -> None:
        if captured:  # the whole cache, under a mask from the device positions
            decode_one_token(self.model, self.state, schedules[0])
        else:  # only the filled part of the cache
            shared = self.longest + index if self.same_length else None
            decode_one_token(self.model, self.state, schedules[0], shared_pos=shared, kv_len=self.longest + index + 1)
        self.state.record()


def first_tokens(model: Transformer, request: RequestPlan, prompts: list, sampling: SamplingParams, generator,
                 stats: Optional[torch.Tensor] = None) -> tuple:
    """The prefill of the request's prompts and the first new token of each, drawn as `sampling`
    says: (tokens [B], prompt lengths [B], seconds)."""
    device = model.lm_head.weight.device
    ids, lens = padded_ids(prompts, device)
    token, seconds = timed(device, lambda: sample(run_prefill(model, request, ids, lens, stats), sampling, generator))
    return token, lens, seconds


def prefill(model: Transformer, ids: torch.Tensor, lens: torch.Tensor, *, plan=None,
            stats: Optional[torch.Tensor] = None, chunk: int = 8192) -> torch.Tensor:
    """Runs right-padded prompts ids [B, longest] (valid lengths `lens` [B]) through the model
    in chunks of `chunk` tokens, filling the KV caches, with the plan's prefill skips; returns
    each sequence's logits at its last prompt token, [B, vocab]."""
    request = resolve_prefill(model, ids.shape[1], plan, prefill_chunk=chunk, stats=stats is not None)
    return run_prefill(model, request, ids, lens, stats)


def run_prefill(model: Transformer, request: RequestPlan, ids: torch.Tensor, lens: torch.Tensor,
                stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The request's prefill chunks over ids [B, longest] (lengths `lens`); logits [B, vocab] at
    each sequence's last prompt token."""
    logits = None
    for chunk in request.prefill:
        start, end = chunk.start, chunk.end
        valid = (lens - start).clamp(0, end - start)
        last = (lens - 1 - start).clamp(0, end - start - 1)
        schedule = request.schedule(chunk.phase, batch=ids.shape[0], tokens=end - start)
        out = model(ids[:, start:end], start, kv_len=end, seq_lens=valid, schedule=schedule, stats=stats,
                    logits_index=last)
        # Keep each sequence's logits from the chunk that holds its last prompt token.
        in_chunk = ((lens - 1) >= start) & ((lens - 1) < end)
        logits = out if logits is None else torch.where(in_chunk[:, None], out, logits)
    return logits
