"""AdaSkip on stock Hugging Face models: calibrate, apply a plan, generate, without modeling files.

    profile = adaskip.hf.calibrate(model, texts, tokenizer=tokenizer, num_requests=8, prompt_len=1024)
    plan = adaskip.plan(profile, alpha=1.2)
    with adaskip.hf.apply(model, plan):
        out = model.generate(**inputs, max_new_tokens=64)

How: while a plan is applied, every decoder layer of the model runs our layer step instead of
its own forward (an instance attribute, removed on leaving): the residual stream goes through
adaskip.ops (fused add + RMSNorm, with the IO-similarity statistics where asked), each sublayer
does what adaskip.runtime.schedule decides for the step, and adaskip.runtime.sublayer carries it
out, the same code our runtime runs. The model's own attention, MLP, rotary embedding, masks and
caches are used as they are: nothing of transformers is copied or patched at class level.

Steps. A forward of one token per sequence that continues the request's cache is a decode step;
any other forward is a prefill and starts a new request (online learning restarts). The plan
is resolved once, on entering apply() (adaskip.runtime.request_plan: phases, candidates, the
stand-ins' device copies), and each step looks its schedule up there. Online decode learning
(plan.beta / plan.window) then keeps per-sequence gates on the device with the decode driver's
OnlineLearning (adaskip.runtime.driver), exactly as our runtime's generate does.

adaskip.hf.generate(model, prompts, plan=...) is adaskip.generate on a transformers model: the
request is resolved as generate's (resolve_generation), and its decode steps, generate's own
TokenStep on the model's modules and a transformers cache, run on the shared decode driver
(adaskip.runtime.driver.drive), which owns the sync guard, online settling, EOS,
max_new_tokens and the timing. model.generate under apply() keeps transformers' own loop.

KV cache. In e2e mode a layer whose attention the plan skips never computes K/V, so its cache
layer is never filled (DynamicCache and StaticCache allocate a layer on its first write).
transformers reads the sequence length and mask sizes from layer 0 (or the first layer of a
kind); a cache used under a plan reports, for a layer that does not keep up, the numbers of the
first layer of the same kind that does, so positions stay right when layer 0 is skipped. Such a
cache belongs to the plan: continue it only under the same plan.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM with SwiGLU (silu) MLPs,
transformers >= 5.17. Not supported: SkipDecode's ramp (it needs the decode length in advance),
attention weights of skipped layers (output_attentions has none for them).
"""
from __future__ import annotations

import inspect
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import ops
from .runtime.config import MODEL_FAMILIES, ModelArgs, UnsupportedArchitecture
from .runtime.decode import DecodeState
from .runtime.driver import OnlineLearning, drive, padded_ids, timed
from .runtime.generation import GenerationResult, TokenStep, eos_tensor, generation_result
from .runtime.online import OnlineGates
from .runtime.request_plan import (DECODE, FORWARD, PREFILL, RequestPlan, check_prompts, resolve_applied,
                                   resolve_forward, resolve_generation)
from .runtime.sampling import SamplingParams, sample
from .runtime.rope import apply_rotary
from .runtime.skip_plan import SkipPlan
from .runtime.sublayer import run_sublayer
from .skipping import calibration
from .skipping.profile import ImportanceProfile

SUPPORTED_CLASSES = tuple(f.architecture for f in MODEL_FAMILIES.values() if f.hf_adapter)
MIN_TRANSFORMERS = (5, 17)
_MARK = "_adaskip_hf"  # set on a model while a plan is applied or a calibration runs


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_supported(model) -> ModelArgs:
    """The runtime's ModelArgs of a supported HF model, or a clear error naming what is supported."""
    version = transformers_version()
    if _version_tuple(version) < MIN_TRANSFORMERS:
        raise UnsupportedArchitecture(f"adaskip.hf needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, "
                                      f"this is {version}")
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise UnsupportedArchitecture(f"adaskip.hf supports {', '.join(SUPPORTED_CLASSES)}; got {name}")
    config = model.config.to_dict()
    config["architectures"] = [name]
    try:
        args = ModelArgs.from_hf_config(config)
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"adaskip.hf: {e}") from None
    layers = model.model.layers
    if len(layers) != args.num_layers:
        raise UnsupportedArchitecture(f"adaskip.hf: the model has {len(layers)} decoder layers, its config "
                                      f"{args.num_layers}")
    return args


@dataclass
class _Step:
    """What every layer of one forward reads besides its input (what run_sublayer calls step)."""

    schedule: object
    online: Optional[OnlineGates] = None
    learning: Optional[OnlineLearning] = None  # the request's online learning (host side), in a decode step
    stats: Optional[torch.Tensor] = None
    block_stats: Optional[torch.Tensor] = None
    seq_lens: Optional[torch.Tensor] = None
    taps: object = None
    decode: bool = False  # a decode step of apply()'s request
    # The normed input of the next layer, computed by the fused add+norm of the previous one,
    # and the residual stream it was computed from (used only if that is the next layer's input).
    normed: Optional[torch.Tensor] = None
    normed_of: Optional[torch.Tensor] = None


@dataclass
class _Request:
    """A request being generated under apply(): its cache and online-learning state."""

    cache: object = None
    decode_steps: int = 0
    online: Optional[OnlineLearning] = None


class _Patched:
    """The model's decoder layers running our layer step, while installed. Also what
    schedule_step and the calibration loops read of a model: args, lm_head, state_dict, and
    __call__ with the runtime's Transformer.forward keywords for cache-less forwards."""

    attention_backend = "sdpa"  # the attention is transformers' own; only a schedule field here

    def __init__(self, model, args: ModelArgs):
        self.hf = model
        self.args = args
        self.lm_head = model.lm_head
        self.step: Optional[_Step] = None
        self._own_step = False  # a calibration forward's step, set by __call__ (apply's hooks leave it)
        self.plan: Optional[SkipPlan] = None
        self.resolved: Optional[RequestPlan] = None  # the plan resolved once for every request of apply()
        self.request = _Request()
        self.redirect: dict = {}  # layer -> layer whose cache length it reports
        self._caches = weakref.WeakSet()
        self._hooks = []

    # -- what calibration reads -------------------------------------------------------------

    def state_dict(self):
        return self.hf.state_dict()

    def __call__(self, input_ids: torch.Tensor, input_pos=None, *, plan=None, stats=None, block_stats=None,
                 taps=None, logits_index=None, seq_lens=None, kv_len=None, online=None, schedule=None):
        """A cache-less forward with the runtime's keywords (what calibration, the greedy search
        and validation call): logits [B, T, vocab], or [B, vocab] at logits_index."""
        if input_pos is not None or online is not None or schedule is not None:
            raise ValueError("adaskip.hf: calibration forwards are cache-less, without online learning")
        b, t = input_ids.shape
        request = resolve_forward(self, plan, stats=stats is not None, block_stats=block_stats is not None)
        sched = request.schedule(request.phases[FORWARD], batch=b, tokens=t)
        step = _Step(sched, stats=stats, block_stats=block_stats, seq_lens=seq_lens, taps=taps)
        hidden = self.run(step, input_ids=input_ids, use_cache=False)
        return self.lm_head(_at(hidden, logits_index))

    def run(self, step: _Step, **kwargs) -> torch.Tensor:
        """The model's forward (transformers' keywords) with every layer reading `step`: the last
        hidden states. apply()'s hooks leave such a forward alone."""
        self.step, self._own_step = step, True
        try:
            return self.hf.model(**kwargs).last_hidden_state
        finally:
            self.step, self._own_step = None, False

    # -- install / remove -------------------------------------------------------------------

    def install(self) -> None:
        if getattr(self.hf, _MARK, None) is not None:
            raise RuntimeError("adaskip.hf: this model already runs under adaskip.hf (a plan is applied or a "
                               "calibration runs); leave that first")
        layers = self.hf.model.layers
        for i, layer in enumerate(layers):
            if "forward" in vars(layer):
                raise RuntimeError(f"adaskip.hf: decoder layer {i} already has a forward of its own (another "
                                   "adapter?); adaskip.hf replaces it only on untouched layers")
        for i, layer in enumerate(layers):
            layer.forward = self._layer_forward(i, layer)
        self._hooks = [self.hf.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       self.hf.model.register_forward_hook(self._after_forward, with_kwargs=True)]
        setattr(self.hf, _MARK, self)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for layer in self.hf.model.layers:
            vars(layer).pop("forward", None)
        if getattr(self.hf, _MARK, None) is self:
            delattr(self.hf, _MARK)
        self.step, self.request = None, _Request()

    # -- steps of apply() -------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        if self.plan is None or self._own_step:  # calibration forwards set their own step
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = (ids if ids is not None else embeds).shape
        b, t = shape[0], shape[1]
        cache = _cache_of(kwargs)
        resolved, req = self.resolved, self.request
        decode = t == 1 and cache is not None and cache is req.cache and req.cache is not None
        if not decode:  # a new request
            self.request = req = _Request(cache=cache)
            self.step = _Step(resolved.schedule(resolved.phases[PREFILL], batch=b, tokens=t))
            return None
        if req.online is None:
            req.online = OnlineLearning.start(resolved, b, self.lm_head.weight.device)
        online = req.online
        if online is not None:
            online.settle()  # the gates were decided: stop running what every sequence skips
            if online.gates.gates.shape[1] != b:
                raise ValueError(f"adaskip.hf: a decode step of {b} sequences continues a request of "
                                 f"{online.gates.gates.shape[1]}")
        gates = online.gates if online is not None else None
        sched = resolved.schedule(resolved.phases[DECODE], batch=b, tokens=1, online=gates)
        self.step = _Step(sched, online=gates, learning=online, decode=True)
        return None

    def _after_forward(self, module, args, kwargs, output):
        step, self.step = self.step, None
        if self.plan is None or step is None:
            return None
        req = self.request
        if not step.decode:
            return None
        req.decode_steps += 1
        if step.learning is not None:
            if step.schedule.online_update is not None:
                step.online.update(*step.schedule.online_update)
            step.learning.learned(req.decode_steps - 1, req.decode_steps)
        return None

    # -- one decoder layer ------------------------------------------------------------------

    def _layer_forward(self, i: int, layer):
        patched = self
        base = self.hf.model
        next_norm = base.layers[i + 1].input_layernorm if i + 1 < len(base.layers) else base.norm

        def forward(hidden_states, *args, **kwargs):
            step = patched.step
            if step is None:
                raise RuntimeError("adaskip.hf: a decoder layer was called outside its model's forward while a "
                                   "plan is applied")
            if args:
                raise TypeError("adaskip.hf: decoder layers take their inputs after hidden_states by keyword")
            cache = _cache_of(kwargs)
            if cache is not None:
                patched._track(cache)
                if patched.request.cache is None:  # made by the model's forward itself (use_cache, no cache passed)
                    patched.request.cache = cache
            # A copy: the fused ops update the residual stream in place, and transformers may keep
            # the layer's input (output_hidden_states).
            h = hidden_states.clone()
            x = step.normed if step.normed_of is hidden_states else layer.input_layernorm(hidden_states)
            s = 2 * i
            post = layer.post_attention_layernorm
            attention = layer.self_attn
            x = run_sublayer(s, step.schedule.sublayers[s], x, h, step, norm_weight=post.weight, eps=_eps(post),
                             attend=lambda y: attention(hidden_states=y, **kwargs)[0],
                             store_kv=lambda y: _store_kv(attention, y, cache, kwargs),
                             dense_ffn=layer.mlp, mlp=layer.mlp)
            x = run_sublayer(s + 1, step.schedule.sublayers[s + 1], x, h, step, norm_weight=next_norm.weight,
                             eps=_eps(next_norm), attend=None, store_kv=None, dense_ffn=layer.mlp, mlp=layer.mlp)
            if step.block_stats is not None:
                ops.io_similarity_stats(hidden_states, h, step.block_stats, i, seq_lens=step.seq_lens)
            step.normed, step.normed_of = x, h
            return h

        return forward

    def _track(self, cache) -> None:
        """Makes a cache report, for layers that do not keep up under the plan, the lengths of
        a layer of the same kind that does (transformers reads them from layer 0)."""
        if not self.redirect or cache in self._caches:
            return
        mine = getattr(cache, "_adaskip_redirect", None)
        if mine is not None and mine != self.redirect:
            raise ValueError("adaskip.hf: this cache was filled under another plan; start a new cache")
        cls = type(cache)
        redirect = self.redirect
        for name, position in (("get_seq_length", 0), ("get_mask_sizes", 1), ("get_query_offset", 0)):
            original = getattr(cls, name, None)
            if original is not None:
                setattr(cache, name, _redirected(cache, original, position, redirect))
        cache._adaskip_redirect = dict(redirect)
        self._caches.add(cache)


def _redirected(cache, original, position: int, redirect: dict):
    def method(*args, **kwargs):
        if "layer_idx" in kwargs:
            kwargs["layer_idx"] = redirect.get(kwargs["layer_idx"], kwargs["layer_idx"])
        elif len(args) > position:
            args = list(args)
            args[position] = redirect.get(args[position], args[position])
        elif position == 0:  # the default, layer 0
            kwargs["layer_idx"] = redirect.get(0, 0)
        return original(cache, *args, **kwargs)

    return method


def _at(hidden: torch.Tensor, logits_index) -> torch.Tensor:
    """hidden [B, T, D], or [B, D] at each sequence's logits_index ([B]) when given."""
    if logits_index is None:
        return hidden
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), logits_index]


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _store_kv(attention, x: torch.Tensor, cache, kwargs: dict) -> None:
    """Only the K/V of an attention layer the plan skips but a later step reads (mode prefill,
    or e2e under SkipDecode's ramp), written to the cache as the layer would."""
    if cache is None:
        return
    b, t, _ = x.shape
    k = attention.k_proj(x).view(b, t, -1, attention.head_dim).transpose(1, 2)
    v = attention.v_proj(x).view(b, t, -1, attention.head_dim).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    k = apply_rotary(k, cos, sin)
    cache.update(k, v, attention.layer_idx, {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")})


def _redirect_for(plan: SkipPlan, args: ModelArgs) -> dict:
    """Layer -> the layer whose cache length it reports: layers whose attention is skipped in
    decode (their caches stop growing, or never start in e2e) point at the first layer of the
    same attention kind (full or the same sliding window) that runs in every step."""
    if plan.mode == "prefill":
        return {}  # skipped attention stores its K/V in prefill and runs in decode: every layer keeps up
    skipped = plan.skipped_attention_layers
    kept = [i for i in range(args.num_layers) if i not in skipped]
    if not kept:
        raise ValueError("adaskip.hf: the plan skips every attention layer in decode; transformers' caches then "
                         "have no layer to read the sequence length from")
    windows = args.sliding_windows or [None] * args.num_layers
    out = {}
    for i in sorted(skipped):
        same = [j for j in kept if windows[j] == windows[i]]
        out[i] = (same or kept)[0]
    return out


@contextmanager
def apply(model, plan: SkipPlan):
    """Runs `model` (a supported transformers causal LM) with `plan` inside the `with` block:
    model(...) and model.generate(...) skip the plan's sublayers (never run; their compensation
    or fitted stand-ins instead), in the plan's mode (prefill / decode / e2e), with online decode
    learning when the plan has it. On leaving, the model is exactly as before. Entering twice, or
    with a plan for another model, is an error. Yields an Applied (online_skipped(), decode_steps)."""
    if plan is None:
        raise TypeError("adaskip.hf.apply needs an adaskip SkipPlan, got NoneType")
    args = _check_plan_for(model, plan, "adaskip.hf.apply")
    if plan.ramp:
        raise ValueError("adaskip.hf: SkipDecode's ramp needs the number of decode steps in advance, which "
                         "model.generate does not give its model; use adaskip.generate for ramp plans")
    patched = _Patched(model, args)
    patched.resolved = resolve_applied(patched, plan)  # validated and resolved once for every request
    patched.redirect = _redirect_for(plan, args)
    patched.install()
    patched.plan = plan
    try:
        yield Applied(patched)
    finally:
        patched.remove()


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], *, plan: Optional[SkipPlan] = None, max_new_tokens: int = 64,
             sampling: Optional[SamplingParams] = None, eos_token_ids: Optional[Sequence[int]] = None,
             prefill_chunk: int = 8192, forbid_host_sync: bool = False, step_timing: bool = False) -> GenerationResult:
    """adaskip.generate for a transformers model (outside an apply() block): the same request
    plan, resolved once (adaskip.runtime.request_plan.resolve_generation), the same decode step
    and decode driver (adaskip.runtime.driver.drive: host-sync guard, online learning and its
    settling, EOS and max_new_tokens, timing), on the model's own modules and a transformers
    cache. prompts: a batch of token-id lists of any lengths (left-padded for the model). Greedy
    tokens, and the FFNs online learning gates off, are adaskip.generate's on the same weights;
    returns its GenerationResult. No CUDA graphs; SkipDecode's ramp is refused as in apply()."""
    args = _check_plan_for(model, plan, "adaskip.hf.generate")
    if plan is not None and plan.ramp:
        raise ValueError("adaskip.hf.generate: SkipDecode's ramp is not supported on transformers models yet; use "
                         "adaskip.generate for ramp plans")
    prompts = check_prompts(prompts, args.vocab_size)
    sampling = sampling or SamplingParams()
    was_training = model.training
    patched = _Patched(model, args)
    patched.redirect = _redirect_for(plan, args) if plan is not None else {}
    patched.install()  # its hooks stay idle (no plan set): every forward here sets its own step
    model.eval()
    try:
        request = resolve_generation(patched, [len(p) for p in prompts], plan, max_new_tokens=max_new_tokens,
                                     prefill_chunk=prefill_chunk)
        cached = _CachedModel(patched, prompts, max_new_tokens)
        state, online, prefill_s = _prefill(cached, request, sampling, eos_token_ids, max_new_tokens)
        step = TokenStep(cached, request, state, prompts, graphs=None)
        run = drive(step, max_new_tokens - 1, device=state.token.device, online=online,
                    forbid_host_sync=forbid_host_sync, step_timing=step_timing)
        return generation_result(cached, state, max_new_tokens, online, prefill_s, run)
    finally:
        patched.remove()
        model.train(was_training)


def _check_plan_for(model, plan: Optional[SkipPlan], what: str) -> ModelArgs:
    """The model's ModelArgs, once it is supported and `plan` (None: the full model) fits it."""
    if plan is not None and not isinstance(plan, SkipPlan):
        raise TypeError(f"{what} needs an adaskip SkipPlan, got {type(plan).__name__}")
    args = check_supported(model)
    if plan is not None:
        plan.check_model(args.num_layers, args.fingerprint())
        if plan.streaming:  # transformers' attention has no per-group band; never run it as the full model
            raise ValueError(f"{what}: streaming KV-head groups run on adaskip's runtime only (adaskip.generate); "
                             "this plan streams groups of layers " + str(sorted(plan.streaming)))
    return args


class _CachedModel:
    """The patched model as the runtime's decode step calls a model (decode_one_token's
    keywords), continuing one transformers cache of left-padded prompts: cache slots are shared
    (kv_len slots are filled after a call), RoPE positions are each sequence's own."""

    def __init__(self, patched: _Patched, prompts: list, max_new_tokens: int):
        import transformers

        self.patched, self.args, self.lm_head = patched, patched.args, patched.lm_head
        device = self.lm_head.weight.device
        self.ids, self.lens = padded_ids(prompts, device, left=True)
        longest = self.ids.shape[1]
        # Slots holding a token: the prompts' (left-padded), then one per decode step for all.
        self.mask = torch.ones(len(prompts), longest + max_new_tokens, dtype=torch.long, device=device)
        self.mask[:, :longest] = torch.arange(longest, device=device)[None, :] >= (longest - self.lens)[:, None]
        self.positions = (self.mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
        self.cache = transformers.DynamicCache(config=patched.hf.config)
        parameters = inspect.signature(type(patched.hf.model).forward).parameters
        self.cache_keyword = "cache" if "cache" in parameters else "past_key_values"  # older transformers

    def __call__(self, tokens: torch.Tensor, positions, *, kv_len: int, seq_lens=None, stats=None, online=None,
                 logits_index=None, schedule=None) -> torch.Tensor:
        """Logits of `tokens` [B, T] at RoPE `positions` (an int, [B] of the first token, or [B, T]),
        filling cache slots [kv_len - T, kv_len)."""
        b, t = tokens.shape
        if not isinstance(positions, torch.Tensor):
            positions = torch.full((b,), positions, dtype=torch.long, device=tokens.device)
        if positions.dim() == 1:
            positions = positions[:, None] + torch.arange(t, device=tokens.device)
        step = _Step(schedule, online=online, stats=stats, seq_lens=seq_lens)
        hidden = self.patched.run(step, input_ids=tokens, attention_mask=self.mask[:, :kv_len], position_ids=positions,
                                  use_cache=True, **{self.cache_keyword: self.cache})
        return self.lm_head(_at(hidden, logits_index))

    def kv_cache_bytes(self) -> int:
        tensors = [getattr(layer, name, None) for layer in self.cache.layers for name in ("keys", "values")]
        return sum(x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor))


def _prefill(cached: _CachedModel, request: RequestPlan, sampling: SamplingParams, eos_token_ids,
             max_new_tokens: int) -> tuple:
    """The request's prefill chunks through the model, the first token of each sequence, and the
    decode state the driver's steps continue: (state, online learning or None, prefill seconds)."""
    ids, device = cached.ids, cached.ids.device
    b, longest = ids.shape
    eos = eos_tensor(cached.args, eos_token_ids, device)
    state = DecodeState(b, max_new_tokens, eos.numel(), device)
    generator = state.generator_for(sampling.seed)

    def run():
        logits = None
        for chunk in request.prefill:
            t = chunk.end - chunk.start
            schedule = request.schedule(chunk.phase, batch=b, tokens=t)
            # Left-padded: every prompt ends at the last slot of the last chunk.
            logits = cached(ids[:, chunk.start:chunk.end], cached.positions[:, chunk.start:chunk.end],
                            kv_len=chunk.end, schedule=schedule, logits_index=torch.full((b,), t - 1, device=device))
        return sample(logits, sampling, generator)

    token, prefill_s = timed(device, run)
    online = OnlineLearning.start(request, b, device)
    state.start(token, cached.lens, max_new_tokens, eos, sampling, generator, None, online.gates if online else None)
    state.record()
    return state, online, prefill_s


class Applied:
    """What `with adaskip.hf.apply(model, plan) as applied:` gives: the model and plan, and what
    online learning decided in the latest request."""

    def __init__(self, patched: _Patched):
        self._patched = patched
        self.model, self.plan = patched.hf, patched.plan

    @property
    def decode_steps(self) -> int:
        """Decode steps of the latest request."""
        return self._patched.request.decode_steps

    def online_skipped(self) -> Optional[list]:
        """Per sequence of the latest request, the FFN sublayers online learning gated off (as
        adaskip.generate's GenerationResult.online_skipped); None without online learning. Reads
        the gates back from the device."""
        online = self._patched.request.online
        if online is None:
            return None
        return online.gates.skipped_per_sequence()


def applied_plan(model) -> Optional[SkipPlan]:
    """The plan applied to `model` by adaskip.hf.apply, or None."""
    patched = getattr(model, _MARK, None)
    return patched.plan if patched is not None else None


@contextmanager
def runtime_view(model):
    """`model` seen as our runtime's Transformer by the calibration loops (calibrate, the greedy
    searches, validate, adaskip.evaluation.quality): cache-less forwards with plans, statistics
    and taps, through the model's own modules."""
    args = check_supported(model)
    patched = _Patched(model, args)
    patched.install()
    try:
        yield patched
    finally:
        patched.remove()


def calibrate(model, data: Sequence[Union[str, os.PathLike, Sequence[int]]], *, tokenizer=None,
              num_requests: int = 20, prompt_len: int = 4096, **kwargs) -> ImportanceProfile:
    """adaskip.calibrate for a transformers model: the same ImportanceProfile (its fingerprint
    depends on the geometry and weights, not on the class, so a profile from our runtime fits the
    HF model of the same checkpoint and the other way round). Every keyword of
    adaskip.skipping.calibration.calibrate is accepted (search=("loss",), validate_budgets, ...)."""
    was_training = model.training
    model.eval()
    try:
        with runtime_view(model) as view:
            return calibration.calibrate(view, data, tokenizer=tokenizer, num_requests=num_requests,
                                         prompt_len=prompt_len, **kwargs)
    finally:
        model.train(was_training)


__all__ = ["Applied", "apply", "applied_plan", "calibrate", "check_supported", "generate", "runtime_view",
           "SUPPORTED_CLASSES"]
