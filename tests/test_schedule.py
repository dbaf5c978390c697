"""The step schedule: one object says what every sublayer does in a step, forward only carries
it out, and a captured decode step is keyed by it. Over modes x strategies x online states x
dtypes x batch sizes x phases, two steps have equal keys if and only if they take the same path
(the same kernels and modules, with the same host arguments, in the same order)."""
import itertools

import pytest
import torch

from adaskip import ops
from adaskip.runtime import schedule as sch
from adaskip.runtime import sublayer
from adaskip.runtime.decode import DecodeState, decode_one_token
from adaskip.runtime.model import Attention, FeedForward
from adaskip.runtime.online import OnlineGates
from adaskip.runtime.skip_plan import MODES
from adaskip.skipping import STRATEGIES, calibrate, plan
from behaviour_cases import tiny_model

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def models():
    return {dtype: tiny_model("llama", dtype) for dtype in (torch.float32, torch.bfloat16)}


@pytest.fixture(scope="module")
def plans(models):
    model = models[torch.float32]
    g = torch.Generator().manual_seed(3)
    requests = [torch.randint(0, 101, (24,), generator=g).tolist() for _ in range(2)]
    profile = calibrate(model, requests, num_requests=2, prompt_len=24, progress=False)
    from adaskip.skipping.greedy import search
    from adaskip.skipping.strategies import searches_needed
    for method in searches_needed(STRATEGIES):  # every strategy planned from a stored search gets it
        profile.add_search(search(model, requests, max_sublayers=4, method=method, candidates=2, progress=False))
    out = {}
    for strategy, mode in itertools.product(STRATEGIES, MODES):
        budget = {} if strategy == "full" else {"num_sublayers": 4}
        out[(strategy, mode)] = plan(profile, strategy=strategy, mode=mode, window=3, **budget)
    return out


class _Tracer:
    """Records what a step does: every module and op call with the host facts it depends on."""

    def __init__(self, monkeypatch):
        self.calls = []
        for cls, name in ((Attention, "forward"), (Attention, "store_kv"), (FeedForward, "dense")):
            self._wrap_method(monkeypatch, cls, name)
        for name in ("gated_swiglu", "swiglu_if"):  # the FFN's gated and conditional paths
            self._wrap_method(monkeypatch, sublayer, name)
        for name in ("fused_add_rms_norm", "scale_rms_norm", "skip_or_scale", "io_similarity_stats", "update_gates"):
            self._wrap_op(monkeypatch, name)

    @staticmethod
    def _fact(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype)
        if isinstance(v, (int, float, str, bool, type(None))):
            return v
        if isinstance(v, dict):  # attention masks
            return tuple(sorted((k, v[k] if isinstance(v[k], (str, type(None))) else "mask") for k in v))
        return type(v).__name__

    def _wrap_method(self, monkeypatch, cls, name):
        """Wraps cls.name (a method, or a module's function whose first argument is the module it runs)."""
        original = getattr(cls, name)
        owner = cls.__name__

        def wrapped(module, *args, **kwargs):
            self.calls.append((owner, name, id(module), tuple(self._fact(a) for a in args),
                               tuple(sorted((k, self._fact(v)) for k, v in kwargs.items()))))
            return original(module, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapped)

    def _wrap_op(self, monkeypatch, name):
        original = getattr(ops, name)

        def wrapped(*args, **kwargs):
            self.calls.append(("ops", name, tuple(self._fact(a) for a in args),
                               tuple(sorted((k, self._fact(v)) for k, v in kwargs.items()))))
            return original(*args, **kwargs)

        monkeypatch.setattr(ops, name, wrapped)


def _online_states(num_layers, batch, decode_skips):
    """None, every FFN still learning (with and without conditional nodes), and a settled state
    with some FFNs gated off for every sequence and others decided to run."""
    candidates = [2 * i + 1 for i in range(num_layers) if 2 * i + 1 not in decode_skips]
    learning = OnlineGates.start(num_layers, batch, candidates, "cpu")
    conditional = OnlineGates.start(num_layers, batch, candidates, "cpu", conditional=True)
    settled = OnlineGates.start(num_layers, batch, candidates, "cpu")
    settled.learning, settled.skipped = set(candidates[1:2]), set(candidates[:1])
    settled.gates[candidates[0]] = ops.GATE_SKIP
    return {"none": None, "learning": learning, "conditional": conditional, "settled": settled}


def _cases(models, plans):
    for (strategy, mode), p in plans.items():
        for dtype, batch in itertools.product(models, (1, 3)):
            model = models[dtype]
            yield (strategy, mode, dtype, batch, "prefill", "none", False), model, p.phase("prefill"), None, 5, None
            decode_skips = p.phase("decode").skip_scales
            for phase, step in (("decode-first", 0), ("decode-last", 7)):
                step_plan = p.phase("decode", step, 8)
                states = _online_states(NUM_LAYERS, batch, decode_skips) if p.online else {"none": None}
                for name, online in states.items():
                    for capturing in ((False, True) if name == "conditional" else (False,)):
                        update = (p.window, p.beta) if online is not None and online.learning else None
                        yield ((strategy, mode, dtype, batch, phase, name, capturing), model, step_plan, online, 1,
                               (update, capturing))


def test_equal_keys_if_and_only_if_forward_takes_the_same_path(models, plans, monkeypatch):
    tracer = _Tracer(monkeypatch)
    key_of_trace, trace_of_key, count = {}, {}, 0
    with torch.inference_mode():
        for label, model, step_plan, online, tokens, decode in _cases(models, plans):
            batch = label[3]
            ids = torch.randint(0, 101, (batch, tokens), generator=torch.Generator().manual_seed(1))
            tracer.calls.clear()
            if decode is None:  # a prefill chunk
                model.setup_caches(batch, 16)
                schedule = sch.schedule_step(model, batch=batch, tokens=tokens, plan=step_plan)
                model(ids, 0, kv_len=tokens, plan=step_plan)
            else:
                update, capturing = decode
                schedule = sch.schedule_step(model, batch=batch, tokens=1, plan=step_plan, online=online,
                                             capturing=capturing, online_update=update)
                model.setup_caches(batch, 16)
                state = DecodeState(batch, model.cache_len, 1, torch.device("cpu"))
                state.start(ids[:, 0], torch.full((batch,), 5), 4, torch.tensor([0]), state.sampling, None, None,
                            online)
                decode_one_token(model, state, schedule, shared_pos=5, kv_len=6)
            trace = tuple(tracer.calls)
            key = (schedule, model.cache_batch, model.cache_len)
            key_of_trace.setdefault(trace, set()).add(key)
            trace_of_key.setdefault(key, set()).add(trace)
            count += 1
    assert count >= 480
    # Equal keys -> the same path ...
    assert all(len(traces) == 1 for traces in trace_of_key.values())
    # ... and the same path -> equal keys (no key field that forward ignores).
    assert all(len(keys) == 1 for keys in key_of_trace.values())
    # The enumeration reached every action, and steps that coincide (e.g. the full model in
    # every mode) share one key, so both directions were exercised.
    actions = {step.action for key in trace_of_key for step in key[0].sublayers}
    assert actions == set(sch.ACTIONS) - {sch.RUN_GEMV}  # run-gemv: a GPU-only choice
    assert len(trace_of_key) < count


def test_forward_with_a_plan_equals_forward_with_its_schedule(models, plans):
    model = models[torch.float32]
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    p = plans[("greedy-loss", "e2e")]
    schedule = sch.schedule_step(model, batch=2, tokens=9, plan=p)
    with torch.inference_mode():
        assert torch.equal(model(ids, plan=p), model(ids, schedule=schedule))
        assert not torch.equal(model(ids), model(ids, schedule=schedule))


def test_plan_skips_cost_one_fused_launch(models, plans, monkeypatch):
    """A plan-skipped sublayer is one scale_rms_norm call and nothing else."""
    tracer = _Tracer(monkeypatch)
    model = models[torch.float32]
    p = plans[("shortgpt", "e2e")]  # two whole layers: four sublayers
    ids = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        model(ids, plan=p)
    names = [c[1] for c in tracer.calls]
    assert names.count("scale_rms_norm") == len(p.skip_scales) == 4
    assert names.count("fused_add_rms_norm") == 2 * NUM_LAYERS - 4
    assert names.count("forward") == NUM_LAYERS - 2 and names.count("dense") == NUM_LAYERS - 2
    scales = sorted(c[2][4] for c in tracer.calls if c[1] == "scale_rms_norm")
    assert scales == sorted(p.skip_scales.values())


def test_schedule_describes_each_path_and_rejects_mismatched_buffers(models, plans):
    model = models[torch.bfloat16]
    p = plans[("adaskip", "e2e")]
    online = _online_states(NUM_LAYERS, 2, p.skip_scales)["settled"]
    s = sch.schedule_step(model, batch=2, tokens=1, plan=p, online=online)
    text = s.describe()
    assert "gated-off" in text and "gated-gemv" in text and "skip" in text
    assert s.sublayers_with(sch.GATED_OFF) == sorted(online.skipped)
    ids = torch.zeros(2, 1, dtype=torch.long)
    model.setup_caches(2, 4)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="pass the OnlineGates"):
            model(ids, 0, kv_len=1, schedule=s)
        with pytest.raises(ValueError, match="statistics buffers"):
            model(ids, 0, kv_len=1, schedule=s, online=online, stats=ops.new_stats(8, 2))
        with pytest.raises(ValueError, match="1 x 1 tokens|2 x 1 tokens"):
            model(ids[:1], 0, kv_len=1, schedule=s, online=online)
        with pytest.raises(ValueError, match="a plan or a schedule"):
            model(ids, 0, kv_len=1, schedule=s, online=online, plan=p)
    with pytest.raises(ValueError, match="unknown sublayer action"):
        sch.SublayerStep("maybe")


@pytest.mark.parametrize("batch,tokens,dtype,device,bias,grad,gemv", [
    (1, 1, torch.bfloat16, "cuda", False, False, True),
    (2, 1, torch.float16, "cuda", False, False, True),
    (3, 1, torch.bfloat16, "cuda", False, False, False),  # cuBLAS from 3 sequences on
    (1, 2, torch.bfloat16, "cuda", False, False, False),  # more than one token per sequence
    (1, 1, torch.float32, "cuda", False, False, False),
    (1, 1, torch.bfloat16, "cuda", True, False, False),  # the GEMVs take no biases
    (1, 1, torch.bfloat16, "cuda", False, True, False),  # no backward through the GEMVs
    (1, 1, torch.bfloat16, "cpu", False, False, False),  # ungated CPU FFNs stay dense
])
def test_which_ffns_take_the_decode_gemvs(batch, tokens, dtype, device, bias, grad, gemv, monkeypatch):
    monkeypatch.setattr(ops, "HAS_EXTENSION", True)
    assert sch.ffn_prefers_gemv(batch, tokens, dtype, device, bias, grad) == gemv
    # Gated FFNs take them on the CPU too (the reference), where they serve the input.
    assert sch.gemv_serves(batch, tokens, dtype, "cpu", bias) == (batch <= 2 and tokens == 1 and not bias
                                                                  and dtype != torch.float32)
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    assert not sch.ffn_prefers_gemv(batch, tokens, dtype, "cuda", bias, grad)


def _fake_model(dtype, device, paths, head_dim=128, heads=32, kv_heads=8, bias=False):
    """What schedule_step reads of a model, on any device type (no GPU needed to decide)."""
    from types import SimpleNamespace

    from adaskip.runtime.config import ModelArgs

    args = ModelArgs(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=heads * head_dim,
                     intermediate_size=64, num_layers=2, norm_eps=1e-5, rope_theta=1e4,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, qkv_bias=bias)
    weight = SimpleNamespace(dtype=dtype, device=torch.device("meta") if device == "meta" else SimpleNamespace(type=device))
    return SimpleNamespace(args=args, lm_head=SimpleNamespace(weight=weight), attention_backend="sdpa",
                           decode_paths=paths)


@pytest.mark.parametrize("case", [
    # (paths, batch, tokens, dtype, device, grad, geometry, (attention, projections, lm_head))
    (("kernel", "gemv", "gemv"), 1, 1, torch.bfloat16, "cuda", False, {}, ("kernel", True, True)),
    (("kernel", "gemv", "gemv"), 2, 1, torch.float16, "cuda", False, {}, ("kernel", False, True)),  # proj: 1 seq
    (("kernel", "gemv", "gemv"), 3, 1, torch.bfloat16, "cuda", False, {}, ("kernel", False, False)),  # GEMVs: <= 2
    (("kernel", "gemv", "gemv"), 1, 2, torch.bfloat16, "cuda", False, {}, ("sdpa", False, False)),  # not decode
    (("kernel", "gemv", "gemv"), 1, 1, torch.float32, "cuda", False, {}, ("sdpa", False, False)),
    (("kernel", "gemv", "gemv"), 1, 1, torch.bfloat16, "cuda", True, {}, ("sdpa", False, False)),  # autograd
    (("kernel", "gemv", "gemv"), 1, 1, torch.bfloat16, "cpu", False, {}, ("sdpa", False, False)),
    (("sdpa", "cublas", "cublas"), 1, 1, torch.bfloat16, "cuda", False, {}, ("sdpa", False, False)),
    (("kernel", "gemv", "cublas"), 1, 1, torch.bfloat16, "cuda", False, {"head_dim": 96}, ("sdpa", True, False)),
    (("kernel", "cublas", "cublas"), 1, 1, torch.bfloat16, "cuda", False, {"heads": 32, "kv_heads": 2},
     ("sdpa", False, False)),  # 16 query heads per KV head
    (("kernel", "gemv", "gemv"), 1, 1, torch.bfloat16, "cuda", False, {"bias": True}, ("kernel", False, True)),
], ids=str)
def test_which_decode_steps_take_the_decode_kernels(case, monkeypatch):
    paths, batch, tokens, dtype, device, grad, geometry, want = case
    monkeypatch.setattr(ops, "HAS_EXTENSION", True)
    model = _fake_model(dtype, device, sch.DecodePaths(*paths), **geometry)
    s = sch.schedule_step(model, batch=batch, tokens=tokens, grad=grad)
    assert (s.decode_attention, s.gemv_projections, s.gemv_lm_head) == want
    # The fused rotary + KV write serves every GPU decode step, whatever the attention.
    assert s.decode_rotary == (tokens == 1 and device == "cuda" and not grad)
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)  # no extension: no kernels
    s = sch.schedule_step(model, batch=batch, tokens=tokens, grad=grad)
    assert (s.decode_attention, s.decode_rotary, s.gemv_projections, s.gemv_lm_head) == ("sdpa", False, False, False)


def test_decode_paths_name_what_they_expect():
    with pytest.raises(ValueError, match="decode path attention must be one of"):
        sch.DecodePaths(attention="flash")
    with pytest.raises(ValueError, match="decode path lm_head must be one of"):
        sch.DecodePaths(lm_head="gemm")
